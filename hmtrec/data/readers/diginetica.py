"""Raw Diginetica (CIKM Cup 2016, track 2) item views with the official product categories.

Files: `train-item-views.csv(.gz)` (`sessionId;userId;itemId;timeframe;eventdate`) or the shared
sample `sample_train-item-views.csv` (same columns, snake_case header), and
`product-categories.csv(.gz)` (`itemId;categoryId`). An event's time is its date plus
`timeframe` milliseconds, so events order by timeframe inside a session and sessions by date, as
in the SR-GNN preprocessing. The taxonomy is category ⊃ item.
"""

from __future__ import annotations

import pandas as pd

from hmtrec.data.readers import SourceData, find_file, source_folder
from hmtrec.data.schema import (ItemColumns, build_catalogue, item_labels, map_items, parse_time, read_table,
                                require_columns, require_present)
from hmtrec.data.validation import check_times


def _columns(frame: pd.DataFrame) -> dict[str, str]:
    """The file's own column names by one normalised spelling (the official camelCase and the
    sample's snake_case both map to e.g. 'itemid'), so messages name the file's column."""
    return {column.lower().replace("_", ""): column for column in frame.columns}


def read(cfg) -> SourceData:
    settings, warnings = cfg.validation, []
    folder = source_folder(cfg, "diginetica")
    categories_path = find_file(folder, "product-categories.csv.gz", "product-categories.csv")
    categories = read_table(categories_path, delimiter=";", settings=settings, warnings=warnings)
    names = _columns(categories)
    require_columns(categories, [names.get("itemid", "itemId"), names.get("categoryid", "categoryId")],
                    str(categories_path))
    catalogue = build_catalogue(categories, ItemColumns(item=names["itemid"], levels=[names["categoryid"]],
                                                        level_names=["category", "item"]),
                                file=str(categories_path), settings=settings, warnings=warnings)
    views_path = find_file(folder, "train-item-views.csv.gz", "train-item-views.csv", "sample_train-item-views.csv")
    file = str(views_path)
    views = read_table(views_path, delimiter=";", string_columns=["eventdate"], settings=settings,
                       warnings=warnings)
    names = _columns(views)
    session, item, timeframe, eventdate = (names.get(key, key) for key in ("sessionid", "itemid", "timeframe",
                                                                            "eventdate"))
    require_columns(views, [session, item, timeframe, eventdate], file)
    require_present(views, session, file)
    require_present(views, item, file)
    days = parse_time(views[eventdate], "iso", file=file, column=eventdate, settings=settings, plausible=True)
    milliseconds = parse_time(views[timeframe], "epoch", file=file, column=timeframe)
    leaves = map_items(item_labels(views[item]), catalogue.taxonomy, file=file, column=item)
    events = pd.DataFrame({"sequence": views[session].to_numpy(), "leaf": leaves,
                           "time": days + milliseconds / 1000.0})
    plausible = check_times(days, views[eventdate], file=file, column=eventdate, settings=settings, unit_hint="none")
    dropped = int((~plausible).sum())
    if dropped:
        events = events[plausible].reset_index(drop=True)
    notes = [f"diginetica: {len(events):,} views in {events['sequence'].nunique():,} sessions from "
             f"{views_path.name}; taxonomy category ⊃ item ({catalogue.taxonomy.n_leaves:,} catalogue items)"]
    notes += catalogue.notes
    if dropped:
        notes.append(f"{file}: dropped {dropped:,} view(s) with implausible dates (data.validation.implausible_times: drop)")
    if views_path.name.startswith("sample_"):
        notes.append("this is the 12k-row sample of the official file: fine for protocol tests, "
                     "too small for accuracy claims")
    return SourceData(name="diginetica", events=events, taxonomy=catalogue.taxonomy, notes=notes,
                      warnings=warnings)
