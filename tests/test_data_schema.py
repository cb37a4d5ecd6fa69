"""The generic format and every documented bad-input error (file, row, column in the message)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hmtrec.data.loading import DataConfig, load_data
from hmtrec.data.schema import read_table
from hmtrec.errors import ConfigError, DataError

ITEMS = "item_id,top,sub,title\n" + "\n".join(
    f"i{i},T{i % 2},S{i % 4},item number {i}" for i in range(8)) + "\n"


def _events(n_sessions=30, per_session=4, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_sessions):
        base = 1_700_000_000 + s * 3_600
        for k in range(per_session):
            rows.append((f"s{s}", f"i{rng.integers(0, 8)}", base + 60 * k))
    return pd.DataFrame(rows, columns=["session_id", "item_id", "timestamp"])


def _write(folder: Path, events: pd.DataFrame, items: str = ITEMS, fmt: str = "csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "items.csv").write_text(items)
    if fmt == "csv":
        events.to_csv(folder / "events.csv", index=False)
    else:
        events.to_parquet(folder / "events.parquet", index=False)
    return folder


def _config(folder: Path, events_name="events.csv", **generic) -> DataConfig:
    section = {"interactions": events_name, "items": "items.csv",
               "item_columns": {"item": "item_id", "levels": ["top", "sub"], "text": ["title"]}}
    section.update(generic)
    return DataConfig(source="generic", path=str(folder), generic=section,
                      filters={"min_item_support": 1}, split={"test_days": 0.25})


def _error(folder: Path, **generic) -> str:
    with pytest.raises(DataError) as info:
        load_data(_config(folder, **generic))
    return str(info.value)


def test_generic_csv_and_parquet_give_the_same_data(tmp_path):
    events = _events()
    csv = load_data(_config(_write(tmp_path / "csv", events)))
    parquet = load_data(_config(_write(tmp_path / "pq", events, fmt="parquet"), events_name="events.parquet"))
    assert csv.taxonomy.level_names == ["top", "sub", "item_id"]
    assert csv.taxonomy.n_nodes("top") == 2 and csv.taxonomy.n_nodes("sub") == 4
    for name in ("train", "valid", "test"):
        a, b = getattr(csv, name), getattr(parquet, name)
        assert np.array_equal(a.leaves, b.leaves) and np.array_equal(a.offsets, b.offsets)
        assert np.array_equal(a.timestamps, b.timestamps)
    leaf = csv.taxonomy.index_of(["i3"])[0]
    assert csv.dataset.leaf_text[leaf] == "item number 3"
    # 30 sessions one hour apart, the last 6 hours are test: 6 sessions (ending after the cut)
    assert csv.test.n_sequences == 6 and csv.train.n_sequences + csv.valid.n_sequences == 24


def test_iso_timestamps_order_column_event_types_and_path_taxonomy(tmp_path):
    events = _events(n_sessions=10)
    events["timestamp"] = pd.to_datetime(events["timestamp"], unit="s").dt.strftime("%Y-%m-%dT%H:%M:%S")
    events["event"] = np.where(np.arange(len(events)) % 3 == 0, "cart", "view")
    folder = _write(tmp_path, events, items="item_id,path\n" + "\n".join(
        f"i{i},Home > {'Kitchen' if i % 2 else 'Garden'} > Shelf{i % 3}" for i in range(8)) + "\n")
    config = DataConfig(source="generic", path=str(folder), filters={"min_item_support": 1},
                        split={"protocol": "leave_one_out"},
                        generic={"interactions": "events.csv", "items": "items.csv",
                                 "columns": {"event": "event"},
                                 "item_columns": {"item": "item_id", "path": "path",
                                                  "level_names": ["home", "room", "shelf", "item"]}})
    prepared = load_data(config)
    assert prepared.taxonomy.level_names == ["home", "room", "shelf", "item"]
    assert prepared.taxonomy.n_nodes("room") == 2 and prepared.taxonomy.n_nodes("shelf") == 6
    assert prepared.test.event_type_names == ["cart", "view"]
    assert set(np.unique(prepared.test.event_types)) == {0, 1}
    first = prepared.test.timestamps[0]
    assert first == pytest.approx(pd.Timestamp(events["timestamp"].iloc[0], tz="UTC").timestamp())
    # an order column instead of timestamps: file order is the time
    config = config.model_copy(update={"generic": config.generic.model_copy(update={
        "columns": config.generic.columns.model_copy(update={"time": None, "event": None})})})
    by_order = load_data(config)
    assert np.array_equal(by_order.test.leaves, prepared.test.leaves)


def test_malformed_rows_name_the_file_and_line(tmp_path):
    folder = _write(tmp_path, _events())
    path = folder / "events.csv"
    lines = path.read_text().splitlines()
    lines[5] += ",surplus"
    path.write_text("\n".join(lines) + "\n")
    message = _error(folder)
    assert f"file {path}, row 5: malformed row: line 6 has 4 fields, expected 3" in message
    lines = path.read_text().splitlines()
    lines[5] = "s1,i1,1700000000"
    lines[9] = "s2,i2"
    path.write_text("\n".join(lines) + "\n")
    assert "row 9: malformed row: line 10 has 2 fields, expected 3" in _error(folder)


def test_missing_ids_name_row_and_column(tmp_path):
    events = _events()
    events.loc[6, "session_id"] = None
    message = _error(_write(tmp_path / "a", events))
    assert "events.csv, row 7, column 'session_id': missing id" in message
    events = _events()
    events.loc[11, "item_id"] = ""
    message = _error(_write(tmp_path / "b", events))
    assert "row 12, column 'item_id': missing id" in message


def test_unparsable_timestamp_names_row_and_column(tmp_path):
    events = _events()
    events["timestamp"] = events["timestamp"].astype(str)
    events.loc[13, "timestamp"] = "yesterday-ish"
    message = _error(_write(tmp_path, events))
    assert "row 14, column 'timestamp': unparsable timestamp 'yesterday-ish'" in message
    events = _events()
    events["timestamp"] = pd.to_datetime(events["timestamp"], unit="s").astype(str)
    events.loc[3, "timestamp"] = "2023-02-30 10:00:00"   # no such day
    assert "row 4, column 'timestamp': unparsable timestamp" in _error(_write(tmp_path / "iso", events))


def test_item_without_a_taxonomy_node(tmp_path):
    events = _events()
    events.loc[8, "item_id"] = "i99"
    folder = _write(tmp_path, events)
    message = _error(folder)
    assert "events.csv, row 9, column 'item_id': item 'i99' has no taxonomy node" in message
    # the same rows can be dropped instead, and the drop is reported
    prepared = load_data(_config(folder, unknown_items="drop"))
    report = prepared.reports[0]
    assert report.name == "items not in the item table"
    assert (report.rows_before, report.rows_removed, report.sequences_removed, report.items_removed) == (120, 1, 0, 1)
    # an item table row with a gap: an empty level above a non-empty one
    items = ITEMS.replace("i5,T1,S1,", "i5,,S1,")
    message = _error(_write(tmp_path / "gap", _events(), items=items))
    assert "items.csv, row 6, column 'sub': a path level is empty between two non-empty ones (item 'i5')" in message


def test_item_mapped_to_two_parents(tmp_path):
    items = ITEMS + "i2,T1,S3,item number 2 again\n"
    message = _error(_write(tmp_path / "item", _events(), items=items))
    assert "items.csv, row 9, column 'sub': item 'i2' is mapped to two parents" in message
    # every item listed with two paths is named in the one error
    items = ITEMS + "i2,T1,S3,again\ni6,T1,S1,again\n"
    message = _error(_write(tmp_path / "items", _events(), items=items))
    assert "row 9, column 'sub': item 'i2' is mapped to two parents ('T0 > S2' and 'T1 > S3'); 2 rows in all: " \
           "row 9 (line 10) 'i2', row 10 (line 11) 'i6'" in message
    # nodes are keyed by their full path: the same name under two parents is two nodes
    items = ITEMS.replace("i4,T0,S0,", "i4,T1,S0,")
    prepared = load_data(_config(_write(tmp_path / "node", _events(), items=items)))
    assert {"T0 > S0", "T1 > S0"} <= set(prepared.taxonomy.node_labels[1])


def test_missing_columns_and_files(tmp_path):
    folder = _write(tmp_path, _events().rename(columns={"timestamp": "ts"}))
    assert "events.csv, column 'timestamp': missing column" in _error(folder)
    assert "file not found" in _error(folder, interactions="nope.csv")
    with pytest.raises(ValueError, match="needs a 'generic' section"):
        DataConfig(source="generic")


def test_non_numeric_label(tmp_path):
    events = _events()
    events["clicked"] = 1
    events["clicked"] = events["clicked"].astype(object)
    events.loc[4, "clicked"] = "yes"
    folder = _write(tmp_path, events)
    message = _error(folder, columns={"labels": ["clicked"]})
    assert "row 5, column 'clicked': label 'yes' is not a number" in message


def test_read_table_multichar_delimiter_and_latin1(tmp_path):
    path = tmp_path / "movies.dat"
    path.write_bytes("1::Café (1999)::Drama\n2::Zoë::Comedy|Drama\n".encode("latin-1"))
    frame = read_table(path, delimiter="::", header=False, column_names=["id", "title", "genres"],
                       encoding="latin-1")
    assert frame["title"].tolist() == ["Café (1999)", "Zoë"]
    assert frame["genres"].tolist() == ["Drama", "Comedy|Drama"]


def test_time_protocols_need_times(tmp_path):
    folder = _write(tmp_path, _events())
    config = _config(folder, columns={"time": None})
    with pytest.raises(ConfigError, match="needs event times"):
        load_data(config)
    config = config.model_copy(update={"split": config.split.model_copy(update={"protocol": "leave_one_out"})})
    assert load_data(config).test.n_targets == 30


def test_taxonomy_subset_drops_empty_nodes_and_maps_leaves():
    from hmtrec.data.taxonomy import Taxonomy

    table = pd.DataFrame({"top": ["A", "A", "B", "B", "C"], "sub": ["a1", "a2", "b1", "b1", "c1"],
                          "item": ["x", "y", "z", "w", "v"]})
    taxonomy = Taxonomy.from_table(table, ["top", "sub", "item"])
    keep = taxonomy.index_of(["y", "w", "z"])
    smaller, new_index = taxonomy.subset(keep)
    assert list(smaller.node_labels[0]) == ["A", "B"] and list(smaller.node_labels[1]) == ["a2", "b1"]
    assert sorted(smaller.node_labels[2]) == ["w", "y", "z"]
    assert (new_index >= 0).sum() == 3 and new_index[taxonomy.index_of(["x"])[0]] == -1
    for label in ("y", "w", "z"):
        old, new = taxonomy.index_of([label])[0], smaller.index_of([label])[0]
        assert new_index[old] == new
        assert taxonomy.labels_of([taxonomy.ancestors(old, "top")], "top")[0] == \
            smaller.labels_of([smaller.ancestors(new, "top")], "top")[0]


def test_quoted_values_may_span_lines(tmp_path):
    path = tmp_path / "items.csv"
    path.write_text('item_id,top,title\ni1,T0,"two\nlines"\ni2,T1,plain\n')
    frame = read_table(path)
    assert frame["title"].tolist() == ["two\nlines", "plain"]
    path.write_text('item_id,top,title\ni1,T0,"two\nlines"\ni2,T1,plain,surplus\n')
    with pytest.raises(DataError, match=r"row 2: malformed row: .* has 4 fields, expected 3"):
        read_table(path)
