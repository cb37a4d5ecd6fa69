"""Filters (hand-counted), split protocols and the leakage check."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hmtrec.data.filters import apply_standard_filters, min_item_support, min_sequence_length
from hmtrec.data.loading import DataConfig, load_data
from hmtrec.data.splits import leave_one_out, order_events, session_time_split, time_fraction_split
from hmtrec.data.synthetic import SyntheticConfig

DAY = 86_400.0


def _frame(sequences: dict[str, list[int]], times: dict[str, list[float]] | None = None) -> pd.DataFrame:
    rows = []
    for name, leaves in sequences.items():
        for k, leaf in enumerate(leaves):
            rows.append((name, leaf, times[name][k] if times else float(k)))
    return pd.DataFrame(rows, columns=["sequence", "leaf", "time"])


FILTER_CASE = {"A": [1, 2], "B": [1], "C": [1, 3, 3], "D": [2, 1, 1]}


def test_single_filters_count_rows_sequences_and_items():
    frame = _frame(FILTER_CASE)
    kept, report = min_sequence_length(frame, 2)
    assert (report.rows_removed, report.sequences_removed, report.items_removed) == (1, 1, 0)
    kept, report = min_item_support(frame, 3)
    assert sorted(kept["leaf"]) == [1, 1, 1, 1, 1]
    assert (report.rows_removed, report.sequences_removed, report.items_removed) == (4, 0, 2)
    assert str(report) == "min item support 3: removed 4 of 9 rows, 0 sequences, 2 items"


def test_srgnn_order_versus_fixed_point():
    frame = _frame(FILTER_CASE)
    kept, reports = apply_standard_filters(frame, min_length=2, min_support=3, mode="srgnn")
    assert [(r.rows_removed, r.sequences_removed, r.items_removed) for r in reports] == \
        [(1, 1, 0), (4, 0, 2), (2, 2, 0)]
    assert kept["sequence"].tolist() == ["D", "D"]   # item 1 now has support 2 < 3: the protocol keeps it
    kept, reports = apply_standard_filters(frame, min_length=2, min_support=3, mode="fixed_point")
    assert len(kept) == 0                            # round 2 removes the last item
    assert [r.rows_removed for r in reports] == [4, 3, 2, 0, 0, 0]  # round 3 finds nothing left to do


def test_order_events_sorts_within_and_across_sequences_keeping_ties_in_file_order():
    frame = pd.DataFrame({"sequence": ["b", "a", "b", "a", "b"], "leaf": [1, 2, 3, 4, 5],
                          "time": [5.0, 9.0, 5.0, 8.0, 1.0]})
    ordered = order_events(frame)
    assert ordered["sequence"].tolist() == ["b", "b", "b", "a", "a"]
    assert ordered["leaf"].tolist() == [5, 1, 3, 4, 2]   # b's two events at time 5 stay in file order


def test_session_time_split_assigns_by_last_event_and_drops_unseen_items():
    # sessions ending on days 1..10; the last 2 days are test, the 2 before valid
    sequences = {f"s{d}": [1, 2, 3] if d < 9 else [1, 9, 2] for d in range(1, 11)}
    times = {f"s{d}": [d * DAY - 100, d * DAY - 50, d * DAY] for d in range(1, 11)}
    split = session_time_split(order_events(_frame(sequences, times)), test_days=2, valid_days=2)
    assert sorted(set(split.train["sequence"])) == [f"s{d}" for d in range(1, 7)]
    assert sorted(set(split.valid["sequence"])) == ["s7", "s8"]
    assert sorted(set(split.test["sequence"])) == ["s10", "s9"]
    # item 9 never occurs in training: removed from test events, sessions stay (length 2)
    assert 9 not in set(split.test["leaf"]) and len(split.test) == 4
    assert split.test["target"].tolist() == [False, True, False, True]
    removed = [r for r in split.reports if r.name == "test: items unseen in training"][0]
    assert (removed.rows_removed, removed.items_removed) == (2, 1)


def test_session_time_split_without_valid_window_uses_the_tail_of_train():
    sequences = {f"s{d:02d}": [1, 2] for d in range(1, 21)}
    times = {f"s{d:02d}": [d * DAY, d * DAY + 1] for d in range(1, 21)}
    split = session_time_split(order_events(_frame(sequences, times)), test_days=5, valid_days=0,
                               valid_tail_fraction=0.2)
    assert split.test["sequence"].nunique() == 5
    # s16..s20 end after the cut (day 20 + 1 s - 5 days); valid = the last 20% of the 15 others
    assert sorted(set(split.valid["sequence"])) == ["s13", "s14", "s15"]
    assert split.train["sequence"].nunique() == 12


def test_leave_one_out_by_time():
    frame = order_events(_frame({"u1": [1, 2, 3, 4, 5], "u2": [6, 7]},
                                {"u1": [5.0, 1.0, 2.0, 3.0, 4.0], "u2": [0.0, 1.0]}))
    split = leave_one_out(frame)
    u1 = split.test[split.test["sequence"] == "u1"]
    assert u1["leaf"].tolist() == [2, 3, 4, 5, 1]              # by time: item 1 was rated last
    assert u1["target"].tolist() == [False] * 4 + [True]
    assert split.valid["leaf"].tolist() == [2, 3, 4, 5]
    assert split.valid["target"].tolist() == [False, False, False, True]
    assert split.train[split.train["sequence"] == "u1"]["leaf"].tolist() == [2, 3, 4]
    assert split.train[split.train["sequence"] == "u2"]["leaf"].tolist() == [6, 7]  # too short: train only
    assert "u2" not in set(split.test["sequence"])


def test_time_fraction_split_keeps_history_as_context():
    frame = order_events(_frame({"u1": [1, 2, 3, 4, 5], "u2": [6, 7, 8]},
                                {"u1": [0.0, 20.0, 50.0, 85.0, 95.0], "u2": [10.0, 90.0, 100.0]}))
    split = time_fraction_split(frame, test_fraction=0.1, valid_fraction=0.2)  # cuts at 70 and 90
    assert split.cutoffs == {"valid": pytest.approx(70.0), "test": pytest.approx(90.0)}
    assert split.train["leaf"].tolist() == [1, 2, 3, 6]
    assert split.valid["leaf"].tolist() == [1, 2, 3, 4]
    assert split.valid["target"].tolist() == [False, False, False, True]
    test = split.test.set_index("leaf")["target"]
    assert [leaf for leaf, is_target in test.items() if is_target] == [5, 7, 8]


@pytest.mark.parametrize("protocol", ["session_time", "leave_one_out", "time_fraction"])
def test_no_test_period_information_leaks_into_training(protocol):
    """Training must hold no event from the test period, no test target, and (session
    protocols) no test session; valid targets never come after test targets' period starts."""
    config = DataConfig(synthetic=SyntheticConfig(n_items=800, level_sizes=[5, 40], n_sessions=3_000, days=12),
                        split={"protocol": protocol, "test_days": 2, "valid_days": 2})
    prepared = load_data(config)
    train, valid, test = prepared.train, prepared.valid, prepared.test
    assert train.n_targets > 0 and valid.n_targets > 0 and test.n_targets > 0
    test_targets = test.targets()
    target_keys = set(zip(test.sequence_ids[test.sequence_index()[test_targets]], test.timestamps[test_targets]))
    train_keys = set(zip(train.sequence_ids[train.sequence_index()], train.timestamps))
    assert not target_keys & train_keys
    valid_targets = valid.targets()
    valid_keys = set(zip(valid.sequence_ids[valid.sequence_index()[valid_targets]], valid.timestamps[valid_targets]))
    assert not valid_keys & train_keys
    if protocol == "leave_one_out":
        # per user: every training event precedes the valid target, which precedes the test target
        common = np.intersect1d(train.sequence_ids, test.sequence_ids)
        last_train = pd.Series(train.timestamps[train.offsets[1:] - 1], index=train.sequence_ids)[common]
        last_test = pd.Series(test.timestamps[test.offsets[1:] - 1], index=test.sequence_ids)[common]
        assert (last_train.to_numpy() <= last_test.to_numpy()).all()
        assert np.array_equal(np.flatnonzero(test_targets), test.offsets[1:] - 1)
    else:
        cutoffs = prepared.info["cutoffs"]
        assert train.timestamps.max() < cutoffs["test"]
        assert train.timestamps.max() <= cutoffs["valid"]
        if protocol == "session_time":
            assert not set(train.sequence_ids) & set(test.sequence_ids)
            assert not set(train.sequence_ids) & set(valid.sequence_ids)
            assert test.timestamps[test.offsets[1:] - 1].min() > cutoffs["test"]
        else:
            assert test.timestamps[test_targets].min() >= cutoffs["test"]
            assert valid.timestamps[valid_targets].max() < cutoffs["test"]


