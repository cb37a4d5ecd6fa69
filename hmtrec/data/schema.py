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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from hmtrec.config import StrictModel
from hmtrec.data.taxonomy import Taxonomy
from hmtrec.errors import DataError

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
               string_columns: Sequence[str] = ()) -> pd.DataFrame:
    """Read a CSV (optionally .gz) or Parquet file into a DataFrame.

    CSV rows with the wrong number of fields raise DataError naming the file and the line. Empty
    fields become missing values. `delimiter` may be several characters (MovieLens '::').
    `string_columns` are read as text (ids that look numeric but must not be converted).
    """
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", file=_display(path))
    if path.suffix == ".parquet" or path.name.endswith(".parquet.gz"):
        table = pq.read_table(path, columns=list(columns) if columns else None)
        frame = table.to_pandas()
        if column_names is not None:
            frame.columns = list(column_names)
        return frame
    if delimiter is None:
        delimiter = "\t" if ".tsv" in path.suffixes or path.suffix == ".tsv" else ","
    source = path
    if len(delimiter) != 1 or encoding.lower().replace("-", "") not in ("utf8",):
        # pyarrow reads single-character delimiters and UTF-8 only: rewrite the bytes in memory.
        import gzip

        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
        text = raw.decode(encoding)
        if len(delimiter) != 1:
            substitute = "\x1f"
            if substitute in text:
                raise DataError(f"cannot split on {delimiter!r}: the file contains the unit separator",
                                file=_display(path))
            text = text.replace(delimiter, substitute)
            delimiter = substitute
        source = io.BytesIO(text.encode("utf8"))
    bad_rows: list = []

    def on_invalid(row) -> str:
        bad_rows.append(row)
        return "skip"

    if column_names is not None:
        read_options = pacsv.ReadOptions(column_names=list(column_names), skip_rows=1 if header else 0)
    else:
        read_options = pacsv.ReadOptions(autogenerate_column_names=not header)
    parse_options = pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid,
                                       newlines_in_values=False)
    convert_options = pacsv.ConvertOptions(strings_can_be_null=True,
                                           column_types={c: pa.string() for c in string_columns},
                                           include_columns=list(columns) if columns else None)
    def read(read_options):
        if isinstance(source, io.BytesIO):
            source.seek(0)
        try:
            return pacsv.read_csv(source, read_options=read_options, parse_options=parse_options,
                                  convert_options=convert_options)
        except pa.ArrowInvalid as error:
            raise DataError(f"cannot parse: {_arrow_message(error)}", file=_display(path)) from None
        except KeyError as error:  # an include_columns entry that the header lacks
            raise DataError(f"missing column {error}", file=_display(path)) from None

    table = read(read_options)
    if bad_rows:
        # Either quoted values span lines (the fast parse assumes they don't) or rows really are
        # malformed. Re-read on one thread (which also numbers the rows) allowing such values.
        bad_rows.clear()
        read_options.use_threads = False
        parse_options.newlines_in_values = True
        table = read(read_options)
    if bad_rows:
        row = bad_rows[0]
        line = row.number
        row_number = None if line is None else line - (1 if header else 0)
        where = f"line {line}" if line is not None else "a line"
        raise DataError(f"malformed row: {where} has {row.actual_columns} fields, expected "
                        f"{row.expected_columns} ({len(bad_rows)} malformed rows in all): {row.text[:80]!r}",
                        file=_display(path), row=row_number)
    return table.to_pandas()


def _arrow_message(error: Exception) -> str:
    message = str(error)
    return re.sub(r"^CSV parse error: ", "", message).strip()


# ---- validation ----------------------------------------------------------------------------

def require_columns(frame: pd.DataFrame, columns: Sequence[str | None], file: str) -> None:
    for column in columns:
        if column is not None and column not in frame.columns:
            raise DataError(f"missing column; the file has {list(frame.columns)}", file=file, column=column)


