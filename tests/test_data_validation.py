"""Bad and suspicious input, class by class (issue 18): every offender located by file, row,
line, the file's own column name and value; compression and encodings named; plausibility checks
reported or rejected by option. Fixtures are small files built here from real rows."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hmtrec.data.loading import DataConfig, load_data, read_source
from hmtrec.data.schema import read_table
from hmtrec.errors import ConfigError, DataError


# ---- fixtures from real rows -----------------------------------------------------------------

def _ml_ratings(data_dir: Path, n: int = 3000) -> list[str]:
    with gzip.open(data_dir / "movielens-1m" / "ratings_users0001-2999.dat.gz", "rt") as f:
        return [next(f).rstrip("\n") for _ in range(n)]


def _movielens(tmp_path: Path, data_dir: Path, lines: list[str], name: str = "ml") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(data_dir / "movielens-1m" / "movies.dat", folder / "movies.dat")
    (folder / "ratings.dat").write_text("\n".join(lines) + "\n")
    return folder


def _ml_config(folder: Path, **validation) -> DataConfig:
    return DataConfig(source="movielens-1m", path=str(folder), validation=validation)


def _generic(tmp_path: Path, data_dir: Path, n: int = 3000, name: str = "gen") -> tuple[Path, pd.DataFrame]:
    """Real MovieLens rows in the generic format: events.csv (user, movie, timestamp) + items.csv."""
    folder = tmp_path / name
    folder.mkdir()
    rows = [line.split("::") for line in _ml_ratings(data_dir, n)]
    events = pd.DataFrame(rows, columns=["user", "movie", "rating", "timestamp"])
    movies = pd.read_csv(data_dir / "movielens-1m" / "movies.dat", sep="::", engine="python", encoding="latin-1",
                         names=["movie", "title", "genres"], dtype=str)
    movies["genre"] = movies["genres"].str.split("|").str[0]
    movies[["movie", "genre", "title"]].to_csv(folder / "items.csv", index=False)
    return folder, events


def _generic_config(folder: Path, events: str = "events.csv", **extra) -> DataConfig:
    section = {"interactions": events, "items": "items.csv",
               "columns": {"sequence": "user", "item": "movie", "time": "timestamp"},
               "item_columns": {"item": "movie", "levels": ["genre"]}}
    validation = extra.pop("validation", {})
    section.update(extra)
    return DataConfig(source="generic", path=str(folder), generic=section, validation=validation,
                      split={"protocol": "leave_one_out"}, filters={"min_item_support": 1})


def _raises(config: DataConfig, kind=DataError) -> str:
    with pytest.raises(kind) as info:
        load_data(config)
    return str(info.value)


# ---- 1. implausible timestamps ---------------------------------------------------------------

def test_implausible_timestamps_are_all_named_and_can_be_dropped(tmp_path, data_dir):
    lines = _ml_ratings(data_dir)
    bad = {10: "32503680000",        # year 3000
           20: "-2208988800",        # year 1900
           30: "978300760000",       # milliseconds in a seconds column
           40: "978300"}             # truncated
    for row, value in bad.items():
        parts = lines[row].split("::")
        lines[row] = "::".join(parts[:3] + [value])
    folder = _movielens(tmp_path, data_dir, lines)
    message = _raises(_ml_config(folder))
    assert "ratings.dat, row 11, column 'timestamp': implausible timestamp" in message
    assert "outside 1990-01-01 .. 2100-01-01" in message and "look like milliseconds" in message
    assert "4 rows in all: row 11 (line 11) 32503680000, row 21 (line 21) -2208988800, " \
           "row 31 (line 31) 978300760000, row 41 (line 41) 978300" in message
    source = read_source(_ml_config(folder, implausible_times="drop"))
    assert any("dropped 4 event(s) with implausible times" in note for note in source.notes)
    assert len(source.events) == len(lines) - 4
    # a configurable range
    assert "outside 2001-01-01 .. 2100-01-01" in _raises(_ml_config(folder, time_min="2001-01-01"))


def test_millisecond_column_is_detected(tmp_path, data_dir):
    folder, events = _generic(tmp_path, data_dir)
    events["timestamp"] = events["timestamp"].astype(np.int64) * 1000
    events.to_csv(folder / "events.csv", index=False)
    source = read_source(_generic_config(folder))
    assert any("read as milliseconds" in note for note in source.notes)
    assert source.events["time"].max() < 2e9


# ---- 2. corrupt or disguised compression -----------------------------------------------------

def test_compression_faults_are_named_with_the_file(tmp_path, data_dir):
    folder, events = _generic(tmp_path, data_dir)
    payload = events.to_csv(index=False).encode()
    (folder / "events.csv").write_bytes(gzip.compress(payload))          # gzip named .csv
    message = _raises(_generic_config(folder))
    assert "events.csv: the file is gzip-compressed but its name does not say so" in message
    compressed = gzip.compress(payload)
    (folder / "cut.csv.gz").write_bytes(compressed[: len(compressed) // 2])
    assert "cut.csv.gz: corrupt gzip file: it is truncated" in _raises(_generic_config(folder, "cut.csv.gz"))
    broken = bytearray(compressed)
    broken[-6] ^= 0xFF                                                    # the CRC32 trailer
    (folder / "crc.csv.gz").write_bytes(bytes(broken))
    assert "crc.csv.gz: corrupt gzip file: CRC check failed" in _raises(_generic_config(folder, "crc.csv.gz"))
    (folder / "plain.csv.gz").write_bytes(payload)
    assert "plain.csv.gz: the name says gzip but the file is not gzip" in \
        _raises(_generic_config(folder, "plain.csv.gz"))


# ---- 3. header-only files and degenerate splits ----------------------------------------------

def test_header_only_file_is_named(tmp_path, data_dir):
    folder, events = _generic(tmp_path, data_dir)
    events.head(0).to_csv(folder / "events.csv", index=False)
    assert "events.csv: the file has a header but no data rows" in _raises(_generic_config(folder))
    (folder / "events.csv").write_text("")
    assert "events.csv: the file is empty" in _raises(_generic_config(folder))


def test_degenerate_splits_fail_or_warn_before_training(tmp_path, data_dir):
    folder, events = _generic(tmp_path, data_dir)
    events.to_csv(folder / "events.csv", index=False)
    base = _generic_config(folder)
    # the last user alone is after the test cut-off: one test sequence is a warning
    times = events["timestamp"].astype(np.int64)
    last_user = events["user"].iloc[-1]
    shifted = events.assign(timestamp=np.where(events["user"] == last_user, times + 400 * 86_400, times))
    shifted.to_csv(folder / "events.csv", index=False)
    config = base.model_copy(update={"split": base.split.model_copy(update={
        "protocol": "time_fraction", "test_fraction": 0.05, "valid_fraction": 0.3})})
    prepared = load_data(config)
    assert any("the test split holds 1 sequence(s)" in warning for warning in prepared.info["warnings"])
    # a valid window with no events in it: an error before any training, naming the keys
    others = events["user"] != last_user
    packed = shifted.assign(timestamp=times.min() + np.arange(len(events)) + np.where(others, 0, 400 * 86_400))
    packed.to_csv(folder / "events.csv", index=False)
    message = _raises(config, ConfigError)
    assert "data.split: the validation split has no targets (protocol 'time_fraction'" in message
    assert "data.split.test_fraction / valid_fraction" in message


# ---- 4. every offender in one error ----------------------------------------------------------

def test_all_offenders_are_listed_capped_with_a_count(tmp_path, data_dir):
    folder, events = _generic(tmp_path, data_dir)
    unknown = events.copy()
    for k, row in enumerate(range(100, 1300, 100)):
        unknown.loc[row, "movie"] = f"99{k:03d}"
    unknown.to_csv(folder / "events.csv", index=False)
    message = _raises(_generic_config(folder))
    assert "row 101, column 'movie': item '99000' has no taxonomy node" in message
    assert "12 distinct unknown item(s)" in message and "12 rows in all: row 101 (line 102) '99000', " \
           "row 201 (line 202) '99001'" in message and ", and 2 more" in message
    missing = events.copy()
    missing.loc[[5, 50], "user"] = None
    missing.to_csv(folder / "events.csv", index=False)
    assert "row 6, column 'user': missing id; 2 rows in all: row 6 (line 7), row 51 (line 52)" in \
        _raises(_generic_config(folder))


# ---- 5. locations: short rows, invalid UTF-8, the file's own names ---------------------------

def test_row_level_messages_give_line_column_and_value(tmp_path, data_dir):
    folder, events = _generic(tmp_path, data_dir)
    text = events.to_csv(index=False).splitlines()
    text[8] = ",".join(text[8].split(",")[:3])       # no timestamp
    text[12] += ",7"                                 # one field too many
    (folder / "events.csv").write_text("\n".join(text) + "\n")
    message = _raises(_generic_config(folder))
    assert "malformed row (2 malformed rows in all): line 9 has 3 fields, expected 4 (no value for 'timestamp')" \
        in message and "line 13 has 5 fields, expected 4 (surplus field after 'timestamp')" in message
    # invalid UTF-8: line, byte offset and the column's own name
    items = (folder / "items.csv").read_bytes().split(b"\n")
    items[3] = items[3].replace(b"Grumpier", b"Gr\xfcmpier")
    (folder / "items.csv").write_bytes(b"\n".join(items))
    events.to_csv(folder / "events.csv", index=False)
    message = _raises(_generic_config(folder))
    offset = sum(len(line) + 1 for line in items[:3]) + items[3].index(b"\xfc")
    assert f"items.csv: invalid utf8 at line 4, byte offset {offset}, in column 'title'" in message
    # a multi-character separator is shown as written, not as the stand-in character
    ml = _movielens(tmp_path, data_dir, _ml_ratings(data_dir, 50)[:9] + ["1::661::3"] + _ml_ratings(data_dir, 20)[10:])
    message = _raises(_ml_config(ml))
    assert "line 10 has 3 fields, expected 4 (no value for 'timestamp'): '1::661::3'" in message


def test_diginetica_messages_use_the_file_s_own_column_names(tmp_path, data_dir):
    folder = tmp_path / "dg"
    folder.mkdir()
    source = data_dir / "diginetica"
    shutil.copy(source / "product-categories.csv.gz", folder)
    lines = (source / "sample_train-item-views.csv").read_text().splitlines()[:400]
    lines[7] = lines[7].replace(lines[7].split(";")[2], "999999999", 1)
    (folder / "sample_train-item-views.csv").write_text("\n".join(lines) + "\n")
    message = _raises(DataConfig(source="diginetica", path=str(folder)))
    assert "row 7, column 'item_id': item '999999999' has no taxonomy node" in message


# ---- 6. mixed encodings ----------------------------------------------------------------------

def test_mixed_encodings_are_reported(tmp_path, data_dir):
    ml = _movielens(tmp_path, data_dir, _ml_ratings(data_dir, 200))
    movies = (ml / "movies.dat").read_bytes().split(b"\n")
    movies[5] = movies[5].replace(b"Heat", "Heat Café".encode("utf8"))     # a UTF-8 line in a latin-1 file
    (ml / "movies.dat").write_bytes(b"\n".join(movies))
    source = read_source(_ml_config(ml))
    assert any("mixed encodings: 1 line(s) hold UTF-8 byte sequences in a latin-1 file (lines 6)" in warning
               for warning in source.warnings)
    assert "mixed encodings" in _raises(_ml_config(ml, suspicious="error"))
    # the other way round: a latin-1 line in a UTF-8 file
    path = tmp_path / "items.csv"
    path.write_bytes("movie,genre,title\n1,Drama,Café\n2,Drama,".encode("utf8") + "Zoë\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"invalid utf8 at line 3, byte offset \d+, in column 'title'.*mixes encodings"):
        read_table(path)


# ---- 7. suspicious but legal input -----------------------------------------------------------

def test_suspicious_input_is_reported_or_rejected(tmp_path, data_dir):
    # swapped latitude / longitude among real Foursquare venues
    folder = tmp_path / "fsq"
    folder.mkdir()
    venues = pd.read_csv(data_dir / "foursquare-nyc" / "stan_NYC_poi_coords.csv").head(300)
    venues.loc[17, ["lat", "lon"]] = venues.loc[17, ["lon", "lat"]].to_numpy().copy()
    venues.to_csv(folder / "stan_NYC_poi_coords.csv", index=False)
    checkins = pd.read_csv(data_dir / "foursquare-nyc" / "stan_NYC_checkins.csv.gz", nrows=20000)
    checkins[checkins["poi"].isin(venues["poi"])].to_csv(folder / "stan_NYC_checkins.csv.gz", index=False)
    config = DataConfig(source="foursquare-nyc", path=str(folder))
    warnings = read_source(config).warnings
    assert any("1 venue(s) lie far outside the data's extent (1 fall inside it with latitude and longitude "
               "swapped): row 18" in warning for warning in warnings)
    with pytest.raises(DataError, match="far outside the data's extent"):
        read_source(DataConfig(source="foursquare-nyc", path=str(folder), validation={"suspicious": "error"}))
    # conflicting duplicate ratings of one (user, movie)
    lines = _ml_ratings(data_dir, 500)
    parts = lines[3].split("::")
    lines.append("::".join([parts[0], parts[1], "1" if parts[2] != "1" else "2", parts[3]]))
    source = read_source(_ml_config(_movielens(tmp_path, data_dir, lines)))
    assert any("1 (user_id, movie_id) pairs appear more than once with different rating" in w for w in source.warnings)
    # an unnamed index column, and a path that repeats a node
    gen, events = _generic(tmp_path, data_dir, 500)
    events.to_csv(gen / "events.csv")                 # index=True: an unnamed first column
    items = pd.read_csv(gen / "items.csv", dtype=str)
    items["path"] = items["genre"] + " > Film > " + items["genre"]
    items.to_csv(gen / "items.csv", index=False)
    config = _generic_config(gen, item_columns={"item": "movie", "path": "path"})
    warnings = read_source(config).warnings
    assert any("column '': the first column has no name and holds a row index" in w for w in warnings)
    assert any("path(s) repeat a node name" in w for w in warnings)
    with pytest.raises(DataError, match="first column has no name"):
        read_source(_generic_config(gen, item_columns={"item": "movie", "path": "path"},
                                    validation={"suspicious": "error"}))


# ---- 8. fields a reader does not use are validated -------------------------------------------

def test_movielens_ratings_outside_one_to_five_are_errors(tmp_path, data_dir):
    lines = _ml_ratings(data_dir, 500)
    for row, value in ((4, "7"), (9, "0")):
        parts = lines[row].split("::")
        lines[row] = "::".join([parts[0], parts[1], value, parts[3]])
    message = _raises(_ml_config(_movielens(tmp_path, data_dir, lines)))
    assert "ratings.dat, row 5, column 'rating': rating 7 is not one of [1, 2, 3, 4, 5]; 2 rows in all: " \
           "row 5 (line 5) 7, row 10 (line 10) 0" in message
