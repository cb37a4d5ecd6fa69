"""The sequence pipeline (config kind "sequence"): data -> model(s) -> training -> evaluation -> run dir.

    kind: sequence
    data: {source: synthetic, ...}               # hmtrec.data.loading.DataConfig
    model: {name: hiersrec, dim: 64, ...}        # any registered sequence model + its parameters
    train: {epochs: 10, batch_size: 128, max_len: 50, ...}
    eval: {ks: [10, 20], candidate_fraction: 0.05, ...}   # hmtrec.evaluate.ranking.EvalSettings
    baselines: [pop, {name: sasrec, label: sasrec-64, dim: 64}]

Every model, main and baselines alike, goes through the same steps, driven by the registry and
the model contract only: build it (`build_model` with context taxonomy, dataset, max_len, run_dir),
then train it with the shared Trainer on causal windows (or on the model's own
`training_batches(...)` when it defines one) if `trainable`, else `fit(train)`; save its weights;
evaluate it on the test split. One table compares them all.

Run directory:
    config.yaml          resolved config (every default written out)
    run.json             {"kind": "sequence", "model", "baselines", "status", versions}
    taxonomy.json        the catalogue's tree, leaf labels included
    leaf_text.json       item texts (when the data has them)
    data.json            what was loaded: sizes, protocol, filter reports
    checkpoint.pt        the main model's last epoch (resume), best.safetensors its best epoch
    model.safetensors    the main model's final weights
    baselines/<label>/   the same files for each baseline
    metrics.json         test metrics and training summary of every model
    metrics.md           the results table in Markdown
    evaluation.json      the latest `hmtrec evaluate` (with the overrides it used)
    log.txt
"""

from __future__ import annotations

import math
import platform
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import numpy as np
import torch
import yaml
from pydantic import Field, field_validator, model_validator

import hmtrec
from hmtrec.config import StrictModel, dump_config, load_config, register_config
from hmtrec.data.loading import DataConfig, PreparedData, load_data
from hmtrec.data.sequences import SequenceData, collate_windows, make_windows
from hmtrec.errors import ConfigError, HmtrecError
from hmtrec.evaluate.ranking import EvalSettings, evaluate_model
from hmtrec.evaluate.report import print_results, results_table
from hmtrec.models.registry import build_model, validate_model_params
from hmtrec.pipelines import register_pipeline
from hmtrec.progress import console
from hmtrec.rundir import RunDir, check_label, write_text
from hmtrec.train.run_dir import close_run_dir, get_logger, open_run_dir, read_json, save_weights, write_json
from hmtrec.train.trainer import (TrainerSettings, TrainState, Trainer, check_device, resolve_device,
                                  seed_everything, usable_cores)

MAIN_WEIGHTS = "model.safetensors"
BASELINES_DIR = "baselines"
LENGTH_POOL_BATCHES = 50  # batches per pool of windows sorted by length
EVALUATION_OVERRIDES = ("eval.", "data.path", "train.device", "train.threads")


