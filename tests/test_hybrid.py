"""The kNN + neural hybrid: the mixture by hand, the weight chosen on validation equals the best of
evaluating every weight separately, and a run directory trains, tunes and reloads it."""

import json

import numpy as np
import pytest
import torch

from hmtrec.config import build_config
from hmtrec.data.loading import DataConfig, load_data
from hmtrec.data.synthetic import SyntheticConfig
from hmtrec.errors import ConfigError
from hmtrec.evaluate.ranking import EvalSettings, evaluate_model
from hmtrec.models.registry import build_model, validate_model_params
from hmtrec.pipelines import get_pipeline
from test_hiersrec import batch_of

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    return load_data(DataConfig(source="synthetic", synthetic=SyntheticConfig(n_items=120, level_sizes=[4, 12],
                                                                             n_sessions=800, days=10)))


def hybrid(tiny, **params):
    entry, validated = validate_model_params("sequence", {"name": "knn-hybrid",
                                                          "neural": {"name": "sasrec", "dim": 8}, **params})
    torch.manual_seed(0)
    model = build_model(entry, validated, taxonomy=tiny.taxonomy, dataset=tiny.dataset, max_len=10)
    model.fit(tiny.train)
    return model.eval()


def test_prediction_is_the_mixture_of_neural_probabilities_and_normalised_votes(tiny):
    model = hybrid(tiny)
    batch = batch_of([[0, 5, 9, 5], [3, 7]])
    with torch.no_grad():
        neural = torch.softmax(model.neural.predict(batch)["item"], dim=-1)
        votes = model.knn.predict(batch)["item"].clamp_min(0)
        alone = model.predict(batch)["item"]
        model.knn_weight.fill_(0.3)
        mixed = model.predict(batch)["item"]
    torch.testing.assert_close(alone.exp(), neural)                     # w = 0: the neural model alone
    expected = 0.7 * neural + 0.3 * votes / votes.sum(1, keepdim=True)
    torch.testing.assert_close(mixed.exp(), expected)
    torch.testing.assert_close(mixed.exp().sum(1), torch.ones(4))


def test_tuned_weight_is_the_best_of_evaluating_each_weight(tiny):
    model = hybrid(tiny, weights=[0.0, 0.25, 0.5, 1.0])
    tuned = model.tune_on_validation(tiny.valid, max_len=10)
    separately = {}
    for weight in (0.0, 0.25, 0.5, 1.0):
        model.knn_weight.fill_(weight)
        result = evaluate_model(model, tiny.valid, tiny.taxonomy, EvalSettings(ks=[20], segments=[]), max_len=10)
        separately[f"{weight:g}"] = result["full"]["item"]["MRR@20"]
    assert tuned["valid_by_weight"] == pytest.approx(separately)
    best = max(separately.values())
    assert tuned["knn_weight"] == min(float(w) for w, v in separately.items() if v == best)


def test_hybrid_errors_name_the_key(tiny):
    with pytest.raises(ConfigError, match="model.neural"):
        hybrid(tiny, neural={"name": "vsknn"})
    with pytest.raises(ConfigError, match="model.neural.dim"):
        hybrid(tiny, neural={"name": "sasrec", "dim": "wide"})
    with pytest.raises(ConfigError, match="weights"):
        validate_model_params("sequence", {"name": "knn-hybrid", "weights": [1.5]})


def test_pipeline_tunes_on_validation_and_the_run_reloads(tmp_path):
    from hmtrec.serve.artefact import load_sequence_run
    raw = {"kind": "sequence",
           "data": {"source": "synthetic", "synthetic": {"n_items": 120, "level_sizes": [4, 12], "n_sessions": 800,
                                                         "days": 10}},
           "model": {"name": "knn-hybrid", "neural": {"name": "hiersrec", "dim": 16, "id_dim": 16, "level_dim": 8,
                                                      "text": "none"}, "weights": [0.0, 0.5, 1.0]},
           "train": {"epochs": 1, "batch_size": 32, "max_len": 10, "threads": 1},
           "eval": {"ks": [10, 20]}}
    metrics = get_pipeline("sequence").train(build_config(json.loads(json.dumps(raw))), tmp_path)
    tuned = metrics["models"]["knn-hybrid"]["training"]["tuned"]
    assert tuned["knn_weight"] in (0.0, 0.5, 1.0) and set(tuned["valid_by_weight"]) == {"0", "0.5", "1"}
    artefact = load_sequence_run(tmp_path)
    model = artefact.model()
    assert float(model.knn_weight) == tuned["knn_weight"]
    prepared = load_data(build_config(raw).data)
    result = evaluate_model(model, prepared.test, prepared.taxonomy, EvalSettings(ks=[10, 20]), max_len=10,
                            train=prepared.train)
    assert result["full"]["item"] == pytest.approx(metrics["models"]["knn-hybrid"]["full"]["item"])
