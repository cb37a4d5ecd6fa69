"""Exact top-K ranking metrics from ranks.

The rank of a target is 1 + the number of candidates scored strictly higher + the number scored
equal with a lower index (a stable sort by descending score, ties broken by index). A target
outside the candidate set has rank = inf: a miss at every K.
"""

from __future__ import annotations

import math

import torch


# Row sums of a boolean matrix are accumulated in int16 over column blocks narrower than the int16
# range: on CPU this is an order of magnitude faster than a plain int64 sum of booleans.
_COUNT_BLOCK = 16384


def count_true(mask: torch.Tensor) -> torch.Tensor:
    """Number of True entries in each row of a bool [B, N] matrix, as int64 [B]."""
    counts = torch.zeros(mask.shape[0], dtype=torch.int64, device=mask.device)
    as_bytes = mask.view(torch.uint8)
    for start in range(0, mask.shape[1], _COUNT_BLOCK):
        counts += as_bytes[:, start:start + _COUNT_BLOCK].sum(1, dtype=torch.int16)
    return counts


def beats_target(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """bool [B, N]: the entries ranked ahead of each row's target, i.e. scored higher, or scored
    equal with a lower index."""
    targets = targets[:, None].long()
    target_scores = scores.gather(1, targets)
    beats = scores > target_scores
    ties = scores == target_scores          # includes the target itself
    tied_rows = torch.nonzero(count_true(ties) > 1).squeeze(1)
    columns = torch.arange(scores.shape[1], device=scores.device)[None, :]
    if 8 * len(tied_rows) > len(targets):   # many tied rows (e.g. count-based scores): in place
        ties &= columns < targets
        beats |= ties
    elif len(tied_rows):                    # a few tied rows: only they pay for the index comparison
        beats[tied_rows] |= ties[tied_rows] & (columns < targets[tied_rows])
    return beats


def ranks_from_beats(beats: torch.Tensor, targets: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 ranks [B] from `beats_target`'s mask; with `allowed` [B, N], only allowed entries
    count and a disallowed target gets rank inf. `beats` is left unchanged."""
    if allowed is None:
        return 1.0 + count_true(beats).to(torch.float64)
    ranks = 1.0 + count_true(beats & allowed).to(torch.float64)
    inside = allowed.gather(1, targets[:, None].long()).squeeze(1)
    return torch.where(inside, ranks, torch.full_like(ranks, math.inf))


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """scores [B, N], targets [B] (int), allowed [B, N] bool or None -> float64 ranks [B].
    Disallowed entries never outrank the target; a disallowed target gets rank inf."""
    return ranks_from_beats(beats_target(scores, targets), targets, allowed)


def metric_names(ks: list[int]) -> list[str]:
    return [f"{name}@{k}" for k in ks for name in ("Recall", "MRR", "NDCG")]


def metric_sums(ranks: torch.Tensor, ks: list[int]) -> dict[str, float]:
    """Sums (not means) of Recall@K, MRR@K and NDCG@K over the ranks, so chunks add up exactly."""
    ranks = ranks.to(torch.float64)
    out = {}
    for k in ks:
        hit = ranks <= k
        out[f"Recall@{k}"] = float(hit.sum())
        out[f"MRR@{k}"] = float(torch.where(hit, 1.0 / ranks, torch.zeros_like(ranks)).sum())
        out[f"NDCG@{k}"] = float(torch.where(hit, 1.0 / torch.log2(ranks + 1.0), torch.zeros_like(ranks)).sum())
    return out


def metrics_from_ranks(ranks: torch.Tensor, ks: list[int]) -> dict[str, float]:
    n = max(len(ranks), 1)
    return {name: value / n for name, value in metric_sums(ranks, ks).items()}
