"""Streaming preparation (DuckDB) gives the same splits, arrays and filter reports as the in-memory
generic reader, memory-maps its shards for training, and fails on bad rows with file, row and column."""

import json
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from hmtrec.config import build_config
from hmtrec.data.loading import DataConfig, load_data
from hmtrec.data.streaming import PrepareSettings, prepare
from hmtrec.errors import ConfigError, DataError

DAY = 86_400.0


def write_log(folder, n_sessions=400, seed=0, unknown=False):
    """Sessions over 12 days, skewed popularity (rare items get filtered), some 1-event sessions, string ids."""
    rng = np.random.default_rng(seed)
    n_items = 120
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(n_items)],
                          "category": [f"c{i % 4}" for i in range(n_items)],
                          "sub": [f"s{i % 12}" for i in range(n_items)],
                          "title": [f"item {i} title" for i in range(n_items)]})
    rows = []
    for s in range(n_sessions):
        start = rng.uniform(0, 12 * DAY)
        for position in range(int(rng.integers(1, 7))):
            item = int(min(n_items - 1, n_items * rng.random() ** 2))
            rows.append((f"u{s:04d}", f"i{item}", 1_600_000_000 + start + 60 * position + (s % 3 == 0) * 0))
    log = pd.DataFrame(rows, columns=["session", "item", "ts"])
    log = log.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # file order is not time order
    if unknown:
        log.loc[5, "item"] = "ghost"
    folder.mkdir(parents=True, exist_ok=True)
    log.to_csv(folder / "log.csv", index=False)
    items.to_csv(folder / "items.csv", index=False)
    return folder


def data_config(folder, **generic):
    return DataConfig.model_validate({
        "source": "generic", "path": str(folder),
        "split": {"test_days": 2, "valid_days": 2},
        "generic": {"interactions": "log.csv", "items": "items.csv",
                    "columns": {"sequence": "session", "item": "item", "time": "ts"},
                    "item_columns": {"item": "item_id", "levels": ["category", "sub"], "text": ["title"]},
                    **generic}})


def assert_same(memory, streamed):
    assert streamed.taxonomy.to_dict() == memory.taxonomy.to_dict()
    assert streamed.dataset.leaf_text == memory.dataset.leaf_text
    for split in ("train", "valid", "test"):
        a, b = getattr(memory, split), getattr(streamed, split)
        np.testing.assert_array_equal(b.offsets, a.offsets)
        np.testing.assert_array_equal(b.leaves, a.leaves)
        np.testing.assert_array_equal(b.targets(), a.targets())
        np.testing.assert_allclose(b.timestamps, a.timestamps)
    assert [r.to_dict() for r in streamed.reports] == [r.to_dict() for r in memory.reports]
    assert streamed.info["counts"] == memory.info["counts"]
    assert streamed.info["protocol_description"] == memory.info["protocol_description"]


@pytest.mark.parametrize("mode, valid_days", [("srgnn", 2), ("once", 0)])
def test_streamed_shards_equal_the_in_memory_splits(tmp_path, mode, valid_days):
    folder = write_log(tmp_path / "log")
    cfg = data_config(folder)
    cfg = cfg.model_copy(update={"filters": cfg.filters.model_copy(update={"mode": mode}),
                                 "split": cfg.split.model_copy(update={"valid_days": valid_days})})
    memory = load_data(cfg)
    prepare(cfg, tmp_path / "shards", PrepareSettings(memory_mb=256, threads=1, batch_rows=97))
    streamed = load_data(DataConfig(source="prepared", path=str(tmp_path / "shards")))
    assert isinstance(streamed.train.leaves, np.memmap) or isinstance(streamed.train.leaves.base, np.memmap)
    assert_same(memory, streamed)
    assert any(r.rows_removed for r in streamed.reports)  # the filters did remove something here


def test_keep_unused_items_keeps_the_whole_catalogue_like_the_reader(tmp_path):
    folder = write_log(tmp_path / "log")
    cfg = data_config(folder).model_copy(update={"keep_unused_items": True})
    memory = load_data(cfg)
    prepare(cfg, tmp_path / "shards", PrepareSettings(memory_mb=256, threads=1))
    streamed = load_data(DataConfig(source="prepared", path=str(tmp_path / "shards"), keep_unused_items=True))
    assert streamed.taxonomy.n_leaves == 120   # items the filters removed stay in the catalogue
    assert_same(memory, streamed)


