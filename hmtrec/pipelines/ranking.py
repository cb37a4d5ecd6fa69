"""The ranking kind (config kind "ranking"): multi-task, multi-scenario rankers on feature rows. The
run lifecycle around it (run directory, same-run check, status, `hmtrec evaluate`) is `hmtrec.lifecycle`.

train: read rows (MovieLens-1M multi-scenario protocol, or any CSV/Parquet table) -> fit the
feature encoder on the training rows -> train the model with the shared Trainer (early stopping on
validation AUC) -> write weights, vocabularies, metrics and validation/test predictions.

Run directory:
  config.yaml          resolved config                 run.json        {"kind": "ranking", ...}
  features.json        vocabularies and statistics     model.safetensors  final (best-epoch) weights
  checkpoint.pt        resumable training state        best.safetensors   best epoch's weights
  metrics.json         valid/test metrics per (scenario, task), per group and overall
  predictions_valid.csv, predictions_test.csv   one column per task (probability or value),
                       `<task>_label`, the scenario column and the group columns
  log.txt
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterable, Literal

import pandas as pd
import torch
from pydantic import Field, field_validator, model_validator

from hmtrec.config import StrictModel, register_config
from hmtrec.data.features import EncodedRows, FeatureEncoder, FeatureSchema, TaskSpec, log_report, read_rows
from hmtrec.errors import ConfigError, DataError, HmtrecError
from hmtrec.evaluate.classification import metrics_rows, task_metrics
from hmtrec.models.families import MULTI_TASK_ROWS
from hmtrec.models.ranking.base import LossSettings, RankingModel
from hmtrec.models.registry import post_training_keys, validate_model_params
from hmtrec.lifecycle import LrScheduleSettings, RunKind, TrainSettings, fit_trainable, register_kind
from hmtrec.progress import console
from hmtrec.rundir import RunDir, get_logger, save_weights, write_frame
from hmtrec.serve.ranker import (Ranker, build_model, predict_encoded,  # noqa: F401
                                 prediction_frame)

FEATURES_FILE = "features.json"
WEIGHTS_FILE = "model.safetensors"


class RankingData(StrictModel):
    """Where rows come from. `table`: explicit train/valid/test files, or one file (`path`) split by
    row order with `fractions`. `movielens-1m`: the multi-scenario protocol of ../shared/data (or
    the GroupLens files in `path`), under one of the presets of
    hmtrec/data/readers/movielens_ranking.py."""

    source: Literal["movielens-1m", "table"] = "table"
    path: str | None = None
    train: str | None = None
    valid: str | None = None
    test: str | None = None
    fractions: list[float] = [0.8, 0.1, 0.1]
    # movielens-1m: "m3oe-code" (the M3oE code's merge order and row-order split: test users unseen),
    # "random" (the Scenario-Wise-Rec / HAMUR random_split, seeded by split_seed: users shared),
    # "chronological" (users 1-2999 by timestamp) or "user-sorted"; default m3oe-code
    preset: Literal["m3oe-code", "random", "chronological", "user-sorted"] | None = None
    split: Literal["row_order", "random"] | None = None   # before presets: row_order = user-sorted
    split_seed: int = 0
    max_rows: int | None = None                # keep only the first rows (quick runs)
    new_user_max_ratings: int = 50             # movielens-1m: user_activity = "new" up to this many ratings
    new_item_max_ratings: int = 20             # movielens-1m: item_popularity = "new" up to this many training ratings
    new_user_max_prior_ratings: int = 50       # chronological: user_history = "new" up to this many earlier ratings

    @property
    def resolved_preset(self) -> str:
        if self.preset is not None:
            return self.preset
        return {"row_order": "user-sorted", "random": "random"}.get(self.split or "", "m3oe-code")

    @model_validator(mode="after")
    def _presets_need_a_known_source(self):
        if self.source != "movielens-1m" and (self.split == "random" or self.preset is not None):
            # file row numbers in error messages assume contiguous parts of the file
            raise ValueError("data.preset and data.split=random are for source movielens-1m; for a table, "
                             "shuffle the file or give data.train/valid/test")
        if self.preset is not None and self.split is not None:
            raise ValueError("give data.preset or the older data.split, not both")
        return self

    @field_validator("fractions")
    @classmethod
    def _three_fractions(cls, value):
        if len(value) != 3 or any(v < 0 for v in value) or value[0] <= 0:
            raise ValueError("fractions are three non-negative numbers (train, valid, test)")
        return value


class RankingTrain(TrainSettings, LrScheduleSettings):
    """The shared train keys (`hmtrec.lifecycle.TrainSettings`) with the ranking defaults, the
    learning-rate schedule (`LrScheduleSettings`, as in the sequence and geo kinds), plus the
    evaluation batch, the monitored metric and a cap on steps per epoch."""

    epochs: int = Field(2, ge=1)
    batch_size: int = Field(2048, ge=1)
    eval_batch_size: int = Field(32768, ge=1)
    grad_clip: float | None = Field(None, gt=0, allow_inf_nan=False)
    patience: int | None = Field(1, ge=0)
    monitor: Literal["auc", "logloss"] = "auc"   # validation metric averaged over (scenario, task)
    max_steps_per_epoch: int | None = Field(None, ge=1)
    threads: int | None = Field(2, ge=1)          # torch intra-op threads (None: every usable core)


class RankingEval(StrictModel):
    groups: list[str] = []                       # extra columns to break metrics down by (e.g. user_activity)
    keep: list[str] = []                         # input columns copied into predictions_*.csv (e.g. user_id,
                                                 # the request column `hmtrec tune-utility --group` ranks by)
    write_predictions: bool = True


@register_config("ranking")
class RankingConfig(StrictModel):
    # besides hmtrec.rundir.RESUMABLE_CHANGES, a resumed run may change its evaluation batch
    resumable_changes: ClassVar[tuple[str, ...]] = ("train.eval_batch_size",)

    kind: Literal["ranking"] = "ranking"
    name: str | None = None
    data: RankingData = RankingData()
    features: FeatureSchema = FeatureSchema()
    tasks: list[TaskSpec]
    model: dict = {"name": "mmoe"}
    loss: LossSettings = LossSettings()
    train: RankingTrain = RankingTrain()
    eval: RankingEval = RankingEval()

    @field_validator("model")
    @classmethod
    def _known_model(cls, value):
        validate_model_params("ranking", value)     # raises ConfigError naming model.<key>
        return value

    def refit_keys(self) -> tuple[str, ...]:
        """The model keys fitted after training (`hmtrec refit` changes them on the trained weights)."""
        return post_training_keys("ranking", self.model)


# ---- data --------------------------------------------------------------------------------------
def load_splits(data: RankingData) -> tuple[dict[str, pd.DataFrame], dict[str, str], list[str]]:
    """Returns ({"train","valid","test"} -> frame, split -> file name for error messages, reports).
    A frame cut from a larger file carries `attrs["first_row"]`, its first row's number in the file."""
    if data.source == "movielens-1m":
        from hmtrec.data.readers.movielens_ranking import load_movielens_ranking

        splits = load_movielens_ranking(data.path, tuple(data.fractions), data.max_rows,
                                        data.new_user_max_ratings, data.new_item_max_ratings,
                                        split_seed=data.split_seed, preset=data.resolved_preset,
                                        new_user_max_prior_ratings=data.new_user_max_prior_ratings)
        name = f"movielens-1m {data.resolved_preset}"
        return ({"train": splits.train, "valid": splits.valid, "test": splits.test},
                {k: f"{name} ({k})" for k in ("train", "valid", "test")},
                splits.reports)
    if data.train is not None:
        if data.path is not None:
            raise ConfigError("data: give either data.path (one file to split) or data.train/valid/test, not both")
        files = {"train": data.train, "valid": data.valid, "test": data.test}
        missing = [k for k, v in files.items() if v is None]
        if missing:
            raise ConfigError(f"key 'data.{missing[0]}': a file is needed for every split when data.train is given")
        frames = {k: read_rows(v) for k, v in files.items()}
        if data.max_rows is not None:
            frames = {k: f.iloc[:data.max_rows].reset_index(drop=True) for k, f in frames.items()}
        return frames, files, [f"{k}: {len(f)} rows from {files[k]}" for k, f in frames.items()]
    if data.path is None:
        raise ConfigError("key 'data.path': a table source needs data.path or data.train/valid/test")
    from hmtrec.data.readers.movielens_ranking import split_by_row_order

    frame = read_rows(data.path)
    if data.max_rows is not None:
        frame = frame.iloc[:data.max_rows].reset_index(drop=True)
    train, valid, test = split_by_row_order(frame, tuple(data.fractions))
    train.attrs["first_row"], valid.attrs["first_row"] = 1, len(train) + 1
    test.attrs["first_row"] = len(train) + len(valid) + 1
    return ({"train": train, "valid": valid, "test": test}, {k: str(data.path) for k in ("train", "valid", "test")},
            [f"{data.path}: {len(frame)} rows split {len(train)}/{len(valid)}/{len(test)} by row order"])


