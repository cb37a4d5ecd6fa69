"""Ragged taxonomies as a first-class case (issue 18, class 11): empty paths, mixed depths and
items on internal nodes load without hand-work, level columns and a path column key nodes the
same way (by full path), and HierSRec trains on such a catalogue with metrics at every level.
The catalogue is a synthetic ragged tree over real Diginetica items and sessions."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from hmtrec.config import build_config
from hmtrec.data.loading import DataConfig, load_data, read_source
from hmtrec.data.taxonomy import UNASSIGNED, Taxonomy
from hmtrec.errors import DataError
from hmtrec.pipelines import get_pipeline


def _ragged_catalogue(data_dir, folder):
    """Real sessions; a 3-level tree over the real categories: a fifth of the items have no path,
    a fifth sit on an internal (top-level) node, the rest have depth 2 or 3."""
    views = pd.read_csv(data_dir / "diginetica" / "sample_train-item-views.csv", sep=";")
    categories = pd.read_csv(data_dir / "diginetica" / "product-categories.csv.gz", sep=";")
    items = categories[categories["itemId"].isin(views["item_id"])].reset_index(drop=True)
    kind = items["itemId"] % 5        # 0: empty path, 1: internal node, 2: depth 2, 3-4: depth 3
    top = "G" + (items["categoryId"] % 6).astype(str)
    mid = "C" + items["categoryId"].astype(str)
    leaf = mid + "-" + (items["itemId"] % 3).astype(str)
    levels = pd.DataFrame({"item_id": items["itemId"],
                           "top": np.where(kind == 0, "", top),
                           "mid": np.where(kind <= 1, "", mid),
                           "low": np.where(kind <= 2, "", leaf)})
    levels.to_csv(folder / "items_levels.csv", index=False)
    paths = levels[["top", "mid", "low"]].apply(lambda row: " > ".join(part for part in row if part), axis=1)
    pd.DataFrame({"item_id": items["itemId"], "path": paths}).to_csv(folder / "items_path.csv", index=False)
    seconds = (pd.to_datetime(views["eventdate"]) - pd.Timestamp("1970-01-01")).dt.total_seconds() + views["timeframe"] / 1000.0
    pd.DataFrame({"session_id": views["session_id"], "item_id": views["item_id"],
                  "timestamp": seconds}).to_csv(folder / "events.csv", index=False)
    return kind


def _data(folder, items: str, **item_columns) -> dict:
    columns = {"item": "item_id", **item_columns}
    return {"source": "generic", "path": str(folder),
            "split": {"test_days": 14},
            "generic": {"interactions": "events.csv", "items": items, "item_columns": columns}}


def test_level_columns_and_path_column_build_the_same_ragged_tree(data_dir, tmp_path):
    kind = _ragged_catalogue(data_dir, tmp_path)
    by_levels = read_source(DataConfig(**_data(tmp_path, "items_levels.csv", levels=["top", "mid", "low"])))
    by_path = read_source(DataConfig(**_data(tmp_path, "items_path.csv", path="path",
                                             level_names=["top", "mid", "low", "item_id"])))
    a, b = by_levels.taxonomy, by_path.taxonomy
    assert a.level_names == b.level_names == ["top", "mid", "low", "item_id"]
    for level in range(a.n_levels):
        assert sorted(a.node_labels[level]) == sorted(b.node_labels[level])
    # an empty path: "(unassigned)" at every level; an item on an internal node: a node of its own
    item = str(int(pd.read_csv(tmp_path / "items_levels.csv")["item_id"][kind.to_numpy() == 1].iloc[0]))
    leaf = a.index_of([item])[0]
    top = a.labels_of([a.ancestors(leaf, "top")], "top")[0]
    assert a.labels_of([a.ancestors(leaf, "mid")], "mid")[0] == f"{top} > [item {item}]"
    empty = str(int(pd.read_csv(tmp_path / "items_levels.csv")["item_id"][kind.to_numpy() == 0].iloc[0]))
    assert a.labels_of([a.ancestors(a.index_of([empty])[0], "top")], "top")[0] == UNASSIGNED
    assert any("with an empty taxonomy path placed under '(unassigned)'" in note for note in by_levels.notes)
    assert any("with a path shorter than the deepest (3 levels)" in note for note in by_levels.notes)
    # dropping empty paths drops their events too, with a count
    dropped = read_source(DataConfig(**_data(tmp_path, "items_levels.csv", levels=["top", "mid", "low"],
                                             empty_paths="drop")))
    report = dropped.reports[0]
    assert report.name.startswith("items with an empty taxonomy path") and report.items_removed == int((kind == 0).sum())
    assert len(dropped.events) == len(by_levels.events) - report.rows_removed and report.rows_removed > 0
    with pytest.raises(DataError, match=r"items_levels.csv, row \d+, column 'low': item without a taxonomy path.* rows in all"):
        read_source(DataConfig(**_data(tmp_path, "items_levels.csv", levels=["top", "mid", "low"],
                                       empty_paths="error")))


def test_short_paths_can_share_one_node_per_parent():
    taxonomy = Taxonomy.from_paths(["a", "b", "c", "d"], ["A > B > C", "A > B", "A > B", ""], short_paths="node")
    assert sorted(taxonomy.node_labels[2]) == ["(unassigned) > (unassigned) > (unassigned)", "A > B > (B)",
                                               "A > B > C"]
    assert taxonomy.ancestors(taxonomy.index_of(["b"])[0], 2) == taxonomy.ancestors(taxonomy.index_of(["c"])[0], 2)


def test_hiersrec_trains_on_a_ragged_real_catalogue(data_dir, tmp_path):
    _ragged_catalogue(data_dir, tmp_path)
    config = build_config(json.loads(json.dumps({
        "kind": "sequence",
        "data": _data(tmp_path, "items_path.csv", path="path", level_names=["top", "mid", "low", "item"]),
        "model": {"name": "hiersrec", "dim": 16, "id_dim": 16, "level_dim": 8, "text_dim": 8, "text_buckets": 256},
        "train": {"epochs": 1, "batch_size": 64, "max_len": 8, "threads": 1},
        "eval": {"ks": [10], "candidate_level": "mid", "candidate_fraction": 0.2},
        "baselines": [],
    })))
    metrics = get_pipeline("sequence").train(config, tmp_path / "run")
    full = metrics["models"]["hiersrec"]["full"]
    assert set(full) >= {"top", "mid", "low", "item"}
    assert all(0 <= full[level]["Recall@10"] <= 1 for level in ("top", "mid", "low", "item"))
