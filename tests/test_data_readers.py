"""Readers on the real datasets in ../shared/data (skipped only when that folder is absent)."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest

from hmtrec.data.loading import DataConfig, load_data


@pytest.fixture(scope="module")
def digi(data_dir):
    return load_data(DataConfig(source="diginetica-sessions", path=str(data_dir / "diginetica-sessions")))


def test_diginetica_sessions_counts_and_catalogue(digi, data_dir):
    taxonomy = digi.taxonomy
    assert taxonomy.level_names == ["category", "item"]
    assert taxonomy.n_leaves == 43_097 and taxonomy.n_nodes("category") == 995
    # train + valid are exactly the 186,670 released training sessions; valid is the last 10%
    assert digi.train.n_sequences + digi.valid.n_sequences == 186_670
    assert digi.valid.n_sequences == round(186_670 * 0.1)
    assert digi.train.n_events + digi.valid.n_events == 906_140
    assert digi.valid.sequence_ids.min() > digi.train.sequence_ids.max()
    assert digi.test.n_targets == 60_858
    # each item's parent is its category in item_category.csv
    table = pd.read_csv(data_dir / "diginetica-sessions" / "item_category.csv.gz")
    leaves = taxonomy.index_of(table["item_id"].astype(str))
    parents = taxonomy.labels_of(taxonomy.ancestors(leaves, "category"), "category")
    assert (parents.astype(str) == table["category_id"].astype(str).to_numpy()).all()


def test_diginetica_sessions_test_targets_are_exactly_the_released_cases(digi, data_dir):
    with gzip.open(data_dir / "diginetica-sessions" / "test_prefixes.tsv.gz", "rt") as f:
        released = [tuple(line.rstrip("\n").split("\t")) for line in f]
    test, labels = digi.test, digi.taxonomy.node_labels[-1]
    rebuilt = []
    sequence_of = test.sequence_index()
    for event in np.flatnonzero(test.targets()):
        start = test.offsets[sequence_of[event]]
        rebuilt.append((" ".join(labels[test.leaves[start:event]]), labels[test.leaves[event]]))
    assert len(rebuilt) == len(released) == 60_858
    assert sorted(rebuilt) == sorted(released)
    # even in file order: sessions in order, each session's prefixes longest first
    order = np.lexsort((-np.flatnonzero(test.targets()), sequence_of[test.targets()]))
    assert [rebuilt[i] for i in order] == released


def test_diginetica_sessions_train_on_all_and_subsample(data_dir):
    path = str(data_dir / "diginetica-sessions")
    full = load_data(DataConfig(source="diginetica-sessions", path=path, split={"train_on_all": True},
                                max_sequences=2_000))
    assert full.train.n_sequences == 2_000  # valid folded back into train
    assert 500 < full.test.n_targets < 1_000 and full.test.n_targets == full.test.targets().sum()
    assert any("max_sequences" in r.name for r in full.reports)


def test_movielens_1m_leave_one_out_by_time(data_dir):
    prepared = load_data(DataConfig(source="movielens-1m", path=str(data_dir / "movielens-1m")))
    taxonomy = prepared.taxonomy
    assert taxonomy.level_names == ["genre", "movie"] and taxonomy.n_nodes("genre") == 18
    assert prepared.dataset.leaf_text[taxonomy.index_of(["1"])[0]] == "Toy Story (1995) Animation Children's Comedy"
    assert taxonomy.labels_of(taxonomy.ancestors(taxonomy.index_of(["1"]), "genre"), "genre")[0] == "Animation"
    train, valid, test = prepared.train, prepared.valid, prepared.test
    assert test.n_sequences == valid.n_sequences == train.n_sequences == 2_999
    assert test.n_targets == valid.n_targets == 2_999
    # test = whole history with only the last event as target; valid = one event shorter; train = two shorter
    assert np.array_equal(test.lengths, valid.lengths + 1) and np.array_equal(valid.lengths, train.lengths + 1)
    assert np.array_equal(np.flatnonzero(test.targets()), test.offsets[1:] - 1)
    raw = pd.read_csv(data_dir / "movielens-1m" / "ratings_users0001-2999.dat.gz", sep="::", engine="python",
                      names=["user", "movie", "rating", "time"])
    raw = raw[raw.groupby("movie")["movie"].transform("size") >= 5]  # the item filter comes first
    last_time = raw.groupby("user")["time"].max()
    assert np.array_equal(test.timestamps[test.offsets[1:] - 1], last_time.loc[test.sequence_ids].to_numpy())
    # no test-period information in training: every user's training events precede its test and valid events
    for split in (train,):
        last_train = split.timestamps[split.offsets[1:] - 1]
        assert (last_train <= valid.timestamps[valid.offsets[1:] - 1]).all()
        assert (valid.timestamps[valid.offsets[1:] - 1] <= test.timestamps[test.offsets[1:] - 1]).all()
    for s in range(0, 2_999, 101):
        assert np.array_equal(train.sequence(s), test.sequence(s)[:-2])
        assert np.all(np.diff(test.timestamps[test.offsets[s]:test.offsets[s + 1]]) >= 0)


def test_movielens_100k_first_flagged_genre(data_dir):
    prepared = load_data(DataConfig(source="movielens-100k", path=str(data_dir / "movielens-100k")))
    taxonomy = prepared.taxonomy
    assert prepared.test.n_sequences == 943 and prepared.test.n_targets == 943
    goldeneye = taxonomy.index_of(["2"])[0]   # flags: Action, Adventure, Thriller
    assert taxonomy.labels_of([taxonomy.ancestors(goldeneye, "genre")], "genre")[0] == "Action"
    assert prepared.dataset.leaf_text[goldeneye] == "GoldenEye (1995) Action Adventure Thriller"
    # every movie kept has >= 5 ratings (the item filter), counted over the whole log
    counts = np.bincount(np.concatenate([prepared.test.leaves]), minlength=taxonomy.n_leaves)
    assert counts.min() >= 5
