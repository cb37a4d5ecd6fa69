"""The config kinds: each module here is one `hmtrec.lifecycle.RunKind` (its config model, data,
batches, the fit of one model, evaluation and printing); the lifecycle itself (train / evaluate /
load, the run directory's guarantees) is `hmtrec.lifecycle`, written once for every kind.

    get_pipeline("sequence").train(config, run_dir)      # hmtrec.lifecycle.train(kind, config, run_dir)
    get_pipeline("ranking").evaluate(run_dir, ["eval.groups=[user_activity]"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from hmtrec.config import KIND_MODULES as PIPELINE_MODULES  # noqa: F401 (older name)
from hmtrec.lifecycle import RunKind, get_kind


class Pipeline(Protocol):
    def train(self, config: Any, run_dir: Path) -> dict: ...

    def evaluate(self, run_dir: Path, overrides: list[str]) -> dict: ...


def get_pipeline(kind: str) -> RunKind:
    """The kind's part of the lifecycle, with `train(config, run_dir)` and `evaluate(run_dir, overrides)`."""
    return get_kind(kind)
