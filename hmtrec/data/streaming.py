"""Streaming preparation of interaction logs larger than memory: `hmtrec prepare CONFIG -o DIR`.

The engine is DuckDB, chosen by measurement over Polars' lazy/streaming engine (docs/benchmarks.md,
"Streaming preparation: DuckDB vs Polars"): on the same work it was faster, used less memory, and it
has what Polars lacks, a hard memory limit (`--memory-mb`) with spilling to disk. The log is read,
validated, filtered, encoded and split by SQL over the files; Python only builds the catalogue (the
item table, which training holds in memory anyway) and copies each split, in bounded record
batches, into memory-mapped arrays:

    DIR/prepared.json          manifest: data config, source files, filter reports, counts, protocol
    DIR/taxonomy.json          the catalogue, restricted to the items that occur (whole with keep_unused_items)
    DIR/leaf_text.json         item texts (when the item table has text columns)
    DIR/<split>.leaves.npy     int64 leaf index per event, sequences contiguous, events in time order
    DIR/<split>.offsets.npy    int64 [n_sequences + 1]
    DIR/<split>.targets.npy    bool target mask (every event but each sequence's first)
    DIR/<split>.times.npy      float64 seconds (when the log has a time column)
    DIR/<split>.events.npy     int64 event-type index (when it has an event column)
    DIR/<split>.sequences.parquet   original sequence id of each sequence (for messages and lookups)

Training reads them with `data: {source: prepared, path: DIR}`: `load_data` maps the arrays
(np.load(mmap_mode="r")), so the batches page events in as they need them and a log's size costs
disk, not memory.

The same rules as the in-memory readers (`hmtrec.data.schema`, `filters`, `splits`) hold, and give
the same splits, arrays and filter reports (tests/test_streaming.py checks it against `load_data`):
missing columns, missing ids, unparsable times and items absent from the item table fail with
file, row and column (or are dropped and reported, `unknown_items: drop`); malformed CSV rows fail
with their line; the filters (srgnn, once, fixed_point) and the session-time split with unseen
items dropped each report what they removed. Supported: `source: generic` with an item table and
the `session_time` protocol (the generic default), which is what logs too large for memory are.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hmtrec.data.filters import FilterReport, logger
from hmtrec.data.schema import build_catalogue, read_table
from hmtrec.data.sequences import Dataset, SequenceData, index_dtype
from hmtrec.data.splits import SECONDS_PER_DAY
from hmtrec.data.taxonomy import Taxonomy
from hmtrec.data.validation import DEFAULT_VALIDATION, implausible_times_error, offender_error
from hmtrec.errors import ConfigError, DataError

MANIFEST = "prepared.json"
FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")


@dataclass
class PrepareSettings:
    memory_mb: int = 2048            # DuckDB's memory_limit: what it may hold before spilling to disk
    threads: int | None = None       # DuckDB threads (default: all cores)
    batch_rows: int = 1_000_000      # rows per record batch copied into the arrays
    temp_dir: str | None = None      # where DuckDB spills (default DIR/.spill, removed after)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + str(text).replace("'", "''") + "'"


class _Preparer:
    """One preparation: a DuckDB connection and the tables it builds, step by step."""

    def __init__(self, cfg, out_dir: Path, settings: PrepareSettings):
        import duckdb

        self.cfg, self.generic, self.out_dir, self.settings = cfg, cfg.generic, out_dir, settings
        self.columns = self.generic.columns
        self.spill = Path(settings.temp_dir) if settings.temp_dir else out_dir / ".spill"
        self.spill.mkdir(parents=True, exist_ok=True)
        self.con = duckdb.connect()
        self.con.execute(f"SET memory_limit='{int(settings.memory_mb)}MB'")
        self.con.execute(f"SET temp_directory={_literal(self.spill)}")
        self.con.execute("SET preserve_insertion_order=true")  # row numbers follow the file
        self.con.execute("SET TimeZone='UTC'")
        if settings.threads:
            self.con.execute(f"SET threads={int(settings.threads)}")
        self.reports: list[FilterReport] = []
        self.notes: list[str] = []
        self.integer_times: bool | None = None
        self.implausible_dropped = 0

    def sql(self, query: str, *params):
        import duckdb

        try:
            return self.con.execute(query, list(params) if params else None)
        except duckdb.OutOfMemoryException as error:
            raise ConfigError(f"--memory-mb {self.settings.memory_mb}: DuckDB ran out of memory "
                              f"({_first_line(error)}); give it more (--memory-mb) or fewer threads "
                              f"(--threads)") from None

    def scalar(self, query: str, *params):
        return self.sql(query, *params).fetchall()[0][0]  # fetch all: DuckDB wants results finished

    # ---- reading and validating ----------------------------------------------------------------
    def source_relation(self, path: Path) -> str:
        if not path.exists():
            raise DataError("file not found", file=str(path))
        if path.suffix == ".parquet":
            return f"read_parquet({_literal(path)})"
        delimiter = self.generic.delimiter or ("\t" if ".tsv" in path.suffixes else ",")
        if len(delimiter) != 1:
            raise ConfigError(f"data.generic.delimiter: streaming preparation reads one-character delimiters, "
                              f"got {delimiter!r}")
        compression = ", compression='gzip'" if path.suffix == ".gz" else ""
        # The header read here, every column text: no sniffing (which would stop at a malformed line
        # without saying which), and ids that look numeric stay as written.
        types = ", ".join(f"{_literal(name)}: 'VARCHAR'" for name in _csv_header(path, delimiter))
        return (f"read_csv({_literal(path)}, header=true, auto_detect=false, columns={{{types}}}, "
                f"delim={_literal(delimiter)}, quote='\"', escape='\"', strict_mode=true, "
                f"null_padding=false{compression})")

    def read_interactions(self, path: Path, taxonomy: Taxonomy) -> None:
        file, c = str(path), self.columns
        relation = self.source_relation(path)
        try:
            header = [row[0] for row in self.sql(f"DESCRIBE SELECT * FROM {relation}").fetchall()]
        except Exception as error:
            raise DataError(f"cannot parse: {_first_line(error)}", file=file) from None
        for column in (c.sequence, c.item, c.time, c.event, *c.labels):
            if column is not None and column not in header:
                raise DataError(f"missing column; the file has {header}", file=file, column=column)
        time_part = f", CAST({_quote(c.time)} AS VARCHAR) AS t" if c.time is not None else ""
        event_part = f", CAST({_quote(c.event)} AS VARCHAR) AS ev" if c.event is not None else ""
        label_part = "".join(f", CAST({_quote(label)} AS VARCHAR) AS {_quote('label_' + label)}"
                             for label in c.labels)
        try:
            self.sql(f"""CREATE TEMP TABLE raw AS
                         SELECT row_number() OVER () AS row, CAST({_quote(c.sequence)} AS VARCHAR) AS seq,
                                trim(CAST({_quote(c.item)} AS VARCHAR)) AS item{time_part}{event_part}{label_part}
                         FROM {relation}""")
        except Exception as error:
            raise _csv_error(error, file) from None
        self.n_rows = self.scalar("SELECT count(*) FROM raw")
        self._require_present("seq IS NULL OR trim(seq) = ''", file, c.sequence, "missing id")
        self._require_present("item IS NULL OR item = ''", file, c.item, "missing id")
        if c.event is not None:
            self._require_present("ev IS NULL OR trim(ev) = ''", file, c.event, "missing event type")
        for label in c.labels:
            name = _quote("label_" + label)
            row = self.scalar(f"SELECT min(row) FROM raw WHERE TRY_CAST({name} AS DOUBLE) IS NULL")
            if row is not None:
                value = self.scalar(f"SELECT {name} FROM raw WHERE row = ?", row)
                raise DataError(f"label {value!r} is not a number", file=file, row=int(row), column=label)
        # items -> leaf index through the catalogue
        labels = taxonomy.node_labels[-1].astype(str)
        self.con.register("catalogue_view", pa.table({"label": pa.array(labels, pa.string()),
                                                      "leaf": pa.array(np.arange(len(labels)), pa.int64())}))
        self.sql("CREATE TEMP TABLE catalogue AS SELECT * FROM catalogue_view")
        self.con.unregister("catalogue_view")
        time_expr = self._time_expression(file)
        event_select = ", e.code AS event" if c.event is not None else ""
        event_join = "LEFT JOIN event_names e ON r.ev = e.name" if c.event is not None else ""
        if c.event is not None:
            self.sql("CREATE TEMP TABLE event_names AS SELECT name, CAST(row_number() OVER (ORDER BY name) - 1 "
                     "AS BIGINT) AS code FROM (SELECT DISTINCT ev AS name FROM raw)")
            self.event_names = [row[0] for row in self.sql("SELECT name FROM event_names ORDER BY code").fetchall()]
        else:
            self.event_names = []
        self.sql(f"""CREATE TEMP TABLE parsed AS
                     SELECT r.row, r.seq, k.leaf, {time_expr} AS time{event_select}
                     FROM raw r LEFT JOIN catalogue k ON r.item = k.label {event_join}""")
        if c.time is not None:
            found = self._offenders("SELECT p.row, r.t FROM parsed p JOIN raw r ON p.row = r.row "
                                    "WHERE p.time IS NULL OR NOT isfinite(p.time) ORDER BY p.row")
            if found is not None:
                positions, values = found
                value = values[positions[0]]
                expected = "a number" if self.time_format in ("epoch", "epoch_ms", "order") else \
                    "epoch seconds or an ISO date"
                what = "order value" if self.time_format == "order" else "timestamp"
                message = "missing timestamp" if value is None else f"unparsable {what} {value!r} (expected {expected})"
                raise offender_error(message, positions, values, file=file, column=c.time)
        if self.generic.unknown_items == "error":
            found = self._offenders("SELECT p.row, r.item FROM parsed p JOIN raw r ON p.row = r.row "
                                    "WHERE p.leaf IS NULL ORDER BY p.row")
            if found is not None:
                positions, values = found
                distinct = len({str(value) for value in values.values()})
                raise offender_error(f"item {str(values[positions[0]])!r} has no taxonomy node (it is not in the item "
                                     f"table; {distinct:,} distinct unknown item(s); generic.unknown_items: drop "
                                     "removes their rows)", positions, values, file=file, column=c.item)
        if c.time is not None and self.time_format != "order":
            self._check_plausible_times(file)   # after the item check, in the reader's order
        if self.generic.unknown_items == "drop":
            raw_sequences, raw_items = self.sql("SELECT count(DISTINCT seq), count(DISTINCT item) FROM raw").fetchall()[0]
        self.sql("DROP TABLE raw")
        self.sql("CREATE TEMP TABLE events AS SELECT * FROM parsed WHERE leaf IS NOT NULL")
        if self.generic.unknown_items == "drop":  # the generic reader's report
            rows, sequences, items = self._counts("events")
            report = FilterReport("items not in the item table", self.n_rows,
                                  self.n_rows - rows - self.implausible_dropped,
                                  raw_sequences - sequences, raw_items - items)
            logger.info("%s", report)
            self.reports.append(report)
        self.sql("DROP TABLE parsed")

    def _check_plausible_times(self, file: str) -> None:
        """The readers' plausibility rule (`validation.check_times`): every time within
        data.validation.time_min .. time_max, else one error naming the rows (or, with
        `implausible_times: drop`, the rows are dropped and counted in the notes)."""
        settings = self.cfg.validation or DEFAULT_VALIDATION
        low, high = settings.seconds_range()
        outside = f"p.time < {low!r} OR p.time > {high!r}"
        if settings.implausible_times == "drop":
            # counted among the listed items only, as the reader counts them (unknown ones are dropped anyway)
            dropped = self.scalar(f"SELECT count(*) FROM parsed p WHERE ({outside}) AND p.leaf IS NOT NULL")
            self.implausible_dropped = int(dropped)
            if dropped:
                self.sql(f"DELETE FROM parsed p WHERE {outside}")
                self.notes.append(f"{file}: dropped {dropped:,} event(s) with implausible times "
                                  f"(data.validation.implausible_times: drop)")
            return
        found = self.sql(f"SELECT p.row, r.t, p.time FROM parsed p JOIN raw r ON p.row = r.row WHERE {outside} "
                         f"ORDER BY p.row").fetchall()
        if not found:
            return
        positions = [int(row) - 1 for row, _, _ in found]
        values = dict(zip(positions, (self._as_read(value) for _, value, _ in found)))
        raise implausible_times_error(positions, np.array([t for _, _, t in found]), values, file=file,
                                      column=self.columns.time, settings=settings,
                                      unit_hint="milliseconds" if self.time_format == "epoch_ms" else "seconds")

    def _as_read(self, value: str):
        """A time column's text as the in-memory reader's CSV parser holds it: numbers as int (a
        column of integers) or float, dates as text; so that messages quote it alike."""
        if self.time_format not in ("epoch", "epoch_ms"):
            return value
        if self.integer_times is None:
            self.integer_times = bool(self.scalar(
                "SELECT coalesce(bool_and(regexp_full_match(trim(t), '[+-]?[0-9]+')), true) FROM raw"))
        return int(value) if self.integer_times else float(value)

    def _offenders(self, query: str) -> tuple[list[int], dict[int, object]] | None:
        """Every offending row of `query` (SELECT row, value ... ORDER BY row) as the in-memory
        readers' `offender_error` takes them: 0-based positions and their values; None if none."""
        found = self.sql(query).fetchall()
        if not found:
            return None
        positions = [int(row) - 1 for row, _ in found]
        return positions, dict(zip(positions, (value for _, value in found)))

    def _require_present(self, condition: str, file: str, column: str, what: str) -> None:
        found = self._offenders(f"SELECT row, NULL FROM raw WHERE {condition} ORDER BY row")
        if found is not None:
            raise offender_error(what, found[0], file=file, column=column)

    def _epoch_reads_as_milliseconds(self) -> bool:
        """`validation.detect_milliseconds` (the median read as seconds is implausible, read as
        milliseconds plausible), decided with counts, minima and maxima only: DuckDB's median holds
        the whole column in memory, past any memory limit."""
        settings = self.cfg.validation or DEFAULT_VALIDATION
        low, high = settings.seconds_range()
        value = "TRY_CAST(t AS DOUBLE)"
        if self.scalar(f"SELECT count(*) FROM raw WHERE {value} IS NULL"):
            return False   # the parse check names those rows
        n = self.scalar("SELECT count(*) FROM raw")
        if n == 0:
            return False

        def median_at_least(bound: float) -> bool:
            return self._median_beyond(value, n, bound, below=False)

        def median_at_most(bound: float) -> bool:
            return self._median_beyond(value, n, bound, below=True)

        as_seconds = median_at_least(low) and median_at_most(high)
        as_milliseconds = median_at_least(1000.0 * low) and median_at_most(1000.0 * high)
        return not as_seconds and as_milliseconds

    def _median_beyond(self, value: str, n: int, bound: float, below: bool) -> bool:
        """Is np.median of `value` over `raw` (n rows, none null) <= bound (below) or >= bound?"""
        outside = f"{value} > {bound!r}" if below else f"{value} < {bound!r}"
        count = self.scalar(f"SELECT count(*) FROM raw WHERE {outside}")
        half = n // 2
        if n % 2:
            return count <= half
        if count != half:
            return count < half
        # the two middle values straddle the bound: their mean decides
        inner, outer = self.sql(f"SELECT {'max' if below else 'min'}({value}) FILTER (WHERE NOT ({outside})), "
                                f"{'min' if below else 'max'}({value}) FILTER (WHERE {outside}) FROM raw").fetchall()[0]
        middle = (inner + outer) / 2
        return middle <= bound if below else middle >= bound

    def _time_expression(self, file: str) -> str:
        c = self.columns
        if c.time is None:
            self.time_format = "order"
            return "CAST(r.row - 1 AS DOUBLE)"
        time_format = c.time_format
        if time_format == "auto":
            numeric_share = self.scalar("SELECT avg(CASE WHEN TRY_CAST(t AS DOUBLE) IS NULL THEN 0 ELSE 1 END) "
                                        "FROM raw WHERE t IS NOT NULL")
            time_format = "epoch" if (numeric_share or 0) > 0.5 else "iso"
            if time_format == "epoch" and self._epoch_reads_as_milliseconds():
                time_format = "epoch_ms"
                self.notes.append(f"{file}, column {c.time!r}: epoch values read as milliseconds (as seconds "
                                  f"they are implausible; set time_format to say so)")
        self.time_format = time_format
        if time_format in ("epoch", "order"):
            return "TRY_CAST(r.t AS DOUBLE)"
        if time_format == "epoch_ms":
            return "TRY_CAST(r.t AS DOUBLE) / 1000.0"
        return "epoch_us(TRY_CAST(r.t AS TIMESTAMPTZ)) / 1e6"

    # ---- filters (hmtrec.data.filters, in SQL) -------------------------------------------------
    def _counts(self, table: str) -> tuple[int, int, int]:
        return self.sql(f"SELECT count(*), count(DISTINCT seq), count(DISTINCT leaf) FROM {table}").fetchall()[0]

    def _replace(self, name: str, query: str, report_name: str, detail: str = "") -> FilterReport:
        rows, sequences, items = self._counts("events")
        self.sql(f"CREATE TEMP TABLE events_next AS {query}")
        self.sql("DROP TABLE events")
        self.sql("ALTER TABLE events_next RENAME TO events")
        after = self._counts("events")
        report = FilterReport(report_name, rows, rows - after[0], sequences - after[1], items - after[2], detail)
        logger.info("%s", report)
        return report

    def min_sequence_length(self, minimum: int, name: str | None = None) -> FilterReport:
        return self._replace("events", f"""SELECT * FROM events WHERE seq IN
                                            (SELECT seq FROM events GROUP BY seq HAVING count(*) >= {minimum})""",
                             name or f"min sequence length {minimum}")

    def min_item_support(self, minimum: int, name: str | None = None) -> FilterReport:
        return self._replace("events", f"""SELECT * FROM events WHERE leaf IN
                                            (SELECT leaf FROM events GROUP BY leaf HAVING count(*) >= {minimum})""",
                             name or f"min item support {minimum}")

    def filters(self, min_length: int, min_support: int, mode: str, max_rounds: int = 50) -> None:
        if mode == "srgnn":
            self.reports.append(self.min_sequence_length(min_length))
            self.reports.append(self.min_item_support(min_support))
            self.reports.append(self.min_sequence_length(min_length, f"min sequence length {min_length} (again)"))
        elif mode == "once":
            self.reports.append(self.min_item_support(min_support))
            self.reports.append(self.min_sequence_length(min_length))
        else:  # fixed_point
            for round_number in range(1, max_rounds + 1):
                before = self.scalar("SELECT count(*) FROM events")
                self.reports.append(self.min_item_support(min_support, f"min item support {min_support} "
                                                                       f"(round {round_number})"))
                self.reports.append(self.min_sequence_length(min_length, f"min sequence length {min_length} "
                                                                         f"(round {round_number})"))
                if self.scalar("SELECT count(*) FROM events") == before:
                    break

    # ---- the session-time split (hmtrec.data.splits.session_time_split, in SQL) ----------------
    def session_time_split(self, test_days: float, valid_days: float, valid_tail_fraction: float,
                           drop_unseen: bool, min_length: int) -> tuple[str, dict]:
        self.sql("""CREATE TEMP TABLE seqs AS SELECT seq, min(time) AS first, max(time) AS last
                    FROM events GROUP BY seq""")
        last = float(self.scalar("SELECT max(last) FROM seqs"))
        test_cut = last - test_days * SECONDS_PER_DAY
        valid_cut = test_cut - valid_days * SECONDS_PER_DAY
        # Sequences in the in-memory order: first event's time, then id.
        self.sql(f"""CREATE TEMP TABLE seq_split AS
                     SELECT seq, first, row_number() OVER (ORDER BY first, seq) AS seq_order,
                            CASE WHEN last > {test_cut!r} THEN 'test'
                                 WHEN last > {valid_cut!r} AND {valid_days!r} > 0 THEN 'valid'
                                 ELSE 'train' END AS split
                     FROM seqs""")
        if valid_days <= 0:
            n_train = self.scalar("SELECT count(*) FROM seq_split WHERE split = 'train'")
            n_tail = int(round(n_train * valid_tail_fraction))
            self.sql(f"""UPDATE seq_split SET split = 'valid' WHERE seq IN (
                             SELECT seq FROM seq_split WHERE split = 'train' ORDER BY seq_order DESC LIMIT {n_tail})""")
            valid_text = f"valid = last {valid_tail_fraction:.0%} of training sessions"
        else:
            valid_text = f"valid = sessions ending in the {valid_days:g} days before"
        self.sql("""CREATE TEMP TABLE split_events AS
                    SELECT e.*, s.split, s.seq_order FROM events e JOIN seq_split s USING (seq)""")
        self.sql("DROP TABLE events")
        if drop_unseen:
            self.sql("CREATE TEMP TABLE seen AS SELECT DISTINCT leaf FROM split_events WHERE split = 'train'")
            for split in ("valid", "test"):
                self._drop_unseen(split, min_length)
        description = (f"session split by last-event time: test = sessions ending in the last {test_days:g} days, "
                       f"{valid_text}" + ("; items unseen in training removed from valid/test" if drop_unseen else ""))
        return description, {"valid": valid_cut, "test": test_cut}

    def _split_counts(self, split: str, extra: str = "") -> tuple[int, int, int]:
        return self.sql(f"SELECT count(*), count(DISTINCT seq), count(DISTINCT leaf) FROM split_events "
                        f"WHERE split = '{split}' {extra}").fetchall()[0]

    def _drop_unseen(self, split: str, min_length: int) -> None:
        before = self._split_counts(split)
        seen = "leaf IN (SELECT leaf FROM seen)"
        after = self._split_counts(split, f"AND {seen}")
        report = FilterReport(f"{split}: items unseen in training", before[0], before[0] - after[0],
                              before[1] - after[1], before[2] - after[2])
        logger.info("%s", report)
        self.reports.append(report)
        self.sql(f"DELETE FROM split_events WHERE split = '{split}' AND NOT {seen}")
        short = (f"seq IN (SELECT seq FROM split_events WHERE split = '{split}' GROUP BY seq "
                 f"HAVING count(*) < {min_length})")
        kept = self._split_counts(split, f"AND NOT {short}")
        report = FilterReport(f"{split}: sequences shorter than {min_length} after that", after[0],
                              after[0] - kept[0], after[1] - kept[1], after[2] - kept[2])
        logger.info("%s", report)
        self.reports.append(report)
        self.sql(f"DELETE FROM split_events WHERE split = '{split}' AND {short}")

    # ---- writing the arrays --------------------------------------------------------------------
    def write_split(self, split: str, new_index: np.ndarray, has_time: bool) -> dict:
        """The split's arrays, written in record batches of `batch_rows` through plain file writes:
        neither a whole column nor the pages of a mapped output file are held in memory, so what
        Python holds here does not grow with the log."""
        n_events = int(self.scalar(f"SELECT count(*) FROM split_events WHERE split = '{split}'"))
        n_sequences = int(self.scalar(f"SELECT count(DISTINCT seq_order) FROM split_events WHERE split = '{split}'"))
        batch_rows = self.settings.batch_rows
        # per sequence, in order: its original id (sequences.parquet), its end (offsets) and its
        # first event (not a target)
        lengths = self.con.sql(f"""SELECT seq, count(*) AS n FROM split_events WHERE split = '{split}'
                                   GROUP BY seq, seq_order ORDER BY seq_order""").to_arrow_reader(batch_rows)
        end, targets_written = 0, 0
        with _NpyWriter(self.out_dir / f"{split}.offsets.npy", np.int64, n_sequences + 1) as offsets, \
                _NpyWriter(self.out_dir / f"{split}.targets.npy", np.bool_, n_events) as targets, \
                pq.ParquetWriter(self.out_dir / f"{split}.sequences.parquet",
                                 pa.schema([("sequence", pa.string())])) as sequence_ids:
            offsets.write(np.zeros(1, dtype=np.int64))
            for batch in lengths:
                if batch.num_rows == 0:
                    continue
                counts = batch.column(1).to_numpy().astype(np.int64)
                ends = end + np.cumsum(counts)
                offsets.write(ends)
                sequence_ids.write_table(pa.table({"sequence": batch.column(0)}))
                # every event but each sequence's first, in pieces of <= batch_rows events
                starts = np.r_[end, ends[:-1]]
                for piece_start in range(int(end), int(ends[-1]), batch_rows):
                    piece_end = min(piece_start + batch_rows, int(ends[-1]))
                    mask = np.ones(piece_end - piece_start, dtype=np.bool_)
                    inside = starts[(starts >= piece_start) & (starts < piece_end)]
                    mask[inside - piece_start] = False
                    targets.write(mask)
                targets_written += int(counts.sum() - (counts > 0).sum())
                end = int(ends[-1])
        if end != n_events:
            raise DataError(f"internal: wrote {end} of {n_events} events of split {split}", file=str(self.out_dir))
        event_column = ", event" if self.event_names else ""
        reader = self.con.sql(f"""SELECT leaf, time{event_column} FROM split_events WHERE split = '{split}'
                                  ORDER BY seq_order, time, row""").to_arrow_reader(batch_rows)
        with _NpyWriter(self.out_dir / f"{split}.leaves.npy", np.int64, n_events) as leaves, \
                _NpyWriter(self.out_dir / f"{split}.times.npy", np.float64, n_events, enabled=has_time) as times, \
                _NpyWriter(self.out_dir / f"{split}.events.npy", np.int64, n_events,
                           enabled=bool(self.event_names)) as events:
            for batch in reader:
                leaves.write(new_index[batch.column(0).to_numpy()])
                times.write(batch.column(1).to_numpy())
                events.write(batch.column(2).to_numpy() if self.event_names else None)
        return {"sequences": n_sequences, "events": n_events, "targets": targets_written}

    def close(self) -> None:
        self.con.close()
        import shutil

        if self.settings.temp_dir is None:
            shutil.rmtree(self.spill, ignore_errors=True)


