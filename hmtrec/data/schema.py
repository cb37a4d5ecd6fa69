"""The canonical interaction schema, table reading (CSV / Parquet) and validation.

Interactions: one row per event with a sequence id (session or user), an item id, a time (epoch
seconds, an ISO date/time, or an order column) and optionally an event type and label columns.
Items: an item id plus either one column per taxonomy level (coarse to fine) or one path column
such as "Home > Kitchen > Knives", and optional text columns.

Every problem raises `DataError` naming the file, the row (1-based, header excluded) and the
column. Once validated, interactions become the canonical frame used by filters and splits:
columns `sequence`, `leaf` (int64 index into the Taxonomy), `time` (float64 seconds or order),
and `event` (int64 index into the event names) when there is an event column.
"""

from __future__ import annotations

import io
import re
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from hmtrec.config import StrictModel
from hmtrec.data.taxonomy import UNASSIGNED, EmptyPaths, ShortPaths, Taxonomy, split_paths
from hmtrec.data.validation import (MAX_LISTED, ValidationConfig, check_container, check_times, decode,
                                    check_conflicting_duplicates, detect_milliseconds, first_line_of, offender_error,
                                    read_bytes, scalar, warn)
from hmtrec.errors import DataError
from hmtrec.rundir import LOGGER_NAME

logger = logging.getLogger(LOGGER_NAME)

TimeFormat = Literal["auto", "epoch", "epoch_ms", "iso", "order"]


class InteractionColumns(StrictModel):
    """Column names of an interaction table."""

    sequence: str = Field("session_id", description="session or user id column")
    item: str = "item_id"
    time: str | None = Field("timestamp", description="time or order column; None: file order")
    time_format: TimeFormat = Field("auto", description="auto: numbers are epoch seconds, text is parsed as ISO")
    event: str | None = Field(None, description="optional event-type column (view, cart, ...)")
    labels: list[str] = Field(default_factory=list, description="optional numeric label columns")


class ItemColumns(StrictModel):
    """Column names of an item table (or of the interaction table when it carries the levels)."""

    item: str = "item_id"
    levels: list[str] | None = Field(None, description="taxonomy columns, coarse to fine (item excluded)")
    path: str | None = Field(None, description="one path column, e.g. 'A > B > C' (instead of levels)")
    path_separator: str = ">"
    level_names: list[str] | None = Field(None, description="names for path levels, item level last")
    text: list[str] = Field(default_factory=list, description="columns joined into each item's text")
    empty_paths: EmptyPaths = Field("unassigned", description="an item with no path: unassigned (an "
                                    "'(unassigned)' node per level), drop (with its events, counted) or error")
    short_paths: ShortPaths = Field("item", description="a path shorter than the deepest (an item on an "
                                    "internal node): item (a node per item at each missing level) or node "
                                    "(one '(B)' node under each such node B)")

    @model_validator(mode="after")
    def _one_hierarchy(self) -> "ItemColumns":
        if (self.levels is None) == (self.path is None):
            raise ValueError("give exactly one of 'levels' (one column per level) or 'path'")
        if self.levels is not None and len(self.levels) < 1:
            raise ValueError("'levels' needs at least one column above the item")
        return self


# ---- reading -------------------------------------------------------------------------------

def _display(path: Path) -> str:
    return str(path)


