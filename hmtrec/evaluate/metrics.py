"""Exact top-K ranking metrics from ranks.

The rank of a target is 1 + the number of candidates scored strictly higher + the number scored
equal with a lower index (a stable sort by descending score, ties broken by index). A target
outside the candidate set has rank = inf: a miss at every K.
"""

from __future__ import annotations

import math

import torch


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """scores [B, N], targets [B] (int), allowed [B, N] bool or None -> float ranks [B].
    Disallowed entries never outrank the target; a disallowed target gets rank inf."""
    target_scores = scores.gather(1, targets[:, None].long())
    higher = scores > target_scores
    columns = torch.arange(scores.shape[1], device=scores.device)[None, :]
    tied_before = (scores == target_scores) & (columns < targets[:, None])
    beats = higher | tied_before
    if allowed is not None:
        beats &= allowed
    ranks = 1.0 + beats.sum(1).to(torch.float64)
    if allowed is not None:
        inside = allowed.gather(1, targets[:, None].long()).squeeze(1)
        ranks = torch.where(inside, ranks, torch.full_like(ranks, math.inf))
    return ranks


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