def require_present(frame: pd.DataFrame, column: str, file: str, what: str = "missing id") -> None:
    """Raise naming the first row where `column` is missing or blank."""
    values = frame[column]
    missing = values.isna().to_numpy()
    if values.dtype == object:
        missing |= (values.astype(str).str.strip() == "").to_numpy()
    if missing.any():
        raise DataError(what, file=file, row=int(np.flatnonzero(missing)[0]) + 1, column=column)


def parse_time(values: pd.Series, time_format: TimeFormat, *, file: str, column: str) -> np.ndarray:
    """Times as float64 seconds (or as the order values themselves). Raises on the first row that
    cannot be parsed."""
    missing = values.isna().to_numpy()
    if missing.any():
        raise DataError("missing timestamp", file=file, row=int(np.flatnonzero(missing)[0]) + 1, column=column)
    numeric = pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype)
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
            raise DataError(f"unparsable {'order value' if time_format == 'order' else 'timestamp'} "
                            f"{values.iloc[row]!r} (expected a number)", file=file, row=row + 1, column=column)
        seconds = as_number.to_numpy(dtype=np.float64)
        return seconds / 1000.0 if time_format == "epoch_ms" else seconds
    # ISO dates or date-times; time zones are converted to UTC.
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        parsed = values
    else:
        parsed = pd.to_datetime(values.astype(str), errors="coerce", utc=True, format="ISO8601")
    bad = parsed.isna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"unparsable timestamp {values.iloc[row]!r} (expected epoch seconds or an ISO date)",
                        file=file, row=row + 1, column=column)
    if getattr(parsed.dt, "tz", None) is None:
        parsed = parsed.dt.tz_localize("UTC")
    return (parsed.dt.tz_convert("UTC").dt.tz_localize(None).astype("datetime64[ns]")
            .to_numpy().astype(np.int64) / 1e9)


def parse_labels(frame: pd.DataFrame, columns: Sequence[str], file: str) -> dict[str, np.ndarray]:
    labels = {}
    for column in columns:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(f"label {frame[column].iloc[row]!r} is not a number", file=file, row=row + 1,
                            column=column)
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
              unknown: Literal["error", "drop"] = "error") -> np.ndarray:
    """Leaf index of each item label; -1 for unknown items when `unknown="drop"`, else an error
    naming the first row whose item has no taxonomy node."""
    if np.issubdtype(np.asarray(labels).dtype, np.integer):
        return _map_integer_items(np.asarray(labels), taxonomy, file=file, column=column, unknown=unknown)
    leaf_labels = taxonomy.node_labels[-1].astype(str)
    order = np.argsort(leaf_labels, kind="stable")
    sorted_labels = leaf_labels[order]
    labels = labels.astype(str)
    where = np.searchsorted(sorted_labels, labels)
    where_clipped = np.minimum(where, len(sorted_labels) - 1)
    found = (where < len(sorted_labels)) & (sorted_labels[where_clipped] == labels)
    if not found.all() and unknown == "error":
        row = int(np.flatnonzero(~found)[0])
        raise DataError(f"item {str(labels[row])!r} has no taxonomy node (it is not in the item table)",
                        file=file, row=row + 1, column=column)
    return np.where(found, order[where_clipped], -1).astype(np.int64)


def _map_integer_items(ids: np.ndarray, taxonomy: Taxonomy, *, file: str, column: str,
                       unknown: Literal["error", "drop"]) -> np.ndarray:
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
        row = int(np.flatnonzero(~found)[0])
        raise DataError(f"item {str(ids[row])!r} has no taxonomy node (it is not in the item table)",
                        file=file, row=row + 1, column=column)
    return np.where(found, order[clipped] if len(order) else -1, -1).astype(np.int64)


@dataclass
class Catalogue:
    taxonomy: Taxonomy
    leaf_text: list[str] | None


