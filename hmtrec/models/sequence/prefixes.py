"""The history ("prefix") behind every prediction of a batch, for models that do not read the
sequence causally themselves (session popularity, session-kNN).

A batch from `collate_windows` holds `inputs [B, T]` and `targets [B, T]`; the prediction for
`targets[b, t]` may use `inputs[b, :t + 1]` only. `target_prefixes` lays those prefixes out as one
row per target position, in the row-major order `predict` must return its scores in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hmtrec.data.sequences import PAD
from hmtrec.models.sequence.base import target_positions


@dataclass
class Prefixes:
    items: torch.Tensor      # long [M, T]: inputs[row, :position + 1], PAD after the prefix
    lengths: torch.Tensor    # long [M]: events in each prefix (PAD inputs excluded)
    rows: torch.Tensor       # long [M]: batch row of each target
    positions: torch.Tensor  # long [M]: position t of each target within its row

    @property
    def n_queries(self) -> int:
        return int(self.items.shape[0])


def target_prefixes(batch: dict[str, torch.Tensor]) -> Prefixes:
    inputs = batch["inputs"]
    rows, positions = torch.nonzero(target_positions(batch), as_tuple=True)  # row-major, as predict requires
    width = inputs.shape[1]
    within = torch.arange(width, device=inputs.device)[None, :] <= positions[:, None]
    items = torch.where(within, inputs[rows], torch.full_like(inputs[rows], PAD))
    return Prefixes(items=items, lengths=(items != PAD).sum(1), rows=rows, positions=positions)
