"""User-action streams and the active / dormant example sampler (the destination-recommendation pattern).

An *action log* is a `SequenceData` of per-user sequences with timestamps (seconds) and, optionally,
action types (booking, view, search; check-in; ...). A training or test *example* is

    (user, prediction time t, target leaf at time T >= t, history strictly before t)

where the history is cut into named *streams*: each stream keeps the actions of chosen types whose
age at t lies in a window (e.g. a long-term stream of actions older than a week and a short-term
stream of the last week), the most recent `max_events` of them.

For every target event at time T the sampler makes
- *active* examples at t = T - 1 day, ..., T - k days, with every stream (full history), and
- *dormant* examples at t = T - D, D drawn uniformly from a range of days further back, with the
  streams flagged `dormant` only (long-term history: the user has shown no recent activity).

Examples are stored as flat arrays (user, t, target, kind); their streams are cut from the log on
demand, per batch, with one vectorised binary search per stream. Nothing at or after t is read.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from pydantic import Field, model_validator

from hmtrec.config import StrictModel
from hmtrec.data.sequences import PAD, SequenceData
from hmtrec.errors import ConfigError, DataError
from hmtrec.rundir import get_logger

DAY_SECONDS = 86_400.0
ACTIVE, DORMANT = 0, 1
KIND_NAMES = ("active", "dormant")
DEFAULT_EVENT_TYPE = "event"  # the one action type of a log without event types
CALENDAR_FEATURES = {"month": 12, "week": 53, "weekday": 7}


class StreamSettings(StrictModel):
    """One stream of a user's history, as seen at prediction time t."""

    name: str
    event_types: list[str] | None = None    # action types feeding the stream; None: every type
    min_age_days: float = Field(0.0, ge=0)  # keep actions at least this old at t ...
    max_age_days: float | None = None       # ... and strictly younger than this (None: no limit)
    max_events: int = Field(64, ge=1)       # the most recent ones
    dormant: bool = False                   # also fed to dormant examples (long-term history)

    @model_validator(mode="after")
    def _check_ages(self):
        if self.max_age_days is not None and self.max_age_days <= self.min_age_days:
            raise ValueError(f"stream {self.name!r}: max_age_days must exceed min_age_days")
        return self


def _default_streams() -> list[StreamSettings]:
    return [StreamSettings(name="long", min_age_days=7.0, max_events=64, dormant=True),
            StreamSettings(name="short", max_age_days=7.0, max_events=32)]


class ExampleSettings(StrictModel):
    """How examples are cut from an action log (config section `examples`)."""

    streams: list[StreamSettings] = Field(default_factory=_default_streams)
    active_days: int = Field(3, ge=0)        # active examples at T-1, ..., T-k days
    dormant_days: tuple[float, float] = (30.0, 120.0)  # dormant offsets drawn uniformly from this range
    dormant_per_target: int = Field(1, ge=0)
    max_targets: int | None = Field(None, ge=1)   # sub-sample target events (seeded) for quick runs
    time_origin: str | None = None           # calendar time of timestamp 0 (ISO); None: Unix epoch
    utc_offset_hours: float = 0.0            # local time = UTC + offset, for calendar features
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        names = [stream.name for stream in self.streams]
        if not names:
            raise ValueError("at least one stream is needed")
        if len(set(names)) != len(names):
            raise ValueError(f"stream names must be distinct: {names}")
        low, high = self.dormant_days
        if not 0 < low <= high:
            raise ValueError(f"dormant_days must be an increasing positive range, got {list(self.dormant_days)}")
        if self.dormant_per_target and low <= self.active_days:
            raise ValueError(f"dormant_days start ({low}) must lie beyond the active window "
                             f"({self.active_days} days)")
        if self.dormant_per_target and not any(stream.dormant for stream in self.streams):
            raise ValueError("dormant examples need at least one stream with dormant: true")
        if self.time_origin is not None:
            try:
                pd.Timestamp(self.time_origin)
            except ValueError as error:
                raise ValueError(f"time_origin {self.time_origin!r} is not a date: {error}") from None
        return self


