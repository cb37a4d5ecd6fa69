"""Action streams and the active / dormant example sampler."""

import zlib

import numpy as np
import pytest

from hmtrec.data.actions import (ACTIVE, DAY_SECONDS, DORMANT, ActionStreams, ExampleSettings, StreamSettings,
                                 calendar_features, sample_examples)
from hmtrec.data.sequences import PAD, SequenceData
from hmtrec.errors import ConfigError, DataError


def tiny_log():
    """User u acts on days 0, 10, 20, 28, 40 (target on day 40); user v on days 0, 50 (target 50)."""
    return SequenceData(leaves=np.array([0, 1, 2, 3, 4, 5, 6]), offsets=np.array([0, 5, 7]),
                        sequence_ids=np.array(["u", "v"]),
                        timestamps=np.array([0, 10, 20, 28, 40, 0, 50]) * DAY_SECONDS,
                        target_mask=np.array([0, 0, 0, 0, 1, 0, 1], dtype=bool))


def random_log(seed=0, n_users=6, n_events=40, n_leaves=12, n_types=3):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, n_events, n_users)
    offsets = np.r_[0, np.cumsum(lengths)]
    times = np.concatenate([np.sort(rng.uniform(0, 200, n)) for n in lengths]) * DAY_SECONDS
    return SequenceData(leaves=rng.integers(0, n_leaves, offsets[-1]), offsets=offsets,
                        sequence_ids=np.array([f"user{i}" for i in range(n_users)]), timestamps=times,
                        event_types=rng.integers(0, n_types, offsets[-1]),
                        event_type_names=["booking", "view", "search"][:n_types])


def airbnb_settings(**overrides):
    streams = [StreamSettings(name="bookings", event_types=["booking"], max_events=8, dormant=True),
               StreamSettings(name="recent", event_types=["view", "search"], max_age_days=14, max_events=6)]
    return ExampleSettings(**{"streams": streams, "active_days": 3, "dormant_days": (20.0, 60.0), **overrides})


def test_streams_and_offsets_on_a_hand_made_case():
    settings = ExampleSettings(active_days=2, dormant_days=(15.0, 25.0))
    examples, report = sample_examples(tiny_log(), settings, seed=3)
    assert report.made == {"active": 4, "dormant": 2} and report.n_targets == 2
    np.testing.assert_array_equal(examples.kind, [ACTIVE, ACTIVE, DORMANT] * 2)
    np.testing.assert_allclose(examples.lead_days[[0, 1, 3, 4]], [1, 2, 1, 2])
    assert np.all((examples.lead_days[[2, 5]] >= 15) & (examples.lead_days[[2, 5]] <= 25))
    batch = ActionStreams(tiny_log(), settings).batch(examples)
    # u at day 39 and 38: long stream = actions at least 7 days old (days 0, 10, 20, 28); short stream
    # = the last 7 days (none); v at day 49: day 0 only.
    assert batch["long_leaves"][0].tolist() == [0, 1, 2, 3]
    assert batch["long_age_days"][0].tolist() == [39, 29, 19, 11]
    assert batch["long_leaves"][3].tolist()[:1] == [5] and set(batch["long_leaves"][3].tolist()[1:]) == {PAD}
    assert (batch["short_leaves"] == PAD).all()
    assert batch["targets"].tolist() == [4, 4, 4, 6, 6, 6]


def test_short_stream_keeps_recent_actions_and_caps_length():
    log = SequenceData(leaves=np.arange(6), offsets=np.array([0, 6]), sequence_ids=np.array(["u"]),
                       timestamps=np.array([0.0, 1.0, 9.0, 9.5, 9.8, 12.0]) * DAY_SECONDS,
                       target_mask=np.array([0, 0, 0, 0, 0, 1], dtype=bool))
    settings = ExampleSettings(streams=[StreamSettings(name="long", min_age_days=7, dormant=True),
                                        StreamSettings(name="short", max_age_days=7, max_events=2)],
                               active_days=1, dormant_days=(2.0, 3.0), dormant_per_target=0)
    examples, _ = sample_examples(log, settings)
    batch = ActionStreams(log, settings).batch(examples)       # t = day 11
    assert batch["short_leaves"].tolist() == [[3, 4]]           # days 9.5, 9.8 (day 9 dropped by the cap)
    assert batch["long_leaves"].tolist() == [[0, 1]]            # days 0 and 1 are >= 7 days old


def test_sampler_never_reads_anything_at_or_after_prediction_time():
    log = random_log()
    settings = airbnb_settings()
    streams = ActionStreams(log, settings)
    examples, report = sample_examples(log, settings, seed=1)
    assert report.made["active"] > 20 and report.made["dormant"] > 5
    batch = streams.batch(examples)
    for name in streams.stream_names:
        real = batch[f"{name}_leaves"] != PAD
        assert (batch[f"{name}_age_days"][real] > 0).all()
    # Stronger: rebuild every example from a log holding only that user's actions strictly before t,
    # and with everything after t scrambled: the example's tensors must be identical.
    rng = np.random.default_rng(0)
    for row in rng.choice(len(examples), 25, replace=False):
        user, t = examples.user[row], examples.time[row]
        start, end = log.offsets[user], log.offsets[user + 1]
        leaves, types, times = (log.leaves[start:end].copy(), log.event_types[start:end].copy(),
                                log.timestamps[start:end].copy())
        future = times >= t
        leaves[future] = rng.integers(0, 12, future.sum())
        types[future] = rng.integers(0, 3, future.sum())
        altered = SequenceData(leaves, np.array([0, end - start]), log.sequence_ids[user:user + 1], timestamps=times,
                               event_types=types, event_type_names=log.event_type_names)
        one = examples.subset(np.array([row]))
        one.user = np.array([0])
        rebuilt = ActionStreams(altered, settings).batch(one)
        original = streams.batch(examples, np.array([row]))
        for key in original:
            width = rebuilt[key].shape[-1] if rebuilt[key].dim() > 1 else None
            left = original[key][..., :width] if width else original[key]
            assert np.array_equal(left.numpy(), rebuilt[key].numpy()), key