def test_unknown_items_are_dropped_and_reported_like_the_reader(tmp_path):
    folder = write_log(tmp_path / "log", unknown=True)
    cfg = data_config(folder, unknown_items="drop")
    memory = load_data(cfg)
    prepare(cfg, tmp_path / "shards", PrepareSettings(memory_mb=256, threads=1))
    streamed = load_data(DataConfig(source="prepared", path=str(tmp_path / "shards")))
    assert streamed.reports[0].name == "items not in the item table"
    assert_same(memory, streamed)


def test_bad_rows_fail_with_file_row_and_column_like_the_reader(tmp_path):
    folder = write_log(tmp_path / "log")
    log = pd.read_csv(folder / "log.csv", dtype=str)
    cases = {
        "session": ("session", 7, None),
        "unknown": ("item", 3, "ghost"),
        "time": ("ts", 11, "yesterday"),
    }
    for name, (column, row, value) in cases.items():
        broken = log.copy()
        broken.loc[row - 1, column] = value
        broken.to_csv(folder / "log.csv", index=False)
        cfg = data_config(folder)
        with pytest.raises(DataError) as memory_error:
            load_data(cfg)
        with pytest.raises(DataError) as streamed_error:
            prepare(cfg, tmp_path / f"shards-{name}", PrepareSettings(memory_mb=256, threads=1))
        assert (streamed_error.value.row, streamed_error.value.column) == (row, column), str(streamed_error.value)
        assert (memory_error.value.row, memory_error.value.column) == (row, column)
        assert str(streamed_error.value) == str(memory_error.value)
    # a malformed line (an extra field) names the file and the line
    log.to_csv(folder / "log.csv", index=False)
    lines = (folder / "log.csv").read_text().splitlines()
    lines[4] += ",extra"
    (folder / "log.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as memory_error:
        load_data(data_config(folder))
    with pytest.raises(DataError) as streamed_error:
        prepare(data_config(folder), tmp_path / "shards-malformed", PrepareSettings(memory_mb=256, threads=1))
    assert "line 5 has 4 fields, expected 3" in str(streamed_error.value)
    assert streamed_error.value.row == memory_error.value.row == 4


def test_prepared_source_refuses_settings_it_cannot_honour(tmp_path):
    folder = write_log(tmp_path / "log")
    prepare(data_config(folder), tmp_path / "shards", PrepareSettings(memory_mb=256, threads=1))
    with pytest.raises(ConfigError, match="data.filters: .* was prepared with"):
        load_data(DataConfig.model_validate({"source": "prepared", "path": str(tmp_path / "shards"),
                                             "filters": {"min_item_support": 3}}))
    # the preparing config itself, with source and path switched, is accepted
    same = data_config(folder).model_copy(update={"source": "prepared", "path": str(tmp_path / "shards")})
    assert load_data(same).train.n_events > 0
    with pytest.raises(ConfigError, match="session_time"):
        cfg = data_config(folder)
        prepare(cfg.model_copy(update={"split": cfg.split.model_copy(update={"protocol": "leave_one_out"})}),
                tmp_path / "x")


def test_training_streams_from_prepared_shards(tmp_path):
    from hmtrec.cli import app
    from hmtrec.pipelines import get_pipeline
    from typer.testing import CliRunner

    folder = write_log(tmp_path / "log", n_sessions=600)
    config_file = tmp_path / "prep.yaml"
    config_file.write_text(json.dumps({"kind": "sequence", "data": data_config(folder).model_dump(mode="json")}))
    done = CliRunner().invoke(app, ["prepare", str(config_file), "-o", str(tmp_path / "shards"), "--memory-mb", "256",
                                    "--threads", "1"])
    assert done.exit_code == 0, done.output
    config = build_config({"kind": "sequence", "data": {"source": "prepared", "path": str(tmp_path / "shards")},
                           "model": {"name": "sasrec", "dim": 16, "layers": 1, "heads": 1},
                           "train": {"epochs": 1, "batch_size": 32, "max_len": 5, "threads": 1},
                           "eval": {"ks": [5]}})
    metrics = get_pipeline("sequence").train(config, tmp_path / "run")
    assert metrics["models"]["sasrec"]["full"]["sub"]["Recall@5"] >= 0
    # each epoch records the process's peak RSS so far (the scale benchmark's training-phase peak)
    peak = metrics["models"]["sasrec"]["training"]["history"][0]["peak_rss_bytes"]
    assert peak is None if sys.platform == "win32" else peak > 50 * 2**20
    data = json.loads((tmp_path / "run" / "data.json").read_text())
    assert data["source"] == "prepared" and data["filters_applied"]


def test_implausible_times_fail_drop_and_read_as_milliseconds_like_the_reader(tmp_path):
    folder = write_log(tmp_path / "log", unknown=True)
    log = pd.read_csv(folder / "log.csv", dtype=str)
    broken = log.copy()
    broken.loc[[10, 20], "ts"] = ["32503680000", "1600000000000"]     # the year 3000; milliseconds
    broken.to_csv(folder / "log.csv", index=False)
    cfg = data_config(folder, unknown_items="drop")
    with pytest.raises(DataError) as memory_error:
        load_data(cfg)
    with pytest.raises(DataError) as streamed_error:
        prepare(cfg, tmp_path / "shards-error", PrepareSettings(memory_mb=256, threads=1))
    assert "implausible timestamp 32503680000.0 = 3000-01-01" in str(streamed_error.value)
    assert str(streamed_error.value) == str(memory_error.value)
    assert streamed_error.value.row == 11
    # implausible_times: drop removes them, counted in the notes, and the splits stay the reader's
    cfg = cfg.model_copy(update={"validation": cfg.validation.model_copy(update={"implausible_times": "drop"})})
    memory = load_data(cfg)
    prepare(cfg, tmp_path / "shards-drop", PrepareSettings(memory_mb=256, threads=1))
    streamed = load_data(DataConfig(source="prepared", path=str(tmp_path / "shards-drop")))
    assert_same(memory, streamed)
    note = "dropped 2 event(s) with implausible times"
    assert any(note in n for n in memory.info["notes"]) and any(note in n for n in streamed.info["notes"])
    # a log written in milliseconds is read as milliseconds by both (time_format: auto), with a note
    in_ms = log.copy()
    in_ms["ts"] = (in_ms["ts"].astype(float) * 1000).round().astype("int64").astype(str)
    in_ms.to_csv(folder / "log.csv", index=False)
    cfg = data_config(folder, unknown_items="drop")
    memory = load_data(cfg)
    prepare(cfg, tmp_path / "shards-ms", PrepareSettings(memory_mb=256, threads=1))
    streamed = load_data(DataConfig(source="prepared", path=str(tmp_path / "shards-ms")))
    assert_same(memory, streamed)
    assert any("read as milliseconds" in n for n in streamed.info["notes"])


@pytest.mark.parametrize("values", [[1, 2, 3], [1, 5, 6, 9], [2, 4], [4, 4, 4, 4], [7], [1, 3, 5, 7, 100, 200]])
def test_the_median_test_of_the_milliseconds_rule_matches_numpy(tmp_path, values):
    """Prepare decides `detect_milliseconds` without DuckDB's median (which holds the column in memory)."""
    import duckdb

    from hmtrec.data.streaming import _Preparer

    preparer = _Preparer.__new__(_Preparer)
    preparer.con = duckdb.connect()
    preparer.settings = PrepareSettings()
    preparer.con.execute("CREATE TABLE raw AS SELECT CAST(v AS VARCHAR) AS t FROM unnest(?) AS u(v)", [values])
    median = float(np.median(values))
    for bound in sorted({*values, median, median - 0.5, median + 0.5, min(values) - 1, max(values) + 1}):
        assert preparer._median_beyond("TRY_CAST(t AS DOUBLE)", len(values), bound, below=True) == (median <= bound)
        assert preparer._median_beyond("TRY_CAST(t AS DOUBLE)", len(values), bound, below=False) == (median >= bound)


def _mapped_rss_kb(path) -> int:
    """Resident kB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            field = line.split(maxsplit=1)[0]
            if not field.endswith(":"):                   # a mapping's header line, its file last
                inside = line.rstrip().endswith(str(path))
            elif inside and field == "Rss:":
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_DONTNEED") or not __import__("os").path.exists(
    "/proc/self/smaps"), reason="needs madvise(DONTNEED) and /proc/self/smaps (Linux)")
def test_released_shard_pages_leave_the_resident_set_and_keep_their_values(tmp_path):
    from hmtrec.data.sequences import SequenceData, release_mapped_pages

    path = tmp_path / "train.leaves.npy"
    np.save(path, np.arange(1 << 20, dtype=np.int64))                 # 8 MB
    leaves = np.load(path, mmap_mode="r")
    data = SequenceData(leaves=leaves, offsets=np.array([0, len(leaves)]), sequence_ids=np.array([0]))
    assert int(data.leaves.sum()) == (1 << 20) * ((1 << 20) - 1) // 2  # every page read
    assert _mapped_rss_kb(path) > 4_000
    data.release_mapped_pages()
    assert _mapped_rss_kb(path) < 1_000
    assert int(data.leaves[12345]) == 12345 and int(data.leaves[-1]) == (1 << 20) - 1
    in_memory = np.arange(10)
    release_mapped_pages(in_memory)                                   # not a mapping: untouched
    np.testing.assert_array_equal(in_memory, np.arange(10))


@pytest.mark.skipif(not hasattr(__import__("os"), "preadv") or not __import__("os").path.exists("/proc/self/smaps"),
                    reason="needs pread and /proc/self/smaps (Linux)")
def test_windows_of_a_mapped_shard_are_read_without_mapping_its_pages(tmp_path, monkeypatch):
    import hmtrec.data.sequences
    from hmtrec.data.sequences import PAD, SequenceData, Windows, collate_windows

    monkeypatch.setattr(hmtrec.data.sequences, "PREAD_MIN_BYTES", 1 << 20)   # these shards count as large

    rng = np.random.default_rng(0)
    n_events = 1 << 20                                                # 8 MB of leaves, 8 MB of times
    arrays = {"leaves": rng.integers(0, 1000, n_events), "times": np.cumsum(rng.random(n_events)),
              "targets": rng.random(n_events) < 0.9}
    for name, values in arrays.items():
        np.save(tmp_path / f"train.{name}.npy", values)
    mapped = {name: np.load(tmp_path / f"train.{name}.npy", mmap_mode="r") for name in arrays}
    offsets = np.arange(0, n_events + 1, 16)                          # sequences of 16 events
    on_disk = SequenceData(leaves=mapped["leaves"], offsets=offsets, sequence_ids=np.arange(len(offsets) - 1),
                           timestamps=mapped["times"], target_mask=mapped["targets"])
    in_memory = SequenceData(leaves=arrays["leaves"], offsets=offsets, sequence_ids=np.arange(len(offsets) - 1),
                             timestamps=arrays["times"], target_mask=arrays["targets"])
    length = rng.integers(2, 10, 4000)
    windows = Windows(rng.integers(0, n_events - 10, 4000), length)
    rows = np.arange(4000)
    read, indexed = collate_windows(on_disk, windows, rows), collate_windows(in_memory, windows, rows)
    assert read.keys() == indexed.keys()
    for key in read:
        torch.testing.assert_close(read[key], indexed[key], rtol=0, atol=0)
    assert (read["inputs"] != PAD).any()
    # 4,000 random windows over every page: none of the shards' pages became resident in this process
    assert all(_mapped_rss_kb(tmp_path / f"train.{name}.npy") < 64 for name in arrays)


def test_leaf_counts_in_chunks_equal_one_bincount(monkeypatch):
    import hmtrec.data.sequences as sequences

    leaves = np.random.default_rng(0).integers(0, 50, 1000)
    data = sequences.SequenceData(leaves, np.array([0, 1000]), np.array([0]))
    monkeypatch.setattr(sequences, "SCAN_CHUNK", 7)                  # 143 passes, the last one short
    np.testing.assert_array_equal(sequences.leaf_counts(data, minlength=60), np.bincount(leaves, minlength=60))
    np.testing.assert_array_equal(sequences.leaf_counts(data), np.bincount(leaves))
