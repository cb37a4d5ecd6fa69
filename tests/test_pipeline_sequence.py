"""The sequence pipeline end to end on small synthetic data: training beats popularity with both
couplings, an interrupted run resumes to the same metrics, the run directory is complete and
pickle-free, and config mistakes are named."""

import json

import pytest
import torch
import yaml

from hmtrec.config import build_config, load_config
from hmtrec.errors import ConfigError, HmtrecError
from hmtrec.pipelines import get_pipeline
from hmtrec.rundir import load_tensors

SMALL = {
    "kind": "sequence",
    "data": {"source": "synthetic",
             "synthetic": {"n_items": 400, "level_sizes": [6, 40], "n_sessions": 3000, "days": 10}},
    "model": {"name": "hiersrec", "dim": 32, "id_dim": 32, "level_dim": 16, "text_dim": 16, "text_buckets": 4096,
              "dropout": 0.1, "consistency_weight": 0.1},
    "train": {"epochs": 2, "batch_size": 64, "max_len": 10, "lr": 0.003, "threads": 1},
    "eval": {"ks": [10, 20], "candidate_level": "L2", "candidate_fraction": 0.1},
    "baselines": ["pop"],
}


def small_config(**sections):
    raw = json.loads(json.dumps(SMALL))
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key].update(value)
        else:
            raw[key] = value
    return build_config(raw)


class Interrupt(Exception):
    pass


def interrupt_after(epoch):
    def callback(state):
        if state.epoch == epoch:
            raise Interrupt()
    return callback


@pytest.fixture(scope="module")
def cascade_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cascade")
    metrics = get_pipeline("sequence").train(small_config(), run_dir)
    return run_dir, metrics


@pytest.mark.parametrize("coupling", ["cascade", "parallel"])
def test_both_couplings_beat_popularity(coupling, cascade_run, tmp_path):
    if coupling == "cascade":
        metrics = cascade_run[1]
    else:
        metrics = get_pipeline("sequence").train(
            small_config(model={**SMALL["model"], "coupling": "parallel"}), tmp_path)
    model, pop = metrics["models"]["hiersrec"], metrics["models"]["pop"]
    for level in ("L1", "L2", "item"):
        assert model["full"][level]["MRR@20"] > pop["full"][level]["MRR@20"] + 0.05, level
    assert model["full"]["item"]["Recall@20"] > 2 * pop["full"]["item"]["Recall@20"]
    # Candidate mode: about 10% of the catalogue; a target outside the candidates is a miss.
    assert 0.05 < model["candidate_fraction"] < 0.2
    assert 0.3 < model["candidate_coverage"] <= 1
    assert model["candidate"]["item"]["Recall@20"] <= model["candidate_coverage"] + 1e-12
    assert model["training"]["epochs"] == 2 and model["training"]["epoch_seconds"] > 0


def test_run_directory_is_complete_and_holds_no_pickles(cascade_run):
    run_dir, metrics = cascade_run
    for name in ("config.yaml", "run.json", "taxonomy.json", "leaf_text.json", "data.json", "checkpoint.pt",
                 "model.safetensors", "best.safetensors", "metrics.json", "metrics.md", "log.txt",
                 "baselines/pop/model.safetensors"):
        assert (run_dir / name).exists(), name
    run = json.loads((run_dir / "run.json").read_text())
    assert run["kind"] == "sequence" and run["model"] == "hiersrec" and run["status"] == "done"
    assert run["baselines"] == ["pop"] and "torch" in run["versions"]
    checkpoint = load_tensors(run_dir / "checkpoint.pt")   # weights_only=True: no pickled code
    assert checkpoint["state"]["epoch"] == 2
    # The resolved config has every default written out and validates again.
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["model"]["coupling"] == "cascade" and resolved["train"]["monitor"] == "MRR@20"
    assert load_config(run_dir / "config.yaml").model == small_config().model
    assert json.loads((run_dir / "metrics.json").read_text())["models"]["pop"]["full"] == metrics["models"]["pop"]["full"]
    assert "| hiersrec |" in (run_dir / "metrics.md").read_text()


def test_interrupted_training_resumes_to_the_same_metrics(cascade_run, tmp_path):
    config = small_config()
    with pytest.raises(Interrupt):
        get_pipeline("sequence").train(config, tmp_path, on_epoch_end=interrupt_after(1))
    assert load_tensors(tmp_path / "checkpoint.pt")["state"]["epoch"] == 1
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "training"
    resumed = get_pipeline("sequence").train(config, tmp_path)
    uninterrupted = cascade_run[1]
    assert resumed["models"]["hiersrec"]["full"] == uninterrupted["models"]["hiersrec"]["full"]
    assert resumed["models"]["hiersrec"]["candidate"] == uninterrupted["models"]["hiersrec"]["candidate"]
    history = resumed["models"]["hiersrec"]["training"]["history"]
    assert [record["epoch"] for record in history] == [1, 2]
    assert "resumed from" in (tmp_path / "log.txt").read_text()


def test_a_run_directory_refuses_a_different_config(cascade_run):
    run_dir, _ = cascade_run
    with pytest.raises(ConfigError, match=r"different config.*model.dim"):
        get_pipeline("sequence").train(small_config(model={**SMALL["model"], "dim": 64}), run_dir)


