import numpy as np
import pandas as pd
import pytest
import torch

from hmtrec.config import load_config
from hmtrec.data.sequences import PAD, SequenceData, collate_windows, make_windows
from hmtrec.data.taxonomy import Taxonomy
from hmtrec.errors import DataError


def small_taxonomy():
    return Taxonomy.from_table(pd.DataFrame({"cat": ["a", "a", "b", "c"], "item": ["1", "2", "3", "4"]}),
                               ["cat", "item"])


def test_taxonomy_queries_are_arrays():
    taxonomy = small_taxonomy()
    assert taxonomy.n_nodes("cat") == 3 and taxonomy.n_leaves == 4
    np.testing.assert_array_equal(taxonomy.leaves_under([0], "cat"), [0, 1])
    np.testing.assert_array_equal(taxonomy.leaves_under([2, 0], "cat"), [0, 1, 3])
    np.testing.assert_array_equal(taxonomy.ancestors(np.array([3, 0]), "cat"), [2, 0])
    mask = taxonomy.candidate_mask(torch.tensor([[1], [0]]), "cat")
    assert mask.tolist() == [[False, False, True, False], [True, True, False, False]]


def test_taxonomy_round_trips_through_json(tmp_path):
    taxonomy = small_taxonomy()
    taxonomy.save(tmp_path / "t.json")
    loaded = Taxonomy.load(tmp_path / "t.json")
    np.testing.assert_array_equal(loaded.leaf_ancestors, taxonomy.leaf_ancestors)


def test_item_with_two_parents_names_file_row_column():
    table = pd.DataFrame({"cat": ["a", "b", "a"], "item": ["1", "1", "2"]})
    with pytest.raises(DataError, match=r"file items.csv, row 2, column 'cat'.*two parents"):
        Taxonomy.from_table(table, ["cat", "item"], file="items.csv")


def test_missing_node_names_row():
    table = pd.DataFrame({"cat": ["a", None], "item": ["1", "2"]})
    with pytest.raises(DataError, match=r"row 2, column 'cat'.*without a taxonomy node"):
        Taxonomy.from_table(table, ["cat", "item"], file="items.csv")


def test_path_column_builds_levels():
    taxonomy = Taxonomy.from_paths(["x", "y", "z"], ["A > B", "A > C", "D > B"], ["l1", "l2", "item"])
    assert taxonomy.n_nodes("l1") == 2 and taxonomy.n_nodes("l2") == 3  # "A>B" and "D>B" differ


def test_windows_cover_every_target_once():
    data = SequenceData(np.arange(10), np.array([0, 3, 4, 10]), np.array(["a", "b", "c"]))
    windows = make_windows(data, max_len=3)
    batch = collate_windows(data, windows, np.arange(len(windows.start)))
    targets = batch["targets"][batch["targets"] != PAD]
    assert sorted(targets.tolist()) == [1, 2, 5, 6, 7, 8, 9]


def test_windows_cut_a_chunk_of_sequences_at_a_time_are_the_same_windows(monkeypatch):
    """make_windows cuts WINDOW_CHUNK sequences per pass (bounded temporaries): any chunk size gives
    the windows of one pass over the whole log, with and without a stored target mask."""
    from hmtrec.data import sequences

    rng = np.random.default_rng(4)
    lengths = rng.integers(1, 30, size=57)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    for mask in (None, rng.random(int(offsets[-1])) < 0.6):
        data = SequenceData(rng.integers(0, 40, int(offsets[-1])), offsets,
                            np.array([f"s{i}" for i in range(len(lengths))], dtype=object), target_mask=mask)
        for only_with_targets in (True, False):
            whole = make_windows(data, 4, only_with_targets=only_with_targets)
            for chunk in (1, 5, 56):
                monkeypatch.setattr(sequences, "WINDOW_CHUNK", chunk)
                cut = make_windows(data, 4, only_with_targets=only_with_targets)
                assert np.array_equal(cut.start, whole.start) and np.array_equal(cut.length, whole.length)
            monkeypatch.setattr(sequences, "WINDOW_CHUNK", 1 << 20)


def test_unknown_config_key_is_named(tmp_path):
    from hmtrec.config import CONFIG_KINDS, StrictModel, register_config
    from hmtrec.errors import ConfigError

    @register_config("spine-test")
    class SpineTest(StrictModel):
        kind: str = "spine-test"
        epochs: int = 1

    with pytest.raises(ConfigError, match="unknown key 'epoch'"):
        load_config(None, ["kind=spine-test", "epoch=3"])
    with pytest.raises(ConfigError, match="key 'epochs'"):
        load_config(None, ["kind=spine-test", "epochs=many"])
    CONFIG_KINDS.pop("spine-test")
