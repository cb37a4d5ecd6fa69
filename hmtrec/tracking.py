"""Optional MLflow tracking of a training run: the resolved config as parameters, every epoch's
records (loss, validation metrics, seconds) as step-wise metrics, the final numeric results of
metrics.json, and the run directory as the run's artefacts.

Off by default; `hmtrec train --track` (or `hmtrec tune --track`, one MLflow run per trial) turns it
on. The tracking URI is `--tracking-uri`, else $MLFLOW_TRACKING_URI, else `./mlruns` (MLflow's file
store: MLflow 3 keeps it in maintenance mode behind MLFLOW_ALLOW_FILE_STORE, which we set for file
URIs only; `sqlite:///mlflow.db` or an `http://` tracking server work as they are). Needs
`pip install mlflow-skinny` (or the full `mlflow`). Under `torchrun` only rank 0 logs.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from hmtrec.errors import ConfigError
from hmtrec.train.callbacks import epoch_listener

DEFAULT_URI = "./mlruns"
MAX_PARAMS_PER_CALL = 100   # MLflow's log_batch limits
MAX_METRICS_PER_CALL = 1000
_INVALID_KEY_CHARS = re.compile(r"[^\w\-. :/]")


def metric_key(key: str) -> str:
    """MLflow keys allow letters, digits, _ - . space : / only: `item/MRR@20` -> `item/MRR_at_20`."""
    return _INVALID_KEY_CHARS.sub("_", key.replace("@", "_at_"))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists are kept whole (as JSON when logged)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def numeric_leaves(tree: Any) -> dict[str, float]:
    return {key: float(value) for key, value in flatten(tree).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))}


def resolve_uri(tracking_uri: str | None) -> str:
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if "://" not in uri and not uri.startswith("file:"):
        uri = Path(uri).resolve().as_uri()  # a plain path is a local file store
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def _import_mlflow() -> None:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ConfigError("tracking needs MLflow: pip install mlflow-skinny (or mlflow)") from None


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class _EpochLogger:
    """Logs each Trainer epoch's numeric records at step = epoch; a baseline's keys get its label
    as a prefix (its run directory lies under the main one)."""

    def __init__(self, client, run_id: str, run_dir: Path):
        self.client, self.run_id, self.run_dir = client, run_id, run_dir.resolve()

    def __call__(self, trainer, state) -> None:
        from mlflow.entities import Metric

        prefix = ""
        if trainer.run_dir is not None and Path(trainer.run_dir).resolve() != self.run_dir:
            prefix = Path(trainer.run_dir).resolve().name + "/"
        record = state.history[-1]
        timestamp = int(time.time() * 1000)
        metrics = [Metric(metric_key(prefix + key), value, timestamp, state.epoch)
                   for key, value in numeric_leaves(record).items() if key != "epoch"]
        for first in range(0, len(metrics), MAX_METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=metrics[first:first + MAX_METRICS_PER_CALL])


@contextmanager
def tracked_run(config, run_dir: str | Path, *, tracking_uri: str | None = None, experiment: str | None = None,
                tags: dict[str, str] | None = None) -> Iterator[str | None]:
    """Wrap one `pipeline.train(config, run_dir)`: yields the MLflow run id (None off rank 0). On success
    the final metrics and the run directory are logged; an exception ends the MLflow run as FAILED."""
    if not _is_rank_zero():
        yield None
        return
    _import_mlflow()
    from mlflow.entities import Metric, Param, RunStatus
    from mlflow.tracking import MlflowClient

    run_dir = Path(run_dir)
    client = MlflowClient(tracking_uri=resolve_uri(tracking_uri))
    name = experiment or f"hmtrec-{config.kind}"
    found = client.get_experiment_by_name(name)
    experiment_id = found.experiment_id if found is not None else client.create_experiment(name)
    run = client.create_run(experiment_id, run_name=run_dir.name,
                            tags={"hmtrec.kind": config.kind, "hmtrec.run_dir": str(run_dir.resolve()),
                                  **(tags or {})})
    run_id = run.info.run_id
    params = [Param(key, json.dumps(value) if isinstance(value, (list, dict)) else str(value))
              for key, value in flatten(config.model_dump(mode="json")).items()]
    for first in range(0, len(params), MAX_PARAMS_PER_CALL):
        client.log_batch(run_id, params=params[first:first + MAX_PARAMS_PER_CALL])
    try:
        with epoch_listener(_EpochLogger(client, run_id, run_dir)):
            yield run_id
    except BaseException:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    metrics_file = run_dir / "metrics.json"
    if metrics_file.exists():
        final = numeric_leaves(json.loads(metrics_file.read_text()))
        timestamp = int(time.time() * 1000)
        metrics = [Metric(metric_key(f"final/{key}"), value, timestamp, 0) for key, value in final.items()]
        for first in range(0, len(metrics), MAX_METRICS_PER_CALL):
            client.log_batch(run_id, metrics=metrics[first:first + MAX_METRICS_PER_CALL])
    client.log_artifacts(run_id, str(run_dir))
    client.set_terminated(run_id)