def test_evaluate_reloads_the_models_and_accepts_eval_overrides(cascade_run):
    run_dir, metrics = cascade_run
    pipeline = get_pipeline("sequence")
    again = pipeline.evaluate(run_dir, [])
    assert again["hiersrec"]["full"] == metrics["models"]["hiersrec"]["full"]
    assert again["pop"]["full"] == metrics["models"]["pop"]["full"]
    wider = pipeline.evaluate(run_dir, ["eval.candidate_fraction=0.3"])
    assert wider["hiersrec"]["candidate_fraction"] > metrics["models"]["hiersrec"]["candidate_fraction"] + 0.1
    assert wider["hiersrec"]["candidate_coverage"] >= metrics["models"]["hiersrec"]["candidate_coverage"]
    assert json.loads((run_dir / "evaluation.json").read_text())["overrides"] == ["eval.candidate_fraction=0.3"]
    with pytest.raises(ConfigError, match="train.epochs"):
        pipeline.evaluate(run_dir, ["train.epochs=5"])


def test_config_mistakes_are_named():
    assert build_config({"kind": "sequence"}).model["name"] == "hiersrec"   # the default main model
    with pytest.raises(ConfigError, match="unknown key 'train.epoch'"):
        small_config(train={"epoch": 3})
    with pytest.raises(ConfigError, match="key 'train.batch_size'"):
        small_config(train={"batch_size": "big"})
    with pytest.raises(ConfigError, match="unknown key 'model.dimm'"):
        small_config(model={"name": "hiersrec", "dimm": 3})
    with pytest.raises(ConfigError, match="unknown sequence model 'hiersrc'"):
        small_config(model={"name": "hiersrc"})
    with pytest.raises(ConfigError, match="unknown key 'baselines.0.alpha'"):
        small_config(baselines=[{"name": "pop", "alpha": 1}])
    with pytest.raises(ConfigError, match="used twice"):
        small_config(baselines=["pop", "pop"])
    with pytest.raises(ConfigError, match="unknown key 'data.sourc'"):
        small_config(data={"sourc": "synthetic"})
    with pytest.raises(ConfigError, match="eval.max_len"):
        small_config(eval={"max_len": 50})
    with pytest.raises(ConfigError, match="train.monitor"):
        small_config(train={"monitor": "AUC"})


def test_levels_only_model_trains_and_reports_coarse_levels(tmp_path):
    model = {**SMALL["model"], "head_levels": ["L1", "L2"]}
    with pytest.raises(ConfigError, match=r"eval.candidate_level.*'L2' must be coarser"):
        get_pipeline("sequence").train(small_config(model=model), tmp_path / "bad")
    config = small_config(model=model, baselines=[], train={"epochs": 1, "monitor": "MRR@10"},
                          eval={"ks": [10], "candidate_level": "L1", "candidate_k": 2, "candidate_fraction": None})
    result = get_pipeline("sequence").train(config, tmp_path)["models"]["hiersrec"]
    assert set(result["full"]) == {"L1", "L2"}
    assert result["full"]["L2"]["MRR@10"] > 0.2
    assert result["candidate"]["L2"]["Recall@10"] <= result["candidate_coverage"] + 1e-12


def test_evaluate_refuses_a_directory_that_is_not_a_run(tmp_path):
    from hmtrec.serve.artefact import load_sequence_run

    with pytest.raises(HmtrecError, match="not a run directory"):
        load_sequence_run(tmp_path)


def test_training_batches_visit_each_window_once_per_epoch_deterministically():
    import numpy as np

    from hmtrec.data.sequences import PAD, SequenceData
    from hmtrec.pipelines.sequence import TrainSection, training_batches

    lengths = np.random.default_rng(0).integers(2, 30, size=300)
    data = SequenceData(np.arange(lengths.sum()) % 50, np.r_[0, np.cumsum(lengths)], np.arange(300).astype(str))
    settings = TrainSection(batch_size=16, max_len=8, seed=3)
    batches, steps = training_batches(object(), data, settings)

    def targets_of(epoch):
        seen = [batch["targets"][batch["targets"] != PAD] for batch in batches(epoch)]
        return seen, torch.cat(seen)

    first, all_targets = targets_of(1)
    assert len(first) == steps(1)
    assert sorted(all_targets.tolist()) == sorted(data.leaves[data.targets()].tolist())  # every target once
    again, _ = targets_of(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))                          # same epoch, same batches
    second, _ = targets_of(2)
    assert not all(torch.equal(a, b) for a, b in zip(first, second))                     # reshuffled per epoch
    # Batches group windows of similar length: far less padding than a plain shuffle would leave.
    padded = sum(int((batch["inputs"] == PAD).sum()) for batch in batches(1))
    assert padded < 0.25 * sum(batch["inputs"].numel() for batch in batches(1))
    half, half_steps = training_batches(object(), data, settings.model_copy(update={"epoch_fraction": 0.5}))
    visited = list(half(1))
    assert len(visited) == half_steps(1) < steps(1)
    n_windows = sum(len(batch["inputs"]) for batch in batches(1))
    assert sum(len(batch["inputs"]) for batch in visited) == round(0.5 * n_windows)
