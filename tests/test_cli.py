"""The command line: `hmtrec train`, `hmtrec evaluate` and `hmtrec recommend` on a small synthetic run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from hmtrec.cli import app
from hmtrec.data.sequences import SequenceData, collate_windows, make_windows
from hmtrec.errors import ConfigError, HmtrecError
from hmtrec.serve.artefact import load_sequence_run

CONFIG = {
    "kind": "sequence",
    "data": {"source": "synthetic",
             "synthetic": {"n_items": 300, "level_sizes": [5, 30], "n_sessions": 2000, "days": 10}},
    "model": {"name": "hiersrec", "dim": 32, "id_dim": 32, "level_dim": 16, "text_dim": 16, "text_buckets": 2048},
    "train": {"epochs": 1, "batch_size": 64, "max_len": 8, "threads": 1, "lr": 0.003},
    "eval": {"ks": [5, 20], "candidate_level": "L2", "candidate_fraction": 0.1},
    "baselines": ["pop"],
}
runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    config = folder / "small.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    run_dir = folder / "run"
    result = runner.invoke(app, ["train", "--config", str(config), "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    return config, run_dir


def recommend(run_dir, *args):
    result = runner.invoke(app, ["recommend", str(run_dir), *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_train_writes_the_run_and_evaluate_reads_it_back(trained):
    _, run_dir = trained
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["models"]) == {"hiersrec", "pop"}
    result = runner.invoke(app, ["evaluate", str(run_dir), "--set", "eval.candidate_fraction=0.25"])
    assert result.exit_code == 0, result.output
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["models"]["hiersrec"]["full"] == metrics["models"]["hiersrec"]["full"]
    assert evaluation["models"]["hiersrec"]["candidate_fraction"] > 0.2


def test_unknown_config_key_is_named(trained, tmp_path):
    config, _ = trained
    result = runner.invoke(app, ["train", "--config", str(config), "--set", "train.epoch=3",
                                 "--run-dir", str(tmp_path / "run")])
    assert isinstance(result.exception, ConfigError)
    assert "unknown key 'train.epoch'" in str(result.exception)
    assert not (tmp_path / "run").exists()


def test_the_command_exits_with_a_readable_error(trained):
    config, _ = trained
    env = {**os.environ, "HMTREC_PROGRESS": "0"}
    done = subprocess.run([sys.executable, "-m", "hmtrec.cli", "train", "--config", str(config),
                           "--set", "model.coupling=serial"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert "key 'model.coupling'" in done.stderr and "Traceback" not in done.stderr


def test_recommend_is_consistent_with_the_model_and_the_taxonomy(trained):
    _, run_dir = trained
    artefact = load_sequence_run(run_dir)
    taxonomy = artefact.taxonomy
    history = [str(label) for label in taxonomy.node_labels[-1][[3, 17, 42, 17]]]
    out = recommend(run_dir, "--history", " ".join(history), "-k", "7")
    assert out == recommend(run_dir, "--history", ",".join(history), "-k", "7")   # deterministic
    assert out["model"] == "hiersrec" and out["level"] == "item" and out["skipped"] == []
    items = out["recommendations"]
    assert [item["rank"] for item in items] == list(range(1, 8))
    probabilities = [item["probability"] for item in items]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6
    for item in items:
        leaf = taxonomy.index_of([item["id"]])[0]
        for level, label in item["ancestors"].items():
            assert taxonomy.labels_of([taxonomy.ancestors(np.array([leaf]), level)[0]], level)[0] == label
    # The same scores as the evaluation path: the history as a sequence, its last position scored.
    leaves = taxonomy.index_of(history + [history[0]])
    data = SequenceData(leaves, np.array([0, len(leaves)]), np.array(["q"]))
    batch = collate_windows(data, make_windows(data, 8), np.array([0]))
    model = artefact.model()
    with torch.no_grad():
        scores = model.predict(batch)
    last = {level: value[-1].softmax(0) for level, value in scores.items()}
    top = torch.topk(last["item"], 7)
    assert [item["id"] for item in items] == taxonomy.labels_of(top.indices.numpy()).tolist()
    np.testing.assert_allclose(probabilities, top.values.numpy(), rtol=1e-5)
    for level in ("L1", "L2"):
        best = int(last[level].argmax())
        assert out["levels"][level]["label"] == taxonomy.labels_of([best], level)[0]
        assert out["levels"][level]["probability"] == pytest.approx(float(last[level][best]), rel=1e-5)
        assert out["levels"][level]["source"] == "head"
        assert out["levels"][level]["contains_top"] == (items[0]["ancestors"][level] == out["levels"][level]["label"])


def test_recommend_options(trained):
    _, run_dir = trained
    taxonomy = load_sequence_run(run_dir).taxonomy
    history = [str(label) for label in taxonomy.node_labels[-1][:12]]
    excluded = recommend(run_dir, "--history", " ".join(history), "-k", "20", "--exclude-history")
    assert not set(item["id"] for item in excluded["recommendations"]) & set(history)
    # A history longer than the model's window keeps its most recent events.
    assert excluded["truncated"] == 12 - 8
    with pytest.raises(HmtrecError, match=r"unknown item id\(s\) in the history: 'nope', 'zzz'"):
        recommend(run_dir, "--history", f"nope {history[0]} zzz")
    skipped = recommend(run_dir, "--history", f"nope {history[0]}", "--skip-unknown", "--model", "pop", "-k", "3")
    assert skipped["skipped"] == ["nope"] and skipped["model"] == "pop"
    pop = load_sequence_run(run_dir, labels=["pop"]).model("pop")
    most_popular = pop.counts("item").argsort(descending=True, stable=True)[:3].numpy()
    assert [item["id"] for item in skipped["recommendations"]] == taxonomy.labels_of(most_popular).tolist()
    with pytest.raises(ConfigError, match="no model"):
        recommend(run_dir, "--history", history[0], "--model", "sasrec")
