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


def _normalise_header(frame: pd.DataFrame) -> dict[str, str]:
    """Map the official camelCase and the snake_case spellings to one set of names."""
    return {column: column.lower().replace("_", "") for column in frame.columns}


def read(cfg) -> SourceData:
    folder = source_folder(cfg, "diginetica")
    categories_path = find_file(folder, "product-categories.csv.gz", "product-categories.csv")
    categories = read_table(categories_path, delimiter=";")
    categories = categories.rename(columns=_normalise_header(categories))
    catalogue = build_catalogue(categories, ItemColumns(item="itemid", levels=["categoryid"],
                                                        level_names=["category", "item"]),
                                file=str(categories_path))
    views_path = find_file(folder, "train-item-views.csv.gz", "train-item-views.csv", "sample_train-item-views.csv")
    file = str(views_path)
    views = read_table(views_path, delimiter=";", string_columns=["eventdate"])
    views = views.rename(columns=_normalise_header(views))
    require_columns(views, ["sessionid", "itemid", "timeframe", "eventdate"], file)
    require_present(views, "sessionid", file)
    require_present(views, "itemid", file)
    days = parse_time(views["eventdate"], "iso", file=file, column="eventdate")
    milliseconds = parse_time(views["timeframe"], "epoch", file=file, column="timeframe")
    leaves = map_items(item_labels(views["itemid"]), catalogue.taxonomy, file=file, column="itemId")
    events = pd.DataFrame({"sequence": views["sessionid"].to_numpy(), "leaf": leaves,
                           "time": days + milliseconds / 1000.0})
    notes = [f"diginetica: {len(events):,} views in {events['sequence'].nunique():,} sessions from "
             f"{views_path.name}; taxonomy category ⊃ item ({catalogue.taxonomy.n_leaves:,} catalogue items)"]
    if views_path.name.startswith("sample_"):
        notes.append("this is the 12k-row sample of the official file: fine for protocol tests, "
                     "too small for accuracy claims")
    return SourceData(name="diginetica", events=events, taxonomy=catalogue.taxonomy, notes=notes)