def test_dormant_examples_see_long_term_history_only():
    log = random_log(seed=2)
    settings = airbnb_settings()
    examples, _ = sample_examples(log, settings, seed=0)
    batch = ActionStreams(log, settings).batch(examples)
    dormant = batch["kind"] == DORMANT
    assert dormant.any()
    assert (batch["recent_leaves"][dormant] == PAD).all()
    assert (batch["lead_days"][dormant] >= 20).all() and (batch["lead_days"][dormant] <= 60).all()
    real = batch["bookings_leaves"] != PAD
    assert (batch["bookings_types"][real] == 0).all()                         # bookings only
    recent = batch["recent_leaves"] != PAD
    assert set(batch["recent_types"][recent].tolist()) <= {1, 2}
    assert (batch["recent_age_days"][recent] < 14).all()


def test_sampling_is_deterministic_and_drops_examples_without_history():
    log = random_log(seed=4)
    settings = airbnb_settings(max_targets=30)
    first, report = sample_examples(log, settings, seed=7)
    again, _ = sample_examples(log, settings, seed=7)
    other, _ = sample_examples(log, settings, seed=8)
    np.testing.assert_array_equal(first.time, again.time)
    assert not np.array_equal(np.sort(first.time), np.sort(other.time))
    assert report.n_targets == 30 and report.n_targets_available == log.n_targets
    made = sum(report.made.values())
    assert made == len(first)
    assert made + sum(report.dropped_without_history.values()) == 30 * (3 + 1)
    # a user's first action has no history at all: every example for it is dropped
    first_only = log.with_targets(log.positions() == 0)
    empty, report = sample_examples(first_only, settings)
    assert len(empty) == 0 and report.dropped_without_history["active"] == 3 * min(30, log.n_sequences)


def test_bad_inputs_name_the_problem():
    log = random_log()
    with pytest.raises(ConfigError, match=r"examples.streams.0.event_types.*'purchase'"):
        ActionStreams(log, ExampleSettings(streams=[StreamSettings(name="b", event_types=["purchase"], dormant=True)]))
    unsorted = SequenceData(np.array([0, 1]), np.array([0, 2]), np.array(["u"]),
                            timestamps=np.array([5.0, 1.0]))
    with pytest.raises(DataError, match=r"sequence 'u' is not in time order"):
        ActionStreams(unsorted, ExampleSettings())
    with pytest.raises(DataError, match="no timestamps"):
        ActionStreams(SequenceData(np.array([0]), np.array([0, 1]), np.array(["u"])), ExampleSettings())
    with pytest.raises(ValueError, match="beyond the active window"):
        ExampleSettings(active_days=5, dormant_days=(3.0, 10.0))
    with pytest.raises(ValueError, match="dormant: true"):
        ExampleSettings(streams=[StreamSettings(name="s")])


def test_calendar_features_follow_the_time_origin():
    # 2012-04-03 was a Tuesday in ISO week 14; +30 days is 2012-05-03 (Thursday, week 18)
    features = calendar_features(np.array([0.0, 30 * DAY_SECONDS]), "2012-04-03T18:00:00")
    assert features["month"].tolist() == [3, 4]
    assert features["weekday"].tolist() == [1, 3]
    assert features["week"].tolist() == [13, 17]
    # a negative UTC offset moves 02:00 UTC on a Wednesday back to Tuesday evening
    local = calendar_features(np.array([0.0]), "2012-04-04T02:00:00", utc_offset_hours=-5)
    assert local["weekday"].tolist() == [1]


def test_batches_carry_each_actions_local_clock_and_a_stable_user_hash():
    log = tiny_log()
    settings = ExampleSettings(streams=[StreamSettings(name="all", max_events=8, dormant=True)], active_days=1,
                               dormant_days=(2.0, 3.0), dormant_per_target=0,
                               time_origin="2024-01-01T00:00:00", utc_offset_hours=-5)
    examples, _ = sample_examples(log, settings)
    batch = ActionStreams(log, settings).batch(examples)
    # user u's actions on days 0, 10, 20, 28 at 00:00 UTC are 19:00 local the evening before
    assert batch["all_hour"][0, :4].tolist() == [19] * 4
    # 2023-12-31 (Sunday), 01-10 (Wed), 01-20 (Sat), 01-28 (Sun): weekday Monday = 0
    assert batch["all_weekday"][0, :4].tolist() == [6, 2, 5, 6]
    assert batch["user_hash"].tolist() == [zlib.crc32(b"u"), zlib.crc32(b"v")]


def test_active_per_target_draws_distinct_active_days():
    log = random_log(seed=3)
    settings = airbnb_settings()
    every, _ = sample_examples(log, settings, seed=2)
    drawn, _ = sample_examples(log, settings, seed=2, active_per_target=1)
    active = drawn.kind == ACTIVE
    lead = np.round(drawn.lead_days[active])
    assert set(lead.tolist()) <= set(range(1, settings.active_days + 1)) and len(set(lead.tolist())) > 1
    # one active example per target event (those whose drawn day has history)
    assert len(np.unique(drawn.target_time[active] + drawn.user[active] * 1e12)) == active.sum()
    assert active.sum() < (every.kind == ACTIVE).sum()