@dataclass
class Examples:
    """Flat arrays, one entry per example."""

    user: np.ndarray          # int64, sequence index in the action log
    time: np.ndarray          # float64, prediction time t (seconds)
    target: np.ndarray        # int64, target leaf
    target_time: np.ndarray   # float64, T
    kind: np.ndarray          # int8, ACTIVE or DORMANT

    def __len__(self) -> int:
        return len(self.user)

    @property
    def lead_days(self) -> np.ndarray:
        return (self.target_time - self.time) / DAY_SECONDS

    def subset(self, rows: np.ndarray) -> "Examples":
        return Examples(self.user[rows], self.time[rows], self.target[rows], self.target_time[rows],
                        self.kind[rows])

    def counts(self) -> dict[str, int]:
        return {name: int((self.kind == code).sum()) for code, name in enumerate(KIND_NAMES)}


@dataclass
class SamplerReport:
    """What the sampler made and what it dropped (examples without any history at t)."""

    n_targets: int
    n_targets_available: int
    made: dict[str, int] = field(default_factory=dict)
    dropped_without_history: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{self.n_targets} target events (of {self.n_targets_available})"]
        for name in KIND_NAMES:
            parts.append(f"{self.made.get(name, 0)} {name} examples "
                         f"({self.dropped_without_history.get(name, 0)} dropped: no history at t)")
        return "; ".join(parts)


def log_event_types(log: SequenceData) -> list[str]:
    """The action-type vocabulary of a log (one default type when the log has none)."""
    if log.event_types is None:
        return [DEFAULT_EVENT_TYPE]
    return list(log.event_type_names)


def _check_log(log: SequenceData) -> None:
    if log.timestamps is None:
        raise DataError("the action log has no timestamps; active/dormant examples need event times")
    times = np.asarray(log.timestamps, dtype=np.float64)
    if np.isnan(times).any():
        event = int(np.flatnonzero(np.isnan(times))[0])
        raise DataError(f"event {event} (sequence {str(log.sequence_ids[log.sequence_index()[event]])!r}) "
                        "has no timestamp")
    same_sequence = log.sequence_index()[1:] == log.sequence_index()[:-1]
    backwards = same_sequence & (np.diff(times) < 0)
    if backwards.any():
        event = int(np.flatnonzero(backwards)[0]) + 1
        raise DataError(f"sequence {str(log.sequence_ids[log.sequence_index()[event]])!r} is not in time order "
                        f"(event {event})")


class _StreamIndex:
    """The events of one stream (a subset of the log, still grouped by user and in time order),
    searchable by (user, time) with exact integer keys: key = user * (n_times + 1) + time rank."""

    def __init__(self, log: SequenceData, events: np.ndarray):
        self.events = events
        times = np.asarray(log.timestamps, dtype=np.float64)[events]
        self.unique_times = np.unique(times)
        self.stride = len(self.unique_times) + 1
        users = log.sequence_index()[events]
        self.keys = users * self.stride + np.searchsorted(self.unique_times, times, side="left")

    def count_before(self, users: np.ndarray, times: np.ndarray, *, inclusive: bool) -> np.ndarray:
        """Position (in `events`) just past the user's events with time < t (or <= t when inclusive)."""
        rank = np.searchsorted(self.unique_times, times, side="right" if inclusive else "left")
        return np.searchsorted(self.keys, users * self.stride + rank, side="left")


