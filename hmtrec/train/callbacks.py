"""Process-wide listeners on every Trainer's epochs, so tools that watch training from outside
(`hmtrec tune` reporting to its pruner, MLflow tracking) need no parameter threaded through each
pipeline. A listener is called as `listener(trainer, state)` after each epoch's checkpoint is saved;
an exception it raises (e.g. `optuna.TrialPruned`) stops the training and propagates to the caller.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

EpochListener = Callable[[Any, Any], None]
_LISTENERS: list[EpochListener] = []


@contextmanager
def epoch_listener(listener: EpochListener) -> Iterator[None]:
    """Call `listener(trainer, state)` after every epoch of every Trainer inside the `with` block."""
    _LISTENERS.append(listener)
    try:
        yield
    finally:
        _LISTENERS.remove(listener)


def notify_epoch_end(trainer, state) -> None:
    for listener in list(_LISTENERS):
        listener(trainer, state)
