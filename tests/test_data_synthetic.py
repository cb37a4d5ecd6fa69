"""The synthetic generator: determinism, real hierarchical structure, skew, drift, text."""

from __future__ import annotations

import numpy as np
import pytest

from hmtrec.data.loading import DataConfig, load_data
from hmtrec.data.synthetic import SyntheticConfig, generate

SMALL = SyntheticConfig(n_items=2_000, level_sizes=[10, 80], n_sessions=8_000, days=20)


@pytest.fixture(scope="module")
def small():
    return generate(SMALL, seed=3)


def test_same_seed_same_output_and_other_seed_differs(small):
    again = generate(SMALL, seed=3)
    assert again.events.equals(small.events)
    assert again.leaf_text == small.leaf_text
    assert again.taxonomy.to_dict() == small.taxonomy.to_dict()
    other = generate(SMALL, seed=4)
    assert not np.array_equal(other.events["item"].to_numpy()[:1000], small.events["item"].to_numpy()[:1000])


def test_shape_of_catalogue_and_log(small):
    taxonomy = small.taxonomy
    assert taxonomy.level_names == ["L1", "L2", "item"]
    assert [taxonomy.n_nodes(level) for level in range(3)] == [10, 80, 2_000]
    assert taxonomy.leaf_counts("L2").min() >= 1 and taxonomy.leaf_counts("L1").min() >= 1
    events = small.events
    assert events["sequence"].nunique() == 8_000
    assert events["item"].dtype == np.int32
    assert events["item"].min() >= 0 and events["item"].max() < 2_000
    # sorted by session, time non-decreasing within a session, sessions numbered in time order
    seq, t = events["sequence"].to_numpy(), events["time"].to_numpy()
    same = seq[1:] == seq[:-1]
    assert np.all(np.diff(seq) >= 0) and np.all(np.diff(t)[same] >= 0)
    first_times = events.groupby("sequence")["time"].min().to_numpy()
    assert np.all(np.diff(first_times) >= 0)
    assert 0 <= t.min() and t.max() < 21 * 86_400
    mean_length = len(events) / 8_000
    assert 5.0 < mean_length < 7.0  # mean_session_length 6, clipped at 50


def test_sessions_dwell_in_related_categories(small):
    taxonomy, events = small.taxonomy, small.events
    items = events["item"].to_numpy()
    same_session = events["sequence"].to_numpy()[1:] == events["sequence"].to_numpy()[:-1]
    l1, l2 = taxonomy.ancestors(items, "L1"), taxonomy.ancestors(items, "L2")
    same_l2 = (l2[1:] == l2[:-1])[same_session].mean()
    same_l1 = (l1[1:] == l1[:-1])[same_session].mean()
    # what consecutive events would share if they were independent draws from the same marginal
    share_l2 = np.bincount(l2, minlength=80) / len(l2)
    assert same_l2 > 0.65 and same_l2 > 10 * (share_l2 ** 2).sum()
    assert same_l1 > same_l2 + 0.05  # moves between L2 categories mostly stay under the same L1


def test_popularity_is_skewed_but_not_degenerate(small):
    counts = np.sort(np.bincount(small.events["item"], minlength=2_000))[::-1]
    top_share = counts[:20].sum() / counts.sum()     # top 1% of items
    assert 0.05 < top_share < 0.5
    assert (counts > 0).mean() > 0.6


def test_drift_new_items_appear_late_and_interests_move(small):
    events = small.events
    late = events["time"].to_numpy() > 10 * 86_400
    early_items = set(np.unique(events["item"].to_numpy()[~late]))
    late_items = np.unique(events["item"].to_numpy()[late])
    new_late = [i for i in late_items if i not in early_items]
    assert len(new_late) > 20
    l1 = small.taxonomy.ancestors(events["item"].to_numpy(), "L1")
    early_share = np.bincount(l1[~late], minlength=10) / (~late).sum()
    late_share = np.bincount(l1[late], minlength=10) / late.sum()
    assert np.abs(early_share - late_share).sum() > 0.1  # total variation * 2


def test_item_text_names_its_categories(small):
    taxonomy, text = small.taxonomy, small.leaf_text
    assert len(text) == 2_000 and all(len(t.split()) == 5 for t in text)
    l2 = taxonomy.ancestor_table("L2")
    # the second word names the L2 category for ~90% of items: items sharing it share the category
    words = np.array([t.split()[1] for t in text])
    agree = [np.mean(l2[words == w] == np.bincount(l2[words == w]).argmax()) for w in np.unique(words)[:40]]
    assert np.mean(agree) > 0.8


def test_rejects_inconsistent_sizes():
    with pytest.raises(ValueError, match="non-decreasing"):
        SyntheticConfig(n_items=50, level_sizes=[10, 100])
    with pytest.raises(ValueError, match="level names"):
        SyntheticConfig(level_names=["a", "b"])


def test_four_level_catalogue():
    data = generate(SyntheticConfig(n_items=600, level_sizes=[4, 12, 40], n_sessions=500,
                                    level_names=["dept", "aisle", "shelf", "sku"]), seed=0)
    assert data.taxonomy.level_names == ["dept", "aisle", "shelf", "sku"]
    assert data.taxonomy.n_nodes("shelf") == 40 and data.taxonomy.n_leaves == 600


def test_medium_size_is_fast_and_compact():
    import time

    started = time.perf_counter()
    data = generate(SyntheticConfig(n_items=100_000, level_sizes=[50, 1_000], n_sessions=200_000,
                                    item_text=False, chunk_sessions=50_000), seed=1)
    assert time.perf_counter() - started < 20
    assert data.events.memory_usage(deep=True).sum() < 25 * len(data.events)
    assert len(data.events) > 1_000_000


def test_loaded_synthetic_split_beats_popularity_with_the_hierarchy():
    prepared = load_data(DataConfig(synthetic=SMALL))
    taxonomy, train, test = prepared.taxonomy, prepared.train, prepared.test
    # no session in two splits, and training ends before the test period starts
    assert not set(train.sequence_ids) & set(test.sequence_ids)
    assert train.timestamps.max() <= prepared.info["cutoffs"]["valid"] < prepared.info["cutoffs"]["test"]
    assert test.timestamps[test.offsets[1:] - 1].min() > prepared.info["cutoffs"]["test"]
    popularity = np.bincount(train.leaves, minlength=taxonomy.n_leaves)
    targets = np.flatnonzero(test.targets())
    truth, previous = test.leaves[targets], test.leaves[targets - 1]
    pop_hit = np.isin(truth, np.argsort(-popularity)[:20]).mean()
    # "popular items in the previous item's L2 category" uses the hierarchy only
    l2 = taxonomy.ancestor_table("L2")
    score = popularity[None, :] + 1e9 * (l2[None, :] == l2[previous[:2000], None])
    top = np.argsort(-score, axis=1)[:, :20]
    l2_hit = (top == truth[:2000, None]).any(axis=1).mean()
    assert l2_hit > pop_hit + 0.25
