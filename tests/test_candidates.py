"""Candidate generation and bounded-memory scoring against hand-computed and brute-force results."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from hmtrec.data.taxonomy import Taxonomy
from hmtrec.serve.candidates import (adaptive_node_mask, aggregate_leaf_scores, candidate_leaf_index,
                                     candidate_leaf_mask, candidate_node_mask, candidate_topk, descendant_mask,
                                     full_topk, k_for_fraction, NodeBlocks, row_chunks, top_nodes)


def taxonomy_abc() -> Taxonomy:
    """A = items {0, 1, 2}, B = {3}, C = {4, 5}."""
    return Taxonomy.from_table(pd.DataFrame({"cat": list("AAABCC"), "item": list("012345")}), ["cat", "item"])


def random_taxonomy(n_items=300, n_cats=25, n_depts=4, seed=0) -> Taxonomy:
    rng = np.random.default_rng(seed)
    dept_of_cat = np.r_[np.arange(n_depts), rng.integers(0, n_depts, n_cats - n_depts)]
    cat_of_item = np.r_[np.arange(n_cats), rng.integers(0, n_cats, n_items - n_cats)]
    return Taxonomy.from_table(pd.DataFrame({"dept": [f"d{dept_of_cat[c]}" for c in cat_of_item],
                                             "cat": [f"c{c:02d}" for c in cat_of_item],
                                             "item": [f"i{i:03d}" for i in range(n_items)]}),
                               ["dept", "cat", "item"])


def test_top_nodes_breaks_ties_by_lower_index():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    assert top_nodes(scores, 2).tolist() == [[1, 2], [0, 1]]
    assert top_nodes(scores, 10).tolist() == [[1, 2, 0, 3], [0, 1, 2, 3]]
    with pytest.raises(ValueError, match="k must be >= 1"):
        top_nodes(scores, 0)


def test_k_for_fraction():
    taxonomy = random_taxonomy()
    assert k_for_fraction(taxonomy, "cat", 0.3) == 8          # round(0.3 * 25) = round(7.5) = 8
    assert k_for_fraction(taxonomy, "cat", 0.001) == 1
    assert k_for_fraction(taxonomy, "cat", 1.0) == 25
    assert k_for_fraction(taxonomy, "dept", 0.5) == 2
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        k_for_fraction(taxonomy, "cat", 0.0)


def test_adaptive_mask_hand_case():
    counts = torch.tensor([3, 1, 2])                      # A, B, C of taxonomy_abc; 6 leaves
    scores = torch.tensor([[0.0, 5, 1], [2.0, 0, 1], [0.0, 0, 9], [1.0, 1, 1]])
    mask = adaptive_node_mask(scores, counts, 0.5)        # until 3 leaves are reached
    assert mask.tolist() == [[False, True, True],         # B (1) + C (2) = 3
                             [True, False, False],        # A (3)
                             [True, False, True],         # C (2) + A (3): crosses the target, kept
                             [True, False, False]]        # tie: A first
    tiny = adaptive_node_mask(scores, counts, 0.01)
    assert tiny.sum(1).tolist() == [1, 1, 1, 1]           # always at least one node
    assert adaptive_node_mask(scores, counts, 1.0).all()


def test_candidate_leaf_mask_agrees_with_taxonomy_and_brute_force():
    taxonomy = random_taxonomy()
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (50, taxonomy.n_nodes("cat")), generator=generator).float()
    mask = candidate_leaf_mask(scores, taxonomy, "cat", mode="fixed_k", k=4)
    assert torch.equal(mask, taxonomy.candidate_mask(top_nodes(scores, 4), "cat"))
    counts = taxonomy.leaf_counts("cat")
    adaptive = candidate_leaf_mask(scores, taxonomy, "cat", fraction=0.2)
    parent = taxonomy.ancestor_table("cat")
    for row in range(len(scores)):
        order = sorted(range(scores.shape[1]), key=lambda j: (-float(scores[row, j]), j))
        chosen, taken = [], 0
        for node in order:
            if chosen and taken >= 0.2 * taxonomy.n_leaves:
                break
            chosen.append(node)
            taken += counts[node]
        expected = np.isin(parent, chosen)
        assert adaptive[row].numpy().tolist() == expected.tolist()
    assert adaptive.sum(1).float().mean() / taxonomy.n_leaves >= 0.2


def test_candidate_node_mask_arguments_are_checked():
    taxonomy = taxonomy_abc()
    scores = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="adaptive candidates need a fraction"):
        candidate_node_mask(scores, taxonomy, "cat")
    with pytest.raises(ValueError, match="not k"):
        candidate_node_mask(scores, taxonomy, "cat", k=2, fraction=0.5)
    with pytest.raises(ValueError, match="need k or fraction"):
        candidate_node_mask(scores, taxonomy, "cat", mode="fixed_k")
    with pytest.raises(ValueError, match=r"shape \(2, 4\) for level 'cat' with 3 nodes"):
        candidate_node_mask(torch.zeros(2, 4), taxonomy, "cat", k=1, mode="fixed_k")


def test_descendant_mask():
    taxonomy = random_taxonomy()
    dept_mask = torch.tensor([[True, False, False, True], [False, False, False, False]])
    cats = descendant_mask(dept_mask, taxonomy, "dept", "cat")
    dept_of_cat = taxonomy.node_ancestors(np.arange(25), "cat", "dept")
    assert cats[0].numpy().tolist() == np.isin(dept_of_cat, [0, 3]).tolist()
    assert not cats[1].any()
    with pytest.raises(ValueError, match="coarser"):
        descendant_mask(cats, taxonomy, "cat", "dept")


def test_aggregate_leaf_scores():
    taxonomy = taxonomy_abc()
    scores = torch.tensor([[0.5, -1.0, 2.0, 0.0, 1.0, 3.0]])
    summed = aggregate_leaf_scores(scores, taxonomy, "cat")
    values = scores[0].tolist()
    expected = [math.log(sum(math.exp(v) for v in values[:3])), values[3],
                math.log(math.exp(values[4]) + math.exp(values[5]))]
    assert summed[0].tolist() == pytest.approx(expected, rel=1e-6)
    assert aggregate_leaf_scores(scores, taxonomy, "cat", "max")[0].tolist() == [2.0, 0.0, 3.0]
    huge = aggregate_leaf_scores(scores * 1000, taxonomy, "cat")  # no overflow: shifted by the row max
    assert torch.isfinite(huge[0, 2]) and huge[0].argmax() == 2
    # a node without leaves (built by hand) scores -inf
    empty = Taxonomy(["cat", "item"], [["A", "B", "C"], ["0", "1"]], [None, np.array([0, 2])])
    assert aggregate_leaf_scores(torch.zeros(1, 2), empty, "cat")[0, 1] == -math.inf
    assert aggregate_leaf_scores(torch.zeros(1, 2), empty, "cat", "max")[0, 1] == -math.inf
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate_leaf_scores(scores, taxonomy, "cat", "mean")


def test_row_chunks_respect_the_budget():
    chunks = list(row_chunks(10, 1000, budget_mb=3 * 4000 / 2**20))
    assert [c.stop - c.start for c in chunks] == [3, 3, 3, 1]
    assert [c.stop - c.start for c in row_chunks(2, 10**9, budget_mb=1)] == [1, 1]


def test_candidate_leaf_index_lists_the_leaves_under_each_rows_nodes():
    taxonomy = random_taxonomy()
    generator = torch.Generator().manual_seed(1)
    nodes = top_nodes(torch.rand(20, 25, generator=generator), 3)
    index = candidate_leaf_index(taxonomy, "cat", nodes)
    for row in range(len(nodes)):
        leaves = index[row][index[row] >= 0].numpy()
        assert sorted(leaves.tolist()) == taxonomy.leaves_under(nodes[row].numpy(), "cat").tolist()
        assert (index[row][len(leaves):] == -1).all()
    assert index.shape[1] == max(len(taxonomy.leaves_under(n.numpy(), "cat")) for n in nodes)


def test_full_and_candidate_topk_equal_brute_force():
    taxonomy = random_taxonomy()
    generator = torch.Generator().manual_seed(2)
    queries = torch.randn(16, 8, generator=generator)
    leaves = torch.randn(taxonomy.n_leaves, 8, generator=generator)
    full_scores = queries @ leaves.T
    expected = torch.topk(full_scores, 10, dim=1)
    budget = 16 * 7 * 4 / 2**20                     # 7 leaves per chunk: many merges
    scores, found = full_topk(queries, leaves, 10, budget_mb=budget)
    assert torch.equal(found, expected.indices) and torch.allclose(scores, expected.values)

    nodes = top_nodes(torch.randn(16, 25, generator=generator), 2)
    scores, found = candidate_topk(queries, leaves, taxonomy, "cat", nodes, 10)
    allowed = taxonomy.candidate_mask(nodes, "cat")
    masked = torch.topk(full_scores.masked_fill(~allowed, -math.inf), 10, dim=1)
    real = torch.isfinite(masked.values)
    assert torch.equal(found[real], masked.indices[real]) and (found[~real] == -1).all()
    assert torch.allclose(scores[real], masked.values[real])


def test_adaptive_nodes_are_the_adaptive_mask_best_first_with_ties_by_lower_index():
    from hmtrec.serve.candidates import adaptive_nodes

    generator = torch.Generator().manual_seed(3)
    for trial in range(60):
        n_nodes = int(torch.randint(1, 120, (1,), generator=generator))
        scores = torch.randn(5, n_nodes, generator=generator)
        if trial % 2:   # many exact ties, also across the first guess's boundary
            scores = torch.randint(0, 3, (5, n_nodes), generator=generator).float()
        counts = torch.randint(0, 30, (n_nodes,), generator=generator)
        counts[0] += 1
        fraction = float(torch.rand(1, generator=generator)) * 0.6 + 0.01
        nodes = adaptive_nodes(scores, counts, fraction, first_guess=1 + trial % 7)
        mask = adaptive_node_mask(scores, counts, fraction)
        assert nodes.shape[1] == int(mask.sum(1).max())
        for row in range(len(scores)):
            taken = nodes[row][nodes[row] >= 0]
            assert set(taken.tolist()) == set(torch.nonzero(mask[row]).flatten().tolist())
            expected = sorted(taken.tolist(), key=lambda node: (-float(scores[row, node]), node))
            assert taken.tolist() == expected


def test_candidate_leaf_index_skips_padding_and_lists_candidates_as_node_blocks_do():
    taxonomy = random_taxonomy()
    generator = torch.Generator().manual_seed(4)
    nodes = top_nodes(torch.rand(12, 25, generator=generator), 4)
    nodes[::3, 2:] = -1                      # rows with fewer nodes, padded
    index = candidate_leaf_index(taxonomy, "cat", nodes)
    embeddings = torch.randn(taxonomy.n_leaves, 6, generator=generator)
    _, leaves = NodeBlocks(embeddings, taxonomy, "cat").scores(torch.randn(12, 6, generator=generator), nodes)
    assert torch.equal(index, leaves)
    for row in range(len(nodes)):
        chosen = nodes[row][nodes[row] >= 0].numpy()
        assert sorted(index[row][index[row] >= 0].tolist()) == taxonomy.leaves_under(chosen, "cat").tolist()


def test_kernel_nodes_are_top_and_adaptive_nodes_with_their_ties_and_order():
    """The compiled node choice against the torch / NumPy definitions: tied scores (small integers),
    rows that stop inside the held buffer and rows that need a full sort (tiny nodes, large targets)."""
    from hmtrec.serve import kernels
    from hmtrec.serve.candidates import adaptive_nodes

    rng = np.random.default_rng(11)
    for n_nodes, guess_overflow in ((5, False), (200, False), (200, True)):
        scores = torch.from_numpy(rng.integers(0, 6, size=(17, n_nodes)).astype(np.float32))
        counts = rng.integers(1, 4 if guess_overflow else 40, size=n_nodes).astype(np.float64)
        for fraction in (0.01, 0.3, 0.9, 1.0):
            want = adaptive_nodes(scores, counts, fraction)
            got = kernels.select_nodes(scores.numpy(), counts, target=fraction * counts.sum())
            assert np.array_equal(got, want.numpy()), (n_nodes, fraction)
        for top in (1, 3, n_nodes, n_nodes + 4):
            assert np.array_equal(kernels.select_nodes(scores.numpy(), counts, top=top), top_nodes(scores, top).numpy())
    assert kernels.select_nodes(np.zeros((0, 5), np.float32), np.ones(5), target=2.0).shape == (0, 0)
    with pytest.raises(ValueError, match="top or target"):
        kernels.select_nodes(scores.numpy(), counts)


def test_kernel_scores_are_the_node_blocks_candidates():
    """Same candidates in the same order as `NodeBlocks.scores`, scores equal up to float rounding,
    padding -inf / -1; odd dimensions exercise the kernel's remainder loop."""
    from hmtrec.serve import kernels

    taxonomy = random_taxonomy()
    generator = torch.Generator().manual_seed(6)
    for dim in (7, 8):
        embeddings = torch.randn(taxonomy.n_leaves, dim, generator=generator)
        blocks = NodeBlocks(embeddings, taxonomy, "cat")
        queries = torch.randn(12, dim, generator=generator)
        nodes = top_nodes(torch.rand(12, 25, generator=generator), 4)
        nodes[::3, 1:] = -1
        want_scores, want_leaves = blocks.scores(queries, nodes)
        scores, leaves = kernels.score_nodes(queries.numpy(), nodes.numpy(), blocks.offsets, blocks.columns,
                                             blocks.leaf_ids.numpy())
        assert np.array_equal(leaves, want_leaves.numpy())
        assert np.array_equal(np.isinf(scores), leaves < 0)
        np.testing.assert_allclose(scores[leaves >= 0], want_scores.numpy()[leaves >= 0], rtol=1e-5, atol=1e-5)