class _NpyWriter:
    """A 1-D .npy file of known length written piece by piece with ordinary writes (the page cache,
    not this process, holds what was written); it checks on closing that exactly `length` items came."""

    def __init__(self, path: Path, dtype, length: int, enabled: bool = True):
        self.path, self.dtype, self.length, self.enabled, self.written = path, np.dtype(dtype), int(length), enabled, 0
        self.file = None

    def __enter__(self) -> "_NpyWriter":
        if self.enabled:
            from numpy.lib import format as npy

            self.file = open(self.path, "wb")
            npy.write_array_header_1_0(self.file, {"descr": npy.dtype_to_descr(self.dtype), "fortran_order": False,
                                                   "shape": (self.length,)})
        return self

    def write(self, values) -> None:
        if self.file is None:
            return
        values = np.ascontiguousarray(values, dtype=self.dtype)
        values.tofile(self.file)
        self.written += len(values)

    def __exit__(self, kind, error, traceback) -> None:
        if self.file is None:
            return
        self.file.close()
        if kind is None and self.written != self.length:
            raise DataError(f"internal: wrote {self.written} of {self.length} values", file=str(self.path))


def _csv_header(path: Path, delimiter: str) -> list[str]:
    import csv
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf8", newline="") as f:
        header = next(csv.reader(f, delimiter=delimiter), None)
    if not header:
        raise DataError("empty file (no header line)", file=str(path))
    return header


