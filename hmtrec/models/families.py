"""Model families, defined by the batches a model reads (its batch contract), not by its class.

- sequence windows (`hmtrec.data.sequences.collate_windows`): `inputs [B, T]`, `targets [B, T]`
  (PAD = -1, every position a target), optional times and types; `predict` scores every target,
  `score_next(histories)` the event after each history (inference: no target is invented);
- geo action streams (`hmtrec.data.actions.ActionStreams.batch`): one example per row, its action
  tokens before the prediction time and one target destination; `predict` gives log-probabilities
  per level for every example, and for an inference query (`ActionStreams.query`: the actions
  before t, no target);
- multi-task rows (`hmtrec.data.features.EncodedRows.batch`): encoded feature rows with a label per
  task head; `predict` gives one score per row and task.

Every model says which contracts it reads in `batch_contracts`; a config kind feeds one contract,
and `hmtrec.lifecycle` refuses a model of another family before anything is trained
(`check_family`), e.g. the geo action-token transformer named in a sequence config.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from hmtrec.errors import ConfigError

SEQUENCE_WINDOWS = "sequence windows"
GEO_ACTIONS = "geo action streams"
MULTI_TASK_ROWS = "multi-task rows"


class _LevelModel(Protocol):
    """What every model predicting on taxonomy levels has: trained (when `trainable`) or fitted,
    log-probabilities per level."""

    batch_contracts: tuple[str, ...]
    trainable: bool

    @property
    def levels(self) -> list[str]: ...

    def fit(self, train) -> None: ...

    def predict(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]: ...


@runtime_checkable
class SequenceWindowModel(_LevelModel, Protocol):
    """Trained on causal windows (when `trainable`), else fitted; scores the next event."""

    def score_next(self, histories: torch.Tensor) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class GeoActionModel(_LevelModel, Protocol):
    """Trained on (or fitted to) action-stream examples; log-probabilities per level per example."""


@runtime_checkable
class MultiTaskRowModel(Protocol):
    """Trained on encoded feature rows; one score per row and task head."""

    batch_contracts: tuple[str, ...]
    task_names: list[str]

    def predict(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]: ...


FAMILIES: dict[str, type] = {SEQUENCE_WINDOWS: SequenceWindowModel, GEO_ACTIONS: GeoActionModel,
                             MULTI_TASK_ROWS: MultiTaskRowModel}
_KIND_OF = {SEQUENCE_WINDOWS: "sequence", GEO_ACTIONS: "geo", MULTI_TASK_ROWS: "ranking"}


def check_family(model, contract: str, label: str) -> None:
    """Refuse a model that does not read `contract`'s batches, naming the config kind it belongs to,
    or one that lacks a member of its family's protocol."""
    reads = tuple(getattr(model, "batch_contracts", ()))
    if contract not in reads:
        kinds = [_KIND_OF[c] for c in reads if c in _KIND_OF]
        where = f"; use it in a {' or '.join(kinds)} config" if kinds else ""
        raise ConfigError(f"model {label!r} does not read {contract} (it reads {list(reads) or 'nothing known'})"
                          f"{where}")
    protocol = FAMILIES[contract]
    if not isinstance(model, protocol):
        members = set(protocol.__annotations__) | {name for name in vars(protocol) if not name.startswith("_")}
        missing = sorted(name for name in members if not hasattr(model, name))
        raise ConfigError(f"model {label!r} claims {contract} but lacks {missing}")
