"""MLflow tracking into a file store under tmp_path: the resolved config as params, one metric point
per epoch, the final metrics, and the run directory as artefacts; a failed run is marked FAILED."""

import json
import os

import pytest

if os.environ.get("CI", "").lower() == "true":
    import mlflow  # noqa: F401  (CI installs the test extra, which includes mlflow-skinny: a missing one fails)
else:
    pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402

from hmtrec.config import build_config  # noqa: E402
from hmtrec.tracking import metric_key, tracked_run  # noqa: E402
from hmtrec.train.launch import train_run  # noqa: E402
from tiny_runs import tiny_sequence  # noqa: E402

TINY = tiny_sequence(baselines=[{"name": "gru4rec", "hidden_size": 16}])


def test_a_tracked_run_logs_params_epochs_and_the_run_directory(tmp_path):
    uri = (tmp_path / "mlruns").as_uri()
    run_dir = tmp_path / "run"
    train_run(build_config(TINY), run_dir, track=True, tracking_uri=uri, experiment="tiny")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tiny")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.dim"] == "16" and run.data.params["train.lr"] == "0.001"
    assert json.loads(run.data.params["eval.ks"]) == [10]
    history = client.get_metric_history(run.info.run_id, metric_key("valid_item/MRR@20"))
    assert [point.step for point in history] == [1, 2]
    recorded = json.loads((run_dir / "metrics.json").read_text())["models"]
    assert [p.value for p in history] == [r["valid_item/MRR@20"] for r in recorded["sasrec"]["training"]["history"]]
    # The baseline's epochs are logged under its label.
    assert [p.step for p in client.get_metric_history(run.info.run_id, "gru4rec/loss")] == [1, 2]
    assert run.data.metrics[metric_key("final/models.sasrec.full.item.Recall@10")] == pytest.approx(
        recorded["sasrec"]["full"]["item"]["Recall@10"])
    artefacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.json", "model.safetensors", "log.txt"} <= artefacts


def test_a_failed_run_is_marked_failed(tmp_path):
    uri = (tmp_path / "mlruns").as_uri()
    with pytest.raises(RuntimeError):
        with tracked_run(build_config(TINY), tmp_path / "run", tracking_uri=uri, experiment="broken"):
            raise RuntimeError("training broke")
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("broken").experiment_id])
    assert run.info.status == "FAILED"


def test_metric_keys_are_valid_for_mlflow():
    assert metric_key("valid_item/MRR@20") == "valid_item/MRR_at_20"
    assert metric_key("loss[a b]") == "loss_a b_"
