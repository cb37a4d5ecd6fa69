"""The Python API: train a config, load a run directory, evaluate, recommend and predict.

    import hmtrec
    run = hmtrec.train("configs/quickstart.yaml", "runs/qs")     # -> Run (resumes an interrupted run)
    run = hmtrec.load("runs/qs")
    run.evaluate({"eval.candidate_fraction": 0.1})
    run.recommend([["i12", "i907"], ["i3"]], k=10)             # sequence runs: many histories at once
    run.recommend(events_frame, k=10)                          # or a frame / file of (history, item) rows
    hmtrec.load("runs/hinet").predict("rows.csv")              # ranking runs: one column per head

Data may be given as pandas frames, Polars frames (converted with `to_pandas`) or file paths (CSV,
TSV, Parquet). Nothing here imports torch until a run is used, so `import hmtrec` stays quick.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from hmtrec.errors import ConfigError, DataError, HmtrecError
from hmtrec.rundir import RunDir


def _config(config: Any, overrides: Sequence[str] | None):
    from hmtrec.config import StrictModel, build_config, load_config

    if isinstance(config, StrictModel):
        if overrides:
            return load_config(None, list(overrides), base=config.model_dump(mode="json"))
        return config
    if isinstance(config, dict):
        return load_config(None, list(overrides or []), base=config)
    if isinstance(config, (str, Path)):
        return load_config(config, list(overrides or []))
    raise ConfigError(f"config: expected a YAML path, a mapping or a config object, got {type(config).__name__}")


def _overrides(overrides: dict | Sequence[str] | None) -> list[str]:
    """{"eval.ks": [10]} or ["eval.ks=[10]"] -> ["eval.ks=[10]"] (values written as YAML)."""
    if overrides is None:
        return []
    if isinstance(overrides, dict):
        import yaml

        return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
                for key, value in overrides.items()]
    return [str(item) for item in overrides]


def train(config: Any, run_dir: str | Path | None = None, *, overrides: dict | Sequence[str] | None = None) -> "Run":
    """Train a config (YAML path, mapping or config object) into `run_dir` (default: named from the
    config and its hash, so the same call resumes) and return the finished run."""
    from hmtrec import lifecycle
    from hmtrec.rundir import default_run_dir

    resolved = _config(config, _overrides(overrides))
    path = Path(run_dir) if run_dir is not None else default_run_dir(
        resolved, config if isinstance(config, (str, Path)) else None)
    lifecycle.train(lifecycle.get_kind(resolved.kind), resolved, path)
    return Run(path)


def load(run_dir: str | Path) -> "Run":
    """A finished run directory, ready to evaluate, recommend or predict."""
    from hmtrec.lifecycle import open_finished

    open_finished(run_dir, None, "hmtrec.load")
    return Run(run_dir)


def as_frame(data: Any, what: str = "rows"):
    """A pandas frame from a pandas or Polars frame, or a CSV/TSV/Parquet path."""
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        return data
    if hasattr(data, "to_pandas") and callable(data.to_pandas):
        return data.to_pandas()
    if isinstance(data, (str, Path)):
        from hmtrec.data.features import read_rows

        return read_rows(data)
    raise DataError(f"{what}: expected a pandas or Polars frame or a file path, got {type(data).__name__}")


def histories_from_frame(frame, *, history_column: str, item_column: str, file: str | None = None
                         ) -> tuple[list[Any], list[list[str]]]:
    """(history ids in first-seen order, item lists in row order) from long rows (history, item)."""
    for column in (history_column, item_column):
        if column not in frame.columns:
            raise DataError(f"no column {column!r}; columns: {list(frame.columns)}", file=file, column=column)
    missing = frame[item_column].isna().to_numpy() | frame[history_column].isna().to_numpy()
    if missing.any():
        row = int(missing.argmax()) + 1
        column = item_column if frame[item_column].isna().iloc[row - 1] else history_column
        raise DataError("empty value", file=file, row=row, column=column)
    ids, groups = [], {}
    for history, item in zip(frame[history_column].tolist(), frame[item_column].astype(str).tolist()):
        if history not in groups:
            groups[history] = []
            ids.append(history)
        groups[history].append(item)
    return ids, [groups[h] for h in ids]


class Run:
    """A run directory seen from Python: its kind, config and metrics, and what it can do."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = RunDir(run_dir)
        self.info = self.run_dir.read_info()
        self._artefacts: dict = {}
        self._ranker = None

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, kind={self.kind!r}, status={self.info.get('status')!r})"

    @property
    def path(self) -> Path:
        return self.run_dir.path

    @property
    def kind(self) -> str:
        return self.info["kind"]

    @property
    def config(self):
        return self.run_dir.read_config()

    @property
    def metrics(self) -> dict:
        from hmtrec.rundir import read_json

        return read_json(self.path / "metrics.json")

    def evaluate(self, overrides: dict | Sequence[str] | None = None) -> dict:
        """Evaluate again on the test split, with evaluation keys overridden (e.g. {"eval.ks": [10]})."""
        from hmtrec import lifecycle

        return lifecycle.evaluate(lifecycle.get_kind(self.kind), self.path, _overrides(overrides))

    # ---- sequence runs ----------------------------------------------------------------------
    def _require(self, kind: str, what: str) -> None:
        if self.kind != kind:
            raise HmtrecError(f"{self.path} holds a {self.kind!r} run; {what} needs a {kind} run")

    def artefact(self, model: str | None = None):
        """The loaded model `model` (default: the main one) of a sequence run, as a
        `hmtrec.serve.artefact.SequenceArtefact`; loaded once, refitted when it keeps no tensors."""
        self._require("sequence", "recommend")
        label = model or self.info.get("model")
        if label not in self._artefacts:
            from hmtrec.serve.artefact import load_sequence_run

            self.run_dir.require_done("recommendation")
            artefact = load_sequence_run(self.path, labels=[label] if label else None)
            if artefact.needs_fit:
                from hmtrec.data.loading import load_fitting_split

                artefact.fit_missing(load_fitting_split(artefact.config.data, artefact.config.train.final_fit))
            self._artefacts[label] = artefact
        return self._artefacts[label]

    def recommend(self, histories: Any, k: int = 10, *, model: str | None = None, exclude_history: bool = False,
                  skip_unknown: bool = False, candidate_fraction: float | None = None,
                  top_nodes: int | None = None, candidate_level: str | None = None,
                  history_column: str = "session", item_column: str = "item") -> list[dict]:
        """Top-k items after each history: a list of item-id lists (oldest first), or a frame / file of
        rows (history id, item id) in time order. One result per history (with its `id` when the
        histories came as rows); candidates as in `SequenceArtefact.recommend_many`."""
        ids = None
        if isinstance(histories, (str, Path)) or hasattr(histories, "columns") or hasattr(histories, "to_pandas"):
            file = str(histories) if isinstance(histories, (str, Path)) else None
            frame = as_frame(histories, "histories")
            ids, histories = histories_from_frame(frame, history_column=history_column, item_column=item_column,
                                                  file=file)
        else:
            histories = [[str(item) for item in history] for history in histories]
        results = self.artefact(model).recommend_many(histories, k, label=model, exclude_history=exclude_history,
                                               skip_unknown=skip_unknown, candidate_fraction=candidate_fraction,
                                               top_nodes=top_nodes, candidate_level=candidate_level)
        if ids is not None:
            for history_id, result in zip(ids, results):
                result["id"] = history_id
        return results

    # ---- ranking runs -----------------------------------------------------------------------
    @property
    def ranker(self):
        self._require("ranking", "predict")
        if self._ranker is None:
            from hmtrec.calibrate import load_calibration
            from hmtrec.serve.ranker import Ranker

            self._ranker = Ranker.load(self.path)
            self._calibration = load_calibration(self.path)
        return self._ranker

    @property
    def calibration(self):
        """The run's calibration (from `hmtrec calibrate`), or None."""
        self.ranker
        return self._calibration

    def predict(self, rows: Any, *, calibrated: bool = True, keep: Iterable[str] = ()):
        """Scores of feature rows (frame or file): one column per task head, calibrated when the run
        has a calibration (the raw score kept in `<head>_raw`), plus labels, scenario and kept columns."""
        from hmtrec.calibrate import apply_calibration

        file = str(rows) if isinstance(rows, (str, Path)) else None
        frame = as_frame(rows, "rows")
        scores = self.ranker.predict_frame(frame, file=file, keep=list(keep))
        if calibrated and self.calibration is not None:
            scores = apply_calibration(scores, self.calibration, source=file or "rows")
        return scores