def read_table(path: str | Path, *, delimiter: str | None = None, columns: Sequence[str] | None = None,
               header: bool = True, column_names: Sequence[str] | None = None, encoding: str = "utf8",
               string_columns: Sequence[str] = (), settings: ValidationConfig | None = None,
               warnings: list[str] | None = None) -> pd.DataFrame:
    """Read a CSV (optionally .gz) or Parquet file into a DataFrame.

    The container is read from the file's first bytes (see `hmtrec.data.validation`): compression
    the name hides, a truncated or corrupt gzip, invalid bytes in the declared encoding and a file
    without data rows are errors that say so. CSV rows with the wrong number of fields raise
    DataError naming the file, every bad line (capped) and the missing or surplus column. Empty
    fields become missing values. `delimiter` may be several characters (MovieLens '::').
    `string_columns` are read as text (ids that look numeric but must not be converted).
    The frame's `attrs["first_line"]` is the file line of its first row (None for Parquet).
    """
    path = Path(path)
    file = _display(path)
    if not path.exists():
        raise DataError("file not found", file=file)
    if check_container(path) == "parquet":
        try:
            table = pq.read_table(path, columns=list(columns) if columns else None)
        except (pa.ArrowInvalid, OSError) as error:
            raise DataError(f"cannot read Parquet: {error}", file=file) from None
        if table.num_rows == 0:
            raise DataError("the file has columns but no data rows", file=file)
        frame = table.to_pandas()
        if column_names is not None:
            frame.columns = list(column_names)
        frame.attrs["first_line"] = None
        return frame
    if delimiter is None:
        delimiter = "\t" if ".tsv" in path.suffixes or path.suffix == ".tsv" else ","
    raw = read_bytes(path)
    if not raw.strip():
        raise DataError("the file is empty", file=file)
    text = decode(raw, encoding, file=file, delimiter=delimiter, header=column_names, settings=settings,
                  warnings=warnings)
    substitute = None
    if len(delimiter) != 1:
        # pyarrow splits on one character only: stand in a character the file does not use.
        substitute = "\x1f"
        if substitute in text:
            raise DataError(f"cannot split on {delimiter!r}: the file contains the unit separator", file=file)
        text = text.replace(delimiter, substitute)
    utf8 = encoding.lower().replace("-", "").replace("_", "") in ("utf8", "utf8sig")
    source = io.BytesIO(raw if utf8 and substitute is None else text.encode("utf8"))
    parse_delimiter = substitute or delimiter
    bad_rows: list = []

    def on_invalid(row) -> str:
        bad_rows.append(row)
        return "skip"

    if column_names is not None:
        read_options = pacsv.ReadOptions(column_names=list(column_names), skip_rows=1 if header else 0)
    else:
        read_options = pacsv.ReadOptions(autogenerate_column_names=not header)
    parse_options = pacsv.ParseOptions(delimiter=parse_delimiter, invalid_row_handler=on_invalid,
                                       newlines_in_values=False)
    convert_options = pacsv.ConvertOptions(strings_can_be_null=True,
                                           column_types={c: pa.string() for c in string_columns},
                                           include_columns=list(columns) if columns else None)

    def read(read_options):
        source.seek(0)
        try:
            return pacsv.read_csv(source, read_options=read_options, parse_options=parse_options,
                                  convert_options=convert_options)
        except pa.ArrowInvalid as error:
            raise DataError(f"cannot parse: {_arrow_message(error)}", file=file) from None
        except KeyError as error:  # an include_columns entry that the header lacks
            raise DataError(f"missing column {error}", file=file) from None

    table = read(read_options)
    if bad_rows:
        # Either quoted values span lines (the fast parse assumes they don't) or rows really are
        # malformed. Re-read on one thread (which also numbers the rows) allowing such values.
        bad_rows.clear()
        read_options.use_threads = False
        parse_options.newlines_in_values = True
        table = read(read_options)
    if bad_rows:
        raise _malformed_rows_error(bad_rows, table.column_names, header, file, parse_delimiter, delimiter)
    if table.num_rows == 0:
        raise DataError("the file has a header but no data rows" if header else "the file has no data rows",
                        file=file)
    frame = table.to_pandas()
    frame.attrs["first_line"] = 2 if header else 1
    return frame


def _malformed_rows_error(bad_rows: list, names: list[str], header: bool, file: str, parse_delimiter: str,
                          delimiter: str) -> DataError:
    """Every malformed row (capped) with its line, field count and the column it lacks or exceeds."""
    def describe(row) -> str:
        where = f"line {row.number}" if row.number is not None else "a line"
        if row.actual_columns < row.expected_columns:
            column = f"no value for {names[row.actual_columns]!r}" if row.actual_columns < len(names) else "short"
        else:
            column = f"surplus field after {names[-1]!r}" if names else "surplus field"
        shown = row.text.replace(parse_delimiter, delimiter)[:80]
        return (f"{where} has {row.actual_columns} fields, expected {row.expected_columns} "
                f"({column}): {shown!r}")

    first = bad_rows[0]
    row_number = None if first.number is None else first.number - (1 if header else 0)
    listed = "; ".join(describe(row) for row in bad_rows[:MAX_LISTED])
    more = f"; and {len(bad_rows) - MAX_LISTED:,} more" if len(bad_rows) > MAX_LISTED else ""
    count = f" ({len(bad_rows)} malformed rows in all)" if len(bad_rows) > 1 else ""
    return DataError(f"malformed row{count}: {listed}{more}", file=file, row=row_number)


def _arrow_message(error: Exception) -> str:
    message = str(error)
    return re.sub(r"^CSV parse error: ", "", message).strip()


