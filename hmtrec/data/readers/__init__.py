"""Readers turn one data source (a public dataset's files, the generic format, the synthetic
generator) into a `SourceData`: the canonical interaction frame plus its catalogue. Filters,
splits and the conversion to sequences happen afterwards in `hmtrec.data.loading`, the same way
for every source."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from hmtrec.data.filters import FilterReport
from hmtrec.data.taxonomy import Taxonomy


@dataclass
class SourceData:
    """A source before filtering and splitting.

    `events`: canonical frame (columns `sequence`, `leaf`, `time`, optionally `event`), in file
    order. `given`: for benchmarks that ship their own split, frames named "train"/"test" (with a
    boolean `target` column on test), already ordered; `events` is then unused."""

    name: str
    events: pd.DataFrame | None
    taxonomy: Taxonomy
    leaf_text: list[str] | None = None
    event_names: list[str] = field(default_factory=list)
    has_time: bool = True
    given: dict[str, pd.DataFrame] | None = None
    notes: list[str] = field(default_factory=list)
    reports: list[FilterReport] = field(default_factory=list)   # rows a reader dropped on request
    warnings: list[str] = field(default_factory=list)   # legal but suspicious input (hmtrec.data.validation)


def source_folder(cfg, folder_name: str):
    """The folder a reader reads: `data.path` if given, else <data dir>/<folder_name>."""
    from pathlib import Path

    from hmtrec.errors import DataError
    from hmtrec.paths import data_dir

    folder = Path(cfg.path) if cfg.path is not None else data_dir() / folder_name
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist (set data.path in the config, relative to the "
                        f"config file's folder, or the HMT_DATA_DIR environment variable)")
    return folder


def find_file(folder, *names: str):
    """The first of `names` present in `folder` (e.g. 'ratings.dat' or 'ratings.dat.gz')."""
    from hmtrec.errors import DataError

    for name in names:
        if (folder / name).exists():
            return folder / name
    raise DataError(f"none of {list(names)} found in {folder}")
