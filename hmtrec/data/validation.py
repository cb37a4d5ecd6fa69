"""Checks shared by every reader: where a bad value is, how plausible a legal value is, and what
the bytes of a file really are.

- Row-level errors list every offender (the first `MAX_LISTED`, then a count) with its row, its
  line in the file and its value, under the file's own column name, in one `DataError`.
- Compression is read from the file's first bytes, not its name: a gzip file named `.csv`, a
  `.gz` that is not gzip, a truncated gzip or a CRC mismatch is an error that says so.
- Text must decode in the declared encoding; an invalid byte is located by line, byte offset and
  field, and a file that mixes encodings is named as such.
- Plausibility: timestamps outside a configurable range (with unit detection: milliseconds in a
  seconds column), coordinates far outside the data's own extent (swapped latitude/longitude),
  paths repeating a node, conflicting duplicate events, an unnamed index column. What is legal
  but suspicious is reported (a warning) or rejected, by `data.validation.suspicious`.

The rules are listed in docs/data.md.
"""

from __future__ import annotations

import gzip
from datetime import datetime, timezone
import logging
import re
import zlib
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from hmtrec.config import StrictModel
from hmtrec.errors import DataError
from hmtrec.rundir import LOGGER_NAME

logger = logging.getLogger(LOGGER_NAME)

MAX_LISTED = 10   # offenders named in one message; the rest are counted
SECONDS_PER_DAY = 86_400.0


class ValidationConfig(StrictModel):
    """Plausibility checks (see docs/data.md, "What is checked")."""

    time_min: str = Field("1990-01-01", description="earliest plausible event time (ISO date)")
    time_max: str = Field("2100-01-01", description="latest plausible event time (ISO date)")
    implausible_times: Literal["error", "drop"] = Field(
        "error", description="events outside [time_min, time_max]: error, or drop them with a count")
    suspicious: Literal["report", "error"] = Field(
        "report", description="legal but suspicious input (swapped coordinates, a path repeating a node, "
                              "conflicting duplicate events, an unnamed index column, mixed encodings): "
                              "report it as a warning, or reject it")
    coordinate_outlier_factor: float = Field(
        20.0, gt=1, description="a venue is an outlier when its distance from the median point exceeds "
                                "this many times the 95th-percentile distance")

    @field_validator("time_min", "time_max")
    @classmethod
    def _iso_date(cls, value: str) -> str:
        try:
            pd.Timestamp(value)
        except (ValueError, TypeError):
            raise ValueError(f"{value!r} is not an ISO date") from None
        return value

    def seconds_range(self) -> tuple[float, float]:
        low, high = (pd.Timestamp(v, tz="UTC").timestamp() for v in (self.time_min, self.time_max))
        return low, high


DEFAULT_VALIDATION = ValidationConfig()


# ---- locating offenders --------------------------------------------------------------------

def offender_error(headline: str, positions: Sequence[int], values: Sequence | None = None, *,
                   file: str | None, column: str | None, first_line: int | None = 2,
                   rows: Sequence[int] | None = None) -> DataError:
    """One DataError naming every offender (capped): `headline` describes the first one.

    `positions` are 0-based positions into `values`; the row shown is position + 1 (header
    excluded) unless `rows` gives the 1-based row numbers; the line is row - 1 + `first_line`
    (None: not a line-numbered text file)."""
    positions = np.asarray(positions, dtype=np.int64)
    row_numbers = np.asarray(rows, dtype=np.int64) if rows is not None else positions + 1
    count = len(positions)

    def shown(value) -> str:
        return repr(value.item() if isinstance(value, np.generic) else value)

    def line(k: int) -> str:
        return f" (line {row_numbers[k] - 1 + first_line})" if first_line is not None else ""

    def where(k: int) -> str:
        return f"row {row_numbers[k]}{line(k)}" + (f" {shown(values[positions[k]])}" if values is not None else "")

    if count == 1:
        suffix = line(0)
    else:
        listed = ", ".join(where(k) for k in range(min(count, MAX_LISTED)))
        more = f", and {count - MAX_LISTED:,} more" if count > MAX_LISTED else ""
        suffix = f"; {count:,} rows in all: {listed}{more}"
    return DataError(headline + suffix, file=file, row=int(row_numbers[0]), column=column)


def scalar(value):
    """A value as its file shows it in a message (7, not np.int64(7))."""
    return value.item() if isinstance(value, np.generic) else value


