"""Split protocols on the canonical interaction frame.

Input: a frame with columns `sequence`, `leaf`, `time` (and optionally `event`), grouped by
sequence and ordered by time inside each sequence (`order_events` does that). Output: three frames
(train, valid, test), each with a boolean `target` column marking the events to predict.

Protocols:
- `session_time_split` (SR-GNN style): whole sessions go to train / valid / test by the time of
  their last event; the last `test_days` are test. Items unseen in training are removed from
  valid/test events and sessions left shorter than `min_length` are dropped, as the protocol does.
- `leave_one_out` (SASRec style): per user by time, test = last event (with the whole history as
  input), valid = second to last, train = the rest.
- `time_fraction_split` (next-POI style): global time cut-offs; train = events before the valid
  cut, valid targets fall in [valid cut, test cut), test targets after the test cut; earlier events
  of the same user stay as input context.
In every protocol, training never sees an event at or after the first valid/test cut-off, and a
test target is never a training event.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from hmtrec.data.filters import FilterReport, report_mask

SECONDS_PER_DAY = 86_400.0


@dataclass
class SplitFrames:
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    reports: list[FilterReport] = field(default_factory=list)
    description: str = ""
    cutoffs: dict[str, float] = field(default_factory=dict)


def order_events(frame: pd.DataFrame) -> pd.DataFrame:
    """Group events by sequence, sequences ordered by their first event's time (then id), events
    by time; ties keep the input row order, so an order column or file order is respected."""
    frame = frame.reset_index(drop=True)
    first = frame.groupby("sequence", sort=False)["time"].transform("min")
    codes = pd.factorize(frame["sequence"], sort=True)[0]
    order = np.lexsort((np.arange(len(frame)), frame["time"].to_numpy(), codes, first.to_numpy()))
    return frame.iloc[order].reset_index(drop=True)


def positions(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(position within its sequence, sequence length) of each event of an ordered frame."""
    codes = _run_codes(frame["sequence"])
    starts = np.r_[0, np.flatnonzero(codes[1:] != codes[:-1]) + 1]
    lengths = np.diff(np.r_[starts, len(frame)])
    position = np.arange(len(frame)) - np.repeat(starts, lengths)
    return position, np.repeat(lengths, lengths)


def _run_codes(column: pd.Series) -> np.ndarray:
    values = pd.factorize(column, sort=False)[0]
    return values


def _with_default_targets(frame: pd.DataFrame) -> pd.DataFrame:
    position, _ = positions(frame)
    return frame.assign(target=position > 0)


def _seen_in(frame: pd.DataFrame, train: pd.DataFrame) -> np.ndarray:
    """Per event of `frame`: does its item occur in `train`? (a lookup table, no sorting)"""
    leaves, train_leaves = frame["leaf"].to_numpy(), train["leaf"].to_numpy()
    size = int(max(leaves.max(initial=-1), train_leaves.max(initial=-1))) + 1
    seen = np.zeros(size, dtype=bool)
    seen[train_leaves] = True
    return seen[leaves]


def _drop_unseen(frame: pd.DataFrame, train: pd.DataFrame, min_length: int, split: str
                 ) -> tuple[pd.DataFrame, list[FilterReport]]:
    keep = _seen_in(frame, train)
    reports = [report_mask(f"{split}: items unseen in training", frame, keep)]
    kept = frame[keep]
    codes = pd.factorize(kept["sequence"], sort=False)[0]
    long = np.bincount(codes)[codes] >= min_length
    reports.append(report_mask(f"{split}: sequences shorter than {min_length} after that", kept, long))
    return kept[long].reset_index(drop=True), reports


def _tail_sequences(frame: pd.DataFrame, fraction: float) -> np.ndarray:
    """Boolean per event: is its sequence among the last `fraction` of sequences (frame order)?"""
    codes = _run_codes(frame["sequence"])
    n_sequences = int(codes.max()) + 1 if len(codes) else 0
    n_tail = int(round(n_sequences * fraction))
    return codes >= n_sequences - n_tail


def session_time_split(frame: pd.DataFrame, *, test_days: float, valid_days: float = 0.0,
                       valid_tail_fraction: float = 0.1, drop_unseen: bool = True,
                       min_length: int = 2) -> SplitFrames:
    """Whole sessions by the time of their last event. With `valid_days` = 0, valid is the last
    `valid_tail_fraction` of training sessions (in time order) instead of a time window."""
    end = frame.groupby("sequence", sort=False)["time"].transform("max").to_numpy()
    last = float(frame["time"].max())
    test_cut = last - test_days * SECONDS_PER_DAY
    valid_cut = test_cut - valid_days * SECONDS_PER_DAY
    is_test = end > test_cut
    is_valid = (end > valid_cut) & ~is_test
    train, valid, test = frame[~is_test & ~is_valid], frame[is_valid], frame[is_test]
    if valid_days <= 0:
        tail = _tail_sequences(train, valid_tail_fraction)
        train, valid = train[~tail], train[tail]
        valid_text = f"valid = last {valid_tail_fraction:.0%} of training sessions"
    else:
        valid_text = f"valid = sessions ending in the {valid_days:g} days before"
    reports: list[FilterReport] = []
    if drop_unseen:
        valid, valid_reports = _drop_unseen(valid, train, min_length, "valid")
        test, test_reports = _drop_unseen(test, train, min_length, "test")
        reports += valid_reports + test_reports
    description = (f"session split by last-event time: test = sessions ending in the last {test_days:g} days, "
                   f"{valid_text}" + ("; items unseen in training removed from valid/test" if drop_unseen else ""))
    return SplitFrames(_with_default_targets(train.reset_index(drop=True)),
                       _with_default_targets(valid.reset_index(drop=True)),
                       _with_default_targets(test.reset_index(drop=True)),
                       reports, description, {"valid": valid_cut, "test": test_cut})