class ActionStreams:
    """Cuts the streams of examples out of an action log and makes model batches."""

    def __init__(self, log: SequenceData, settings: ExampleSettings):
        _check_log(log)
        self.log = log
        self.settings = settings
        self.type_names = log_event_types(log)
        types = log.event_types if log.event_types is not None else np.zeros(log.n_events, dtype=np.int64)
        self.types = np.asarray(types, dtype=np.int64)
        self.times = np.asarray(log.timestamps, dtype=np.float64)
        # local time of day and weekday of every action, for the tokens (computed once, not per batch)
        local = action_clock(self.times, settings.time_origin, settings.utc_offset_hours)
        self.hours, self.weekdays = local["hour"], local["weekday"]
        self.user_hashes = user_hashes(log.sequence_ids)
        self.indexes: list[_StreamIndex] = []
        for position, stream in enumerate(settings.streams):
            if stream.event_types is None:
                keep = np.ones(log.n_events, dtype=bool)
            else:
                unknown = sorted(set(stream.event_types) - set(self.type_names))
                if unknown:
                    raise ConfigError(f"key 'examples.streams.{position}.event_types': unknown action types "
                                      f"{unknown}; the log has {self.type_names}")
                wanted = [self.type_names.index(name) for name in stream.event_types]
                keep = np.isin(self.types, wanted)
            self.indexes.append(_StreamIndex(log, np.flatnonzero(keep)))

    @property
    def stream_names(self) -> list[str]:
        return [stream.name for stream in self.settings.streams]

    def ranges(self, examples: Examples) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per stream, [start, end) positions into that stream's event list for every example.
        Events kept: time < t - min_age (strictly before t when min_age is 0) and
        time > t - max_age, the most recent max_events; empty for non-dormant streams of dormant examples."""
        out = []
        for stream, index in zip(self.settings.streams, self.indexes):
            newest = examples.time - stream.min_age_days * DAY_SECONDS
            end = index.count_before(examples.user, newest, inclusive=stream.min_age_days > 0)
            if stream.max_age_days is None:
                start = index.count_before(examples.user, np.full(len(examples), -np.inf), inclusive=False)
            else:
                oldest = examples.time - stream.max_age_days * DAY_SECONDS
                start = index.count_before(examples.user, oldest, inclusive=True)
            start = np.maximum(start, end - stream.max_events)
            if not stream.dormant:
                end = np.where(examples.kind == DORMANT, start, end)
            out.append((start, end))
        return out

    def history_lengths(self, examples: Examples) -> np.ndarray:
        return sum(end - start for start, end in self.ranges(examples))

    def batch(self, examples: Examples, rows: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """Tensors for a batch of examples. Per stream s: `{s}_leaves` [B, L] (PAD = -1),
        `{s}_types` [B, L], `{s}_age_days` [B, L] (age of each action at t, > 0), `{s}_hour` and
        `{s}_weekday` [B, L] (local hour 0..23 and weekday of each action); plus `targets` [B], `kind` [B],
        `lead_days` [B], `user_hash` [B] (a stable hash of the user id) and the calendar features of t
        (`context_<name>` [B])."""
        chosen = examples if rows is None else examples.subset(np.asarray(rows))
        batch: dict[str, torch.Tensor] = {}
        for stream, index, (start, end) in zip(self.settings.streams, self.indexes, self.ranges(chosen)):
            length = end - start
            width = max(int(length.max()) if len(length) else 0, 1)
            # left-aligned, oldest first: position j holds stream event start + j
            column = np.arange(width)[None, :]
            valid = column < length[:, None]
            position = np.where(valid, start[:, None] + column, 0)
            events = index.events[position] if len(index.events) else np.zeros_like(position)
            batch[f"{stream.name}_leaves"] = torch.from_numpy(np.where(valid, self.log.leaves[events], PAD))
            batch[f"{stream.name}_types"] = torch.from_numpy(np.where(valid, self.types[events], PAD))
            age = (chosen.time[:, None] - self.times[events]) / DAY_SECONDS
            batch[f"{stream.name}_age_days"] = torch.from_numpy(np.where(valid, age, 0.0))
            batch[f"{stream.name}_hour"] = torch.from_numpy(np.where(valid, self.hours[events], 0))
            batch[f"{stream.name}_weekday"] = torch.from_numpy(np.where(valid, self.weekdays[events], 0))
        batch["targets"] = torch.from_numpy(chosen.target.copy())
        batch["kind"] = torch.from_numpy(chosen.kind.astype(np.int64))
        batch["lead_days"] = torch.from_numpy(chosen.lead_days)
        batch["user_hash"] = torch.from_numpy(self.user_hashes[chosen.user])
        for name, values in calendar_features(chosen.time, self.settings.time_origin,
                                              self.settings.utc_offset_hours).items():
            batch[f"context_{name}"] = torch.from_numpy(values)
        return batch


    def query(self, users: np.ndarray, times: np.ndarray) -> dict[str, torch.Tensor]:
        """The batch of inference queries: each user's (sequence index) actions strictly before each
        prediction time, with the features `batch` gives, and no target: nothing is invented for
        the model to score (no `targets`, `kind` or `lead_days`)."""
        times = np.asarray(times, dtype=np.float64)
        queries = Examples(np.asarray(users, dtype=np.int64), times, np.full(len(times), PAD, dtype=np.int64),
                           times, np.full(len(times), ACTIVE, dtype=np.int8))   # ACTIVE: the history ends at t
        batch = self.batch(queries)
        for key in ("targets", "kind", "lead_days"):
            del batch[key]
        return batch


def calendar_features(times: np.ndarray, time_origin: str | None = None,
                      utc_offset_hours: float = 0.0) -> dict[str, np.ndarray]:
    """0-based month, ISO week (0..52) and weekday (Monday = 0) of each time, in local time."""
    origin = pd.Timestamp(time_origin) if time_origin is not None else pd.Timestamp(0)
    if origin.tzinfo is not None:
        origin = origin.tz_convert(None)
    seconds = np.asarray(times, dtype=np.float64) + utc_offset_hours * 3600.0
    stamps = pd.DatetimeIndex(origin + pd.to_timedelta(seconds, unit="s"))
    return {
        "month": (stamps.month.to_numpy() - 1).astype(np.int64),
        "week": (stamps.isocalendar().week.to_numpy() - 1).astype(np.int64),
        "weekday": stamps.day_of_week.to_numpy().astype(np.int64),
    }


def action_clock(times: np.ndarray, time_origin: str | None = None, utc_offset_hours: float = 0.0
                 ) -> dict[str, np.ndarray]:
    """Local hour of day (0..23) and weekday (Monday = 0) of each time."""
    origin = pd.Timestamp(time_origin) if time_origin is not None else pd.Timestamp(0)
    if origin.tzinfo is not None:
        origin = origin.tz_convert(None)
    seconds = np.asarray(times, dtype=np.float64) + utc_offset_hours * 3600.0
    stamps = pd.DatetimeIndex(origin + pd.to_timedelta(seconds, unit="s"))
    return {"hour": stamps.hour.to_numpy().astype(np.int64), "weekday": stamps.day_of_week.to_numpy().astype(np.int64)}


def user_hashes(sequence_ids: np.ndarray) -> np.ndarray:
    """A stable non-negative int64 per user id (CRC-32 of its text), the same in every split and run,
    so a model can hash users into embedding buckets without a vocabulary."""
    return np.array([zlib.crc32(str(identifier).encode()) for identifier in sequence_ids], dtype=np.int64)


def sample_examples(log: SequenceData, settings: ExampleSettings, *, seed: int | None = None,
                    streams: ActionStreams | None = None, active_per_target: int | None = None
                    ) -> tuple[Examples, SamplerReport]:
    """Active and dormant examples for every target event of `log` (its target mask), deterministic
    given the seed (default: settings.seed). Examples whose streams are all empty are dropped and counted.
    `active_per_target` (training): that many distinct active days per target, drawn from 1..active_days,
    instead of all of them."""
    streams = streams or ActionStreams(log, settings)
    rng = np.random.default_rng(settings.seed if seed is None else seed)
    target_events = np.flatnonzero(log.targets())
    n_available = len(target_events)
    if settings.max_targets is not None and n_available > settings.max_targets:
        target_events = np.sort(rng.choice(target_events, settings.max_targets, replace=False))
    users = log.sequence_index()[target_events]
    target_times = streams.times[target_events]
    targets = log.leaves[target_events]

    offsets_days, kinds, which = [], [], []
    if active_per_target is None or active_per_target >= settings.active_days:
        active_offsets = [np.full(len(target_events), float(day)) for day in range(1, settings.active_days + 1)]
    else:
        days = np.argsort(rng.random((len(target_events), settings.active_days)), axis=1)[:, :active_per_target] + 1
        active_offsets = [days[:, pick].astype(np.float64) for pick in range(active_per_target)]
    for offsets in active_offsets:
        offsets_days.append(offsets)
        kinds.append(np.full(len(target_events), ACTIVE, dtype=np.int8))
        which.append(np.arange(len(target_events)))
    low, high = settings.dormant_days
    for _ in range(settings.dormant_per_target):
        offsets_days.append(rng.uniform(low, high, len(target_events)))
        kinds.append(np.full(len(target_events), DORMANT, dtype=np.int8))
        which.append(np.arange(len(target_events)))
    if offsets_days:
        offset, kind, source = np.concatenate(offsets_days), np.concatenate(kinds), np.concatenate(which)
    else:
        offset, kind, source = np.empty(0), np.empty(0, dtype=np.int8), np.empty(0, dtype=np.int64)
    # Order by target event, then active before dormant, so a target's examples sit together.
    order = np.lexsort((offset, kind, source))
    offset, kind, source = offset[order], kind[order], source[order]
    examples = Examples(users[source], target_times[source] - offset * DAY_SECONDS, targets[source],
                        target_times[source], kind)
    has_history = streams.history_lengths(examples) > 0
    report = SamplerReport(
        n_targets=len(target_events), n_targets_available=n_available,
        made={name: int(((kind == code) & has_history).sum()) for code, name in enumerate(KIND_NAMES)},
        dropped_without_history={name: int(((kind == code) & ~has_history).sum())
                                 for code, name in enumerate(KIND_NAMES)})
    get_logger().info("examples: %s", report.summary())
    return examples.subset(np.flatnonzero(has_history)), report
