"""Baselines against tiny hand-computed cases: S-POP counts, SKNN / V-SKNN neighbour scores, GRU4Rec's
session-parallel batches and gate equations, SASRec's causal mask. Every expected number below was
worked out by hand from the six-item catalogue and the three training sessions in `TRAIN`."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from hmtrec.data.sequences import PAD, Dataset, SequenceData, collate_windows, make_windows
from hmtrec.data.taxonomy import Taxonomy
from hmtrec.errors import ConfigError
from hmtrec.evaluate.ranking import EvalSettings, evaluate_model
from hmtrec.models.registry import build_model, validate_model_params
from hmtrec.models.sequence.gru4rec import GRU4Rec, GRU4RecParams
from hmtrec.models.sequence.prefixes import target_prefixes
from hmtrec.models.sequence.sasrec import SASRec, SASRecParams
from hmtrec.models.sequence.sknn import SessionKNN, SKNNParams, VSKNNParams
from hmtrec.models.sequence.spop import SessionPop, SessionPopParams
from hmtrec.train.trainer import Trainer, TrainerSettings

torch.set_num_threads(1)


def taxonomy() -> Taxonomy:
    # category a: items 0, 1, 2; category b: items 3, 4, 5
    table = pd.DataFrame({"category": list("aaabbb"), "item": [str(i) for i in range(6)]})
    return Taxonomy.from_table(table, ["category", "item"])


def sequences(*items: list[int], timestamps: list[float] | None = None) -> SequenceData:
    leaves = np.concatenate([np.asarray(s, dtype=np.int64) for s in items])
    offsets = np.r_[0, np.cumsum([len(s) for s in items])]
    times = None
    if timestamps is not None:  # one time per sequence, spread over its events
        times = np.concatenate([np.full(len(s), t, dtype=np.float64) for s, t in zip(items, timestamps)])
    return SequenceData(leaves, offsets, np.arange(len(items)), timestamps=times)


def batch_of(*items: list[int], max_len: int = 10) -> dict[str, torch.Tensor]:
    data = sequences(*items)
    windows = make_windows(data, max_len)
    return collate_windows(data, windows, np.arange(len(windows.start)))


# Three training sessions, oldest first: s0 = {0, 1, 2}, s1 = {1, 3}, s2 = {4, 5, 0}.
# Event popularity: item 0: 2, item 1: 2, items 2-5: 1 each.
TRAIN = sequences([0, 1, 2], [1, 3], [4, 5, 0])


def fitted(model):
    model.fit(TRAIN)
    return model


# ---- prefixes ------------------------------------------------------------------------------------
def test_target_prefixes_follow_row_major_order_and_cut_at_the_target():
    batch = batch_of([1, 0, 5], [3, 4])
    prefixes = target_prefixes(batch)
    assert prefixes.rows.tolist() == [0, 0, 1]
    assert prefixes.items.tolist() == [[1, PAD], [1, 0], [3, PAD]]
    assert prefixes.lengths.tolist() == [1, 2, 1]


# ---- S-POP ---------------------------------------------------------------------------------------
def test_spop_counts_the_history_and_breaks_ties_by_popularity():
    model = fitted(SessionPop(taxonomy()))
    scores = model.predict(batch_of([3, 5, 3, 2]))
    item = scores["item"]
    # tie-break = 0.5 * popularity / (max popularity 2 + 1): 1/3 for items 0 and 1, 1/6 for the others
    np.testing.assert_allclose(item[0].numpy(), [1 / 3, 1 / 3, 1 / 6, 1 + 1 / 6, 1 / 6, 1 / 6], rtol=1e-6)
    np.testing.assert_allclose(item[2].numpy(), [1 / 3, 1 / 3, 1 / 6, 2 + 1 / 6, 1 / 6, 1 + 1 / 6], rtol=1e-6)
    assert item[2].argsort(descending=True)[:3].tolist() == [3, 5, 0]   # counts, then popularity (0 before 2)
    # categories: a has 5 training events, b 3; tie-break 0.5 * 5/6 and 0.5 * 3/6
    np.testing.assert_allclose(scores["category"][2].numpy(), [5 / 12, 3 + 0.25], rtol=1e-6)


def test_spop_max_history_counts_only_the_latest_events():
    model = SessionPop(taxonomy(), SessionPopParams(max_history=1))
    model.fit(TRAIN)
    item = model.predict(batch_of([3, 3, 5, 2]))["item"]
    assert item[2, 5] == pytest.approx(1 + 1 / 6) and item[2, 3] == pytest.approx(1 / 6)


# ---- SKNN ----------------------------------------------------------------------------------------
def test_sknn_cosine_scores_by_hand():
    model = fitted(SessionKNN(taxonomy(), SKNNParams(k=2, sample_size=0, popularity_fallback=False)))
    item = model.predict(batch_of([1, 0, 5]))["item"].numpy()
    # history {1}: s0 cos 1/sqrt(1*3), s1 cos 1/sqrt(1*2) -> both vote
    a, b = 1 / math.sqrt(3), 1 / math.sqrt(2)
    np.testing.assert_allclose(item[0], [a, a + b, a, b, 0, 0], rtol=1e-6)
    # history {1, 0}: s0 2/sqrt(6), s1 1/sqrt(4), s2 1/sqrt(6); k = 2 keeps s0 and s1
    a, b = 2 / math.sqrt(6), 0.5
    np.testing.assert_allclose(item[1], [a, a + b, a, b, 0, 0], rtol=1e-6)


def test_sknn_jaccard_and_k():
    model = fitted(SessionKNN(taxonomy(), SKNNParams(k=1, sample_size=0, similarity="jaccard",
                                                     popularity_fallback=False)))
    item = model.predict(batch_of([1, 0, 5]))["item"].numpy()
    # history {1, 0}: jaccard s0 = 2/3, s1 = 1/3, s2 = 1/4; k = 1 keeps s0 only
    np.testing.assert_allclose(item[1], [2 / 3, 2 / 3, 2 / 3, 0, 0, 0], rtol=1e-6)


def test_sknn_sample_keeps_the_most_recent_candidates():
    # with timestamps, s0 is the most recent session, s2 the oldest
    train = sequences([0, 1, 2], [1, 3], [4, 5, 0], timestamps=[30.0, 20.0, 10.0])
    model = SessionKNN(taxonomy(), SKNNParams(k=10, sample_size=1, popularity_fallback=False))
    model.fit(train)
    item = model.predict(batch_of([0, 4]))["item"].numpy()
    # history {0}: candidates s0 and s2; only the most recent (s0) is kept; cos = 1/sqrt(3)
    np.testing.assert_allclose(item[0], [1 / math.sqrt(3)] * 3 + [0, 0, 0], rtol=1e-6)


def test_sknn_category_votes_sum_their_items():
    model = fitted(SessionKNN(taxonomy(), SKNNParams(k=2, sample_size=0, popularity_fallback=False)))
    scores = model.predict(batch_of([1, 0]))
    np.testing.assert_allclose(scores["category"].numpy(),
                               scores["item"].numpy().reshape(1, 2, 3).sum(2), rtol=1e-6)


def test_without_remind_history_items_get_no_votes_and_rank_last():
    model = fitted(SessionKNN(taxonomy(), SKNNParams(k=2, sample_size=0, remind=False)))
    scores = model.predict(batch_of([1, 0, 5]))
    item, category = scores["item"].numpy(), scores["category"].numpy()
    # history {1, 0}: s0 (2/sqrt(6)) and s1 (1/2) vote, but not for the history's items 0 and 1
    a = 2 / math.sqrt(6)
    assert item[1, 0] == item[1, 1] == -1.0
    np.testing.assert_allclose(item[1, 2:4], [a, 0.5], rtol=1e-6)
    assert 0 <= item[1, 4] < 0.25 and item[1].argsort()[::-1][:2].tolist() == [2, 3]
    np.testing.assert_allclose(category[1], [a, 0.5], rtol=1e-6)       # category votes exclude them too


def test_popularity_fallback_orders_unvoted_items_below_every_vote():
    model = fitted(SessionKNN(taxonomy(), SKNNParams(k=1, sample_size=0)))
    item = model.predict(batch_of([3, 2]))["item"][0]
    # history {3}: only s1 = {1, 3} votes, 1/sqrt(2) each; the rest follow popularity (0 first)
    assert item[1] == item[3] == pytest.approx(1 / math.sqrt(2))
    unvoted = item[[0, 2, 4, 5]]
    assert unvoted.max() < 1 / math.sqrt(2) / 2 + 1e-7
    assert item.argsort(descending=True).tolist()[:3] == [1, 3, 0]
    # a history sharing nothing with training: pure popularity order
    lonely = SessionKNN(taxonomy(), SKNNParams())
    lonely.fit(sequences([0, 1, 0], [1, 2]))
    assert lonely.predict(batch_of([5, 4]))["item"][0].argsort(descending=True).tolist()[:3] == [0, 1, 2]


# ---- V-SKNN --------------------------------------------------------------------------------------
def test_vsknn_position_weights_and_vote_decay_by_hand():
    model = fitted(SessionKNN(taxonomy(), VSKNNParams(k=3, sample_size=0, idf_weighting=0.0,
                                                      popularity_fallback=False)))
    item = model.predict(batch_of([0, 3, 1, 2]))["item"].numpy()
    # history [0, 3]: weights 1/2 (item 0), 1 (item 3); similarity = weight sum / 2 distinct items
    # s0 = {0,1,2}: 0.25, latest shared item 0 is 2 steps back -> vote 0.25 / 2
    # s1 = {1,3}:   0.5,  shares the last item (step 1)      -> vote 0.5
    # s2 = {4,5,0}: 0.25, step 2                              -> vote 0.125
    np.testing.assert_allclose(item[1], [0.125 + 0.125, 0.125 + 0.5, 0.125, 0.5, 0.125, 0.125], rtol=1e-6)
    # history [0, 3, 1]: weights 1/3, 2/3, 1; |h| = 3
    # s0: (1/3 + 1) / 3 = 4/9, latest shared is item 1 (step 1); s1: (2/3 + 1) / 3 = 5/9, step 1;
    # s2: (1/3) / 3 = 1/9, step 3 -> 1/27
    s0, s1, s2 = 4 / 9, 5 / 9, 1 / 27
    np.testing.assert_allclose(item[2], [s0 + s2, s0 + s1, s0, s1, s2, s2], rtol=1e-6)


def test_idf_weighting_multiplies_votes_by_inverse_sequence_frequency():
    plain = fitted(SessionKNN(taxonomy(), VSKNNParams(sample_size=0, idf_weighting=0.0, popularity_fallback=False)))
    weighted = fitted(SessionKNN(taxonomy(), VSKNNParams(sample_size=0, idf_weighting=2.0, popularity_fallback=False)))
    # sequences containing each item: 0 -> 2, 1 -> 2, 2..5 -> 1, of 3 sequences
    idf = np.log(3 / np.array([2, 2, 1, 1, 1, 1]))
    batch = batch_of([0, 3, 1])
    np.testing.assert_allclose(weighted.predict(batch)["item"].numpy(),
                               plain.predict(batch)["item"].numpy() * (1 + 2.0 * idf), rtol=1e-6)


def test_knn_chunking_and_reload_do_not_change_scores():
    histories = [[0, 1], [4, 0, 3, 1], [5], [2, 2, 1]]
    for params in (SKNNParams(sample_size=2), VSKNNParams(sample_size=2, idf_weighting=0.5)):
        model = fitted(SessionKNN(taxonomy(), params))
        expected = model.predict(batch_of(*histories))
        tiny = SessionKNN(taxonomy(), params.model_copy(update={"max_triples": 1000}))
        tiny.load_state_dict(model.state_dict())
        tiny.params = params.model_copy(update={"max_triples": 1000})
        chunked = tiny.predict(batch_of(*histories))
        for level in expected:
            torch.testing.assert_close(chunked[level], expected[level])


def test_knn_handles_a_chunk_per_query():
    model = fitted(SessionKNN(taxonomy(), VSKNNParams(max_triples=1000)))
    many = [[i % 6, (i + 1) % 6, (i * 5) % 6] for i in range(400)]   # forces several chunks
    whole = fitted(SessionKNN(taxonomy(), VSKNNParams()))
    torch.testing.assert_close(model.predict(batch_of(*many))["item"], whole.predict(batch_of(*many))["item"])


# ---- GRU4Rec -------------------------------------------------------------------------------------
def test_session_parallel_batches_cover_every_target_once():
    train = sequences([0, 1, 2], [1, 3], [4, 5, 0, 2, 2], [3], [1, 2])
    model = GRU4Rec(taxonomy(), GRU4RecParams(hidden_size=4))
    batches = list(model.training_batches(train, epoch=1, batch_size=2, max_len=50))
    # slots: A = s0 (2 steps) then s4 (1 step); B = s1 (1 step) then s2 (4 steps); s3 has no target
    assert [b["inputs"].tolist() for b in batches] == [[0, 1], [1, 4], [1, 5], [0], [2]]
    assert [b["targets"].tolist() for b in batches] == [[1, 3], [2, 5], [2, 0], [2], [2]]
    assert [b["state_index"].tolist() for b in batches] == [[-1, -1], [0, -1], [-1, 1], [1], [0]]
    targets = sorted(int(e) + 1 for b in batches for e in b["input_events"])
    assert targets == np.flatnonzero(train.targets()).tolist()
    assert model.training_steps(train, batch_size=2) == len(batches)


def test_session_parallel_hidden_states_match_a_full_pass():
    train = sequences([0, 1, 2], [1, 3], [4, 5, 0, 2, 2], [1, 2, 4])
    model = GRU4Rec(taxonomy(), GRU4RecParams(hidden_size=5, n_layers=2)).eval()
    windows = make_windows(train, 10)
    window_batch = collate_windows(train, windows, np.arange(len(windows.start)))
    full = model._window_hidden(window_batch)            # target positions, row-major = event order
    expected = dict(zip(np.flatnonzero(train.targets()).tolist(), full))
    with torch.no_grad():
        for batch in model.training_batches(train, epoch=1, batch_size=2):
            step = model._parallel_step(batch)
            for row, event in enumerate(batch["input_events"].tolist()):
                torch.testing.assert_close(step[row], expected[event + 1])


def test_gru4rec_learns_a_deterministic_successor():
    torch.manual_seed(0)
    train = sequences(*[[(start + i) % 6 for i in range(5)] for start in range(6)] * 2)
    model = GRU4Rec(taxonomy(), GRU4RecParams(hidden_size=16, dropout_embedding=0.0, dropout_hidden=0.0))
    Trainer(model, TrainerSettings(epochs=10, lr=0.05, grad_clip=None)).fit(
        lambda epoch: model.training_batches(train, epoch, batch_size=4))
    model.eval()
    scores = model.predict(batch_of([2, 3, 4], [5, 0, 1]))["item"]
    assert scores.argmax(1).tolist() == [3, 4, 0, 1]



def test_gru4rec_scores_by_hand_with_the_shared_embedding():
    """Two steps of a 2-unit GRU written out with PyTorch's gate equations: the input of item i is
    row i of the output matrix Wy (constrained embedding), and the scores are h . Wy^T + b_y."""
    model = GRU4Rec(taxonomy(), GRU4RecParams(hidden_size=2, dropout_embedding=0.0, dropout_hidden=0.0)).eval()
    wy = np.array([[0.5, -0.2], [0.1, 0.3], [-0.4, 0.2], [0.0, 0.6], [0.3, 0.3], [-0.1, -0.5]])
    w_ih = np.array([[0.2, -0.1], [0.4, 0.3],        # reset gate
                     [-0.3, 0.5], [0.1, 0.1],        # update gate
                     [0.6, -0.4], [0.2, 0.7]])       # candidate
    w_hh = np.array([[0.1, 0.2], [-0.2, 0.1], [0.3, 0.0], [0.0, -0.3], [0.5, 0.1], [-0.1, 0.4]])
    b_ih, b_hh = np.array([0.1, 0.0, -0.1, 0.2, 0.0, 0.05]), np.array([0.0, 0.1, 0.05, 0.0, -0.1, 0.0])
    b_y = np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06])
    with torch.no_grad():
        model.output_embedding.weight.copy_(torch.tensor(wy))
        model.output_bias.copy_(torch.tensor(b_y))
        model.gru.weight_ih_l0.copy_(torch.tensor(w_ih))
        model.gru.weight_hh_l0.copy_(torch.tensor(w_hh))
        model.gru.bias_ih_l0.copy_(torch.tensor(b_ih))
        model.gru.bias_hh_l0.copy_(torch.tensor(b_hh))

    def sigmoid(x):
        return 1 / (1 + np.exp(-x))

    h, expected = np.zeros(2), []
    for item in (2, 4):                                  # history [2, 4, 1]: targets after 2 and after 4
        gi, gh = w_ih @ wy[item] + b_ih, w_hh @ h + b_hh
        reset, update = sigmoid(gi[0:2] + gh[0:2]), sigmoid(gi[2:4] + gh[2:4])
        candidate = np.tanh(gi[4:6] + reset * gh[4:6])
        h = (1 - update) * candidate + update * h
        expected.append(h @ wy.T + b_y)
    with torch.no_grad():
        scores = model.predict(batch_of([2, 4, 1]))["item"]
        later = model.predict(batch_of([2, 5, 1]))["item"]
    np.testing.assert_allclose(scores.double().numpy(), np.array(expected), rtol=1e-5, atol=1e-6)
    # causal: the step after item 2 never sees item 4
    torch.testing.assert_close(later[0], scores[0])
    assert not torch.allclose(later[1], scores[1])


# ---- SASRec --------------------------------------------------------------------------------------
def test_sasrec_prediction_never_depends_on_later_positions():
    torch.manual_seed(0)
    model = SASRec(taxonomy(), SASRecParams(dim=8, heads=2, dropout=0.0), max_len=10).eval()
    before = model.encode(torch.tensor([[0, 1, 2, 3, 4]]))
    after = model.encode(torch.tensor([[0, 1, 2, 5, 5]]))
    torch.testing.assert_close(before[0, :3], after[0, :3])
    assert not torch.allclose(before[0, 3], after[0, 3])
    padded = model.encode(torch.tensor([[0, 1, 2, PAD, PAD]]))
    torch.testing.assert_close(padded[0, :3], before[0, :3])


def test_sasrec_scores_with_the_shared_item_embedding():
    torch.manual_seed(0)
    model = SASRec(taxonomy(), SASRecParams(dim=8, heads=1, dropout=0.0), max_len=10).eval()
    batch = batch_of([0, 1, 2])
    hidden = model.encode(batch["inputs"])[0, :2]
    torch.testing.assert_close(model.predict(batch)["item"], hidden @ model.item_embedding.weight.T)


def test_sasrec_learns_a_deterministic_successor():
    torch.manual_seed(0)
    data = sequences(*[[(start + i) % 6 for i in range(6)] for start in range(6)])
    windows = make_windows(data, 8)
    model = SASRec(taxonomy(), SASRecParams(dim=16, heads=2, dropout=0.0), max_len=8)
    Trainer(model, TrainerSettings(epochs=60, lr=0.01)).fit(
        lambda epoch: [collate_windows(data, windows, np.arange(len(windows.start)))])
    model.eval()
    assert model.predict(batch_of([4, 5, 0]))["item"].argmax(1).tolist() == [5, 0]


# ---- registry and evaluator --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["spop", "sknn", "vsknn", "gru4rec", "sasrec"])
def test_every_baseline_builds_from_config_and_runs_through_the_evaluator(name):
    tax = taxonomy()
    entry, params = validate_model_params("sequence", {"name": name})
    data = sequences([0, 1, 2, 0], [1, 3], [4, 5, 0])
    model = build_model(entry, params, taxonomy=tax, dataset=Dataset("t", data, tax), max_len=10)
    if model.trainable:
        windows = make_windows(data, 10)
        model.loss(collate_windows(data, windows, np.arange(len(windows.start))))[0].backward()
    else:
        model.fit(data)
    result = evaluate_model(model, data, tax, EvalSettings(ks=[1, 3], candidate_k=1), max_len=10)
    assert result["n_cases"] == data.n_targets
    assert set(result["full"]) == {"category", "item"}
    for metrics in result["full"].values():
        assert 0.0 <= metrics["MRR@3"] <= metrics["Recall@3"] <= 1.0


def test_unknown_or_invalid_parameters_are_named():
    with pytest.raises(ConfigError, match="model.neighbours"):
        validate_model_params("sequence", {"name": "sknn", "neighbours": 5})
    with pytest.raises(ConfigError, match="model.position_weighting"):
        validate_model_params("sequence", {"name": "vsknn", "position_weighting": "cubic"})
    with pytest.raises(ConfigError, match="heads"):
        validate_model_params("sequence", {"name": "sasrec", "dim": 10, "heads": 3})
