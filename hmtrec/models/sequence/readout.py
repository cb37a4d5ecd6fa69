"""Session-model readouts over a causal encoder's outputs, at the target positions only.

Both read the encodings h_0..h_t of one window up to a target position t (never later ones, so
they keep the encoder's causality), for the M target positions of a batch at once ([M, T, D]
work, so a long window with one target — the leave-one-out case — costs one row, not T).

- `AttentionReadout` (SR-GNN, Wu et al. 2019; STAMP, Liu et al. 2018): the session vector is
  W_out [h_t ; s_t] with s_t = Σ_{j≤t} α_tj h_j and α_tj = qᵀ σ(W_1 h_t + W_2 h_j + c) — the last
  item's encoding next to an attention summary of the whole session. With `reversed_positions`
  (GCE-GNN, Wang et al. 2020) the attention also sees an embedding of t - j, the distance from
  the end of the session, which means the same thing whatever the session's length.
- `RepeatExplore` (a RepeatNet-like copy mechanism, Ren et al. 2019): with probability r_t the
  next item is a repeat, drawn from the session's own items with attention weights
  β_tj = softmax_j(qᵀ tanh(W_1 h_t + W_2 h_j)); otherwise it is drawn from the model's catalogue
  distribution p_explore. So p(i) = (1 - r_t) p_explore(i) + r_t Σ_{j≤t: x_j = i} β_tj, with
  r_t = σ(w · [h_t ; Σ_j β_tj h_j] + b).
"""

from __future__ import annotations

import torch
from torch import nn

from hmtrec.data.sequences import PAD

# log of the smallest repeat mass kept: an item outside the session has none, and log 0 has no gradient
_LOG_FLOOR_MASS = 1e-30


def _history(hidden: torch.Tensor, valid: torch.Tensor, at: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the M target positions `at` [B, T]: their window row [M], position t [M], the window's
    encodings [M, T, D] and which of them a row may read [M, T] (valid and j <= t)."""
    rows, positions = torch.nonzero(at, as_tuple=True)
    length = hidden.shape[1]
    readable = valid[rows] & (torch.arange(length, device=hidden.device)[None, :] <= positions[:, None])
    return rows, positions, hidden[rows], readable


class AttentionReadout(nn.Module):
    def __init__(self, dim: int, max_len: int, reversed_positions: bool = False):
        super().__init__()
        self.last = nn.Linear(dim, dim)                  # W_1 h_t + c
        self.each = nn.Linear(dim, dim, bias=False)      # W_2 h_j
        self.score = nn.Linear(dim, 1, bias=False)       # q
        self.out = nn.Linear(2 * dim, dim, bias=False)   # W_out
        self.distance = None
        if reversed_positions:
            self.distance = nn.Embedding(max_len, dim)
            nn.init.normal_(self.distance.weight, std=0.02)

    def forward(self, hidden: torch.Tensor, valid: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, D], valid [B, T], at [B, T] -> session vectors [M, D] (row-major order of `at`)."""
        rows, positions, history, readable = _history(hidden, valid, at)
        last = hidden[at]
        pre = self.last(last)[:, None, :] + self.each(history)                       # [M, T, D]
        if self.distance is not None:
            steps = torch.arange(hidden.shape[1], device=hidden.device)
            back = (positions[:, None] - steps[None, :]).clamp(0, self.distance.num_embeddings - 1)
            pre = pre + self.distance(back)
        alpha = self.score(torch.sigmoid(pre)).squeeze(-1) * readable                 # [M, T]
        summary = torch.einsum("mt,mtd->md", alpha, history)
        return self.out(torch.cat([last, summary], dim=-1))


class RepeatExplore(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.last = nn.Linear(dim, dim)
        self.each = nn.Linear(dim, dim, bias=False)
        self.score = nn.Linear(dim, 1, bias=False)
        self.gate = nn.Linear(2 * dim, 1)

    def forward(self, hidden: torch.Tensor, inputs: torch.Tensor, valid: torch.Tensor, at: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (β [M, T]: repeat weights over the window's positions, 0 where unreadable; the items
        at those positions [M, T] (PAD where unreadable); log r [M] and log(1 - r) [M] stacked as [M, 2])."""
        rows, _, history, readable = _history(hidden, valid, at)
        last = hidden[at]
        energy = self.score(torch.tanh(self.last(last)[:, None, :] + self.each(history))).squeeze(-1)
        beta = torch.softmax(energy.float().masked_fill(~readable, float("-inf")), dim=-1)   # a row reads j = t at least
        context = torch.einsum("mt,mtd->md", beta.to(history.dtype), history)
        gate = self.gate(torch.cat([last, context], dim=-1)).squeeze(-1).float()
        log_gate = torch.stack([nn.functional.logsigmoid(gate), nn.functional.logsigmoid(-gate)], dim=-1)
        items = torch.where(readable, inputs[rows], torch.full_like(inputs[rows], PAD))
        return beta, items, log_gate

    @staticmethod
    def row_nll(explore_nll: torch.Tensor, beta: torch.Tensor, items: torch.Tensor, log_gate: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
        """-log p(target) per row [M], from the explore distribution's -log p_explore(target) [M]."""
        repeat_mass = (beta * (items == targets[:, None])).sum(-1)
        repeat = log_gate[:, 0] + repeat_mass.clamp_min(_LOG_FLOOR_MASS).log()
        explore = log_gate[:, 1] - explore_nll
        return -torch.logaddexp(repeat, explore)

    @staticmethod
    def log_probabilities(explore_log_p: torch.Tensor, beta: torch.Tensor, items: torch.Tensor,
                          log_gate: torch.Tensor) -> torch.Tensor:
        """log p(i) [M, N] of the mixture, from log p_explore [M, N], which it overwrites (the caller's
        fresh tensor: at a million items each [M, N] copy is most of evaluation's memory). Only the
        session's own items (at most T per row) get repeat mass, so they are fixed up after one
        dense pass."""
        out = explore_log_p.add_(log_gate[:, 1:])
        real = items != PAD
        # each position's item's total repeat mass (an item may sit at several positions)
        same = (items[:, :, None] == items[:, None, :]) & real[:, :, None] & real[:, None, :]
        mass = (same * beta[:, None, :]).sum(-1)
        row = torch.arange(out.shape[0], device=out.device)[:, None].expand_as(items)[real]
        column = items[real]
        # an item at several positions gets the same value from each, so the write order is moot
        out[row, column] = torch.logaddexp(out[row, column], log_gate[row, 0] + mass[real].clamp_min(_LOG_FLOOR_MASS).log())
        return out
