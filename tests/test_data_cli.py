"""`hmtrec data info` / `hmtrec data synth`, and the synthetic data round-tripping through the
generic format."""

from __future__ import annotations

import numpy as np
from typer.testing import CliRunner

from hmtrec.cli import app
from hmtrec.data.loading import DataConfig, load_data
from hmtrec.data.synthetic import WRITTEN_EPOCH

SMALL = ["n_items=400", "level_sizes=[4,30]", "n_sessions=1500", "days=10"]


def test_synth_then_generic_load_reproduces_the_synthetic_source(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["data", "synth", str(tmp_path), "--format", "csv", "--seed", "2",
                                 *sum([["--set", item] for item in SMALL], [])])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "interactions.csv").exists() and (tmp_path / "items.csv").exists()
    direct = load_data(DataConfig(source="synthetic", seed=2, synthetic={
        "n_items": 400, "level_sizes": [4, 30], "n_sessions": 1500, "days": 10}))
    generic = load_data(DataConfig(
        source="generic", path=str(tmp_path),
        split={"test_days": 3, "valid_days": 3},
        generic={"interactions": "interactions.csv", "items": "items.csv",
                 "item_columns": {"item": "item_id", "levels": ["L1", "L2"], "text": ["text"]}}))
    for name in ("train", "valid", "test"):
        a, b = getattr(direct, name), getattr(generic, name)
        assert np.array_equal(a.offsets, b.offsets)
        assert np.array_equal(direct.taxonomy.labels_of(a.leaves), generic.taxonomy.labels_of(b.leaves))
        assert np.allclose(a.timestamps + WRITTEN_EPOCH, b.timestamps)
    for level in (0, 1, 2):   # same tree (node order may differ: files sort labels)
        for taxonomy, other in ((direct.taxonomy, generic.taxonomy), (generic.taxonomy, direct.taxonomy)):
            leaves = np.arange(taxonomy.n_leaves)
            # the generic reader keys a node by its full path ("L1-0 > L2-3"); compare node names
            def name(labels):
                return [str(label).split(" > ")[-1] for label in labels]

            pairs = set(zip(taxonomy.labels_of(leaves), name(taxonomy.labels_of(taxonomy.ancestors(leaves, level), level))))
            other_leaves = other.index_of(taxonomy.labels_of(leaves))
            assert pairs == set(zip(taxonomy.labels_of(leaves),
                                    name(other.labels_of(other.ancestors(other_leaves, level), level))))
    assert generic.dataset.leaf_text == [direct.dataset.leaf_text[i]
                                         for i in direct.taxonomy.index_of(generic.taxonomy.node_labels[-1])]


def test_data_info_prints_sizes_and_reports():
    runner = CliRunner()
    result = runner.invoke(app, ["data", "info", "--source", "synthetic",
                                 *sum([["--set", f"synthetic.{item}"] for item in SMALL], [])])
    assert result.exit_code == 0, result.output
    assert "L1 (4) ⊃ L2 (30) ⊃ item" in result.output
    assert "min item support 5" in result.output and "protocol: session split" in result.output


def test_data_info_names_a_bad_key():
    runner = CliRunner()
    result = runner.invoke(app, ["data", "info", "--set", "split.test_dayz=3"])
    assert result.exit_code != 0
    assert "data.split.test_dayz" in str(result.exception)
