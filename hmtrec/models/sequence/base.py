"""The contract every sequence model keeps, neural or not.

A batch is what `hmtrec.data.sequences.collate_windows` makes: `inputs [B, T]` and
`targets [B, T]` (leaf indices, PAD = -1), optionally `input_times`, `target_times`, `input_types`.
`targets[b, t]` is the leaf that follows `inputs[b, :t+1]`.

- `predict(batch) -> {level_name: scores [M, n_nodes(level)]}` for the M positions where
  targets != PAD, in row-major order (the order of `batch["targets"][batch["targets"] != PAD]`).
  Higher is better. The leaf level's key is `taxonomy.leaf_level`.
- `loss(batch) -> (scalar, {part: float})` for models trained by `hmtrec.train.Trainer`
  (`trainable = True`); models with `trainable = False` learn in `fit(train)` instead.
- `score_next(histories) -> {level_name: scores [Q, n_nodes(level)]}`: the scores of the event after
  each history (inference: there is no target). Its default asks `predict` for a query batch, which
  carries `score_at [B, T]` (True where to score) instead of targets; `target_positions` reads either.
"""

from __future__ import annotations

import torch
from torch import nn

from hmtrec.data.sequences import PAD, SequenceData
from hmtrec.data.taxonomy import Taxonomy
from hmtrec.models.families import SEQUENCE_WINDOWS


class SequenceRecommender(nn.Module):
    trainable: bool = True
    batch_contracts: tuple[str, ...] = (SEQUENCE_WINDOWS,)   # the batches it reads (hmtrec.models.families)

    def __init__(self, taxonomy: Taxonomy):
        super().__init__()
        self.taxonomy = taxonomy

    @property
    def levels(self) -> list[str]:
        """Names of the taxonomy levels this model scores (those `predict` returns)."""
        return [self.taxonomy.leaf_level]

    def fit(self, train: SequenceData) -> None:
        """Learn from training sequences without gradient steps (statistics, neighbours)."""

    def predict(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def score_next(self, histories: torch.Tensor) -> dict[str, torch.Tensor]:
        """histories [Q, T]: leaf indices oldest first, right-padded with PAD (every row has at
        least one event) -> {level: scores [Q, n_nodes(level)]} for the event after each history."""
        return self.predict(query_batch(histories))


def target_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Boolean [B, T]: where a prediction is wanted (a query batch's `score_at`, else the targets)."""
    if "score_at" in batch:
        return batch["score_at"]
    return batch["targets"] != PAD


def query_batch(histories: torch.Tensor) -> dict[str, torch.Tensor]:
    """A batch that asks for one prediction per row, after its last event: inputs [Q, T] (PAD after
    each history) and `score_at` [Q, T] True at each row's last event. No targets."""
    lengths = (histories != PAD).sum(1)
    if histories.ndim != 2 or bool((lengths == 0).any()):
        raise ValueError("score_next needs histories [Q, T] with at least one event per row")
    score_at = torch.zeros(histories.shape, dtype=torch.bool, device=histories.device)
    score_at[torch.arange(histories.shape[0], device=histories.device), lengths - 1] = True
    return {"inputs": histories, "score_at": score_at}
