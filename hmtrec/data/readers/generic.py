"""The generic format: an interaction table and an item table, CSV (optionally gzipped) or
Parquet, with the column names given in the config (see docs/data.md and
`hmtrec.data.schema.InteractionColumns` / `ItemColumns`)."""

from __future__ import annotations

from pathlib import Path

from hmtrec.data.filters import FilterReport, logger
from hmtrec.data.readers import SourceData
from hmtrec.data.schema import build_catalogue, canonical_interactions, read_table


def _resolve(cfg, name: str) -> Path:
    path = Path(name)
    if not path.is_absolute() and cfg.path is not None:
        path = Path(cfg.path) / path
    return path


def read(cfg) -> SourceData:
    generic = cfg.generic
    columns, item_columns = generic.columns, generic.item_columns
    interactions_path = _resolve(cfg, generic.interactions)
    id_columns = [columns.sequence, columns.item]
    interactions = read_table(interactions_path, delimiter=generic.delimiter, string_columns=id_columns)
    if generic.items is not None:
        items_path = _resolve(cfg, generic.items)
        item_id_columns = [item_columns.item, *(item_columns.levels or []),
                           *([item_columns.path] if item_columns.path else [])]
        items = read_table(items_path, delimiter=generic.delimiter, string_columns=item_id_columns)
        items_file = str(items_path)
    else:  # taxonomy columns live in the interaction table
        items, items_file = interactions, str(interactions_path)
    catalogue = build_catalogue(items, item_columns, file=items_file)
    events, event_names = canonical_interactions(interactions, columns, catalogue.taxonomy,
                                                 file=str(interactions_path), unknown_items="drop"
                                                 if generic.unknown_items == "drop" else "error")
    notes = [f"generic: {len(interactions):,} rows from {interactions_path}, taxonomy {catalogue.taxonomy}"]
    reports = []
    if generic.unknown_items == "drop":
        kept_sequences = events["sequence"].nunique()
        report = FilterReport("items not in the item table", len(interactions), len(interactions) - len(events),
                              interactions[columns.sequence].nunique() - kept_sequences,
                              interactions[columns.item].nunique() - events["leaf"].nunique())
        logger.info("%s", report)
        reports.append(report)
    return SourceData(name=generic.name, events=events, taxonomy=catalogue.taxonomy,
                      leaf_text=catalogue.leaf_text, event_names=event_names,
                      has_time=columns.time is not None, notes=notes, reports=reports)