# ---- validation ----------------------------------------------------------------------------

def require_columns(frame: pd.DataFrame, columns: Sequence[str | None], file: str) -> None:
    for column in columns:
        if column is not None and column not in frame.columns:
            raise DataError(f"missing column; the file has {list(frame.columns)}", file=file, column=column)


def require_present(frame: pd.DataFrame, column: str, file: str, what: str = "missing id") -> None:
    """Raise naming every row (capped) where `column` is missing or blank."""
    values = frame[column]
    missing = values.isna().to_numpy().copy()
    if values.dtype == object or pd.api.types.is_string_dtype(values.dtype):
        missing |= (values.astype(str).str.strip() == "").to_numpy()
    if missing.any():
        raise offender_error(what, np.flatnonzero(missing), file=file, column=column,
                             first_line=first_line_of(frame))


def parse_time(values: pd.Series, time_format: TimeFormat, *, file: str, column: str,
               settings: ValidationConfig | None = None, plausible: bool = False,
               notes: list[str] | None = None) -> np.ndarray:
    """Times as float64 seconds (or as the order values themselves). Raises on every row that
    cannot be parsed (capped, one error). With `plausible`, epoch and ISO times must also fall in
    the plausible range of `settings` (`check_times`); `auto` reads epoch values as milliseconds
    when only that reading is plausible, and says so in `notes`."""
    first_line = first_line_of(values)
    missing = values.isna().to_numpy()
    if missing.any():
        raise offender_error("missing timestamp", np.flatnonzero(missing), file=file, column=column,
                             first_line=first_line)
    numeric = pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype)
    requested = time_format
    if time_format == "auto":
        if numeric:
            time_format = "epoch"
        elif pd.api.types.is_datetime64_any_dtype(values.dtype):
            time_format = "iso"
        else:
            # text: epoch seconds if most values are numbers (the others are then the errors)
            as_number = pd.to_numeric(values, errors="coerce")
            time_format = "epoch" if as_number.notna().mean() > 0.5 else "iso"
    if time_format in ("epoch", "epoch_ms", "order"):
        as_number = values if numeric else pd.to_numeric(values, errors="coerce")
        bad = as_number.isna().to_numpy() | ~np.isfinite(as_number.to_numpy(dtype=np.float64, na_value=np.nan))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise offender_error(f"unparsable {'order value' if time_format == 'order' else 'timestamp'} "
                                 f"{scalar(values.iloc[row])!r} (expected a number)", np.flatnonzero(bad),
                                 values.to_numpy(dtype=object), file=file, column=column, first_line=first_line)
        seconds = as_number.to_numpy(dtype=np.float64)
        if plausible and requested == "auto" and time_format == "epoch" and detect_milliseconds(seconds, settings):
            time_format = "epoch_ms"
            if notes is not None:
                notes.append(f"{file}, column {column!r}: epoch values read as milliseconds (as seconds "
                             f"they are implausible; set time_format to say so)")
        seconds = seconds / 1000.0 if time_format == "epoch_ms" else seconds
    else:
        # ISO dates or date-times; time zones are converted to UTC.
        if pd.api.types.is_datetime64_any_dtype(values.dtype):
            parsed = values
        else:
            parsed = pd.to_datetime(values.astype(str), errors="coerce", utc=True, format="ISO8601")
        bad = parsed.isna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise offender_error(f"unparsable timestamp {values.iloc[row]!r} (expected epoch seconds or an ISO date)",
                                 np.flatnonzero(bad), values.to_numpy(dtype=object), file=file, column=column,
                                 first_line=first_line)
        if getattr(parsed.dt, "tz", None) is None:
            parsed = parsed.dt.tz_localize("UTC")
        seconds = (parsed.dt.tz_convert("UTC").dt.tz_localize(None).astype("datetime64[ns]")
                   .to_numpy().astype(np.int64) / 1e9)
    if plausible and time_format != "order":
        check_times(seconds, values, file=file, column=column, settings=settings,
                    unit_hint="milliseconds" if time_format == "epoch_ms" else "seconds")
    return seconds


def parse_labels(frame: pd.DataFrame, columns: Sequence[str], file: str) -> dict[str, np.ndarray]:
    """Numeric label columns; every row whose label is not a number is named (one error)."""
    labels = {}
    for column in columns:
        raw = frame[column]
        values = pd.to_numeric(raw, errors="coerce")
        bad = values.isna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise offender_error(f"label {scalar(raw.iloc[row])!r} is not a number", np.flatnonzero(bad),
                                 raw.to_numpy(dtype=object), file=file, column=column,
                                 first_line=first_line_of(frame))
        labels[column] = values.to_numpy(dtype=np.float64)
    return labels


