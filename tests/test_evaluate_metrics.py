"""Exact ranks and metric sums against sort-based references, including wide catalogues whose row
counts cross the int16 block boundary of `count_true`."""

import math

import numpy as np
import pytest
import torch

from hmtrec.evaluate.metrics import (beats_target, count_true, metric_sums, metrics_from_ranks, ranks_from_beats,
                                     target_ranks)


def sorted_rank(scores: np.ndarray, target: int, allowed: np.ndarray | None = None) -> float:
    """Rank by a stable sort on descending score (ties by index), among the allowed entries."""
    pool = np.arange(len(scores)) if allowed is None else np.flatnonzero(allowed)
    if target not in pool:
        return math.inf
    order = pool[np.lexsort((pool, -scores[pool]))]
    return float(np.flatnonzero(order == target)[0] + 1)


@pytest.mark.parametrize("n_columns", [7, 16384, 40_000])
def test_ranks_equal_sort_reference_with_ties(n_columns):
    generator = torch.Generator().manual_seed(n_columns)
    scores = torch.randint(0, 3, (6, n_columns), generator=generator).float()   # ties everywhere
    scores[0] = torch.arange(n_columns).float()                                 # a row without ties
    targets = torch.randint(0, n_columns, (6,), generator=generator)
    allowed = torch.rand(6, n_columns, generator=generator) < 0.5
    allowed[1, targets[1]] = False
    allowed[2, targets[2]] = True
    got = target_ranks(scores, targets)
    got_allowed = target_ranks(scores, targets, allowed)
    for row in range(6):
        assert got[row] == sorted_rank(scores[row].numpy(), int(targets[row]))
        assert got_allowed[row] == sorted_rank(scores[row].numpy(), int(targets[row]), allowed[row].numpy())
    assert got_allowed[1] == math.inf and math.isfinite(got_allowed[2])
    assert got[0] == n_columns - int(targets[0])
    beats = beats_target(scores, targets)
    assert torch.equal(ranks_from_beats(beats, targets, allowed), got_allowed)
    assert torch.equal(ranks_from_beats(beats, targets), got)  # beats was not modified in place


def test_ranks_when_only_a_few_rows_have_ties():
    """Few tied rows take the row-indexed tie path, many take the in-place one: same ranks."""
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(40, 300, generator=generator)
    targets = torch.randint(0, 300, (40,), generator=generator)
    scores[7, :] = 1.0                                  # one row entirely tied
    scores[21, targets[21] + 1:] = scores[21, targets[21]]   # ties after the target only: no effect
    ranks = target_ranks(scores, targets)
    for row in range(40):
        assert ranks[row] == sorted_rank(scores[row].numpy(), int(targets[row]))
    assert ranks[7] == int(targets[7]) + 1


def test_count_true_across_blocks():
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 70_000, generator=generator) < 0.9
    mask[2] = True                                        # 70,000 > int16 range: must not overflow
    assert count_true(mask).tolist() == mask.sum(1).tolist()
    assert count_true(mask)[2] == 70_000


def test_metric_sums_equal_reference():
    ranks = torch.tensor([1.0, 2.0, 3.0, 10.0, 11.0, math.inf, 20.0])
    sums = metric_sums(ranks, [1, 10, 20])
    for k in (1, 10, 20):
        hits = [r for r in ranks.tolist() if r <= k]
        assert sums[f"Recall@{k}"] == len(hits)
        assert sums[f"MRR@{k}"] == pytest.approx(sum(1 / r for r in hits))
        assert sums[f"NDCG@{k}"] == pytest.approx(sum(1 / math.log2(r + 1) for r in hits))
    assert metrics_from_ranks(ranks, [10])["Recall@10"] == pytest.approx(4 / 7)
