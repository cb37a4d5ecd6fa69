"""One entry point from a `data:` config section to train / valid / test sequences.

    prepared = load_data(DataConfig(source="movielens-1m"))
    prepared.train, prepared.valid, prepared.test      # SequenceData with target masks
    prepared.dataset.taxonomy, prepared.dataset.leaf_text
    prepared.reports                                   # what each filter removed

Flow, identical for every source: read (a reader per source) -> optional sub-sampling -> filters
-> split protocol -> catalogue restricted to the items that occur -> SequenceData. Evaluating
every target of `test` is exactly the protocol's set of test cases.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from hmtrec.config import StrictModel
from hmtrec.data.filters import FilterMode, FilterReport, apply_standard_filters, report_removal
from hmtrec.data.readers import SourceData
from hmtrec.data.schema import InteractionColumns, ItemColumns
from hmtrec.data.sequences import Dataset, SequenceData
from hmtrec.data.sources import Source
from hmtrec.data.splits import (SplitFrames, given_split_valid_tail, leave_one_out, order_events,
                                session_time_split, time_fraction_split)
from hmtrec.data.synthetic import SyntheticConfig
from hmtrec.data.validation import ValidationConfig
from hmtrec.errors import ConfigError
from hmtrec.rundir import LOGGER_NAME

logger = logging.getLogger(LOGGER_NAME)

Protocol = Literal["auto", "session_time", "leave_one_out", "time_fraction", "given"]


class FilterConfig(StrictModel):
    """Sequence/item filters. `None` means the source's protocol default (see docs/data.md)."""

    min_sequence_length: int | None = Field(None, ge=1)
    min_item_support: int | None = Field(None, ge=1)
    mode: FilterMode | None = None


class SplitConfig(StrictModel):
    """How sequences are split. `None` / "auto" means the source's protocol default."""

    protocol: Protocol = "auto"
    test_days: float | None = Field(None, gt=0, description="session_time: last days that are test")
    valid_days: float | None = Field(None, ge=0, description="session_time: days before test that are "
                                     "valid; 0 = carve valid from the tail of train")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="time_fraction: share of the time range")
    valid_fraction: float = Field(0.1, ge=0, lt=1, description="time_fraction: share of the time range")
    valid_tail_fraction: float = Field(0.1, gt=0, lt=1, description="share of training sequences "
                                       "(the latest) used as valid when no valid window exists")
    unseen_items: Literal["auto", "keep", "drop"] = Field(
        "auto", description="valid/test items absent from train: drop (session protocols remove the events; "
                            "others stop scoring them) or keep")
    train_on_all: bool = Field(False, description="also train on the valid split (final fit; valid "
                               "metrics then are optimistic)")


class GenericConfig(StrictModel):
    """Files and columns of the generic format. Relative paths are read under `data.path`."""

    interactions: str
    items: str | None = Field(None, description="item table; None: the levels are interaction columns")
    columns: InteractionColumns = Field(default_factory=InteractionColumns)
    item_columns: ItemColumns = Field(default_factory=lambda: ItemColumns(levels=["category"]))
    delimiter: str | None = Field(None, description="CSV delimiter; None: ',' ('\\t' for .tsv)")
    unknown_items: Literal["error", "drop"] = "error"
    name: str = "generic"


class GeoConfig(StrictModel):
    """Geographic taxonomy for check-in data (see hmtrec.data.geo.geo_taxonomy)."""

    method: Literal["grid", "geohash", "kmeans"] = "grid"
    cell_km: float = Field(1.0, gt=0)
    region_factor: int = Field(8, ge=2)
    geohash_precision: int = Field(6, ge=2, le=12)
    region_precision: int = Field(4, ge=1, le=11)
    n_cells: int = Field(400, ge=2)
    n_regions: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _nesting(self) -> "GeoConfig":
        if self.region_precision >= self.geohash_precision:
            raise ValueError("region_precision must be smaller than geohash_precision")
        if self.n_regions >= self.n_cells:
            raise ValueError("n_regions must be smaller than n_cells")
        return self