def first_line_of(frame: pd.DataFrame | pd.Series) -> int | None:
    """The file line of row position 0 (set by `read_table`; 2 for a CSV with a header)."""
    return frame.attrs.get("first_line", 2)


def warn(message: str, settings: ValidationConfig | None, warnings: list[str] | None = None, *,
         file: str | None = None, column: str | None = None) -> None:
    """Legal but suspicious input: a warning (kept in `warnings`) or, by option, an error."""
    settings = settings or DEFAULT_VALIDATION
    if settings.suspicious == "error":
        raise DataError(message + " (data.validation.suspicious=error)", file=file, column=column)
    where = ", ".join(part for part in (f"file {file}" if file else "",
                                        f"column {column!r}" if column is not None else "") if part)
    text = f"{where}: {message}" if where else message
    logger.warning("%s", text)
    if warnings is not None:
        warnings.append(text)


# ---- bytes: compression and encoding -------------------------------------------------------

_MAGIC = {b"\x1f\x8b": "gzip", b"PK\x03\x04": "zip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
          b"\x28\xb5\x2f\xfd": "zstd", b"PAR1": "parquet"}


def sniff(path: Path) -> str | None:
    """The container a file's first bytes announce (gzip, zip, ..., parquet) or None for text."""
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            return kind
    return None


def _suffix_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".gz"):
        return "gzip"
    if name.endswith(".parquet"):
        return "parquet"
    for suffix, kind in ((".zip", "zip"), (".bz2", "bzip2"), (".xz", "xz"), (".zst", "zstd")):
        if name.endswith(suffix):
            return kind
    return None


def check_container(path: Path) -> str | None:
    """The file's real container; an error when its name says otherwise."""
    actual, named = sniff(path), _suffix_kind(path)
    if actual == named:
        return actual
    if named is None:
        raise DataError(f"the file is {actual}-compressed but its name does not say so; rename it "
                        f"(e.g. {path.name}{'.gz' if actual == 'gzip' else ''}) or decompress it"
                        if actual != "parquet" else "the file is Parquet but not named .parquet",
                        file=str(path))
    if actual is None:
        raise DataError(f"the name says {named} but the file is not {named} (it starts with "
                        f"{_head(path)!r}); fix the name or the file", file=str(path))
    raise DataError(f"the name says {named} but the file is {actual}", file=str(path))


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(12)