def leave_one_out(frame: pd.DataFrame, *, drop_unseen: bool = False) -> SplitFrames:
    """Per sequence by time: test target = last event, valid target = the one before, train = the
    rest. Sequences with fewer than 3 events stay whole in training (as SASRec does)."""
    position, length = positions(frame)
    from_end = length - 1 - position
    eligible = length >= 3
    train = frame[~eligible | (from_end >= 2)].reset_index(drop=True)
    valid = frame[eligible & (from_end >= 1)].assign(target=(from_end == 1)[eligible & (from_end >= 1)])
    test = frame[eligible].assign(target=(from_end == 0)[eligible])
    reports: list[FilterReport] = []
    if drop_unseen:
        valid, report_v = _skip_unseen_targets(valid, train, "valid")
        test, report_t = _skip_unseen_targets(test, train, "test")
        reports += [report_v, report_t]
    return SplitFrames(_with_default_targets(train), valid.reset_index(drop=True), test.reset_index(drop=True),
                       reports, "leave-one-out by time: test = each user's last event, valid = second to last, "
                                "train = the rest (users with < 3 events: all in train)")


def time_fraction_split(frame: pd.DataFrame, *, test_fraction: float = 0.1, valid_fraction: float = 0.1,
                        drop_unseen: bool = False) -> SplitFrames:
    """Global time cut-offs over the data's time range: the last `test_fraction` of it holds the
    test targets, the `valid_fraction` before it the valid targets. Each user's earlier events
    remain as input context (never as targets of a later split)."""
    if test_fraction <= 0 or valid_fraction < 0 or test_fraction + valid_fraction >= 1:
        raise ValueError("need 0 < test_fraction, 0 <= valid_fraction and test + valid < 1")
    first, last = float(frame["time"].min()), float(frame["time"].max())
    test_cut = first + (1.0 - test_fraction) * (last - first)
    valid_cut = first + (1.0 - test_fraction - valid_fraction) * (last - first)
    time = frame["time"].to_numpy()
    train = _with_default_targets(frame[time < valid_cut].reset_index(drop=True))
    valid = _targets_in_window(frame[time < test_cut], valid_cut)
    test = _targets_in_window(frame, test_cut)
    reports: list[FilterReport] = []
    if drop_unseen:
        valid, report_v = _skip_unseen_targets(valid, train, "valid")
        test, report_t = _skip_unseen_targets(test, train, "test")
        reports += [report_v, report_t]
    description = (f"time split: train = events before {1 - test_fraction - valid_fraction:.0%} of the time range, "
                   f"valid targets in the next {valid_fraction:.0%}, test targets in the last {test_fraction:.0%}; "
                   f"earlier events of the same user are input context")
    return SplitFrames(train, valid, test, reports, description, {"valid": valid_cut, "test": test_cut})


def _targets_in_window(frame: pd.DataFrame, start: float) -> pd.DataFrame:
    """Targets = events at or after `start` (not a sequence's first event); sequences without a
    target are dropped."""
    frame = frame.reset_index(drop=True)
    position, _ = positions(frame)
    target = (frame["time"].to_numpy() >= start) & (position > 0)
    frame = frame.assign(target=target)
    has_target = frame.groupby("sequence", sort=False)["target"].transform("any").to_numpy()
    return frame[has_target].reset_index(drop=True)


def _skip_unseen_targets(frame: pd.DataFrame, train: pd.DataFrame, split: str) -> tuple[pd.DataFrame, FilterReport]:
    """Unseen items stay as input context but are no longer targets; sequences left without a
    target are dropped. The report counts removed rows (of those sequences) and, in its
    detail, the targets no longer scored."""
    unseen_target = frame["target"].to_numpy() & ~_seen_in(frame, train)
    frame = frame.assign(target=frame["target"].to_numpy() & ~unseen_target)
    has_target = frame.groupby("sequence", sort=False)["target"].transform("any").to_numpy()
    report = report_mask(f"{split}: targets with items unseen in training", frame, has_target,
                         detail=f"{int(unseen_target.sum()):,} targets no longer scored")
    return frame[has_target].reset_index(drop=True), report


def given_split_valid_tail(train: pd.DataFrame, fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """For a benchmark that ships only train and test: the last `fraction` of training sequences
    (in file order) become the validation split."""
    tail = _tail_sequences(train, fraction)
    return (_with_default_targets(train[~tail].reset_index(drop=True)),
            _with_default_targets(train[tail].reset_index(drop=True)))