class TrainSection(StrictModel):
    """The `train:` section: how every trainable model of the run is trained."""

    epochs: int = Field(10, ge=0)
    batch_size: int = Field(128, ge=1, description="windows per training batch")
    max_len: int = Field(50, ge=1, description="longest context window, in events")
    epoch_fraction: float = Field(1.0, gt=0, le=1, description="share of the training windows each epoch "
                                  "visits (a different random share every epoch); 1: all")
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="after the warm-up: constant, or cosine / linear decay to lr * lr_floor at the "
                                "last step of the last epoch")
    warmup_fraction: float = Field(0.0, ge=0, lt=1, description="share of all training steps spent warming the "
                                   "learning rate up linearly from lr / warm-up steps to lr")
    lr_floor: float = Field(0.0, ge=0, le=1, description="the decay ends at lr * lr_floor")
    budget_minutes: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="wall-clock budget per model (training plus validation): "
        "stop after the epoch that passes it and record that it did; null: none")
    budget_clock: Literal["wall", "cpu"] = Field(
        "wall", description="what the budget counts: wall (elapsed time) or cpu (process CPU time / threads: the "
                            "time an otherwise idle machine would need, so other processes do not shorten the run)")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(5.0, gt=0)
    seed: int = 0
    device: str = Field("cpu", description="cpu, cuda, cuda:1, mps or auto")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: every core this process "
                                                         "may use)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16: forward pass and loss under bfloat16 autocast (weights, optimiser and "
                            "evaluation stay float32); much faster full-softmax heads on CPUs with bf16 units. "
                            "auto: fp32 on a CPU without native bf16 (emulated bf16 is ~16x slower), else the "
                            "faster of the two in a short timed probe (logged)")
    monitor: str | None = Field(
        "MRR@20", description="validation metric that picks the best epoch: METRIC (at the finest level "
                              "the model scores) or LEVEL/METRIC; null: no validation, keep the last epoch")
    monitor_mode: Literal["max", "min"] = "max"
    patience: int | None = Field(None, ge=1, description="stop after this many epochs without improvement")
    valid_max_sequences: int | None = Field(
        None, ge=1, description="validate on a fixed random subset of this many valid sequences (speed)")
    resume: bool = Field(True, description="continue from checkpoint.pt when the run directory has one")

    @field_validator("device")
    @classmethod
    def _check_device_name(cls, value: str) -> str:
        try:
            torch.device(value) if value != "auto" else None
        except (RuntimeError, ValueError):
            raise ValueError(f"unknown device {value!r}; expected cpu, cuda, cuda:N, mps or auto") from None
        return value

    @field_validator("monitor")
    @classmethod
    def _check_monitor(cls, value: str | None) -> str | None:
        if value is not None:
            metric = value.split("/")[-1]
            name, _, k = metric.partition("@")
            if name not in ("Recall", "MRR", "NDCG") or not k.isdigit() or value.count("/") > 1:
                raise ValueError(f"expected METRIC@K or LEVEL/METRIC@K with METRIC Recall, MRR or NDCG, got {value!r}")
        return value

    def trainer_settings(self) -> TrainerSettings:
        return TrainerSettings(epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay,
                               grad_clip=self.grad_clip, seed=self.seed, device=self.device,
                               monitor=self.monitor and "monitored", monitor_mode=self.monitor_mode,
                               patience=self.patience, resume=self.resume, precision=self.precision,
                               lr_schedule=self.lr_schedule, warmup_fraction=self.warmup_fraction,
                               lr_floor=self.lr_floor, budget_minutes=self.budget_minutes,
                               budget_clock=self.budget_clock,
                               monitor_label=self.monitor)


def _model_spec(section: Any, where: str) -> dict:
    """A model mapping {name, [label], params...} with params validated and defaults filled in."""
    if isinstance(section, str):
        section = {"name": section}
    if not isinstance(section, dict):
        raise ConfigError(f"key {where!r}: expected a model name or a mapping with 'name'")
    section = dict(section)
    label = section.pop("label", None)
    try:
        entry, params = validate_model_params("sequence", section)
    except ConfigError as error:
        raise ConfigError(str(error).replace("'model.", f"'{where}.").replace("'model'", f"'{where}'")) from None
    label = check_label(label or entry.name, f"{where}.label")  # a folder name and a log field
    return {"name": entry.name, "label": label, **params.model_dump(mode="json")}


