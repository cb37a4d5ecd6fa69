"""HierSRec's item head under the sampled softmax (`model.item_loss: sampled`), by hand."""

import pytest
import torch
import torch.nn.functional as F

from hmtrec.errors import ConfigError
from hmtrec.models.sequence.heads import HierarchicalHeads
from tests.test_hiersrec import batch_of, build, three_level_taxonomy

torch.set_num_threads(1)


def test_sampled_leaf_nll_is_the_corrected_softmax_over_the_candidates():
    heads = HierarchicalHeads(three_level_taxonomy(), ["l1", "l2", "item"], 4, coupling="parallel")
    torch.manual_seed(0)
    with torch.no_grad():
        heads.leaf_bias.normal_()
    query, vectors = torch.randn(3, 4), torch.randn(6, 4)
    candidates, log_q = torch.tensor([0, 4, 5]), torch.tensor([0.7, 0.0, 0.3])
    targets, column = torch.tensor([4, 0, 4]), torch.tensor([1, 0, 1])
    rows = heads.sampled_leaf_row_nll({}, query, targets, candidates, column, log_q, vectors[candidates])
    logits = query @ vectors[candidates].T + heads.leaf_bias[candidates] - log_q
    torch.testing.assert_close(rows, F.cross_entropy(logits, column, reduction="none"))


def test_factorized_sampled_nll_is_exact_coarse_plus_a_softmax_over_the_candidates_of_the_targets_parent():
    heads = HierarchicalHeads(three_level_taxonomy(), ["l1", "l2", "item"], 4, coupling="parallel", factorized=True)
    torch.manual_seed(1)
    query, vectors = torch.randn(2, 4), torch.randn(6, 4)
    coarse = {"l1": torch.randn(2, 2), "l2": torch.randn(2, 4)}
    # l2 parents: items 0,1 -> a1 (0); 2 -> a2 (1); 3,4 -> b1 (2); 5 -> b2 (3)
    candidates, log_q = torch.tensor([0, 1, 3, 4]), torch.tensor([0.1, 0.2, 0.3, 0.4])
    targets, column = torch.tensor([1, 3]), torch.tensor([1, 2])
    rows = heads.sampled_leaf_row_nll(coarse, query, targets, candidates, column, log_q, vectors[candidates])
    logits = query @ vectors[candidates].T - log_q          # leaf_bias starts at zero
    within_a1 = -F.log_softmax(logits[0, [0, 1]], dim=0)[1]  # target 1 among a1's candidates 0, 1
    within_b1 = -F.log_softmax(logits[1, [2, 3]], dim=0)[0]  # target 3 among b1's candidates 3, 4
    coarse_nll = F.cross_entropy(coarse["l2"], torch.tensor([0, 2]), reduction="none")
    torch.testing.assert_close(rows, coarse_nll + torch.stack([within_a1, within_b1]))


def test_leaf_vector_rows_are_the_table_rows():
    model = build()
    leaves = torch.tensor([5, 0, 3])
    torch.testing.assert_close(model.leaf_vectors.rows(leaves), model.leaf_vectors()[leaves])


# targets 0..5, each once: every item is a candidate with the same correction, so sampled == full
EVERY_ITEM_ONCE = [[1, 0], [0, 1], [1, 2], [2, 3], [3, 4], [4, 5]]


@pytest.mark.parametrize("switches", [{"repeat_explore": False}, {"repeat_explore": True},
                                      {"repeat_explore": False, "factorized": True},
                                      {"repeat_explore": False, "leaf_scale": 8.0}])
def test_sampled_equals_full_when_every_item_is_a_candidate(switches):
    batch = batch_of(EVERY_ITEM_ONCE)
    losses = {}
    for item_loss in ("full", "sampled"):
        torch.manual_seed(3)
        model = build(item_loss=item_loss, **switches)
        losses[item_loss] = model.loss(batch)
    torch.testing.assert_close(losses["sampled"][0], losses["full"][0])
    assert losses["sampled"][1] == pytest.approx(losses["full"][1], rel=1e-5)


def test_the_sampled_loss_builds_leaf_vectors_for_the_batch_items_only():
    torch.manual_seed(0)
    model = build(item_loss="sampled", repeat_explore=False)
    model.leaf_vectors.forward = None                 # the whole table must not be built
    batch = batch_of([[0, 1], [1, 0]])
    total, _ = model.loss(batch)
    total.backward()
    touched = torch.nonzero(model.leaf_vectors.item_ids.weight.grad.abs().sum(1)).flatten().tolist()
    assert touched == [0, 1]


def test_sampled_item_loss_needs_an_item_head_and_refuses_whole_distribution_terms():
    with pytest.raises(ConfigError, match="model.item_loss"):
        build(item_loss="sampled", head_levels=["l1", "l2"], repeat_explore=False)
    with pytest.raises(ConfigError, match="sibling_smoothing"):
        build(item_loss="sampled", sibling_smoothing=0.1)
    with pytest.raises(ConfigError, match="consistency_weight"):
        build(item_loss="sampled", consistency_weight=0.5)
