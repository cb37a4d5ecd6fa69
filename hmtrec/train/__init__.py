"""One training loop for every torch model, checkpoints and run directories.

The package is also callable: `hmtrec.train(config, run_dir=None) -> hmtrec.Run` trains a config
(a YAML path, a mapping or a validated config) and returns the finished run (`hmtrec.api.train`)."""

import sys
import types


class _CallablePackage(types.ModuleType):
    # `hmtrec.train` is both this subpackage and the top-level training call of the Python API.
    def __call__(self, config, run_dir=None, **options):
        from hmtrec.api import train

        return train(config, run_dir, **options)


sys.modules[__name__].__class__ = _CallablePackage
