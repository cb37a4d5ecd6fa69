"""The contract every sequence model keeps, neural or not.

A batch is what `hmtrec.data.sequences.collate_windows` makes: `inputs [B, T]` and
`targets [B, T]` (leaf indices, PAD = -1), optionally `input_times`, `target_times`, `input_types`.
`targets[b, t]` is the leaf that follows `inputs[b, :t+1]`.

- `predict(batch) -> {level_name: scores [M, n_nodes(level)]}` for the M positions where
  targets != PAD, in row-major order (the order of `batch["targets"][batch["targets"] != PAD]`).
  Higher is better. The leaf level's key is `taxonomy.leaf_level`.
- `loss(batch) -> (scalar, {part: float})` for models trained by `hmtrec.train.Trainer`
  (`trainable = True`); models with `trainable = False` learn in `fit(train)` instead.
"""

from __future__ import annotations

import torch
from torch import nn

from hmtrec.data.sequences import PAD, SequenceData
from hmtrec.data.taxonomy import Taxonomy


class SequenceRecommender(nn.Module):
    trainable: bool = True

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


def target_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Boolean [B, T]: where a prediction is wanted."""
    return batch["targets"] != PAD
