"""The generic format: an interaction table and an item table, CSV (optionally gzipped) or
Parquet, with the column names given in the config (see docs/data.md and
`hmtrec.data.schema.InteractionColumns` / `ItemColumns`)."""

from __future__ import annotations

from pathlib import Path

from hmtrec.data.filters import FilterReport, logger
from hmtrec.data.readers import SourceData
from hmtrec.data.schema import build_catalogue, canonical_interactions, read_table
from hmtrec.data.validation import check_unnamed_index


def _resolve(cfg, name: str) -> Path:
    path = Path(name)
    if not path.is_absolute() and cfg.path is not None:
        path = Path(cfg.path) / path
    return path


def read(cfg) -> SourceData:
    generic = cfg.generic
    settings = cfg.validation
    columns, item_columns = generic.columns, generic.item_columns
    interactions_path = _resolve(cfg, generic.interactions)
    warnings: list[str] = []
    notes: list[str] = []
    id_columns = [columns.sequence, columns.item]
    interactions = read_table(interactions_path, delimiter=generic.delimiter, string_columns=id_columns,
                              settings=settings, warnings=warnings)
    check_unnamed_index(interactions, file=str(interactions_path), settings=settings, warnings=warnings)
    if generic.items is not None:
        items_path = _resolve(cfg, generic.items)
        item_id_columns = [item_columns.item, *(item_columns.levels or []),
                           *([item_columns.path] if item_columns.path else [])]
        items = read_table(items_path, delimiter=generic.delimiter, string_columns=item_id_columns,
                           settings=settings, warnings=warnings)
        items_file = str(items_path)
        check_unnamed_index(items, file=items_file, settings=settings, warnings=warnings)
    else:  # taxonomy columns live in the interaction table
        items, items_file = interactions, str(interactions_path)
    catalogue = build_catalogue(items, item_columns, file=items_file, settings=settings, warnings=warnings)
    notes += catalogue.notes
    reports = []
    events, event_names = canonical_interactions(interactions, columns, catalogue.taxonomy,
                                                 file=str(interactions_path), unknown_items="drop"
                                                 if generic.unknown_items == "drop" else "error",
                                                 settings=settings, warnings=warnings, notes=notes,
                                                 dropped_items=catalogue.dropped_items)
    if len(catalogue.dropped_items):
        report = FilterReport("items with an empty taxonomy path (item_columns.empty_paths: drop)", len(interactions),
                              events.attrs["dropped"]["empty_path_items"], 0, len(catalogue.dropped_items))
        logger.info("%s", report)
        reports.append(report)
    notes.insert(0, f"generic: {len(interactions):,} rows from {interactions_path}, taxonomy {catalogue.taxonomy}")
    if generic.unknown_items == "drop":
        unknown_rows = events.attrs["dropped"]["unknown_items"]
        report = FilterReport("items not in the item table", len(interactions) - events.attrs["dropped"]["empty_path_items"],
                              unknown_rows,
                              interactions[columns.sequence].nunique() - events["sequence"].nunique(),
                              interactions[columns.item].nunique() - events["leaf"].nunique())
        logger.info("%s", report)
        reports.append(report)
    return SourceData(name=generic.name, events=events, taxonomy=catalogue.taxonomy,
                      leaf_text=catalogue.leaf_text, event_names=event_names,
                      has_time=columns.time is not None, notes=notes, reports=reports, warnings=warnings)
