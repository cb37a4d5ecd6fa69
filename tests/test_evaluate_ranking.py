"""The evaluator against plain-Python references: exact ranks and metrics at several levels, with
ties; candidate mode; chunking; coverage and candidate fraction; segment breakdowns."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from hmtrec.data.sequences import PAD, SequenceData
from hmtrec.data.taxonomy import Taxonomy
from hmtrec.evaluate.ranking import EvalSettings, evaluate_model, plan_batches, rank_cases, summarize
from hmtrec.evaluate.segments import Segment

KS = [1, 3, 10]


class TableModel(torch.nn.Module):
    """Scores at a target position: table[previous event] + 0.5 * table[event before that] (when it
    is inside the window), one table per level it predicts. Integer tables make many exact ties."""

    def __init__(self, tables: dict[str, torch.Tensor]):
        super().__init__()
        self.tables = tables
        self.calls = 0

    def predict(self, batch):
        self.calls += 1
        inputs, targets = batch["inputs"], batch["targets"]
        where = targets != PAD
        before = torch.full_like(inputs, PAD)
        before[:, 1:] = inputs[:, :-1]
        last, previous = inputs[where], before[where]
        out = {}
        for level, table in self.tables.items():
            scores = table[last].clone()
            has = previous != PAD
            scores[has] += 0.5 * table[previous[has]]
            out[level] = scores
        return out


def three_level_taxonomy(seed=0, n_items=40, n_cats=7, n_depts=3) -> Taxonomy:
    rng = np.random.default_rng(seed)
    dept_of_cat = np.r_[np.arange(n_depts), rng.integers(0, n_depts, n_cats - n_depts)]
    cat_of_item = np.r_[np.arange(n_cats), rng.integers(0, n_cats, n_items - n_cats)]
    table = pd.DataFrame({"dept": [f"d{dept_of_cat[c]}" for c in cat_of_item],
                          "cat": [f"c{c}" for c in cat_of_item],
                          "item": [f"i{i:02d}" for i in range(n_items)]})
    return Taxonomy.from_table(table, ["dept", "cat", "item"])


def random_data(n_items, seed=0, n_sequences=30, max_length=12, target_share=0.8) -> SequenceData:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_length + 1, n_sequences)
    leaves = rng.integers(0, n_items, lengths.sum())
    mask = rng.random(lengths.sum()) < target_share   # includes some first events: unpredictable
    return SequenceData(leaves, np.r_[0, np.cumsum(lengths)], np.arange(n_sequences), target_mask=mask)


def integer_tables(taxonomy, levels, seed=1, high=4):
    generator = torch.Generator().manual_seed(seed)
    return {level: torch.randint(0, high, (taxonomy.n_leaves, taxonomy.n_nodes(level)), generator=generator).float()
            for level in levels}


# ---- plain-Python references -------------------------------------------------------------------

def ref_rank(scores, target, allowed=None):
    pool = [j for j in range(len(scores)) if allowed is None or j in allowed]
    if target not in pool:
        return math.inf
    return sorted(pool, key=lambda j: (-scores[j], j)).index(target) + 1


def ref_metrics(ranks, ks):
    n = len(ranks)
    out = {}
    for k in ks:
        hits = [r for r in ranks if r <= k]
        out[f"Recall@{k}"] = len(hits) / n
        out[f"MRR@{k}"] = sum(1 / r for r in hits) / n
        out[f"NDCG@{k}"] = sum(1 / math.log2(r + 1) for r in hits) / n
    return out


def ref_cases(data, taxonomy, tables):
    """(target leaf, {level: score list}) per case, contexts read from whole sequences; levels the
    model does not score are derived by max over the finest scored level."""
    cases = []
    mask = data.targets()
    for s in range(data.n_sequences):
        start = data.offsets[s]
        seq = data.sequence(s).tolist()
        for p in range(1, len(seq)):
            if not mask[start + p]:
                continue
            scores = {}
            for level, table in tables.items():
                row = table[seq[p - 1]].tolist()
                if p >= 2:
                    row = [a + 0.5 * b for a, b in zip(row, table[seq[p - 2]].tolist())]
                scores[level] = row
            cases.append((seq[p], scores))
    finest = max(tables, key=taxonomy.level_index)
    for _, scores in cases:
        for level in taxonomy.level_names[: taxonomy.level_index(finest)]:
            if level in scores:
                continue
            fine = scores[finest]
            parent = taxonomy.node_ancestors(np.arange(len(fine)), finest, level)
            node_scores = [-math.inf] * taxonomy.n_nodes(level)
            for j, value in enumerate(fine):
                node_scores[parent[j]] = max(node_scores[parent[j]], value)
            scores[level] = node_scores
    return cases


def ref_chosen_nodes(scores, counts, k=None, fraction=None):
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    if k is not None:
        return set(order[:k])
    chosen, taken = set(), 0
    for node in order:
        if chosen and taken >= fraction * sum(counts):
            break
        chosen.add(node)
        taken += counts[node]
    return chosen


# ---- tests -----------------------------------------------------------------------------------

def test_full_metrics_equal_brute_force_at_every_level_with_ties():
    taxonomy = three_level_taxonomy()
    tables = integer_tables(taxonomy, ["cat", "item"])      # "dept" has no head: derived by max
    data = random_data(taxonomy.n_leaves)
    settings = EvalSettings(ks=KS, level_aggregation="max", segments=[])
    result = evaluate_model(TableModel(tables), data, taxonomy, settings, max_len=50)

    cases = ref_cases(data, taxonomy, tables)
    assert result["n_cases"] == len(cases)
    first_event_targets = int((data.targets() & (data.positions() == 0)).sum())
    assert first_event_targets > 0 and result["n_skipped"] == first_event_targets
    assert result["levels"] == ["dept", "cat", "item"] and result["derived_levels"] == ["dept"]
    for level in taxonomy.level_names:
        ranks = [ref_rank(scores[level], int(taxonomy.ancestors(np.array([leaf]), level)[0]))
                 for leaf, scores in cases]
        assert len(set(ranks)) >= 3  # not a degenerate case
        expected = ref_metrics(ranks, KS)
        assert result["full"][level] == pytest.approx(expected, abs=1e-12), level


@pytest.mark.parametrize("level,mode,k,fraction", [
    ("cat", "fixed_k", 1, None), ("cat", "fixed_k", 3, None), ("dept", "fixed_k", 2, None),
    ("cat", "adaptive", None, 0.1), ("dept", "adaptive", None, 0.3), ("cat", "fixed_k", None, 0.3)])
def test_candidate_metrics_equal_brute_force(level, mode, k, fraction):
    taxonomy = three_level_taxonomy()
    tables = integer_tables(taxonomy, ["cat", "item"], seed=2)
    data = random_data(taxonomy.n_leaves, seed=3)
    settings = EvalSettings(ks=KS, level_aggregation="max", candidate_level=level, candidate_k=k,
                            candidate_fraction=fraction, candidate_mode=mode, segments=[])
    result = evaluate_model(TableModel(tables), data, taxonomy, settings, max_len=50)

    if mode == "fixed_k" and k is None:
        k = round(fraction * taxonomy.n_nodes(level))
        fraction = None
        assert result["candidate_settings"]["k"] == k
    counts = taxonomy.leaf_counts(level).tolist()
    coarse = taxonomy.level_index(level)
    ranks = {name: [] for name in taxonomy.level_names}
    covered, sizes = [], []
    for leaf, scores in ref_cases(data, taxonomy, tables):
        chosen = ref_chosen_nodes(scores[level], counts, k, fraction)
        sizes.append(sum(counts[node] for node in chosen))
        covered.append(int(taxonomy.ancestors(np.array([leaf]), level)[0]) in chosen)
        for index, name in enumerate(taxonomy.level_names):
            target = int(taxonomy.ancestors(np.array([leaf]), name)[0])
            allowed = None
            if index > coarse:
                parent = taxonomy.node_ancestors(np.arange(taxonomy.n_nodes(name)), name, level)
                allowed = {j for j in range(taxonomy.n_nodes(name)) if parent[j] in chosen}
            ranks[name].append(ref_rank(scores[name], target, allowed))
    for name in taxonomy.level_names:
        assert result["candidate"][name] == pytest.approx(ref_metrics(ranks[name], KS), abs=1e-12), name
        if taxonomy.level_index(name) <= coarse:
            assert result["candidate"][name] == result["full"][name]
    assert result["candidate_coverage"] == pytest.approx(np.mean(covered), abs=1e-12)
    assert result["candidate_fraction"] == pytest.approx(np.mean(sizes) / taxonomy.n_leaves, abs=1e-12)
    assert 0 < result["candidate_coverage"] < 1


@pytest.mark.parametrize("options", [{"candidate_k": 7}, {"candidate_k": 100}, {"candidate_fraction": 1.0},
                                     {"candidate_fraction": 1.0, "candidate_mode": "fixed_k"}])
def test_candidates_covering_every_node_equal_full(options):
    taxonomy = three_level_taxonomy()
    data = random_data(taxonomy.n_leaves, seed=4)
    model = TableModel(integer_tables(taxonomy, ["cat", "item"], seed=5))
    result = evaluate_model(model, data, taxonomy, EvalSettings(ks=KS, candidate_level="cat", **options),
                            max_len=6)
    assert result["candidate"] == result["full"]
    assert result["candidate_coverage"] == 1.0 and result["candidate_fraction"] == 1.0


def test_chunked_evaluation_equals_unchunked_exactly():
    taxonomy = three_level_taxonomy()
    data = random_data(taxonomy.n_leaves, seed=6, max_length=20)
    tables = integer_tables(taxonomy, ["cat", "item"], seed=7)
    common = dict(ks=KS, candidate_level="cat", candidate_fraction=0.2)
    whole = TableModel(tables)
    reference = rank_cases(whole, data, taxonomy, EvalSettings(**common), max_len=4)
    # 40 leaves x 16 bytes: 0.002 MB allows 3 target rows per batch, so long windows are split
    chunked_model = TableModel(tables)
    chunked = rank_cases(chunked_model, data, taxonomy,
                         EvalSettings(**common, score_budget_mb=0.002, batch_size=2), max_len=4)
    assert whole.calls == 1 and chunked_model.calls > reference.n_cases / 3
    np.testing.assert_array_equal(chunked.events, reference.events)
    assert len(np.unique(reference.events)) == reference.n_cases
    for level in reference.levels:
        np.testing.assert_array_equal(chunked.full[level], reference.full[level])
        np.testing.assert_array_equal(chunked.candidate[level], reference.candidate[level])
    np.testing.assert_array_equal(chunked.candidate_sizes, reference.candidate_sizes)
    settings = EvalSettings(**common)
    one, two = summarize(reference, data, taxonomy, settings), summarize(chunked, data, taxonomy, settings)
    for volatile in ("seconds", "cases_per_second"):
        one.pop(volatile), two.pop(volatile)
    assert one == two


def test_batch_plan_respects_limits_and_covers_every_target_once():
    counts = np.array([5, 0, 12, 3, 1, 7])
    lengths = counts + 1
    batches = plan_batches(counts, lengths, max_rows=4, max_windows=2)
    covered = {w: [] for w in range(len(counts))}
    for pieces in batches:
        assert len(pieces) <= 2 and sum(p.end_target - p.first_target for p in pieces) <= 4
        for piece in pieces:
            covered[piece.window] += list(range(piece.first_target, piece.end_target))
    assert all(sorted(covered[w]) == list(range(counts[w])) for w in covered)


def hand_case():
    """Categories A = items {0, 1, 2}, B = {3}, C = {4, 5}; sequences [0, 3, 4, 1] and [5, 2]."""
    taxonomy = Taxonomy.from_table(pd.DataFrame({"cat": list("AAABCC"), "item": list("012345")}), ["cat", "item"])
    data = SequenceData(np.array([0, 3, 4, 1, 5, 2]), np.array([0, 4, 6]), np.array(["s1", "s2"]))
    cat_table = torch.zeros(6, 3)
    cat_table[0] = torch.tensor([0.0, 5, 1])   # after item 0: B, then C
    cat_table[3] = torch.tensor([2.0, 0, 1])   # after item 3: A, then C
    cat_table[4] = torch.tensor([3.0, 0, 3])   # after item 4: A and C tie -> A first
    cat_table[5] = torch.tensor([0.0, 0, 9])   # after item 5: C, then A (tie with B, lower index)

    class HandModel(torch.nn.Module):
        def predict(self, batch):
            where = batch["targets"] != PAD
            last = batch["inputs"][where]
            return {"cat": cat_table[last], "item": torch.zeros(len(last), 6)}  # items: all tied
    return taxonomy, data, HandModel()


@pytest.mark.parametrize("options,coverage,fraction,item_ranks", [
    ({"candidate_k": 1}, 2 / 4, (1 + 3 + 3 + 2) / 24, [1, math.inf, 2, math.inf]),
    ({"candidate_k": 2}, 4 / 4, (3 + 5 + 5 + 5) / 24, [1, 4, 2, 3]),
    ({"candidate_fraction": 0.5}, 3 / 4, (3 + 3 + 3 + 5) / 24, [1, math.inf, 2, 3]),
])
def test_coverage_and_fraction_match_hand_computed_values(options, coverage, fraction, item_ranks):
    taxonomy, data, model = hand_case()
    result = evaluate_model(model, data, taxonomy, EvalSettings(ks=[1, 2, 3], **options), max_len=10)
    assert result["n_cases"] == 4
    assert result["candidate_coverage"] == pytest.approx(coverage)
    assert result["candidate_fraction"] == pytest.approx(fraction)
    assert result["candidate"]["item"] == pytest.approx(ref_metrics(item_ranks, [1, 2, 3]))
    # all item scores tie, so the full rank of target t is t + 1: targets 3, 4, 1, 2
    assert result["full"]["item"] == pytest.approx(ref_metrics([4, 5, 2, 3], [1, 2, 3]))


def test_segments_sum_back_to_overall():
    taxonomy = three_level_taxonomy()
    data = random_data(taxonomy.n_leaves, seed=8, max_length=25)
    model = TableModel(integer_tables(taxonomy, ["cat", "item"], seed=9))
    rng = np.random.default_rng(0)
    per_target = rng.integers(3, 6, data.n_targets)
    settings = EvalSettings(ks=KS, candidate_k=2, history_buckets=[1, 2, 4, 8])
    result = evaluate_model(model, data, taxonomy, settings, max_len=5,
                            segments={"group": per_target,
                                      "parity": Segment("parity", per_target % 2, ["even", "odd"])})
    assert set(result["segments"]) == {"history_length", "group", "parity"}
    assert list(result["segments"]["history_length"]) == ["1", "2-3", "4-7", "8+"]
    assert list(result["segments"]["group"]) == ["3", "4", "5"]
    n = result["n_cases"]
    for name, buckets in result["segments"].items():
        cases = result["segment_cases"][name]
        assert sum(cases.values()) == n
        for mode, by_segment in (("full", result["segments"]), ("candidate", result["candidate_segments"])):
            for level in result["levels"]:
                for metric, overall in result[mode][level].items():
                    total = sum(cases[b] * by_segment[name][b][level][metric] for b in buckets)
                    assert total == pytest.approx(n * overall, abs=1e-9)
        coverage = sum(cases[b] * result["segment_coverage"][name][b] for b in buckets)
        assert coverage == pytest.approx(n * result["candidate_coverage"])
    # the history bucket of each case is the number of events before its target
    positions = data.positions()[data.targets()]
    assert result["segment_cases"]["history_length"]["1"] == int((positions == 1).sum())
    assert result["segment_cases"]["history_length"]["8+"] == int((positions >= 8).sum())


def test_target_frequency_breakdown_counts_training_occurrences():
    taxonomy = three_level_taxonomy()
    # training: item 0 eleven times, item 1 twice, items 2 and 3 never
    train = SequenceData(np.r_[[0] * 11, [1, 1]], np.array([0, 6, 13]), np.arange(2))
    test = SequenceData(np.array([5, 0, 1, 2, 0, 4, 3]), np.array([0, 3, 5, 7]), np.arange(3))
    model = TableModel(integer_tables(taxonomy, ["item"], seed=2))
    settings = EvalSettings(ks=[1, 10], frequency_buckets=[0, 1, 10])
    result = evaluate_model(model, test, taxonomy, settings, max_len=5, train=train)
    # cases (targets after the first event): 0 (11 times), 1 (twice), 0, 3 (unseen)
    assert result["segment_cases"]["target_frequency"] == {"unseen": 1, "1-9": 1, "10+": 2}
    alone = evaluate_model(model, test.select(np.array([2])), taxonomy, EvalSettings(ks=[1, 10], segments=[]),
                           max_len=5)
    assert result["segments"]["target_frequency"]["unseen"]["item"] == pytest.approx(alone["full"]["item"])
    without_train = evaluate_model(model, test, taxonomy, settings, max_len=5)
    assert "target_frequency" not in without_train["segments"]
    assert "target_frequency" in without_train["segments_unavailable"]
    with pytest.raises(ValidationError, match="frequency_buckets"):
        EvalSettings(frequency_buckets=[10, 1])


def test_logsumexp_derivation_ranks_like_summed_probabilities():
    taxonomy = three_level_taxonomy()
    generator = torch.Generator().manual_seed(3)
    tables = {"item": torch.randn(taxonomy.n_leaves, taxonomy.n_leaves, generator=generator) * 3}
    data = random_data(taxonomy.n_leaves, seed=10)
    result = evaluate_model(TableModel(tables), data, taxonomy, EvalSettings(ks=KS, segments=[]), max_len=50)
    assert result["derived_levels"] == ["dept", "cat"]
    for level in ("dept", "cat"):
        ranks = []
        for leaf, scores in ref_cases(data, taxonomy, tables):
            item_scores = scores["item"]
            parent = taxonomy.ancestor_table(level)
            probability = [0.0] * taxonomy.n_nodes(level)
            total = sum(math.exp(v) for v in item_scores)
            for j, value in enumerate(item_scores):
                probability[parent[j]] += math.exp(value) / total
            ranks.append(ref_rank(probability, int(parent[leaf])))
        assert result["full"][level] == pytest.approx(ref_metrics(ranks, KS), abs=1e-12)


def test_model_state_and_context_length():
    taxonomy = three_level_taxonomy()
    data = random_data(taxonomy.n_leaves, seed=11)
    model = TableModel(integer_tables(taxonomy, ["item"]))
    model.train()
    evaluate_model(model, data, taxonomy, EvalSettings(segments=[]), max_len=3)
    assert model.training  # restored after evaluation
    with pytest.raises(ValueError, match="context length"):
        evaluate_model(model, data, taxonomy, EvalSettings())
    # eval.max_len overrides the caller's max_len: with max_len 1 the model never sees 2 events
    one = evaluate_model(model, data, taxonomy, EvalSettings(max_len=1, segments=[]), max_len=50)
    plain = evaluate_model(model, data, taxonomy, EvalSettings(segments=[]), max_len=1)
    assert one["full"] == plain["full"]


def test_bad_predictions_and_settings_are_named():
    taxonomy = three_level_taxonomy()
    data = random_data(taxonomy.n_leaves, seed=12)

    class Broken(torch.nn.Module):
        def __init__(self, make):
            super().__init__()
            self.make = make

        def predict(self, batch):
            return self.make(int((batch["targets"] != PAD).sum()))

    nan = torch.zeros(1, taxonomy.n_leaves)
    nan[0, 3] = math.nan
    with pytest.raises(ValueError, match="'item' contain NaN"):
        evaluate_model(Broken(lambda m: {"item": nan.expand(m, -1)}), data, taxonomy, max_len=5)
    with pytest.raises(ValueError, match=r"shape \(\d+, 39\), expected \(\d+, 40\)"):
        evaluate_model(Broken(lambda m: {"item": torch.zeros(m, 39)}), data, taxonomy, max_len=5)
    with pytest.raises(ValueError, match="unknown level 'shelf'"):
        evaluate_model(Broken(lambda m: {"item": torch.zeros(m, 40)}), data, taxonomy,
                       EvalSettings(candidate_level="shelf", candidate_k=1), max_len=5)
    with pytest.raises(ValueError, match="must be coarser"):
        evaluate_model(Broken(lambda m: {"item": torch.zeros(m, 40)}), data, taxonomy,
                       EvalSettings(candidate_level="item", candidate_k=1), max_len=5)
    with pytest.raises(ValueError, match="finer than the finest level the model scores"):
        evaluate_model(Broken(lambda m: {"cat": torch.zeros(m, 7)}), data, taxonomy,
                       EvalSettings(levels=["item"]), max_len=5)
    outside = SequenceData(np.array([1, 2, 40]), np.array([0, 3]), np.array(["s"]))
    with pytest.raises(ValueError, match="event 2 has leaf index 40"):
        evaluate_model(Broken(lambda m: {"item": torch.zeros(m, 40)}), outside, taxonomy, max_len=5)
    with pytest.raises(ValidationError, match="either candidate_k or candidate_fraction"):
        EvalSettings(candidate_k=2, candidate_fraction=0.1)
    with pytest.raises(ValidationError, match="adaptive takes candidate_fraction"):
        EvalSettings(candidate_k=2, candidate_mode="adaptive")
    # a level or mode alone describes candidates without turning them on
    assert not EvalSettings(candidate_level="cat", candidate_mode="adaptive").candidate_enabled
    assert "candidate" not in evaluate_model(Broken(lambda m: {"item": torch.zeros(m, 40)}), data, taxonomy,
                                             EvalSettings(candidate_level="cat", segments=[]), max_len=5)
    lonely = SequenceData(np.array([1, 2]), np.array([0, 1, 2]), np.array(["a", "b"]))
    with pytest.raises(ValueError, match="no evaluation cases"):
        evaluate_model(Broken(lambda m: {"item": torch.zeros(m, 40)}), lonely, taxonomy, max_len=5)
    with pytest.raises(ValidationError, match="history_buckets"):
        EvalSettings(history_buckets=[4, 2])
    assert EvalSettings(ks=[20, 10, 20]).ks == [10, 20]


def test_model_with_coarse_levels_only():
    """A model scoring only coarse levels (e.g. region and cell) is evaluated at those levels."""
    taxonomy = three_level_taxonomy()
    data = random_data(taxonomy.n_leaves, seed=13)
    tables = integer_tables(taxonomy, ["dept", "cat"], seed=14)
    result = evaluate_model(TableModel(tables), data, taxonomy,
                            EvalSettings(ks=KS, candidate_level="dept", candidate_k=1, segments=[]), max_len=50)
    assert result["levels"] == ["dept", "cat"] and result["derived_levels"] == []
    cases = ref_cases(data, taxonomy, tables)
    ranks = [ref_rank(scores["cat"], int(taxonomy.ancestors(np.array([leaf]), "cat")[0]),
                      {c for c in range(taxonomy.n_nodes("cat"))
                       if taxonomy.node_ancestors([c], "cat", "dept")[0] == ref_rank_top(scores["dept"])})
             for leaf, scores in cases]
    assert result["candidate"]["cat"] == pytest.approx(ref_metrics(ranks, KS), abs=1e-12)


def ref_rank_top(scores):
    return sorted(range(len(scores)), key=lambda j: (-scores[j], j))[0]


def test_exclude_history_ranks_only_items_outside_the_case_history():
    """RecBole's full-sort protocol: every leaf of the case's earlier events (its whole sequence
    before the target) is removed from the ranking, the target excepted."""
    taxonomy = three_level_taxonomy()
    tables = integer_tables(taxonomy, ["item"])
    data = random_data(taxonomy.n_leaves, seed=3)
    settings = EvalSettings(ks=KS, segments=[], exclude_history=True)
    result = evaluate_model(TableModel(tables), data, taxonomy, settings, max_len=50)
    ranks, cases = [], ref_cases(data, taxonomy, tables)
    histories = [data.sequence(s)[:p].tolist() for s in range(data.n_sequences)
                 for p in range(1, data.lengths[s]) if data.targets()[data.offsets[s] + p]]
    for (target, scores), history in zip(cases, histories):
        allowed = set(range(taxonomy.n_leaves)) - (set(history) - {target})
        ranks.append(ref_rank(scores["item"], target, allowed))
    assert any(len(set(history)) > 1 for history in histories)
    assert result["full"]["item"] == pytest.approx(ref_metrics(ranks, KS), abs=1e-12)
    plain = evaluate_model(TableModel(tables), data, taxonomy, EvalSettings(ks=KS, segments=[]), max_len=50)
    assert result["full"]["item"]["MRR@10"] > plain["full"]["item"]["MRR@10"]
