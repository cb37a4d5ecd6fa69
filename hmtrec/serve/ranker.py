"""A trained ranking model with its feature encoder, loaded from a run directory, and the batched
predictions the ranking pipeline and the service share (one column per task head).

    ranker = Ranker.load("runs/hinet")
    scores = ranker.predict_frame(rows)      # probabilities (binary tasks) or values, plus labels
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import torch

from hmtrec.data.features import EncodedRows, FeatureEncoder
from hmtrec.errors import DataError
from hmtrec.models.ranking.base import RankingModel
from hmtrec.models.registry import validate_model_params
from hmtrec.lifecycle import open_finished
from hmtrec.rundir import WEIGHTS_FILE, load_weights

FEATURES_FILE = "features.json"


@torch.no_grad()
def predict_encoded(model: RankingModel, rows: EncodedRows, batch_size: int = 32768) -> dict[str, np.ndarray]:
    """Probabilities (binary tasks) or values (regression tasks) for every row, per task."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in model.task_names}
    for batch in rows.batches(batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        for name, values in model.predict(batch).items():
            parts[name].append(values.float().cpu())
    model.train(was_training)
    return {name: torch.cat(values).numpy() if values else np.zeros(0, dtype=np.float32)
            for name, values in parts.items()}


def prediction_frame(predictions: dict[str, np.ndarray], rows: EncodedRows, source: pd.DataFrame,
                     encoder: FeatureEncoder, keep: Iterable[str] = ()) -> pd.DataFrame:
    """One column per task (prediction), `<task>_label` (NaN where the row has no label), then the
    scenario column and any kept columns from the source rows."""
    out = pd.DataFrame(index=range(len(rows)))
    for column in [c for c in [encoder.schema.scenario, *encoder.schema.facets, *keep] if c]:
        if column in source.columns and column not in out.columns:
            out[column] = source[column].to_numpy()
    for j, task in enumerate(encoder.tasks):
        out[task.name] = predictions[task.name]
        if task.label_column in source.columns:
            labels = rows.labels[:, j].numpy().astype(np.float64)
            labels[~rows.label_mask[:, j].numpy()] = np.nan
            out[f"{task.name}_label"] = labels
    return out


def build_model(config: "RankingConfig", encoder: FeatureEncoder) -> RankingModel:  # noqa: F821
    entry, params = validate_model_params("ranking", config.model)
    return entry.builder(params, layout=encoder.layout(), loss=config.loss)


class Ranker:
    """A trained ranking model with its feature encoder, loaded from a run directory."""

    def __init__(self, config: "RankingConfig",  # noqa: F821 (hmtrec.pipelines.ranking)
                 encoder: FeatureEncoder, model: RankingModel, run_dir: Path):
        self.config, self.encoder, self.model, self.run_dir = config, encoder, model, run_dir

    @classmethod
    def load(cls, run_dir: str | Path) -> "Ranker":
        run, _, config = open_finished(run_dir, "ranking", "ranking inference")
        run_dir = run.path
        encoder = FeatureEncoder.load(run_dir / FEATURES_FILE)
        model = build_model(config, encoder)
        model.load_state_dict(load_weights(run_dir / WEIGHTS_FILE))
        model.eval()
        return cls(config, encoder, model, run_dir)

    def predict_frame(self, frame: pd.DataFrame, file: str | None = None, keep: Iterable[str] = ()) -> pd.DataFrame:
        """Scores for a table of rows: one column per task, plus labels, scenario and kept columns."""
        rows = self.encoder.transform(frame, file=file, require_labels=False,
                                      first_row=frame.attrs.get("first_row", 1))
        for column in keep:
            if column not in frame.columns:
                raise DataError("column to keep is absent from the input", file=file, column=column)
        predictions = predict_encoded(self.model, rows, self.config.train.eval_batch_size)
        return prediction_frame(predictions, rows, frame, self.encoder, keep)
