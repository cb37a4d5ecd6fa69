"""Readers turn one data source (a public dataset's files, the generic format, the synthetic
generator) into a `SourceData`: the canonical interaction frame plus its catalogue. Filters,
splits and the conversion to sequences happen afterwards in `hmtrec.data.loading`, the same way
for every source."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

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