def build_catalogue(items: pd.DataFrame, columns: ItemColumns, *, file: str, item_level_name: str | None = None
                    ) -> Catalogue:
    """Taxonomy and text from an item table (or an interaction table carrying item columns).
    Rows repeating the same item with the same path are merged; an item mapped to two parents,
    a missing id or a missing node raises naming file, row and column."""
    require_columns(items, [columns.item, columns.path, *(columns.levels or []), *columns.text], file)
    require_present(items, columns.item, file)
    frame = items.copy()
    frame[columns.item] = item_labels(frame[columns.item])
    if columns.levels is not None:
        level_columns = list(columns.levels) + [columns.item]
        taxonomy = Taxonomy.from_table(frame, level_columns, file=file)
        if item_level_name or columns.level_names:
            names = list(columns.level_names) if columns.level_names else level_columns[:-1] + [item_level_name]
            if len(names) != len(level_columns):
                raise DataError(f"{len(names)} level names for {len(level_columns)} levels", file=file)
            taxonomy = Taxonomy(names, taxonomy.node_labels, taxonomy.parents)
    else:
        require_present(frame, columns.path, file, what="item without a taxonomy path")
        first = ~frame[columns.item].duplicated().to_numpy()
        unique = frame[first]
        taxonomy = Taxonomy.from_paths(unique[columns.item].to_numpy(), unique[columns.path].tolist(),
                                       columns.level_names, separator=columns.path_separator, file=file,
                                       column=columns.path)
        # Re-check the duplicates: the same item listed with a second, different path.
        paths = frame[columns.path].astype(str)
        first_path = pd.Series(unique[columns.path].astype(str).to_numpy(), index=unique[columns.item].to_numpy())
        conflict = (first_path.reindex(frame[columns.item].to_numpy()).to_numpy() != paths.to_numpy())
        if conflict.any():
            row = int(np.flatnonzero(conflict)[0])
            raise DataError(f"item {frame[columns.item].iloc[row]!r} is mapped to two parents "
                            f"({first_path[frame[columns.item].iloc[row]]!r} and {paths.iloc[row]!r})",
                            file=file, row=row + 1, column=columns.path)
    leaf_text = None
    if columns.text:
        first = ~frame[columns.item].duplicated().to_numpy()
        unique = frame[first]
        text = unique[columns.text].fillna("").astype(str).agg(" ".join, axis=1).str.strip()
        by_item = pd.Series(text.to_numpy(), index=unique[columns.item].to_numpy())
        leaf_text = by_item.reindex(taxonomy.node_labels[-1].astype(str)).fillna("").tolist()
    return Catalogue(taxonomy, leaf_text)


def canonical_interactions(frame: pd.DataFrame, columns: InteractionColumns, taxonomy: Taxonomy, *,
                           file: str, unknown_items: Literal["error", "drop"] = "error"
                           ) -> tuple[pd.DataFrame, list[str]]:
    """Validate an interaction table and return (canonical frame, event names).

    Canonical columns: sequence, leaf, time, [event], [label columns]. Rows keep file order."""
    require_columns(frame, [columns.sequence, columns.item, columns.time, columns.event, *columns.labels], file)
    require_present(frame, columns.sequence, file)
    require_present(frame, columns.item, file)
    out = pd.DataFrame({"sequence": frame[columns.sequence].to_numpy()})
    out["leaf"] = map_items(item_labels(frame[columns.item]), taxonomy, file=file, column=columns.item,
                            unknown=unknown_items)
    if columns.time is None:
        out["time"] = np.arange(len(frame), dtype=np.float64)
    else:
        out["time"] = parse_time(frame[columns.time], columns.time_format, file=file, column=columns.time)
    event_names: list[str] = []
    if columns.event is not None:
        require_present(frame, columns.event, file, what="missing event type")
        codes, names = pd.factorize(frame[columns.event].astype(str), sort=True)
        out["event"] = codes.astype(np.int64)
        event_names = [str(name) for name in names]
    for name, values in parse_labels(frame, columns.labels, file).items():
        out[name] = values
    if unknown_items == "drop":
        out = out[out["leaf"].to_numpy() >= 0].reset_index(drop=True)
    return out, event_names
