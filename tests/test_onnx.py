"""`hmtrec export --format onnx`: the exported graphs match PyTorch within 1e-4 (coarse logits, full
and candidate item logits), and the service answers the same on ONNX Runtime."""

import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import hmtrec
from hmtrec.cli import app
from hmtrec.errors import HmtrecError
from hmtrec.serve.app import ServeSettings, create_app
from hmtrec.serve.onnx import OnnxScorer, parity

from test_api import SEQUENCE


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    # two layers, cascade heads and a longer window than the other API tests: the whole encoder is exported
    config = {**SEQUENCE, "model": {**SEQUENCE["model"], "layers": 2, "heads": 2}, "baselines": ["pop"],
              "train": {**SEQUENCE["train"], "max_len": 10}}
    run = hmtrec.train(config, tmp_path_factory.mktemp("onnx") / "run")
    result = CliRunner().invoke(app, ["export", str(run.path), "--format", "onnx"])
    assert result.exit_code == 0, (result.output, result.exception)
    return run, json.loads(result.stdout)


def test_the_exported_graphs_match_pytorch(exported):
    run, manifest = exported
    assert manifest["parity_max_abs_diff"] <= 1e-4 and manifest["levels"] == ["L1", "L2"]
    artefact = run.artefact()
    onnx_scorer = OnnxScorer.load(run.path, artefact)
    rng = np.random.default_rng(7)
    histories = [rng.integers(0, artefact.taxonomy.n_leaves, size=n) for n in rng.integers(1, 25, size=17)]
    assert parity(artefact.scorer(), onnx_scorer, histories, artefact.taxonomy) <= 1e-4
    # and against the model's own score_next (the evaluation path), not only the split scorer
    from hmtrec.serve.scoring import pad_histories

    batch = pad_histories(histories, artefact.config.eval_max_len)
    with torch.no_grad():
        expected = artefact.model().score_next(batch)
    scores = onnx_scorer.score(batch)
    for level, value in expected.items():
        assert float((scores.levels[level] - value).abs().max()) <= 1e-4


def test_the_service_runs_on_onnx_runtime(exported):
    run, _ = exported
    items = [str(label) for label in run.artefact().taxonomy.node_labels[-1][:6]]
    on_torch = TestClient(create_app(run.path, ServeSettings()))
    on_onnx = TestClient(create_app(run.path, ServeSettings(backend="onnx")))
    assert on_onnx.get("/model").json()["backend"] == "onnx"
    for body in ({"history": items, "k": 8}, {"history": items[:2], "k": 8, "candidate_fraction": 0.1},
                 {"history": items[3:], "k": 5, "top_nodes": 2, "exclude_seen": True}):
        a, b = on_torch.post("/recommend", json=body).json(), on_onnx.post("/recommend", json=body).json()
        assert [i["id"] for i in a["items"]] == [i["id"] for i in b["items"]]
        np.testing.assert_allclose([i["probability"] for i in a["items"]], [i["probability"] for i in b["items"]],
                                   atol=1e-5)
        assert {k: v["label"] for k, v in a["levels"].items()} == {k: v["label"] for k, v in b["levels"].items()}


def test_only_encoder_models_are_exported(exported, tmp_path):
    run, _ = exported
    with pytest.raises(HmtrecError, match="not an encoder with hierarchical heads"):
        from hmtrec.serve.onnx import export_onnx

        export_onnx(run.path, tmp_path / "pop", label="pop")