def item_labels(values: pd.Series) -> np.ndarray:
    """Canonical string form of item ids, so '12' in one file matches 12 in another."""
    if pd.api.types.is_float_dtype(values.dtype):
        as_int = values.astype(np.int64)
        if (as_int == values).all():
            values = as_int
    return values.astype(str).str.strip().to_numpy(dtype=object)


def map_items(labels: np.ndarray, taxonomy: Taxonomy, *, file: str, column: str,
              unknown: Literal["error", "drop"] = "error", first_line: int | None = 2,
              rows: np.ndarray | None = None) -> np.ndarray:
    """Leaf index of each item label; -1 for unknown items when `unknown="drop"`, else an error
    naming every row (capped) whose item has no taxonomy node. `rows` overrides the row number of
    each position (e.g. the line of a space-separated list)."""
    if np.issubdtype(np.asarray(labels).dtype, np.integer):
        return _map_integer_items(np.asarray(labels), taxonomy, file=file, column=column, unknown=unknown,
                                  first_line=first_line, rows=rows)
    leaf_labels = taxonomy.node_labels[-1].astype(str)
    order = np.argsort(leaf_labels, kind="stable")
    sorted_labels = leaf_labels[order]
    labels = labels.astype(str)
    where = np.searchsorted(sorted_labels, labels)
    where_clipped = np.minimum(where, len(sorted_labels) - 1)
    found = (where < len(sorted_labels)) & (sorted_labels[where_clipped] == labels)
    if not found.all() and unknown == "error":
        raise _unknown_items_error(labels, found, file=file, column=column, first_line=first_line, rows=rows)
    return np.where(found, order[where_clipped], -1).astype(np.int64)


def _unknown_items_error(labels: np.ndarray, found: np.ndarray, *, file: str, column: str,
                         first_line: int | None, rows: np.ndarray | None) -> DataError:
    positions = np.flatnonzero(~found)
    distinct = len(pd.unique(np.asarray(labels)[positions].astype(str)))
    return offender_error(f"item {str(labels[positions[0]])!r} has no taxonomy node (it is not in the item table; "
                          f"{distinct:,} distinct unknown item(s); generic.unknown_items: drop removes their rows)",
                          positions, np.asarray(labels, dtype=object), file=file, column=column,
                          first_line=first_line, rows=None if rows is None else np.asarray(rows)[positions])


def _map_integer_items(ids: np.ndarray, taxonomy: Taxonomy, *, file: str, column: str,
                       unknown: Literal["error", "drop"], first_line: int | None, rows: np.ndarray | None
                       ) -> np.ndarray:
    """Fast path for integer ids: one searchsorted on the integer leaf labels."""
    leaf_labels = taxonomy.node_labels[-1].astype(str)
    is_integer = np.char.isdigit(leaf_labels.astype("U")) if len(leaf_labels) else np.ones(0, bool)
    lookup_ids = np.full(len(leaf_labels), -1, dtype=np.int64)
    # canonical integers only ("7", not "07"), so string and integer ids agree
    canonical = is_integer & np.array([label == str(int(label)) if ok else False
                                       for label, ok in zip(leaf_labels, is_integer)], dtype=bool)
    lookup_ids[canonical] = leaf_labels[canonical].astype(np.int64)
    order = np.flatnonzero(canonical)[np.argsort(lookup_ids[canonical], kind="stable")]
    sorted_ids = lookup_ids[order]
    where = np.searchsorted(sorted_ids, ids)
    clipped = np.minimum(where, max(len(sorted_ids) - 1, 0))
    found = (where < len(sorted_ids)) & (sorted_ids[clipped] == ids) if len(sorted_ids) else np.zeros(len(ids), bool)
    if not found.all() and unknown == "error":
        raise _unknown_items_error(ids, found, file=file, column=column, first_line=first_line, rows=rows)
    return np.where(found, order[clipped] if len(order) else -1, -1).astype(np.int64)


@dataclass
class Catalogue:
    taxonomy: Taxonomy
    leaf_text: list[str] | None
    dropped_items: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=object))  # empty paths, dropped
    notes: list[str] = field(default_factory=list)      # what was fixed (padded paths, unassigned items)