def _csv_error(error: Exception, file: str) -> DataError:
    """DuckDB's CSV error as the in-memory reader words it: line, fields found and expected, the text."""
    import re

    text = str(error)
    line = re.search(r"CSV Error on Line: (\d+)", text)
    fields = re.search(r"Expected Number of Columns: (\d+) Found: (\d+)", text)
    original = re.search(r"Original Line: (.*)", text)
    if line and fields:
        number = int(line.group(1))
        return DataError(f"malformed row: line {number} has {fields.group(2)} fields, expected {fields.group(1)}: "
                         f"{(original.group(1) if original else '')[:80]!r}", file=file, row=number - 1)
    if line:
        return DataError(f"cannot parse line {line.group(1)}: {_first_line(error)}", file=file,
                         row=int(line.group(1)) - 1)
    return DataError(f"cannot parse: {_first_line(error)}", file=file)


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _check_supported(cfg) -> None:
    from hmtrec.data.loading import SOURCE_DEFAULTS

    if cfg.source != "generic":
        raise ConfigError(f"data.source: streaming preparation reads source 'generic' (your CSV/Parquet log and "
                          f"item table), not {cfg.source!r}; built-in sources fit in memory")
    if cfg.generic.items is None:
        raise ConfigError("data.generic.items: streaming preparation needs an item table (the taxonomy); give "
                          "data.generic.items")
    protocol = SOURCE_DEFAULTS["generic"].protocol if cfg.split.protocol == "auto" else cfg.split.protocol
    if protocol != "session_time":
        raise ConfigError(f"data.split.protocol: streaming preparation implements session_time (the generic "
                          f"default), not {protocol!r}")
    for key in ("max_sequences", "max_train_sequences"):
        if getattr(cfg, key) is not None:
            raise ConfigError(f"data.{key}: not supported by streaming preparation (it is for quick in-memory runs)")
    if cfg.split.train_on_all:
        raise ConfigError("data.split.train_on_all: not supported by streaming preparation")