def read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when it is gzip; compression faults are named as such."""
    kind = check_container(path)
    if kind is None:
        return path.read_bytes()
    if kind != "gzip":
        raise DataError(f"{kind}-compressed text is not supported; use gzip or plain text", file=str(path))
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except EOFError:
        raise DataError("corrupt gzip file: it is truncated (the compressed stream ends early)",
                        file=str(path)) from None
    except (gzip.BadGzipFile, zlib.error, OSError) as error:
        raise DataError(f"corrupt gzip file: {error}", file=str(path)) from None


_UTF8_SEQUENCE = re.compile(rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}")


def decode(raw: bytes, encoding: str, *, file: str, delimiter: str | None = ",",
           header: Sequence[str] | None = None, settings: ValidationConfig | None = None,
           warnings: list[str] | None = None) -> str:
    """Text of `raw`. Invalid bytes raise naming line, byte offset and field (every bad line,
    capped); a single-byte-encoded file holding UTF-8 lines is reported as mixed encodings."""
    utf8 = encoding.lower().replace("-", "").replace("_", "") in ("utf8", "utf8sig")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as error:
        raise _decode_error(raw, encoding, error, file=file, delimiter=delimiter, header=header) from None
    if not utf8 and raw.isascii() is False:
        lines = [number for number, line in enumerate(raw.split(b"\n"), start=1) if _UTF8_SEQUENCE.search(line)]
        if lines:
            shown = ", ".join(map(str, lines[:MAX_LISTED])) + (f" and {len(lines) - MAX_LISTED} more"
                                                               if len(lines) > MAX_LISTED else "")
            warn(f"mixed encodings: {len(lines)} line(s) hold UTF-8 byte sequences in a {encoding} file "
                 f"(lines {shown}); they load as mojibake", settings, warnings, file=file)
    return text


def _decode_error(raw: bytes, encoding: str, error: UnicodeDecodeError, *, file: str, delimiter: str | None,
                  header: Sequence[str] | None) -> DataError:
    lines = raw.split(b"\n")
    bad, offset = [], 0
    for number, line in enumerate(lines, start=1):
        try:
            line.decode(encoding)
        except UnicodeDecodeError as line_error:
            bad.append((number, offset + line_error.start, line, line_error.start))
        offset += len(line) + 1
    number, byte_offset, line, start = bad[0]
    field = ""
    if delimiter:
        index = line[:start].count(delimiter.encode())
        names = list(header) if header is not None else None
        if names is None and number > 1:
            try:
                names = lines[0].decode(encoding, errors="replace").rstrip("\r").split(delimiter)
            except LookupError:
                names = None
        name = names[index] if names is not None and index < len(names) else f"field {index + 1}"
        field = f", in column {name!r}"
    mixed = ""
    non_ascii = sum(1 for candidate in lines if not candidate.isascii())
    if len(bad) < non_ascii:
        mixed = f"; the file mixes encodings ({non_ascii - len(bad)} other non-ASCII lines decode fine)"
    others = "" if len(bad) == 1 else (f"; {len(bad):,} lines in all: " + ", ".join(str(b[0]) for b in bad[:MAX_LISTED])
                                       + (f", and {len(bad) - MAX_LISTED:,} more" if len(bad) > MAX_LISTED else ""))
    return DataError(f"invalid {encoding} at line {number}, byte offset {byte_offset}{field}: "
                     f"{line[max(0, start - 10):start + 10]!r}{mixed}{others}", file=file)


# ---- plausibility --------------------------------------------------------------------------

def check_times(seconds: np.ndarray, raw: pd.Series, *, file: str, column: str,
                settings: ValidationConfig | None, unit_hint: str = "seconds") -> np.ndarray:
    """Mask of plausible times; an error listing the implausible ones (unless they are dropped).

    A value that is plausible once divided by 1000 is named as milliseconds in a seconds column."""
    settings = settings or DEFAULT_VALIDATION
    low, high = settings.seconds_range()
    bad = (seconds < low) | (seconds > high)
    if not bad.any() or settings.implausible_times == "drop":
        return ~bad
    positions = np.flatnonzero(bad)
    raise implausible_times_error(positions, seconds[positions], raw.to_numpy(dtype=object), file=file,
                                  column=column, settings=settings, unit_hint=unit_hint,
                                  first_line=first_line_of(raw))


def implausible_times_error(positions: Sequence[int], seconds: np.ndarray, values, *, file: str, column: str,
                            settings: ValidationConfig | None, unit_hint: str = "seconds",
                            first_line: int | None = 2) -> DataError:
    """The error naming implausible times: 0-based `positions`, their times in `seconds` (aligned
    with `positions`) and the raw `values` (indexed by position). Shared by the in-memory readers
    (`check_times`) and streaming preparation, so both word it alike."""
    settings = settings or DEFAULT_VALIDATION
    low, high = settings.seconds_range()
    seconds = np.asarray(seconds, dtype=np.float64)
    as_ms = seconds / 1000.0
    hint = ""
    if unit_hint == "seconds" and ((as_ms >= low) & (as_ms <= high)).any():
        hint = " (some look like milliseconds: set time_format: epoch_ms, or fix those rows)"
    try:
        when = f" = {datetime.fromtimestamp(float(seconds[0]), tz=timezone.utc):%Y-%m-%d}"
    except (OverflowError, OSError, ValueError):
        when = ""
    return offender_error(
        f"implausible timestamp {scalar(values[positions[0]])!r}{when}: outside {settings.time_min} .. "
        f"{settings.time_max} (data.validation.time_min / time_max; implausible_times: drop removes them)"
        f"{hint}", positions, values, file=file, column=column, first_line=first_line)


def detect_milliseconds(values: np.ndarray, settings: ValidationConfig | None) -> bool:
    """Do (nearly all) epoch values read as seconds fall outside the plausible range, and inside it
    as milliseconds? Used by time_format auto."""
    settings = settings or DEFAULT_VALIDATION
    low, high = settings.seconds_range()
    if len(values) == 0:
        return False
    median = float(np.median(values))
    return not (low <= median <= high) and low <= median / 1000.0 <= high


def check_conflicting_duplicates(keys: pd.DataFrame, values: pd.DataFrame, *, file: str,
                                 settings: ValidationConfig | None, warnings: list[str] | None,
                                 what: str) -> None:
    """Rows sharing `keys` (e.g. user and item) whose `values` (e.g. the rating) differ."""
    if len(keys) == 0 or values.shape[1] == 0:
        return
    frame = pd.concat([keys.reset_index(drop=True), values.reset_index(drop=True)], axis=1)
    key_columns, value_columns = list(keys.columns), list(values.columns)
    duplicated = frame.duplicated(key_columns, keep=False).to_numpy()
    if not duplicated.any():
        return
    subset = frame[duplicated]
    distinct = subset.groupby(key_columns, sort=False)[value_columns].nunique(dropna=False).max(axis=1)
    conflicting = distinct[distinct > 1]
    if conflicting.empty:
        return
    first_key = conflicting.index[0]
    first_key = first_key if isinstance(first_key, tuple) else (first_key,)
    match = np.ones(len(frame), dtype=bool)
    for column, value in zip(key_columns, first_key):
        match &= (frame[column] == value).to_numpy()
    rows = np.flatnonzero(match)[:MAX_LISTED] + 1
    shown = dict(zip(key_columns, first_key))
    warn(f"{len(conflicting):,} {what} appear more than once with different {', '.join(value_columns)}; "
         f"e.g. {shown} in rows {', '.join(map(str, rows))} with "
         f"{frame.loc[match, value_columns].drop_duplicates().to_dict('records')}", settings, warnings, file=file)


def check_unnamed_index(frame: pd.DataFrame, *, file: str, settings: ValidationConfig | None,
                        warnings: list[str] | None) -> None:
    """A first column without a name (or pandas' 'Unnamed: 0') holding 0..n-1 or 1..n: an index
    written by `DataFrame.to_csv` without `index=False`."""
    if frame.shape[1] == 0:
        return
    name = str(frame.columns[0])
    if name.strip() != "" and not name.startswith("Unnamed"):
        return
    values = pd.to_numeric(frame.iloc[:, 0], errors="coerce").to_numpy(dtype=np.float64)
    counting = len(values) > 0 and (np.array_equal(values, np.arange(len(values)))
                                    or np.array_equal(values, np.arange(1, len(values) + 1)))
    kind = "a row index (0..n-1)" if counting else "values"
    warn(f"the first column has no name and holds {kind}: probably an index written with the data "
         f"(pandas to_csv without index=False); it is ignored", settings, warnings, file=file, column=name)


def coordinate_outliers(lat: np.ndarray, lon: np.ndarray, factor: float) -> np.ndarray:
    """Mask of points far outside the data's own extent: distance (degrees) from the median point
    above `factor` x the 95th-percentile distance (floored at 0.01 degree)."""
    if len(lat) < 20:
        return np.zeros(len(lat), dtype=bool)
    centre_lat, centre_lon = np.median(lat), np.median(lon)
    distance = np.hypot(lat - centre_lat, (lon - centre_lon) * np.cos(np.radians(centre_lat)))
    spread = max(float(np.quantile(distance, 0.95)), 0.01)
    return distance > factor * spread


def check_coordinates(ids: np.ndarray, lat: np.ndarray, lon: np.ndarray, *, file: str,
                      columns: tuple[str, str, str], settings: ValidationConfig | None,
                      warnings: list[str] | None) -> None:
    """Missing or out-of-range coordinates (every offender, one error) and outliers from the data's
    own extent (reported; named as swapped when swapping puts the point back inside)."""
    for values, column, limit in ((lat, columns[1], 90.0), (lon, columns[2], 180.0)):
        bad = ~np.isfinite(values) | (np.abs(values) > limit)
        if bad.any():
            raise offender_error(f"coordinate must be a number within ±{limit:g}, got {scalar(values[np.flatnonzero(bad)[0]])!r}",
                                 np.flatnonzero(bad), values, file=file, column=column)
    settings = settings or DEFAULT_VALIDATION
    outliers = coordinate_outliers(lat, lon, settings.coordinate_outlier_factor)
    if not outliers.any():
        return
    positions = np.flatnonzero(outliers)
    swapped = coordinate_outliers(np.where(outliers, lon, lat), np.where(outliers, lat, lon),
                                  settings.coordinate_outlier_factor)
    n_swapped = int((~swapped[positions]).sum())
    listed = ", ".join(f"row {p + 1} {ids[p]!r} ({lat[p]:.4f}, {lon[p]:.4f})" for p in positions[:MAX_LISTED])
    more = f", and {len(positions) - MAX_LISTED:,} more" if len(positions) > MAX_LISTED else ""
    warn(f"{len(positions):,} venue(s) lie far outside the data's extent ({n_swapped:,} fall inside it with "
         f"latitude and longitude swapped): {listed}{more}", settings, warnings, file=file,
         column=f"{columns[1]}/{columns[2]}")