def _blank(values: pd.Series) -> np.ndarray:
    return (values.isna() | (values.astype(str).str.strip() == "")).to_numpy()


def build_catalogue(items: pd.DataFrame, columns: ItemColumns, *, file: str, item_level_name: str | None = None,
                    settings: ValidationConfig | None = None, warnings: list[str] | None = None) -> Catalogue:
    """Taxonomy and text from an item table (or an interaction table carrying item columns).

    Level columns and a path column are read the same way (`Taxonomy.from_levels`): nodes are
    keyed by their full path; ragged paths (empty, shorter than the deepest, items on internal
    nodes) follow `columns.empty_paths` / `short_paths`. Rows repeating the same item with the
    same path are merged; an item listed with two paths and a missing id are errors naming every
    such row; a path repeating a node is reported (see `hmtrec.data.validation.warn`)."""
    require_columns(items, [columns.item, columns.path, *(columns.levels or []), *columns.text], file)
    require_present(items, columns.item, file)
    first_line = first_line_of(items)
    frame = items.copy()
    frame[columns.item] = item_labels(frame[columns.item])
    if columns.levels is not None:
        parts = pd.DataFrame({c: pd.Series(np.where(_blank(frame[c]), None, frame[c].astype(str).str.strip()),
                                           dtype=object) for c in columns.levels})
        hierarchy_column = columns.levels[-1]
        names = list(columns.levels) + [columns.item]
    else:
        parts = split_paths(frame[columns.path].tolist(), columns.path_separator, file=file, column=columns.path)
        hierarchy_column = columns.path
        names = None
    if item_level_name or columns.level_names:
        names = list(columns.level_names) if columns.level_names else (names or [])[:-1] + [item_level_name]
    parts = parts.where(parts.notna(), None)
    path_key = pd.Series(np.full(len(frame), "", dtype=object))
    for position in range(parts.shape[1]):
        path_key = path_key + "\x1f" + parts.iloc[:, position].fillna("").astype(str).reset_index(drop=True)
    path_key = path_key.to_numpy(dtype=object)
    item_ids = frame[columns.item].to_numpy(dtype=object)
    first = ~pd.Series(item_ids).duplicated().to_numpy()
    first_key = pd.Series(path_key[first], index=item_ids[first])
    conflict = first_key.reindex(item_ids).to_numpy() != path_key
    if conflict.any():
        shown = np.flatnonzero(conflict)
        row = shown[0]
        def shown_path(key: str) -> str:
            return " > ".join(part for part in key.split("\x1f") if part)

        raise offender_error(f"item {item_ids[row]!r} is mapped to two parents "
                             f"({shown_path(first_key[item_ids[row]])!r} and {shown_path(path_key[row])!r})",
                             shown, item_ids, file=file, column=hierarchy_column, first_line=first_line)
    unique_parts = parts[first].reset_index(drop=True)
    repeated = np.zeros(len(unique_parts), dtype=bool)
    for i in range(unique_parts.shape[1]):
        for j in range(i + 1, unique_parts.shape[1]):
            a, b = unique_parts.iloc[:, i], unique_parts.iloc[:, j]
            repeated |= (a.notna() & (a == b)).to_numpy()
    repeats = np.flatnonzero(repeated)
    if len(repeats):
        rows = np.flatnonzero(first)[repeats]
        listed = ", ".join(f"row {r + 1} item {item_ids[r]!r} {' > '.join(p for p in path_key[r].split(chr(31)) if p)!r}"
                           for r in rows[:MAX_LISTED])
        warn(f"{len(rows):,} path(s) repeat a node name: {listed}"
             + (f", and {len(rows) - MAX_LISTED:,} more" if len(rows) > MAX_LISTED else ""),
             settings, warnings, file=file, column=hierarchy_column)
    unique_ids = item_ids[first]
    depth_of = unique_parts.notna().sum(axis=1).to_numpy()
    taxonomy, kept = Taxonomy.from_levels(unique_ids, unique_parts, names, file=file, column=hierarchy_column,
                                          empty_paths=columns.empty_paths, short_paths=columns.short_paths,
                                          row_numbers=np.flatnonzero(first) + 1)
    notes = []
    max_depth = taxonomy.n_levels - 1
    empty, short = int((depth_of == 0).sum()), int(((depth_of > 0) & (depth_of < max_depth)).sum())
    if empty:
        notes.append(f"{file}: {empty:,} item(s) with an empty taxonomy path "
                     + ("dropped (their events are dropped too)" if columns.empty_paths == "drop"
                        else f"placed under {UNASSIGNED!r} at every level") + " (item_columns.empty_paths)")
    if short:
        notes.append(f"{file}: {short:,} item(s) with a path shorter than the deepest ({max_depth} levels) "
                     f"extended with {'a node of their own' if columns.short_paths == 'item' else 'one node per parent'} "
                     f"at each missing level (item_columns.short_paths)")
    for note in notes:
        logger.info("%s", note)
    leaf_text = None
    if columns.text:
        unique = frame[first]
        text = unique[columns.text].fillna("").astype(str).agg(" ".join, axis=1).str.strip()
        by_item = pd.Series(text.to_numpy(), index=unique[columns.item].to_numpy())
        leaf_text = by_item.reindex(taxonomy.node_labels[-1].astype(str)).fillna("").tolist()
    return Catalogue(taxonomy, leaf_text, dropped_items=unique_ids[~kept], notes=notes)