@register_config("sequence")
class SequenceConfig(StrictModel):
    kind: Literal["sequence"] = "sequence"
    data: DataConfig = Field(default_factory=DataConfig)
    model: dict[str, Any] = Field("hiersrec", validate_default=True,
                                  description="the main model: a name, or {name, label, <params>}")
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    baselines: list[str | dict[str, Any]] = Field(default_factory=list,
                                                  description="models evaluated beside the main one")

    @field_validator("model", mode="before")
    @classmethod
    def _validate_model(cls, value: Any) -> dict:
        return _model_spec(value, "model")

    @field_validator("baselines", mode="before")
    @classmethod
    def _validate_baselines(cls, value: Any) -> list[dict]:
        if not isinstance(value, list):
            raise ConfigError("key 'baselines': expected a list of model names or mappings")
        return [_model_spec(item, f"baselines.{i}") for i, item in enumerate(value)]

    @model_validator(mode="after")
    def _consistent(self) -> "SequenceConfig":
        labels = [spec["label"] for spec in self.model_specs()]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ConfigError(f"key 'baselines': label(s) {duplicates} used twice; give each a distinct 'label'")
        if self.eval.max_len is not None and self.eval.max_len > self.train.max_len:
            raise ConfigError(f"key 'eval.max_len': {self.eval.max_len} exceeds train.max_len "
                              f"{self.train.max_len}, the longest window the models are built for")
        return self

    def model_specs(self) -> list[dict]:
        """Main model first, then the baselines."""
        return [self.model, *(spec for spec in self.baselines if isinstance(spec, dict))]

    @property
    def eval_max_len(self) -> int:
        return self.eval.max_len or self.train.max_len


# ---- helpers shared with `hmtrec evaluate` and the artefact loader -----------------------------

def model_dir(run_dir: Path, config: SequenceConfig, label: str) -> Path:
    """Where a model's checkpoint and weights live: the run dir for the main model."""
    return RunDir(run_dir).model_dir(label, config.model["label"])


def build_sequence_model(spec: dict, prepared_or_dataset, config: SequenceConfig, directory: Path | None):
    """Build the model a spec names, with the context every sequence builder may use."""
    entry, params = validate_model_params("sequence", {k: v for k, v in spec.items() if k != "label"})
    dataset = getattr(prepared_or_dataset, "dataset", prepared_or_dataset)
    return build_model(entry, params, taxonomy=dataset.taxonomy, dataset=dataset,
                       max_len=config.train.max_len, run_dir=directory)


def check_candidate_level(model, taxonomy, settings: EvalSettings, label: str) -> None:
    """Fail before training, not after, when candidate mode cannot apply to a model."""
    if not settings.candidate_enabled:
        return
    level = settings.candidate_level or taxonomy.level_names[-2]
    finest = max(taxonomy.level_index(name) for name in model.levels)
    if taxonomy.level_index(level) >= finest:
        raise ConfigError(f"key 'eval.candidate_level': {level!r} must be coarser than the finest level model "
                          f"{label!r} predicts ({taxonomy.level_names[finest]!r}); choose a coarser level or "
                          f"turn candidates off (eval.candidate_fraction: null)")


def check_eval_levels(settings: EvalSettings, taxonomy) -> None:
    """Fail before anything is written when eval names a level the data lacks."""
    level = settings.candidate_level
    if level is not None and level not in taxonomy.level_names:
        raise ConfigError(f"key 'eval.candidate_level': the data has no level {level!r}; choose one of "
                          f"{taxonomy.level_names[:-1]}")


def count_parameters(model) -> int:
    parameters = getattr(model, "parameters", None)
    return sum(p.numel() for p in parameters()) if callable(parameters) else 0


def flat_metrics(result: dict, mode: str = "full") -> dict[str, float]:
    """{"level/metric": value} from an evaluate_model result."""
    return {f"{level}/{name}": value for level, metrics in result.get(mode, {}).items()
            for name, value in metrics.items()}


