"""Session-model techniques and hierarchy-to-item switches of HierSRec, each against hand-computed
values: NISER scaling, factorised item scores, sibling soft targets, the attention readout (with
reversed positions), the repeat-or-explore copy mechanism, item dropout, and the fused per-row
cross-entropy they build on. No accuracy is asserted here (figures live in docs/benchmarks.md)."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from hmtrec.data.sequences import PAD
from hmtrec.data.taxonomy import Taxonomy
from hmtrec.errors import ConfigError
from hmtrec.models.sequence.heads import HierarchicalHeads
from hmtrec.models.sequence.losses import softmax_cross_entropy_rows
from hmtrec.models.sequence.readout import AttentionReadout, RepeatExplore
from test_hiersrec import batch_of, build, three_level_taxonomy  # tests/ is on sys.path (rootdir conftest)

torch.set_num_threads(1)


def two_level_taxonomy() -> Taxonomy:
    # category A: items 0, 1; category B: item 2
    return Taxonomy.from_table(pd.DataFrame({"cat": ["A", "A", "B"], "item": ["i0", "i1", "i2"]}), ["cat", "item"])


def test_row_cross_entropy_matches_torch_per_row_with_its_gradient():
    torch.manual_seed(0)
    logits = (torch.randn(5, 40) * 3).requires_grad_()
    targets = torch.randint(0, 40, (5,))
    weights = torch.tensor([1.0, 0.0, 2.0, -1.0, 0.5])
    reference_logits = logits.detach().clone().requires_grad_()
    reference = F.cross_entropy(reference_logits, targets, reduction="none")
    (reference * weights).sum().backward()
    rows = softmax_cross_entropy_rows(logits, targets)
    (rows * weights).sum().backward()
    torch.testing.assert_close(rows, reference.detach())
    torch.testing.assert_close(logits.grad, reference_logits.grad)


def test_niser_scores_are_scale_times_cosine_plus_bias():
    heads = HierarchicalHeads(two_level_taxonomy(), ["item"], 2, leaf_scale=10.0)
    with torch.no_grad():
        heads.leaf_bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    hidden = torch.tensor([[3.0, 4.0]])                              # unit vector (0.6, 0.8)
    vectors = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0]])      # unit (1,0), (0,1), (-1,0)
    logits = heads(hidden, vectors)["item"]
    torch.testing.assert_close(logits, torch.tensor([[6.0, 9.0, -7.0]]))
    plain = HierarchicalHeads(two_level_taxonomy(), ["item"], 2)(hidden, vectors)["item"]
    torch.testing.assert_close(plain, torch.tensor([[6.0, 20.0, -3.0]]))   # dot products: norm matters


def test_factorised_scores_are_category_times_within_category_probabilities():
    heads = HierarchicalHeads(two_level_taxonomy(), ["cat", "item"], 2, coupling="parallel", factorized=True)
    logits = {"cat": torch.tensor([[math.log(0.75), math.log(0.25)]]),
              "item": torch.tensor([[0.0, math.log(3.0), 5.0]])}
    # p(A) = .75 split .25/.75 within A; p(B) = .25 all on item 2 whatever its logit
    expected = torch.tensor([[0.75 * 0.25, 0.75 * 0.75, 0.25]])
    torch.testing.assert_close(heads.leaf_log_probabilities(logits).exp(), expected)
    torch.testing.assert_close(heads.scores(logits)["item"].exp(), expected)
    nll = heads.leaf_row_nll(logits, torch.tensor([1]))
    assert nll.item() == pytest.approx(-math.log(0.5625), rel=1e-6)
    total, parts = heads.loss(logits, torch.tensor([1]))
    assert parts["ce_item"] == pytest.approx(-math.log(0.5625), rel=1e-6)
    assert total.item() == pytest.approx(-math.log(0.75) - math.log(0.5625), rel=1e-6)
    # far apart logits in different categories: no category's sum underflows
    extreme = {"cat": torch.zeros(1, 2), "item": torch.tensor([[-200.0, -201.0, 200.0]])}
    assert torch.isfinite(heads.leaf_log_probabilities(extreme)).all()
    with pytest.raises(ValueError, match="coarser head"):
        HierarchicalHeads(two_level_taxonomy(), ["item"], 2, factorized=True)


def test_sibling_smoothing_is_cross_entropy_against_the_soft_target():
    taxonomy = three_level_taxonomy()          # l2 parents: a1 = {0, 1}, a2 = {2}, b1 = {3, 4}, b2 = {5}
    heads = HierarchicalHeads(taxonomy, ["item"], 4, sibling_smoothing=0.1)
    logits = {"item": torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]] * 3)}
    targets = torch.tensor([0, 2, 4])
    soft = torch.tensor([[0.9, 0.1, 0, 0, 0, 0],                      # sibling 1 gets all of ε
                         [0, 0, 1.0, 0, 0, 0],                        # item 2 has no sibling
                         [0, 0, 0, 0.1, 0.9, 0]])
    _, parts = heads.loss(logits, targets)
    assert parts["ce_item"] == pytest.approx(F.cross_entropy(logits["item"], soft).item(), rel=1e-6)
    # the per-row term by hand: ε (s_target - mean sibling logit)
    torch.testing.assert_close(heads.sibling_term(logits["item"], targets), torch.tensor([-0.1, 0.0, 0.1]))


def reference_readout(readout: AttentionReadout, hidden: torch.Tensor, length: int) -> torch.Tensor:
    """The SR-GNN readout written as loops over one window of `length` valid positions."""
    out = []
    for t in range(length):
        summary = torch.zeros(hidden.shape[-1])
        for j in range(t + 1):
            pre = readout.last(hidden[t]) + readout.each(hidden[j])
            if readout.distance is not None:
                pre = pre + readout.distance.weight[t - j]
            summary = summary + readout.score(torch.sigmoid(pre)) * hidden[j]
        out.append(readout.out(torch.cat([hidden[t], summary])))
    return torch.stack(out)


@pytest.mark.parametrize("reversed_positions", [False, True])
def test_attention_readout_matches_loops_and_reads_only_the_past(reversed_positions):
    torch.manual_seed(0)
    readout = AttentionReadout(4, max_len=6, reversed_positions=reversed_positions)
    hidden = torch.randn(1, 5, 4)
    valid = torch.tensor([[True, True, True, True, False]])      # one padded position at the end
    at = valid.clone()
    with torch.no_grad():
        out = readout(hidden, valid, at)
        torch.testing.assert_close(out, reference_readout(readout, hidden[0], 4))
        changed = hidden.clone()
        changed[0, 2:] += 1.0
        torch.testing.assert_close(readout(changed, valid, at)[:2], out[:2])   # positions 0, 1 unchanged


def test_repeat_explore_mixes_session_items_with_the_catalogue():
    explore_log_p = torch.log(torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.2, 0.0]]).clamp_min(1e-45))
    beta = torch.tensor([[0.5, 0.3, 0.2, 0.0]])
    items = torch.tensor([[3, 5, 3, PAD]])
    log_gate = torch.log(torch.tensor([[0.25, 0.75]]))               # log r, log(1 - r)
    # item 3: .75 * .2 + .25 * (.5 + .2); item 5: .75 * 0 + .25 * .3; item 0: .75 * .2
    expected = torch.tensor([[0.15, 0.15, 0.15, 0.325, 0.15, 0.075]])
    log_p = RepeatExplore.log_probabilities(explore_log_p.clone(), beta, items, log_gate)   # it writes in place
    torch.testing.assert_close(log_p.exp(), expected)
    nll = RepeatExplore.row_nll(-explore_log_p[0, [3, 0]], beta.expand(2, -1), items.expand(2, -1),
                                log_gate.expand(2, -1), torch.tensor([3, 0]))
    torch.testing.assert_close(nll, -torch.log(torch.tensor([0.325, 0.15])))


def test_repeat_weights_are_a_softmax_over_the_readable_past():
    torch.manual_seed(0)
    copy = RepeatExplore(4)
    hidden = torch.randn(1, 4, 4)
    inputs = torch.tensor([[7, 8, 7, PAD]])
    valid = inputs != PAD
    at = torch.tensor([[False, True, True, False]])
    with torch.no_grad():
        beta, items, log_gate = copy(hidden, inputs, valid, at)
        energy = copy.score(torch.tanh(copy.last(hidden[0, 1]) + copy.each(hidden[0, :2]))).squeeze(-1)
    torch.testing.assert_close(beta[0, :2], torch.softmax(energy, dim=0))
    assert beta[0, 2:].abs().sum() == 0 and items[0].tolist() == [7, 8, PAD, PAD]
    assert items[1].tolist() == [7, 8, 7, PAD]
    torch.testing.assert_close(beta.sum(1), torch.ones(2))
    torch.testing.assert_close(log_gate.exp().sum(1), torch.ones(2))


@pytest.mark.parametrize("params", [
    {"repeat_explore": True}, {"repeat_explore": True, "factorized": True}, {"factorized": True, "sibling_smoothing": 0.2},
    {"readout": "attention", "reversed_positions": True}, {"leaf_scale": 12.0, "item_dropout": 0.3, "repeat_explore": False},
    {"repeat_explore": True, "leaf_scale": 12.0, "readout": "attention", "sibling_smoothing": 0.1}])
def test_hiersrec_switches_train_and_predict_distributions(params):
    torch.manual_seed(0)
    model = build(**params)
    batch = batch_of([[0, 1, 0, 3], [5, 2]])
    total, parts = model.loss(batch)
    total.backward()
    assert torch.isfinite(total) and all(math.isfinite(v) for v in parts.values())
    model.eval()
    with torch.no_grad():
        scores = model.predict(batch)
        again = model.predict(batch)
    assert scores["item"].shape == (4, 6)
    torch.testing.assert_close(scores["item"], again["item"])                  # dropout is off in eval
    if params.get("repeat_explore") or params.get("factorized"):                  # log-probabilities of a distribution
        torch.testing.assert_close(scores["item"].exp().sum(1), torch.ones(4), atol=1e-5, rtol=0)
    if params.get("repeat_explore"):
        assert "repeat_share" in parts


def test_copy_prediction_is_causal():
    torch.manual_seed(0)
    model = build(repeat_explore=True).eval()
    with torch.no_grad():
        short = model.predict(batch_of([[0, 1, 2]]))["item"]
        longer = model.predict(batch_of([[0, 1, 2, 5, 4]]))["item"][:2]
    torch.testing.assert_close(short, longer)


def test_item_dropout_changes_training_losses_only():
    torch.manual_seed(0)
    model = build(item_dropout=0.5)
    batch = batch_of([[0, 1, 0, 3]])
    assert model.loss(batch)[0].item() != model.loss(batch)[0].item()
    model.eval()
    assert model.loss(batch)[0].item() == model.loss(batch)[0].item()


def test_switch_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.factorized"):
        build(head_levels=["item"], factorized=True)
    with pytest.raises(ConfigError, match="model.leaf_scale"):
        build(head_levels=["l1"], leaf_scale=10.0)
    assert build(head_levels=["l1"]).repeat_explore is None      # the default mixture needs an item head
    with pytest.raises(ConfigError, match="reversed_positions"):
        build(reversed_positions=True)


def test_exclude_seen_ranks_each_rows_history_last():
    torch.manual_seed(0)
    model = build(exclude_seen=True, repeat_explore=False).eval()
    torch.manual_seed(0)
    plain_model = build(repeat_explore=False).eval()      # the same weights
    batch = batch_of([[0, 3, 4], [5, 2]])                # targets after [0], [0, 3], [5]
    with torch.no_grad():
        scores = model.predict(batch)["item"]
        plain = plain_model.predict(batch)["item"]
    expected_seen = [{0}, {0, 3}, {5}]
    for row, seen in enumerate(expected_seen):
        assert set(torch.nonzero(torch.isinf(scores[row])).flatten().tolist()) == seen
        others = [i for i in range(6) if i not in seen]
        torch.testing.assert_close(scores[row, others], plain[row, others])
    with pytest.raises(ConfigError, match="exclude_seen needs repeat_explore: false"):
        build(exclude_seen=True, repeat_explore=True)


def test_coarse_weight_schedule_moves_linearly_and_counts_training_steps_only():
    taxonomy = three_level_taxonomy()
    heads = HierarchicalHeads(taxonomy, ["l1", "item"], 4, loss_weights={"l1": 1.0},
                              coarse_weight_final=0.2, coarse_weight_steps=4)
    logits = {"l1": torch.tensor([[0.3, -0.1]]), "item": torch.tensor([[0.1, 0.5, 0.0, 0.2, 0.3, -0.4]])}
    targets = torch.tensor([4])
    ce_l1 = F.cross_entropy(logits["l1"], torch.tensor([1])).item()
    ce_item = F.cross_entropy(logits["item"], targets).item()
    seen = []
    for _ in range(6):
        total, parts = heads.loss(logits, targets)
        seen.append(parts["coarse_weight"])
        assert total.item() == pytest.approx(parts["coarse_weight"] * ce_l1 + ce_item, rel=1e-6)
    assert seen == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2, 0.2])
    heads.eval()
    heads.loss(logits, targets)
    assert int(heads.training_steps) == 6                   # evaluation does not advance the schedule
    assert "training_steps" in heads.state_dict()           # saved with the weights: resumes continue it