def canonical_interactions(frame: pd.DataFrame, columns: InteractionColumns, taxonomy: Taxonomy, *,
                           file: str, unknown_items: Literal["error", "drop"] = "error",
                           settings: ValidationConfig | None = None, warnings: list[str] | None = None,
                           notes: list[str] | None = None, dropped_items: np.ndarray = np.empty(0, dtype=object)
                           ) -> tuple[pd.DataFrame, list[str]]:
    """Validate an interaction table and return (canonical frame, event names).

    Canonical columns: sequence, leaf, time, [event], [label columns]. Rows keep file order.
    Times (unless an order column) must be plausible (`settings`); implausible rows are an error
    or, with `implausible_times: drop`, dropped with a note. Rows repeating a (sequence, item,
    time) with different labels are reported."""
    require_columns(frame, [columns.sequence, columns.item, columns.time, columns.event, *columns.labels], file)
    require_present(frame, columns.sequence, file)
    require_present(frame, columns.item, file)
    first_line = first_line_of(frame)
    out = pd.DataFrame({"sequence": frame[columns.sequence].to_numpy()})
    labels = item_labels(frame[columns.item])
    leaves = np.full(len(labels), -1, dtype=np.int64)
    # items the catalogue dropped (empty paths, empty_paths: drop) leave with their events
    listed = ~np.isin(labels, dropped_items) if len(dropped_items) else np.ones(len(labels), dtype=bool)
    leaves[listed] = map_items(labels[listed], taxonomy, file=file, column=columns.item, unknown=unknown_items,
                               first_line=first_line, rows=np.flatnonzero(listed) + 1)
    out["leaf"] = leaves
    if columns.time is None:
        out["time"] = np.arange(len(frame), dtype=np.float64)
    else:
        out["time"] = parse_time(frame[columns.time], columns.time_format, file=file, column=columns.time,
                                 settings=settings, plausible=True, notes=notes)
    event_names: list[str] = []
    if columns.event is not None:
        require_present(frame, columns.event, file, what="missing event type")
        codes, names = pd.factorize(frame[columns.event].astype(str), sort=True)
        out["event"] = codes.astype(np.int64)
        event_names = [str(name) for name in names]
    for name, values in parse_labels(frame, columns.labels, file).items():
        out[name] = values
    if columns.labels:
        keys = [columns.sequence, columns.item] + ([columns.time] if columns.time else [])
        check_conflicting_duplicates(frame[keys], frame[list(columns.labels)], file=file, settings=settings,
                                     warnings=warnings, what=f"({', '.join(keys)}) events")
    keep = out["leaf"].to_numpy() >= 0
    if columns.time is not None:
        plausible = check_times(out["time"].to_numpy(), frame[columns.time], file=file, column=columns.time,
                                settings=settings, unit_hint="none")
        if not plausible.all() and notes is not None:
            notes.append(f"{file}: dropped {int((~plausible).sum()):,} event(s) with implausible times "
                         f"(data.validation.implausible_times: drop)")
        keep &= plausible
    out.attrs["dropped"] = {"unknown_items": int(((out["leaf"].to_numpy() < 0) & listed).sum()),
                            "empty_path_items": int((~listed).sum()),
                            "implausible_times": int(len(out) - (out["leaf"].to_numpy() < 0).sum() - keep.sum())}
    if not keep.all():
        attrs = out.attrs
        out = out[keep].reset_index(drop=True)
        out.attrs = attrs
    return out, event_names
