"""`train.final_fit`: the epoch count is chosen on valid by a selection run, then the kept model is
trained afresh on train + valid for that many epochs along the same learning-rate curve; models
without training and a hybrid's kNN are fitted on train + valid, and a reloaded run scores the
same."""

import json

import pytest
import torch

from hmtrec.config import build_config
from hmtrec.data.loading import load_data
from hmtrec.errors import ConfigError
from hmtrec.pipelines import get_pipeline
from hmtrec.rundir import load_tensors
from hmtrec.train.trainer import lr_factor

torch.set_num_threads(1)

RAW = {
    "kind": "sequence",
    "data": {"source": "synthetic", "synthetic": {"n_items": 120, "level_sizes": [4, 12], "n_sessions": 800,
                                                  "days": 10}},
    "model": {"name": "hiersrec", "dim": 16, "id_dim": 16, "level_dim": 8, "text": "none"},
    "train": {"epochs": 4, "batch_size": 32, "max_len": 10, "lr": 0.003, "threads": 1, "lr_schedule": "cosine",
              "warmup_fraction": 0.1, "patience": 1, "final_fit": True},
    "eval": {"ks": [10, 20], "candidate_fraction": None},
    "baselines": ["vsknn"],
}


def config_of(**train):
    raw = json.loads(json.dumps(RAW))
    raw["train"].update(train)
    return build_config(raw)


@pytest.fixture(scope="module")
def final_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("final-fit")
    return run_dir, get_pipeline("sequence").train(config_of(), run_dir)


def test_the_kept_model_trains_on_train_and_valid_for_the_chosen_epochs(final_run):
    run_dir, metrics = final_run
    training = metrics["models"]["hiersrec"]["training"]
    selection, final = training["selection"], training["final_fit"]
    assert 1 <= selection["best_epoch"] <= selection["epochs"] <= 4
    assert final["epochs"] == selection["best_epoch"] == training["best_epoch"]
    prepared = load_data(config_of().data, with_train_all=True)
    merged = load_data(build_config({**RAW, "train": {k: v for k, v in RAW["train"].items() if k != "final_fit"},
                                     "data": {**RAW["data"], "split": {"train_on_all": True}}}).data)
    assert final["train_targets"] == prepared.train_all.n_targets == merged.train.n_targets
    assert prepared.train_all.n_targets > prepared.train.n_targets
    assert (run_dir / "selection" / "checkpoint.pt").exists() and (run_dir / "selection" / "best.safetensors").exists()
    # the final fit's schedule has the selection run's horizon in epochs: the same lr at each epoch's end
    state = load_tensors(run_dir / "checkpoint.pt")["state"]
    steps = state["step"] // final["epochs"]
    assert state["total_steps"] == 4 * steps
    selection_lr = [record["lr"] for record in training["history"]]
    for record in final["history"]:   # each epoch's last step; the two runs' steps per epoch differ
        epoch = record["epoch"]
        assert record["lr"] == pytest.approx(0.003 * lr_factor(epoch * steps - 1, 4 * steps, "cosine",
                                                               round(0.1 * 4 * steps), 0.0))
        assert record["lr"] == pytest.approx(selection_lr[epoch - 1], rel=0.05, abs=1e-5)
    # the selection model's test figures are kept beside the final model's
    assert set(selection["test"]["full"]["item"]) == set(metrics["models"]["hiersrec"]["full"]["item"])
    assert selection["test"]["full"]["item"] != metrics["models"]["hiersrec"]["full"]["item"]
    # the bench reads both
    from hmtrec.bench.runner import read_record
    from hmtrec.bench.suites import SuiteModel
    bench = read_record(run_dir, SuiteModel(label="hiersrec", model={"name": "hiersrec"}), 0)
    assert bench.selection_metrics["item/MRR@20"] == selection["test"]["full"]["item"]["MRR@20"]
    assert bench.metrics["item/MRR@20"] == metrics["models"]["hiersrec"]["full"]["item"]["MRR@20"]
    assert bench.train_targets == final["train_targets"]


def test_models_without_training_fit_on_train_and_valid_and_evaluate_reproduces_them(final_run):
    run_dir, metrics = final_run
    config = config_of()
    prepared = load_data(config.data, with_train_all=True)
    from hmtrec.evaluate.ranking import evaluate_model
    from hmtrec.models.registry import build_model, validate_model_params

    entry, params = validate_model_params("sequence", {"name": "vsknn"})
    results = {}
    for split in ("train", "train_all"):
        model = build_model(entry, params, taxonomy=prepared.taxonomy, dataset=prepared.dataset, max_len=10)
        model.fit(getattr(prepared, split))
        results[split] = evaluate_model(model, prepared.test, prepared.taxonomy, config.eval, max_len=10,
                                        train=prepared.train_all)["full"]["item"]
    assert results["train_all"] != results["train"]
    assert metrics["models"]["vsknn"]["full"]["item"] == pytest.approx(results["train_all"])
    evaluated = get_pipeline("sequence").evaluate(run_dir, [])
    for label in ("hiersrec", "vsknn"):
        assert evaluated[label]["full"]["item"] == pytest.approx(metrics["models"][label]["full"]["item"])


def test_a_hybrid_keeps_the_weight_its_selection_chose(tmp_path):
    from hmtrec.serve.artefact import load_sequence_run

    raw = json.loads(json.dumps(RAW))
    raw["model"] = {"name": "knn-hybrid", "neural": raw["model"], "weights": [0.0, 0.5, 1.0]}
    raw["baselines"] = []
    raw["train"].update(epochs=2)
    metrics = get_pipeline("sequence").train(build_config(raw), tmp_path)
    training = metrics["models"]["knn-hybrid"]["training"]
    assert training["final_fit"]["epochs"] == training["selection"]["best_epoch"]
    assert float(load_sequence_run(tmp_path).model().knn_weight) == training["tuned"]["knn_weight"]


def test_final_fit_mistakes_are_named():
    with pytest.raises(ConfigError, match="train.final_fit.*train.monitor"):
        config_of(monitor=None)
    raw = json.loads(json.dumps(RAW))
    raw["data"]["split"] = {"train_on_all": True}
    with pytest.raises(ConfigError, match="train_on_all"):
        build_config(raw)