def training_batches(model, train: SequenceData, settings: TrainSection
                     ) -> tuple[Callable[[int], Iterable[dict]], Callable[[int], int] | None]:
    """The batches of one epoch, deterministic given (seed, epoch), so a resumed run replays them.
    A model with its own batching (`training_batches(train, epoch, batch_size, max_len)`) gets it."""
    own = getattr(model, "training_batches", None)
    if callable(own):
        return (lambda epoch: own(train, epoch, settings.batch_size, settings.max_len)), None
    windows = make_windows(train, settings.max_len)
    n_windows = len(windows.start)
    if n_windows == 0:
        raise HmtrecError("the training split has no target with context: nothing to train on")
    pool = settings.batch_size * LENGTH_POOL_BATCHES
    n_visited = max(1, int(round(n_windows * settings.epoch_fraction)))

    def batches(epoch: int, part: int = 0, parts: int = 1) -> Iterable[dict]:
        """The epoch's batches; `part` of `parts` (a DataLoader worker's share): every parts-th of them."""
        rng = np.random.default_rng([settings.seed, epoch])
        order = rng.permutation(n_windows)[:n_visited]
        # Within pools of shuffled windows, batch windows of similar length together (little
        # padding, so much less encoder work), then visit the batches in random order.
        chunks = []
        for first in range(0, n_visited, pool):
            members = order[first:first + pool]
            members = members[np.argsort(windows.length[members], kind="stable")]
            chunks += [members[i:i + settings.batch_size] for i in range(0, len(members), settings.batch_size)]
        for chunk in rng.permutation(len(chunks))[part::parts]:
            yield collate_windows(train, windows, chunks[chunk])

    n_batches = (n_visited // pool) * LENGTH_POOL_BATCHES + math.ceil((n_visited % pool) / settings.batch_size)
    return batches, lambda epoch: n_batches


def _monitor_key(monitor: str, model) -> str:
    if "/" in monitor:
        return monitor
    return f"{model.levels[-1]}/{monitor}"


def _validation_settings(config: SequenceConfig) -> EvalSettings:
    """Full-catalogue metrics only (candidates and segments are for the final report), with the
    monitored K included."""
    ks = set(config.eval.ks)
    if config.train.monitor is not None:
        ks.add(int(config.train.monitor.split("@")[-1]))
    return config.eval.model_copy(update={"ks": sorted(ks), "candidate_k": None, "candidate_fraction": None,
                                          "candidate_level": None, "candidate_mode": None, "segments": []})


def _validation_subset(valid: SequenceData, settings: TrainSection) -> SequenceData:
    if settings.valid_max_sequences is None or valid.n_sequences <= settings.valid_max_sequences:
        return valid
    chosen = np.random.default_rng(settings.seed).choice(valid.n_sequences, settings.valid_max_sequences,
                                                         replace=False)
    return valid.select(np.sort(chosen))


def set_threads(threads: int | None) -> int:
    """Set torch's CPU threads: `threads`, or every core this process may use when None."""
    threads = threads or usable_cores()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def versions() -> dict[str, str]:
    return {"hmtrec": getattr(hmtrec, "__version__", "unknown"),
            "torch": torch.__version__, "python": platform.python_version()}


def _check_same_run(run_dir: Path, config: SequenceConfig) -> None:
    """Refuse to mix two configs in one run directory: resuming needs the same data, models and
    training settings (evaluation settings, device and threads may change)."""
    RunDir(run_dir).check_same_run(config)


# ---- the pipeline ------------------------------------------------------------------------------

@register_pipeline("sequence")
class SequencePipeline:
    def train(self, config: SequenceConfig, run_dir: Path, *,
              on_epoch_end: Callable[[TrainState], None] | None = None) -> dict:
        """Train and evaluate the main model and the baselines; write the run directory.
        `on_epoch_end` is passed to the main model's Trainer (tests use it to interrupt a run)."""
        try:
            check_device(config.train.device)
        except ValueError as error:  # before anything is written
            raise ConfigError(f"key 'train.device': {error}") from None
        RunDir(run_dir).check_same_run(config)  # a refusal costs no data loading
        # data next: bad data or an eval level the data lacks fails before the run directory exists
        console.print(f"[bold]loading data[/bold] ({config.data.source})")
        prepared = load_data(config.data)
        check_eval_levels(config.eval, prepared.taxonomy)
        run = RunDir.begin(run_dir, config, models=[spec["label"] for spec in config.model_specs()],
                           model=config.model["label"], baselines=[spec["label"] for spec in config.baselines])
        run_dir = run.path
        log = get_logger()
        try:
            threads = set_threads(config.train.threads)
            log.info("torch CPU threads: %d (%s)", threads, "train.threads" if config.train.threads else
                     f"every usable core; train.threads: N to change")
            log.info("%s", prepared.summary())
            save_catalogue(run_dir, prepared)
            write_json(run_dir / "data.json", {**prepared.info,
                                               "filters_applied": [r.to_dict() for r in prepared.reports]})
            results: dict[str, dict] = {}
            for spec in config.model_specs():
                is_main = spec["label"] == config.model["label"]
                results[spec["label"]] = self._train_and_evaluate(
                    spec, prepared, config, model_dir(run_dir, config, spec["label"]),
                    on_epoch_end if is_main else None)
            metrics = {"data": {"name": prepared.dataset.name, **prepared.info["counts"],
                                "n_items": prepared.taxonomy.n_leaves},
                       "models": results}
            write_json(run_dir / "metrics.json", metrics)
            write_text(run_dir / "metrics.md", results_table(results))
            print_tables(results, config.eval.ks, prepared.taxonomy)
            run.finish()
            return metrics
        finally:
            run.close()

    def _train_and_evaluate(self, spec: dict, prepared: PreparedData, config: SequenceConfig, directory: Path,
                            on_epoch_end: Callable[[TrainState], None] | None) -> dict:
        log = get_logger()
        label = spec["label"]
        directory.mkdir(parents=True, exist_ok=True)
        seed_everything(config.train.seed)
        model = build_sequence_model(spec, prepared, config, directory)
        check_candidate_level(model, prepared.taxonomy, config.eval, label)
        console.print(f"[bold]{label}[/bold]: {count_parameters(model):,} parameters")
        started = time.perf_counter()
        if getattr(model, "trainable", True):
            model.fit(prepared.train)   # statistics a trainable model keeps beside its weights (a hybrid's kNN)
            training = self._fit_trainable(model, prepared, config, directory, on_epoch_end)
            tune = getattr(model, "tune_on_validation", None)
            if callable(tune):          # settings chosen after training, on the valid split (never test)
                training["tuned"] = tune(_validation_subset(prepared.valid, config.train), max_len=config.eval_max_len)
        else:
            model.fit(prepared.train)
            training = {"fit_seconds": time.perf_counter() - started}
        save_weights(directory / MAIN_WEIGHTS, model.state_dict())
        training["parameters"] = count_parameters(model)
        console.print(f"[bold]evaluating {label}[/bold] on {prepared.test.n_targets:,} test cases")
        result = evaluate_model(model, prepared.test, prepared.taxonomy, config.eval, max_len=config.eval_max_len,
                                train=prepared.train)
        result["training"] = training
        log.info("%s test: %s", label, flat_metrics(result))
        return result

    def _fit_trainable(self, model, prepared: PreparedData, config: SequenceConfig, directory: Path,
                       on_epoch_end) -> dict:
        settings = config.train
        validate = None
        if settings.monitor is not None:
            valid = _validation_subset(prepared.valid, settings)
            valid_settings = _validation_settings(config)
            monitor_key = _monitor_key(settings.monitor, model)

            def validate(trained) -> dict:
                metrics = flat_metrics(evaluate_model(trained, valid, prepared.taxonomy, valid_settings,
                                                      max_len=config.eval_max_len))
                if monitor_key not in metrics:
                    raise ConfigError(f"key 'train.monitor': {monitor_key!r} is not among the validation "
                                      f"metrics {sorted(metrics)}")
                return {**metrics, "monitored": metrics[monitor_key]}

        batches, steps = training_batches(model, prepared.train, settings)
        own_steps = getattr(model, "training_steps", None)
        if steps is None and callable(own_steps):
            n_steps = own_steps(prepared.train, settings.batch_size, settings.max_len)
            steps = lambda epoch: n_steps  # noqa: E731
        trainer = Trainer(model, settings.trainer_settings(), directory, validate=validate, on_epoch_end=on_epoch_end)
        state = trainer.fit(batches, steps)
        epoch_seconds = [record["epoch_seconds"] for record in state.history]
        return {"epochs": state.epoch, "best_epoch": state.best_epoch or state.epoch,
                "stopped_early": state.stopped_early, "stopped_by_budget": state.stopped_by_budget,
                "budget_minutes": settings.budget_minutes, "precision": state.precision or settings.precision,
                "precision_reason": state.precision_reason, "train_seconds": state.train_seconds,
                "fit_seconds": state.fit_seconds, "fit_cpu_seconds": state.fit_cpu_seconds,
                "epoch_seconds": float(np.mean(epoch_seconds)) if epoch_seconds else 0.0,
                "history": state.history}

    def evaluate(self, run_dir: Path, overrides: list[str]) -> dict:
        """Reload a run's models and evaluate them on the test split again; `overrides` may change
        eval.* (e.g. eval.candidate_fraction=0.1), data.path, train.device and train.threads."""
        from hmtrec.serve.artefact import load_sequence_run

        for item in overrides:
            key = item.split("=", 1)[0].strip()
            if not any(key == prefix or key.startswith(prefix) for prefix in EVALUATION_OVERRIDES):
                raise ConfigError(f"--set {key}: `hmtrec evaluate` can only change eval.*, data.path, "
                                  f"train.device and train.threads (the rest describes the trained models)")
        run = RunDir(run_dir)
        run.require_done("`hmtrec evaluate`")
        config = run.read_config(overrides)
        set_threads(config.train.threads)
        run = RunDir.open_existing(run_dir, "sequence")
        run_dir = run.path
        try:
            get_logger().info("evaluate with overrides %s", list(overrides))
            artefact = load_sequence_run(run_dir, config=config)
            prepared = load_data(config.data)
            check_eval_levels(config.eval, prepared.taxonomy)
            artefact.check_catalogue(prepared.taxonomy)
            artefact.fit_missing(prepared.train)
            device = resolve_device(config.train.device)
            results = {}
            for label, model in artefact.models.items():
                console.print(f"[bold]evaluating {label}[/bold] on {prepared.test.n_targets:,} test cases")
                results[label] = evaluate_model(model.to(device), prepared.test, prepared.taxonomy, config.eval,
                                                max_len=config.eval_max_len, train=prepared.train)
                get_logger().info("%s test: %s", label, flat_metrics(results[label]))
            write_json(run_dir / "evaluation.json", {"overrides": list(overrides), "models": results})
            print_tables(results, config.eval.ks, prepared.taxonomy)
            return results
        finally:
            run.close()


def print_tables(results: dict[str, dict], ks: list[int], taxonomy=None) -> None:
    """The results on the console, one table per K so each fits an 80-column terminal; a note
    for each level with no more nodes than K (its Recall@K is 1 for any model)."""
    for k in ks:
        print_results(results, metrics=[f"Recall@{k}", f"MRR@{k}", f"NDCG@{k}"])
        for level in (taxonomy.level_names if taxonomy is not None else []):
            if taxonomy.n_nodes(level) <= k:
                console.print(f"note: level {level!r} has {taxonomy.n_nodes(level)} nodes <= K={k}: "
                              f"its Recall@{k} is 1.0 for every model")


def save_catalogue(run_dir: Path, prepared: PreparedData) -> None:
    """taxonomy.json (tree and leaf labels) and leaf_text.json: what inference needs of the data."""
    prepared.taxonomy.save(run_dir / "taxonomy.json")
    if prepared.dataset.leaf_text is not None:
        write_json(run_dir / "leaf_text.json", {"text": [None if t is None else str(t)
                                                         for t in prepared.dataset.leaf_text]})


def read_run_config(run_dir: Path) -> SequenceConfig:
    run = RunDir(run_dir)
    run.read_info("sequence")
    return run.read_config()