def _resolve(cfg, name: str) -> Path:
    path = Path(name)
    return Path(cfg.path) / path if not path.is_absolute() and cfg.path is not None else path


def prepare(cfg, out_dir: str | Path, settings: PrepareSettings | None = None) -> dict:
    """Prepare the `data:` section `cfg` (a DataConfig) into `out_dir`; returns the manifest."""
    from hmtrec.data.loading import SOURCE_DEFAULTS

    settings = settings or PrepareSettings()
    _check_supported(cfg)
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    defaults = SOURCE_DEFAULTS["generic"]
    generic, columns = cfg.generic, cfg.generic.columns
    interactions_path, items_path = _resolve(cfg, generic.interactions), _resolve(cfg, generic.items)
    item_columns = generic.item_columns
    item_id_columns = [item_columns.item, *(item_columns.levels or []), *([item_columns.path] if item_columns.path else [])]
    items = read_table(items_path, delimiter=generic.delimiter, string_columns=item_id_columns)
    catalogue = build_catalogue(items, item_columns, file=str(items_path))
    del items
    taxonomy, leaf_text = catalogue.taxonomy, catalogue.leaf_text
    min_length = cfg.filters.min_sequence_length or defaults.min_length
    min_support = cfg.filters.min_item_support or defaults.min_support
    mode = cfg.filters.mode or defaults.mode
    drop_unseen = defaults.drop_unseen if cfg.split.unseen_items == "auto" else cfg.split.unseen_items == "drop"
    preparer = _Preparer(cfg, out_dir, settings)
    try:
        preparer.read_interactions(interactions_path, taxonomy)
        preparer.filters(min_length, min_support, mode)
        kept = preparer.scalar("SELECT count(*) FROM events")
        if kept == 0:
            raise ConfigError(f"data.filters: no events left after filtering; see the filter reports: "
                              f"{'; '.join(map(str, preparer.reports))}")
        description, cutoffs = preparer.session_time_split(
            cfg.split.test_days if cfg.split.test_days is not None else defaults.test_days,
            cfg.split.valid_days if cfg.split.valid_days is not None else defaults.valid_days,
            cfg.split.valid_tail_fraction, drop_unseen, max(min_length, 2))
        used = preparer.sql("SELECT DISTINCT leaf FROM split_events ORDER BY leaf").fetchnumpy()["leaf"]
        used = np.asarray(used, dtype=np.int64)
        new_index = np.arange(taxonomy.n_leaves, dtype=np.int64)
        if len(used) < taxonomy.n_leaves and not cfg.keep_unused_items:
            before = taxonomy.n_leaves
            taxonomy, new_index = taxonomy.subset(used)
            if leaf_text is not None:
                leaf_text = [leaf_text[i] for i in used]
            report = FilterReport("catalogue restricted to items that occur", 0, 0, 0, before - taxonomy.n_leaves,
                                  detail=f"{taxonomy.n_leaves:,} of {before:,} catalogue items kept")
            logger.info("%s", report)
            preparer.reports.append(report)
        counts = {split: preparer.write_split(split, new_index, columns.time is not None) for split in SPLITS}
    finally:
        preparer.close()
    taxonomy.save(out_dir / "taxonomy.json")
    if leaf_text is not None:
        (out_dir / "leaf_text.json").write_text(json.dumps({"text": leaf_text}))
    manifest = {
        "format": FORMAT_VERSION,
        "engine": "duckdb",
        "name": generic.name,
        "data": cfg.model_dump(mode="json"),
        "files": {str(path): {"bytes": path.stat().st_size, "mtime": path.stat().st_mtime}
                  for path in (interactions_path, items_path)},
        "has_time": columns.time is not None,
        "event_names": preparer.event_names,
        "reports": [report.to_dict() for report in preparer.reports],
        "notes": preparer.notes,
        "protocol": "session_time",
        "protocol_description": description,
        "filters": {"min_sequence_length": min_length, "min_item_support": min_support, "mode": mode},
        "events_after_filters": int(kept),
        "cutoffs": cutoffs,
        "counts": counts,
        "n_items": taxonomy.n_leaves,
        "levels": {name: taxonomy.n_nodes(name) for name in taxonomy.level_names},
        "settings": {"memory_mb": settings.memory_mb, "threads": settings.threads},
        "seconds": round(time.perf_counter() - started, 3),
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    logger.info("prepared %s in %.1fs: %s", generic.name, manifest["seconds"], counts)
    return manifest


# ---- reading prepared shards (data.source: prepared) --------------------------------------------

def load_prepared(cfg):
    """PreparedData from a folder written by `prepare`, its arrays memory-mapped."""
    from hmtrec.data.loading import PreparedData

    if cfg.path is None:
        raise ConfigError("data.path: source 'prepared' reads the folder `hmtrec prepare` wrote; give data.path")
    folder = Path(cfg.path)
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise DataError(f"not a prepared folder (no {MANIFEST}); write one with `hmtrec prepare`", file=str(folder))
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise DataError(f"prepared with format {manifest.get('format')}, this hmtrec reads {FORMAT_VERSION}; "
                        f"prepare it again", file=str(manifest_path))
    # The preparing config's data settings may stay in the training config; other values cannot apply.
    current, default = cfg.model_dump(mode="json"), type(cfg)().model_dump(mode="json")
    for key in ("split", "filters", "generic", "max_sequences", "max_train_sequences", "keep_unused_items"):
        if current[key] not in (manifest["data"].get(key), default[key]):
            raise ConfigError(f"data.{key}: {folder} was prepared with {key} = {manifest['data'].get(key)!r}; "
                              f"source 'prepared' cannot apply another value ({current[key]!r}): prepare again")
    started = time.perf_counter()
    taxonomy = Taxonomy.load(folder / "taxonomy.json")
    leaf_text = None
    if (folder / "leaf_text.json").exists():
        leaf_text = json.loads((folder / "leaf_text.json").read_text())["text"]
    event_names = list(manifest["event_names"])

    def split_data(split: str) -> SequenceData:
        def array(kind: str):
            path = folder / f"{split}.{kind}.npy"
            return np.load(path, mmap_mode="r") if path.exists() else None

        offsets = array("offsets")
        return SequenceData(leaves=array("leaves"), offsets=offsets,
                            sequence_ids=np.arange(len(offsets) - 1, dtype=index_dtype(len(offsets))),
                            timestamps=array("times") if manifest["has_time"] else None,
                            event_types=array("events") if event_names else None,
                            event_type_names=event_names, target_mask=array("targets"))

    train, valid, test = (split_data(split) for split in SPLITS)
    dataset = Dataset(name=manifest["name"], sequences=train, taxonomy=taxonomy, leaf_text=leaf_text)
    reports = [FilterReport(**report) for report in manifest["reports"]]
    info = {"source": "prepared", "prepared_from": str(folder), "protocol": manifest["protocol"],
            "protocol_description": manifest["protocol_description"], "filters": manifest["filters"],
            "events_after_filters": manifest["events_after_filters"], "cutoffs": manifest["cutoffs"],
            "notes": [*manifest.get("notes", []),
                      f"prepared by `hmtrec prepare` ({manifest['engine']}) from {sorted(manifest['files'])}"],
            "n_items": taxonomy.n_leaves, "levels": manifest["levels"], "counts": manifest["counts"],
            "seconds": round(time.perf_counter() - started, 3)}
    logger.info("loaded prepared %s from %s in %.1fs: %s", manifest["name"], folder, info["seconds"], info["counts"])
    return PreparedData(dataset, train, valid, test, reports, info)
