"""The baselines through the sequence pipeline by name: GRU4Rec trained on its own session-parallel
batches, SASRec on windows, S-POP and the kNNs fitted; each saved to the run directory, reloaded by
`hmtrec evaluate` to the same metrics, and each beating popularity on synthetic sessions whose
next item depends on the current one."""

import pytest
import torch

from hmtrec.config import build_config
from hmtrec.pipelines import get_pipeline

torch.set_num_threads(1)

CONFIG = {
    "kind": "sequence",
    "data": {"source": "synthetic",
             "synthetic": {"n_items": 300, "level_sizes": [5, 30], "n_sessions": 1500, "days": 10,
                           "follow_link": 0.5}},
    "model": {"name": "gru4rec", "hidden_size": 32, "dropout_embedding": 0.0, "dropout_hidden": 0.0},
    "train": {"epochs": 3, "batch_size": 32, "max_len": 10, "lr": 0.005, "threads": 1},
    "eval": {"ks": [10, 20], "candidate_level": "L2", "candidate_fraction": 0.2},
    "baselines": ["pop", "spop", "sknn", "vsknn", {"name": "sasrec", "dim": 32, "dropout": 0.1}],
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("baselines")
    return run_dir, get_pipeline("sequence").train(build_config(CONFIG), run_dir)


def test_every_baseline_beats_popularity(run):
    _, metrics = run
    models = metrics["models"]
    pop = models["pop"]["full"]["item"]["MRR@20"]
    for label in ("gru4rec", "spop", "sknn", "vsknn", "sasrec"):
        assert models[label]["full"]["item"]["MRR@20"] > pop + 0.01, label
    assert models["gru4rec"]["training"]["epochs"] == 3
    assert models["sknn"]["training"]["parameters"] == 0


def test_runs_reload_to_the_same_metrics(run):
    run_dir, metrics = run
    again = get_pipeline("sequence").evaluate(run_dir, [])
    for label in ("gru4rec", "spop", "sknn", "vsknn", "sasrec"):
        assert again[label]["full"] == metrics["models"][label]["full"], label
        assert again[label]["candidate"] == metrics["models"][label]["candidate"], label