class DataConfig(StrictModel):
    source: Source = "synthetic"
    path: str | None = Field(None, description="data folder (or file); default: hmtrec.paths.data_dir()/<source>")
    seed: int = 0
    split: SplitConfig = Field(default_factory=SplitConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    generic: GenericConfig | None = None
    geo: GeoConfig = Field(default_factory=GeoConfig)
    max_sequences: int | None = Field(None, ge=1, description="keep a random subset of sessions/users "
                                      "(before filtering) for quick runs")
    max_train_sequences: int | None = Field(
        None, ge=1, description="keep only the most recent N training sequences (valid and test untouched): "
                                "quicker training on the full evaluation protocol")
    keep_unused_items: bool = Field(False, description="keep catalogue items that occur in no split")
    validation: ValidationConfig = Field(default_factory=ValidationConfig)

    @model_validator(mode="after")
    def _generic_needs_files(self) -> "DataConfig":
        if self.source == "generic" and self.generic is None:
            raise ValueError("source 'generic' needs a 'generic' section (interactions, items, columns)")
        return self


@dataclass
class PreparedData:
    dataset: Dataset               # taxonomy, leaf_text; dataset.sequences is the training split
    train: SequenceData
    valid: SequenceData
    test: SequenceData
    reports: list[FilterReport] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    train_all: SequenceData | None = None   # train + valid (`load_data(with_train_all=True)`): a final fit's data

    @property
    def taxonomy(self):
        return self.dataset.taxonomy

    def fitting_split(self, final_fit: bool) -> SequenceData:
        """What the models learn from: the training split, or train + valid for a run with
        `train.final_fit` (its models are trained, and their statistics fitted, on both)."""
        if not final_fit:
            return self.train
        if self.train_all is None:
            raise ValueError("a final fit's data needs load_data(..., with_train_all=True)")
        return self.train_all

    def summary(self) -> str:
        lines = [f"{self.dataset.name}: {self.dataset.taxonomy}"]
        for name in ("train", "valid", "test"):
            part = getattr(self, name)
            lines.append(f"  {name}: {part.n_sequences:,} sequences, {part.n_events:,} events, "
                         f"{part.n_targets:,} targets")
        lines += [f"  {report}" for report in self.reports]
        lines += [f"  warning: {warning}" for warning in self.info.get("warnings", [])]
        lines.append(f"  protocol: {self.info.get('protocol_description', '')}")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Defaults:
    protocol: str
    min_length: int
    min_support: int
    mode: str
    test_days: float = 7.0
    valid_days: float = 0.0
    drop_unseen: bool = False


# Protocol defaults per source (documented in docs/data.md).
SOURCE_DEFAULTS: dict[str, _Defaults] = {
    "synthetic": _Defaults("session_time", 2, 5, "srgnn", test_days=3.0, valid_days=3.0, drop_unseen=True),
    "diginetica": _Defaults("session_time", 2, 5, "srgnn", test_days=7.0, valid_days=0.0, drop_unseen=True),
    "diginetica-sessions": _Defaults("given", 1, 1, "once", drop_unseen=False),
    "movielens-1m": _Defaults("leave_one_out", 5, 5, "once"),
    "movielens-100k": _Defaults("leave_one_out", 5, 5, "once"),
    "foursquare-nyc": _Defaults("time_fraction", 2, 1, "once"),
    "generic": _Defaults("session_time", 2, 5, "srgnn", test_days=7.0, valid_days=0.0, drop_unseen=True),
}

READERS: dict[str, str] = {
    "synthetic": "hmtrec.data.readers.synthetic",
    "generic": "hmtrec.data.readers.generic",
    "diginetica": "hmtrec.data.readers.diginetica",
    "diginetica-sessions": "hmtrec.data.readers.diginetica_sessions",
    "movielens-1m": "hmtrec.data.readers.movielens",
    "movielens-100k": "hmtrec.data.readers.movielens",
    "foursquare-nyc": "hmtrec.data.readers.foursquare",
}


def read_source(cfg: DataConfig) -> SourceData:
    """Run the source's reader (no filtering or splitting)."""
    module = importlib.import_module(READERS[cfg.source])
    return module.read(cfg)


def load_data(cfg: DataConfig, *, with_train_all: bool = False) -> PreparedData:
    """The splits `cfg` describes; `with_train_all` also gives train + valid merged (`train_all`, what
    a final fit trains on), merged as `data.split.train_on_all` merges them."""
    if cfg.source == "prepared":  # memory-mapped shards of a log prepared by `hmtrec prepare`
        if with_train_all:
            raise ConfigError("train.final_fit: not supported for source 'prepared' (streaming preparation); "
                              "set data.split.train_on_all in a second run instead")
        from hmtrec.data.streaming import load_prepared
        return load_prepared(cfg)
    started = time.perf_counter()
    defaults = SOURCE_DEFAULTS[cfg.source]
    protocol = defaults.protocol if cfg.split.protocol == "auto" else cfg.split.protocol
    if protocol == "given" and any(value is not None for value in cfg.filters.model_dump().values()):
        raise ConfigError("data.filters: the given split is used as released (already filtered); "
                          "filters apply only to the other protocols")
    source = read_source(cfg)
    min_length = cfg.filters.min_sequence_length or defaults.min_length
    min_support = cfg.filters.min_item_support or defaults.min_support
    mode = cfg.filters.mode or defaults.mode
    drop_unseen = defaults.drop_unseen if cfg.split.unseen_items == "auto" else cfg.split.unseen_items == "drop"
    reports: list[FilterReport] = list(source.reports)
    if not source.has_time and protocol in ("session_time", "time_fraction"):
        raise ConfigError(f"data.split.protocol: {protocol!r} needs event times, and source {cfg.source!r} "
                          f"gives only an order; use leave_one_out{' or given' if source.given else ''}, "
                          f"or give a time column")

    events_kept: int | None = None
    if protocol == "given":
        if source.given is None:
            raise ConfigError(f"data.split.protocol: source {cfg.source!r} ships no split; use session_time, "
                              f"leave_one_out or time_fraction")
        split = _given_split(source, cfg, reports)
    else:
        if source.given is not None:
            events = pd.concat([source.given[name].drop(columns="target", errors="ignore")
                                for name in ("train", "test")], ignore_index=True)
        else:
            events = source.events
        if cfg.max_sequences is not None:
            events = _subsample(events, cfg.max_sequences, cfg.seed, reports)
        events, filter_reports = apply_standard_filters(events, min_length=min_length,
                                                        min_support=min_support, mode=mode)
        reports += filter_reports
        if len(events) == 0:
            raise ConfigError(f"data.filters: no events left after filtering {cfg.source!r}; "
                              f"see the filter reports: {'; '.join(map(str, reports))}")
        events = order_events(events)
        events_kept = len(events)
        split = _split(events, protocol, cfg.split, defaults, drop_unseen, min_length)
        reports += split.reports

    train, valid, test = split.train, split.valid, split.test
    warnings = list(source.warnings) + check_splits(train, valid, test, protocol, split.cutoffs)
    if cfg.split.train_on_all:
        train = _merge_train_valid(train, valid, protocol)
    train_all = _merge_train_valid(train, valid, protocol) if with_train_all and not cfg.split.train_on_all else None
    if cfg.max_train_sequences is not None:
        train = _keep_latest_sequences(train, cfg.max_train_sequences, reports)
        if train_all is not None:   # the same cut; its report would repeat the training split's
            train_all = _keep_latest_sequences(train_all, cfg.max_train_sequences, [])

    taxonomy, leaf_text = source.taxonomy, source.leaf_text
    if not cfg.keep_unused_items:
        occurs = np.zeros(taxonomy.n_leaves, dtype=bool)
        for part in (train, valid, test):
            occurs[part["leaf"].to_numpy()] = True
        used = np.flatnonzero(occurs)
        if len(used) < taxonomy.n_leaves:
            before = taxonomy.n_leaves
            taxonomy, new_index = taxonomy.subset(used)
            train, valid, test = (part.assign(leaf=new_index[part["leaf"].to_numpy()]) for part in (train, valid, test))
            if train_all is not None:
                train_all = train_all.assign(leaf=new_index[train_all["leaf"].to_numpy()])
            if leaf_text is not None:
                leaf_text = [leaf_text[i] for i in used]
            reports.append(FilterReport("catalogue restricted to items that occur", 0, 0, 0, before - taxonomy.n_leaves,
                                        detail=f"{taxonomy.n_leaves:,} of {before:,} catalogue items kept"))
            logger.info("%s", reports[-1])

    names = source.event_names
    train_seq, valid_seq, test_seq = (_to_sequences(part, source.has_time, names) for part in (train, valid, test))
    dataset = Dataset(name=source.name, sequences=train_seq, taxonomy=taxonomy, leaf_text=leaf_text)
    info = {
        "source": cfg.source,
        "protocol": protocol,
        "protocol_description": split.description + (" ; train_on_all: valid added to train" if cfg.split.train_on_all else ""),
        "filters": {"min_sequence_length": min_length, "min_item_support": min_support, "mode": mode}
        if protocol != "given" else None,
        "events_after_filters": events_kept,
        "cutoffs": split.cutoffs,
        "notes": source.notes,
        "warnings": warnings,
        "n_items": taxonomy.n_leaves,
        "levels": {name: taxonomy.n_nodes(name) for name in taxonomy.level_names},
        "counts": {name: {"sequences": part.n_sequences, "events": part.n_events, "targets": part.n_targets}
                   for name, part in (("train", train_seq), ("valid", valid_seq), ("test", test_seq))},
        "seconds": round(time.perf_counter() - started, 3),
    }
    train_all_seq = None
    if with_train_all:   # with train_on_all the training split already is train + valid
        train_all_seq = train_seq if train_all is None else _to_sequences(train_all, source.has_time, names)
        info["counts"]["train_all"] = {"sequences": train_all_seq.n_sequences, "events": train_all_seq.n_events,
                                       "targets": train_all_seq.n_targets}
    logger.info("loaded %s in %.1fs: %s", source.name, info["seconds"], info["counts"])
    return PreparedData(dataset, train_seq, valid_seq, test_seq, reports, info, train_all_seq)


def load_fitting_split(cfg: DataConfig, final_fit: bool) -> SequenceData:
    """The split a run's models learnt from (train, or train + valid after `train.final_fit`): what
    statistics a saved run does not keep (a kNN's sessions) are fitted on again."""
    return load_data(cfg, with_train_all=final_fit).fitting_split(final_fit)


MIN_TEST_SEQUENCES = 2   # fewer test sequences than this: the metrics are one case's luck


def check_splits(train: pd.DataFrame, valid: pd.DataFrame, test: pd.DataFrame, protocol: str,
                 cutoffs: dict | None) -> list[str]:
    """Before any training: an empty split (train, valid or test targets) is an error naming the
    protocol and its cut-offs; a test split of a single sequence is a warning (returned)."""
    def targets(part: pd.DataFrame) -> int:
        return int(part["target"].sum()) if "target" in part.columns else len(part)

    where = f"protocol {protocol!r}" + (f", cut-offs {cutoffs}" if cutoffs else "")
    hint = {"session_time": "data.split.test_days / valid_days",
            "time_fraction": "data.split.test_fraction / valid_fraction",
            "leave_one_out": "data.filters.min_sequence_length",
            "given": "data.split.valid_tail_fraction"}.get(protocol, "data.split")
    for name, part in (("train", train), ("validation", valid), ("test", test)):
        if targets(part) == 0:
            span = ""
            if "time" in train.columns and len(train) + len(test):
                times = pd.concat([train["time"], valid["time"], test["time"]])
                span = (f"; event times span {pd.Timestamp(times.min(), unit='s'):%Y-%m-%d %H:%M} .. "
                        f"{pd.Timestamp(times.max(), unit='s'):%Y-%m-%d %H:%M}"
                        if times.max() > 1e8 else "")
            raise ConfigError(f"data.split: the {name} split has no targets ({where}{span}); adjust {hint}, "
                              f"or check for implausible timestamps (data.validation.time_min / time_max)")
    warnings = []
    n_test = test["sequence"].nunique()
    if n_test < MIN_TEST_SEQUENCES:
        warnings.append(f"the test split holds {n_test} sequence(s) ({targets(test)} targets): its metrics "
                        f"are one case's luck; adjust {hint}")
        logger.warning("%s", warnings[-1])
    return warnings


def _split(events: pd.DataFrame, protocol: str, settings: SplitConfig, defaults: _Defaults,
           drop_unseen: bool, min_length: int) -> SplitFrames:
    if protocol == "session_time":
        return session_time_split(
            events,
            test_days=settings.test_days if settings.test_days is not None else defaults.test_days,
            valid_days=settings.valid_days if settings.valid_days is not None else defaults.valid_days,
            valid_tail_fraction=settings.valid_tail_fraction, drop_unseen=drop_unseen,
            min_length=max(min_length, 2))
    if protocol == "leave_one_out":
        return leave_one_out(events, drop_unseen=drop_unseen)
    if protocol == "time_fraction":
        return time_fraction_split(events, test_fraction=settings.test_fraction,
                                   valid_fraction=settings.valid_fraction, drop_unseen=drop_unseen)
    raise ConfigError(f"data.split.protocol: unknown protocol {protocol!r}")


def _given_split(source: SourceData, cfg: DataConfig, reports: list[FilterReport]) -> SplitFrames:
    train, test = source.given["train"], source.given["test"]
    if cfg.max_sequences is not None:
        n_train = train["sequence"].nunique()
        fraction = min(1.0, cfg.max_sequences / max(n_train, 1))
        train = _subsample(train, cfg.max_sequences, cfg.seed, reports, name="train")
        n_test = max(1, int(round(test["sequence"].nunique() * fraction)))
        test = _subsample(test, n_test, cfg.seed, reports, name="test")
    train, valid = given_split_valid_tail(train, cfg.split.valid_tail_fraction)
    description = (f"the benchmark's own train/test split; valid = last {cfg.split.valid_tail_fraction:.0%} "
                   f"of training sessions (file order)")
    return SplitFrames(train, valid, test.reset_index(drop=True), [], description)


def _subsample(events: pd.DataFrame, n: int, seed: int, reports: list[FilterReport], name: str = "") -> pd.DataFrame:
    ids = pd.unique(events["sequence"])
    if n >= len(ids):
        return events
    chosen = np.random.default_rng(seed).choice(len(ids), size=n, replace=False)
    kept = events[events["sequence"].isin(ids[np.sort(chosen)])]
    label = f"max_sequences {n}" + (f" ({name})" if name else "")
    reports.append(report_removal(label, events, kept, detail="random subset for a quick run"))
    return kept


def _keep_latest_sequences(frame: pd.DataFrame, n: int, reports: list[FilterReport]) -> pd.DataFrame:
    """The n training sequences whose last event is latest (file order when there is no time)."""
    ids = pd.unique(frame["sequence"])
    if n >= len(ids):
        return frame
    if "time" in frame.columns:
        last_time = frame.groupby("sequence", sort=False)["time"].max().loc[ids].to_numpy()
        ids = ids[np.argsort(last_time, kind="stable")]
    kept = frame[frame["sequence"].isin(ids[-n:])]
    reports.append(report_removal(f"max_train_sequences {n}", frame, kept,
                                  detail="the most recent training sequences; valid and test untouched"))
    return kept


def _merge_train_valid(train: pd.DataFrame, valid: pd.DataFrame, protocol: str) -> pd.DataFrame:
    if protocol == "leave_one_out":
        # valid sequences are the train sequences plus one event: use them whole as training.
        longer = set(valid["sequence"].unique())
        merged = pd.concat([train[~train["sequence"].isin(longer)], valid], ignore_index=True)
    elif protocol == "time_fraction":
        merged = pd.concat([train[~train["sequence"].isin(set(valid["sequence"]))], valid], ignore_index=True)
    else:
        merged = pd.concat([train, valid], ignore_index=True)
    merged = merged.drop(columns="target")
    merged = order_events(merged) if protocol != "given" else merged
    from hmtrec.data.splits import positions
    position, _ = positions(merged)
    return merged.assign(target=position > 0)


def _to_sequences(frame: pd.DataFrame, has_time: bool, event_names: list[str]) -> SequenceData:
    """An ordered, grouped frame -> SequenceData (the `target` column becomes target_mask)."""
    sequence = frame["sequence"].to_numpy()
    if len(frame):
        codes = pd.factorize(frame["sequence"], sort=False)[0]
        starts = np.r_[0, np.flatnonzero(codes[1:] != codes[:-1]) + 1]
    else:
        starts = np.empty(0, dtype=np.int64)
    offsets = np.r_[starts, len(frame)].astype(np.int64)
    return SequenceData(
        leaves=frame["leaf"].to_numpy(dtype=np.int64),
        offsets=offsets,
        sequence_ids=sequence[starts],
        timestamps=frame["time"].to_numpy(dtype=np.float64) if has_time else None,
        event_types=frame["event"].to_numpy(dtype=np.int64) if "event" in frame.columns else None,
        event_type_names=list(event_names),
        target_mask=frame["target"].to_numpy(dtype=bool) if "target" in frame.columns else None,
    )