def test_raw_diginetica_sample_follows_the_session_protocol(data_dir):
    prepared = load_data(DataConfig(source="diginetica", path=str(data_dir / "diginetica")))
    train, valid, test = prepared.train, prepared.valid, prepared.test
    assert prepared.taxonomy.level_names == ["category", "item"]
    assert [r.name for r in prepared.reports[:3]] == ["min sequence length 2", "min item support 5",
                                                      "min sequence length 2 (again)"]
    assert prepared.reports[0].rows_removed == 933    # 933 single-view sessions in the sample
    for part in (train, valid, test):
        assert part.lengths.min() >= 2
    assert np.isin(test.leaves, train.leaves).all() and np.isin(valid.leaves, train.leaves).all()
    last = max(test.timestamps.max(), train.timestamps.max())
    assert test.timestamps[test.offsets[1:] - 1].min() > last - 7 * DAY
    assert train.timestamps.max() <= last - 7 * DAY
    assert train.n_sequences > 300 and test.n_sequences > 20


def test_max_sequences_and_train_on_all():
    synthetic = SyntheticConfig(n_items=600, level_sizes=[5, 30], n_sessions=2_000, days=10)
    small = load_data(DataConfig(synthetic=synthetic, max_sequences=500))
    report = small.reports[0]
    assert report.name == "max_sequences 500" and report.sequences_removed == 1_500
    total = small.train.n_sequences + small.valid.n_sequences + small.test.n_sequences
    assert total <= 500 and total > 400  # the rest removed by the length filter
    again = load_data(DataConfig(synthetic=synthetic, max_sequences=500))
    assert np.array_equal(again.test.leaves, small.test.leaves)   # same seed, same subset

    base = load_data(DataConfig(synthetic=synthetic))
    merged = load_data(DataConfig(synthetic=synthetic, split={"train_on_all": True}))
    assert merged.train.n_sequences == base.train.n_sequences + base.valid.n_sequences
    assert np.array_equal(merged.test.leaves, base.test.leaves)

    loo = DataConfig(synthetic=synthetic, split={"protocol": "leave_one_out"})
    base, merged = load_data(loo), load_data(loo.model_copy(update={"split": loo.split.model_copy(
        update={"train_on_all": True})}))
    # each user's training sequence grows by its valid target; test is unchanged
    assert merged.train.n_events == base.train.n_events + base.valid.n_targets
    assert np.array_equal(merged.test.leaves, base.test.leaves)


def test_given_split_refuses_filters_and_synthetic_refuses_given():
    from hmtrec.errors import ConfigError

    with pytest.raises(ConfigError, match="data.filters: the given split is used as released"):
        load_data(DataConfig(source="diginetica-sessions", filters={"min_item_support": 5}))
    with pytest.raises(ConfigError, match="ships no split"):
        load_data(DataConfig(synthetic=SyntheticConfig(n_items=100, level_sizes=[3, 10], n_sessions=50),
                             split={"protocol": "given"}))