# ---- scoring -----------------------------------------------------------------------------------
# batches, predictions and the loaded model (Ranker) live in hmtrec/serve/ranker.py, shared with serving
def frame_metrics(frame: pd.DataFrame, encoder: FeatureEncoder, groups: Iterable[str]) -> dict:
    tasks = [(t.name, t.type) for t in encoder.tasks]
    group_columns = [g for g in [*encoder.schema.facets, *groups] if g in frame.columns]
    return task_metrics(frame, tasks, encoder.schema.scenario, group_columns)


def print_metrics(metrics: dict, encoder: FeatureEncoder, title: str) -> None:
    from rich.table import Table

    tasks = [(t.name, t.type) for t in encoder.tasks]
    table = Table(title=title)
    rows = metrics_rows(metrics, tasks, encoder.schema.scenario)
    columns = [c for c in ("slice", "task", "auc", "logloss", "rmse", "mae", "n") if any(c in r for r in rows)]
    for column in columns:
        table.add_column(column, justify="left" if column in ("slice", "task") else "right")
    for row in rows:
        table.add_row(*[f"{row[c]:.4f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns])
    console.print(table)
    if metrics.get("auc") is not None:
        console.print(f"{title}: mean AUC over (scenario, task) = {metrics['auc']:.4f}")


# ---- model artefacts ----------------------------------------------------------------------------
def predict_file(run_dir: str | Path, input_path: str | Path, output_path: str | Path | None = None,
                 keep: Iterable[str] = ()) -> pd.DataFrame:
    """Score every row of a CSV/Parquet file with a trained ranking run; write CSV if `output_path`."""
    ranker = Ranker.load(run_dir)
    frame = read_rows(input_path)
    scores = ranker.predict_frame(frame, file=str(input_path), keep=keep)
    if output_path is not None:
        Path(output_path).parent.mkdir(parents=True, exist_ok=True)
        scores.to_csv(output_path, index=False)
    return scores


# ---- the kind -----------------------------------------------------------------------------------
@dataclass
class RankingRows:
    """The rows of one run: frames per split, their file names (for error messages), the load
    reports; the encoder and the encoded rows once `save_data` fitted it on the training rows."""

    frames: dict[str, pd.DataFrame]
    files: dict[str, str]
    reports: list[str]
    encoder: FeatureEncoder | None = None
    encoded: dict[str, EncodedRows] = field(default_factory=dict)


@register_kind
class RankingKind(RunKind):
    """Multi-task rows: one ranker on encoded feature rows, early-stopped on validation AUC (or
    logloss); predictions of the valid and test rows beside the metrics."""

    name = "ranking"
    config_class = RankingConfig
    batch_contract = MULTI_TASK_ROWS
    evaluation_overrides = ("eval", "data", "train.device", "train.threads", "train.eval_batch_size")
    evaluation_file = "metrics_evaluate.json"

    def model_labels(self, config: RankingConfig) -> list[str]:
        return [config.model["name"]]

    def run_info(self, config: RankingConfig, data) -> dict:
        return {"model": config.model["name"], "name": config.name}

    def prepare(self, config: RankingConfig, *, for_evaluation: bool = False) -> RankingRows:
        frames, files, reports = load_splits(config.data)
        if not for_evaluation and len(frames["train"]) == 0:
            raise DataError("no training rows", file=files["train"])
        return RankingRows(frames, files, reports)

    def save_data(self, run: RunDir, config: RankingConfig, data: RankingRows) -> None:
        log = get_logger()
        for line in data.reports:
            log.info("data: %s", line)
            console.print(f"data: {line}")
        data.encoder = FeatureEncoder(config.features, config.tasks).fit(data.frames["train"], file=data.files["train"])
        data.encoder.save(run.path / FEATURES_FILE)
        self.encode(data)
        for split, rows in data.encoded.items():
            log_report(rows.report, split)

    @staticmethod
    def encode(data: RankingRows) -> None:
        """Every split's rows through the run's encoder (`data.encoder`)."""
        for split, frame in data.frames.items():
            data.encoded[split] = data.encoder.transform(frame, file=data.files[split],
                                                         first_row=frame.attrs.get("first_row", 1))

    def build(self, label: str, run: RunDir, config: RankingConfig, data: RankingRows) -> RankingModel:
        model = build_model(config, data.encoder)
        model.fit_rate_prior(data.encoded["train"])     # fixed training-rate offsets (model.rate_prior)
        get_logger().info("model %s: %d parameters", label, sum(p.numel() for p in model.parameters()))
        return model

    def fit(self, label: str, model: RankingModel, run: RunDir, config: RankingConfig, data: RankingRows,
            on_epoch_end) -> dict:
        settings, encoder, encoded, frames = config.train, data.encoder, data.encoded, data.frames
        n_parameters = sum(p.numel() for p in model.parameters())

        def validate(current: RankingModel) -> dict:
            frame = prediction_frame(predict_encoded(current, encoded["valid"], settings.eval_batch_size),
                                     encoded["valid"], frames["valid"], encoder)
            metrics = frame_metrics(frame, encoder, [])
            return {"auc": metrics["auc"] if metrics["auc"] is not None else float("nan"),
                    "logloss": metrics["logloss"] if metrics["logloss"] is not None else float("nan")}

        train_rows = encoded["train"]
        steps = -(-len(train_rows) // settings.batch_size)
        if settings.max_steps_per_epoch is not None:
            steps = min(steps, settings.max_steps_per_epoch)

        def batches(epoch: int):
            generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + epoch)
            order = torch.randperm(len(train_rows), generator=generator)
            return train_rows.batches(settings.batch_size, order, settings.max_steps_per_epoch)

        has_validation = len(frames["valid"]) > 0
        trainer_settings = settings.trainer_settings(
            monitor=settings.monitor if has_validation else None,
            monitor_mode="max" if settings.monitor == "auc" else "min",
            patience=settings.patience if has_validation else None)
        started = time.perf_counter()
        state = fit_trainable(model, trainer_settings, run.path, batches, lambda epoch: steps,
                              validate=validate if has_validation else None, on_epoch_end=on_epoch_end)
        model.cpu()
        blend = self.fit_post_training(model, config, data)
        save_weights(run.path / WEIGHTS_FILE, model.state_dict())
        return {"model": config.model["name"], "parameters": n_parameters, "best_epoch": state.best_epoch,
                "epochs_run": state.epoch, "train_seconds": state.train_seconds,
                "seconds": time.perf_counter() - started, "history": state.history, **blend}

    @staticmethod
    def fit_post_training(model: RankingModel, config: RankingConfig, data: RankingRows) -> dict:
        """`model.rate_blend`, when on: the mix with a rate baseline, chosen on validation."""
        if model.rate_blend is None:
            return {}
        from hmtrec.models.ranking.rate_blend import fit_rate_blend

        _, params = validate_model_params("ranking", config.model)
        started = time.perf_counter()
        record = fit_rate_blend(model, data.encoded["train"], data.encoded["valid"], params.rate_blend,
                                monitor=config.train.monitor, batch_size=config.train.eval_batch_size)
        record["seconds"] = time.perf_counter() - started
        if "weights" in record:
            get_logger().info("rate blend: %s (smoothing %g), weights %s; valid %s %.4f -> %.4f (rate alone %.4f)",
                              record["kind"], record["smoothing"], record["weights"], record["monitor"],
                              record["valid"]["network"], record["valid"]["blend"], record["valid"]["rate"])
        else:
            get_logger().info("rate blend: %s", record["skipped"])
        return {"rate_blend": record}

    def refit_main(self, label: str, run: RunDir, config: RankingConfig, data: RankingRows, previous: dict
                   ) -> tuple[RankingModel, dict]:
        """The trained weights (the rate blend's buffers may be missing or left over), then the
        post-training stage fitted on validation as `fit` does."""
        from hmtrec.rundir import load_weights

        data.encoder = FeatureEncoder.load(run.path / FEATURES_FILE)
        self.encode(data)
        model = self.build(label, run, config, data)
        missing, unexpected = model.load_state_dict(load_weights(run.path / WEIGHTS_FILE), strict=False)
        stray = [key for key in [*missing, *unexpected] if not key.startswith("rate_blend.")]
        if stray:
            raise HmtrecError(f"{run.path / WEIGHTS_FILE}: the weights do not match the model of config.yaml "
                              f"({stray[:5]}); train a new run")
        started = time.perf_counter()
        blend = self.fit_post_training(model, config, data)
        save_weights(run.path / WEIGHTS_FILE, model.state_dict())
        training = {key: value for key, value in previous.items()
                    if key not in ("valid", "test", "data", "encoding", "rate_blend", "refit", "refit_seconds")}
        return model, {**training, **blend, "refit_seconds": time.perf_counter() - started}

    def evaluate_model(self, label: str, model, run: RunDir | None, config: RankingConfig, data: RankingRows,
                       training: dict | None) -> dict:
        metrics: dict = {**training, "data": data.reports, "encoding": {k: v.report for k, v in data.encoded.items()}}
        for split in ("valid", "test"):
            if len(data.frames[split]) == 0:
                continue
            frame = prediction_frame(predict_encoded(model, data.encoded[split], config.train.eval_batch_size),
                                     data.encoded[split], data.frames[split], data.encoder,
                                     list(dict.fromkeys([*config.eval.groups, *config.eval.keep])))
            metrics[split] = frame_metrics(frame, data.encoder, config.eval.groups)
            if model.rate_blend is not None and model.rate_blend.active:   # the ablation, in the same run
                with model.rate_blend.suspended():
                    alone = prediction_frame(predict_encoded(model, data.encoded[split], config.train.eval_batch_size),
                                             data.encoded[split], data.frames[split], data.encoder)
                network = frame_metrics(alone, data.encoder, [])
                metrics[split]["without_rate_blend"] = {"auc": network["auc"], "logloss": network["logloss"]}
            if config.eval.write_predictions:
                write_frame(run.path / f"predictions_{split}.csv", frame)
        return metrics

    def summary(self, config: RankingConfig, data: RankingRows, results: dict[str, dict],
                training: dict[str, dict]) -> dict:
        return results[config.model["name"]]

    def report(self, run: RunDir, config: RankingConfig, data: RankingRows, results: dict, metrics: dict) -> None:
        if "test" in metrics:
            print_metrics(metrics["test"], data.encoder, f"{config.model['name']} test")

    # `hmtrec evaluate`: re-score the test rows with the saved model and encoder
    def load_saved(self, run: RunDir, config: RankingConfig, info: dict) -> Ranker:
        return Ranker.load(run.path)

    def ready(self, ranker: Ranker, config: RankingConfig, data: RankingRows, info: dict) -> dict:
        data.encoder = ranker.encoder
        return {config.model["name"]: ranker}

    def evaluate_saved_model(self, label: str, ranker: Ranker, config: RankingConfig, data: RankingRows) -> dict:
        scores = ranker.predict_frame(data.frames["test"], file=data.files["test"], keep=config.eval.groups)
        return frame_metrics(scores, ranker.encoder, config.eval.groups)

    def evaluation_record(self, overrides: list[str], results: dict[str, dict]) -> dict:
        return next(iter(results.values()))

    def evaluation_result(self, record: dict) -> dict:
        return record

    def print_evaluation(self, config: RankingConfig, data: RankingRows, results: dict[str, dict]) -> None:
        print_metrics(next(iter(results.values())), data.encoder, f"{config.model['name']} test")


RankingPipeline = RankingKind  # the older name
