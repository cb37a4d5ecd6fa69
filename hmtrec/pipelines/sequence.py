"""The sequence kind (config kind "sequence"): its config, data, windows, the fit of one model and
its evaluation; the run lifecycle around them (run directory, same-run check, per-model loop,
status, `hmtrec evaluate`) is `hmtrec.lifecycle`.

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

import copy
import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from hmtrec.config import StrictModel, register_config
from hmtrec.data.loading import DataConfig, PreparedData, load_data
from hmtrec.data.sequences import SequenceData, collate_windows, index_dtype, make_windows
from hmtrec.errors import ConfigError, HmtrecError
from hmtrec.evaluate.ranking import EvalSettings, evaluate_model
from hmtrec.evaluate.report import print_results, results_table
from hmtrec.models.families import SEQUENCE_WINDOWS
from hmtrec.models.registry import validate_model_params
from hmtrec.lifecycle import LrScheduleSettings, RunKind, TrainSettings, check_final_fit, fit_trainable, register_kind, set_threads  # noqa: F401
from hmtrec.progress import console
from hmtrec.rundir import SELECTION_DIR, RunDir, check_label, get_logger, save_weights, versions, write_json, write_text  # noqa: F401
from hmtrec.train.trainer import TrainerSettings, TrainState, resolve_device

MAIN_WEIGHTS = "model.safetensors"
BASELINES_DIR = "baselines"
LENGTH_POOL_BATCHES = 50  # batches per pool of windows sorted by length


class TrainSection(TrainSettings, LrScheduleSettings):
    """The `train:` section: how every trainable model of the run is trained (the shared keys of
    `hmtrec.lifecycle.TrainSettings`, plus windows, schedule, budget, precision and monitor)."""

    batch_size: int = Field(128, ge=1, description="windows per training batch")
    max_len: int = Field(50, ge=1, description="longest context window, in events")
    epoch_fraction: float = Field(1.0, gt=0, le=1, description="share of the training windows each epoch "
                                  "visits (a different random share every epoch); 1: all")
    budget_minutes: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="wall-clock budget per model (training plus validation): "
        "stop after the epoch that passes it and record that it did; null: none")
    budget_clock: Literal["wall", "cpu"] = Field(
        "wall", description="what the budget counts: wall (elapsed time) or cpu (process CPU time / threads: the "
                            "time an otherwise idle machine would need, so other processes do not shorten the run)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16: forward pass and loss under bfloat16 autocast (weights, optimiser and "
                            "evaluation stay float32); much faster full-softmax heads on CPUs with bf16 units. "
                            "auto: fp32 on a CPU without native bf16 (emulated bf16 is ~16x slower), else the "
                            "faster of the two in a short probe timed in CPU time (logged)")
    monitor: str | None = Field(
        "MRR@20", description="validation metric that picks the best epoch: METRIC (at the finest level "
                              "the model scores) or LEVEL/METRIC; null: no validation, keep the last epoch")
    monitor_mode: Literal["max", "min"] = "max"
    valid_max_sequences: int | None = Field(
        None, ge=1, description="validate on a fixed random subset of this many valid sequences (speed)")
    resume: bool = Field(True, description="continue from checkpoint.pt when the run directory has one")
    final_fit: bool = Field(
        False, description="after the epoch is chosen on valid, train the model afresh on train + valid for that "
                           "many epochs along the same learning-rate curve, and keep that model (evaluated, saved, "
                           "served); the selection model's test figures are recorded beside it (training.selection). "
                           "Costs a second training; models without training are fitted on train + valid")
    sparse_updates: bool | Literal["auto"] = Field(
        "auto", description="sparse gradients and lazy Adam (hmtrec.train.trainer.LazyAdam) for the item tables a "
                            "model trains sparsely (HierSRec with item_loss: sampled): a step updates only the rows "
                            "it used; auto: on where the model offers it, weight_decay is 0 and not under torchrun")

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
        return super().trainer_settings(
            monitor=self.monitor and "monitored", monitor_mode=self.monitor_mode, precision=self.precision,
            budget_minutes=self.budget_minutes, budget_clock=self.budget_clock, monitor_label=self.monitor,
            sparse_updates=self.sparse_updates)


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
    # besides hmtrec.rundir.RESUMABLE_CHANGES, a resumed run may change: a budget bounds how long
    # the run trains, not what it learns per epoch
    resumable_changes: ClassVar[tuple[str, ...]] = ("train.budget_minutes", "train.budget_clock")

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
        if self.train.final_fit and self.train.monitor is None:
            raise ConfigError("key 'train.final_fit': needs train.monitor, the validation metric that chooses the "
                              "number of epochs the final fit trains")
        check_final_fit(self.train.final_fit, self.data)
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

def build_sequence_model(spec: dict, prepared_or_dataset, config: SequenceConfig, directory: Path | None):
    """Build the model a spec names, with the context every sequence builder may use."""
    from hmtrec.serve.artefact import build_sequence_model as build

    return build(spec, getattr(prepared_or_dataset, "dataset", prepared_or_dataset), config.train.max_len, directory)


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
        # a permutation drawn in place in the narrowest index type (the same draws as
        # rng.permutation): the epoch's plan is one such array, the batches are slices of it
        order = np.arange(n_windows, dtype=index_dtype(n_windows))
        rng.shuffle(order)
        order = order[:n_visited]
        # Within pools of shuffled windows, batch windows of similar length together (little
        # padding, so much less encoder work), then visit the batches in random order.
        bounds = []
        for first in range(0, n_visited, pool):
            members = order[first:first + pool]
            members[:] = members[np.argsort(windows.length[members], kind="stable")]
            bounds += [(low, min(low + settings.batch_size, first + len(members)))
                       for low in range(first, first + len(members), settings.batch_size)]
        train.release_mapped_pages()   # what the set-up's scans read; batches read shards by pread
        for chunk in rng.permutation(len(bounds))[part::parts]:
            low, high = bounds[chunk]
            yield collate_windows(train, windows, order[low:high])

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


# ---- the kind -----------------------------------------------------------------------------------

@register_kind
class SequenceKind(RunKind):
    """Sequence windows: every model of `model` and `baselines`, trained on causal windows (or the
    model's own `training_batches`) when trainable, else fitted; evaluated on the test split."""

    name = "sequence"
    config_class = SequenceConfig
    batch_contract = SEQUENCE_WINDOWS
    evaluation_overrides = ("eval", "data.path", "train.device", "train.threads")

    def model_labels(self, config: SequenceConfig) -> list[str]:
        return [spec["label"] for spec in config.model_specs()]

    def run_info(self, config: SequenceConfig, prepared) -> dict:
        return {"model": config.model["label"], "baselines": [spec["label"] for spec in config.baselines]}

    def prepare(self, config: SequenceConfig, *, for_evaluation: bool = False) -> PreparedData:
        console.print(f"[bold]loading data[/bold] ({config.data.source})")
        prepared = load_data(config.data, with_train_all=config.train.final_fit)
        check_eval_levels(config.eval, prepared.taxonomy)   # an eval level the data lacks fails first
        return prepared

    def save_data(self, run: RunDir, config: SequenceConfig, prepared: PreparedData) -> None:
        get_logger().info("%s", prepared.summary())
        save_catalogue(run.path, prepared)
        write_json(run.path / "data.json", {**prepared.info,
                                            "filters_applied": [r.to_dict() for r in prepared.reports]})

    def build(self, label: str, run: RunDir, config: SequenceConfig, prepared: PreparedData):
        spec = next(spec for spec in config.model_specs() if spec["label"] == label)
        directory = run.model_dir(label, config.model["label"])
        directory.mkdir(parents=True, exist_ok=True)
        model = build_sequence_model(spec, prepared, config, directory)
        check_candidate_level(model, prepared.taxonomy, config.eval, label)
        console.print(f"[bold]{label}[/bold]: {count_parameters(model):,} parameters")
        return model

    def fit(self, label: str, model, run: RunDir, config: SequenceConfig, prepared: PreparedData,
            on_epoch_end: Callable[[TrainState], None] | None) -> dict:
        directory = run.model_dir(label, config.model["label"])
        started = time.perf_counter()
        if not getattr(model, "trainable", True):
            model.fit(prepared.fitting_split(config.train.final_fit))
            training = {"fit_seconds": time.perf_counter() - started}
        elif config.train.final_fit:
            training = self._final_fit(model, prepared, config, directory, on_epoch_end)
        else:
            training = self._train_and_tune(model, prepared, config, directory, on_epoch_end)
        save_weights(directory / MAIN_WEIGHTS, model.state_dict())
        training["parameters"] = count_parameters(model)
        return training

    def _train_and_tune(self, model, prepared: PreparedData, config: SequenceConfig, directory: Path,
                        on_epoch_end) -> dict:
        """Train on the training split, the epoch chosen on valid, then the settings a model chooses
        after training (a hybrid's kNN weight), on valid too (never test)."""
        model.fit(prepared.train)   # statistics a trainable model keeps beside its weights (a hybrid's kNN)
        training = self._fit_trainable(model, prepared, config, directory, on_epoch_end)
        tune = getattr(model, "tune_on_validation", None)
        if callable(tune):
            training["tuned"] = tune(_validation_subset(prepared.valid, config.train), max_len=config.eval_max_len)
        return training

    def _final_fit(self, model, prepared: PreparedData, config: SequenceConfig, directory: Path,
                   on_epoch_end) -> dict:
        """`train.final_fit`: a copy of the untrained model is trained as usual in `selection/` (the
        epoch and any post-training setting chosen on valid) and scored on test; then `model` is
        trained on train + valid for the selection's best number of epochs, its learning rate
        following the selection run's curve epoch by epoch (the same horizon in epochs), and takes
        the selection's post-training settings. Both stages resume from their own checkpoints."""
        tune, adopt = getattr(model, "tune_on_validation", None), getattr(model, "adopt_tuned", None)
        if callable(tune) and not callable(adopt):
            raise ConfigError(f"key 'train.final_fit': model {type(model).__name__} chooses settings on valid "
                              f"after training but cannot pass them on to a final fit (no adopt_tuned)")
        selection = copy.deepcopy(model)        # the same initial weights as `model`
        selection_dir = directory / SELECTION_DIR
        selection_dir.mkdir(parents=True, exist_ok=True)
        chosen = self._train_and_tune(selection, prepared, config, selection_dir, on_epoch_end)
        result = evaluate_model(selection, prepared.test, prepared.taxonomy, config.eval, max_len=config.eval_max_len,
                                train=prepared.train)
        chosen["test"] = {mode: result[mode] for mode in ("full", "candidate") if mode in result}
        get_logger().info("final fit: the selection model (best epoch %d of %d) test: %s", chosen["best_epoch"],
                          chosen["epochs"], flat_metrics(result))
        del selection

        train_all, settings = prepared.train_all, config.train
        model.fit(train_all)
        final_settings = dataclasses.replace(
            settings.trainer_settings(), epochs=chosen["best_epoch"], schedule_epochs=settings.epochs,
            monitor=None, patience=None, budget_minutes=None, precision=chosen["precision"])
        batches, steps = self._batches(model, train_all, settings)
        state = fit_trainable(model, final_settings, directory, batches, steps, on_epoch_end=on_epoch_end)
        if "tuned" in chosen:
            adopt(chosen["tuned"])
        get_logger().info("final fit: %d epoch(s) on train + valid (%s targets) in %.0f s", state.epoch,
                          f"{train_all.n_targets:,}", state.train_seconds)
        final = self._summary(state, final_settings.budget_minutes, settings.precision)
        final.update(train_targets=train_all.n_targets, schedule_epochs=settings.epochs)
        # the bench tables read the selection's validation curve and best epoch; training time is both stages'
        training = {key: value for key, value in chosen.items() if key not in ("test",)}
        training.update(final_fit=final, selection={"test": chosen["test"], "best_epoch": chosen["best_epoch"],
                                                    "epochs": chosen["epochs"]},
                        train_seconds=chosen["train_seconds"] + state.train_seconds,
                        fit_seconds=chosen["fit_seconds"] + state.fit_seconds,
                        fit_cpu_seconds=chosen["fit_cpu_seconds"] + state.fit_cpu_seconds)
        return training

    @staticmethod
    def _batches(model, train: SequenceData, settings: TrainSection):
        batches, steps = training_batches(model, train, settings)
        own_steps = getattr(model, "training_steps", None)
        if steps is None and callable(own_steps):
            n_steps = own_steps(train, settings.batch_size, settings.max_len)
            steps = lambda epoch: n_steps  # noqa: E731
        return batches, steps

    @staticmethod
    def _summary(state: TrainState, budget_minutes: float | None, precision: str) -> dict:
        epoch_seconds = [record["epoch_seconds"] for record in state.history]
        return {"epochs": state.epoch, "best_epoch": state.best_epoch or state.epoch,
                "stopped_early": state.stopped_early, "stopped_by_budget": state.stopped_by_budget,
                "budget_minutes": budget_minutes, "precision": state.precision or precision,
                "precision_reason": state.precision_reason, "train_seconds": state.train_seconds,
                "fit_seconds": state.fit_seconds, "fit_cpu_seconds": state.fit_cpu_seconds,
                "epoch_seconds": float(np.mean(epoch_seconds)) if epoch_seconds else 0.0,
                "history": state.history}

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

        batches, steps = self._batches(model, prepared.train, settings)
        state = fit_trainable(model, settings.trainer_settings(), directory, batches, steps, validate=validate,
                              on_epoch_end=on_epoch_end)
        return self._summary(state, settings.budget_minutes, settings.precision)

    def evaluate_model(self, label: str, model, run: RunDir | None, config: SequenceConfig,
                       prepared: PreparedData, training: dict | None) -> dict:
        console.print(f"[bold]evaluating {label}[/bold] on {prepared.test.n_targets:,} test cases")
        result = evaluate_model(model, prepared.test, prepared.taxonomy, config.eval, max_len=config.eval_max_len,
                                train=prepared.fitting_split(config.train.final_fit))
        if training is not None:
            result["training"] = training
        get_logger().info("%s test: %s", label, flat_metrics(result))
        return result

    def summary(self, config: SequenceConfig, prepared: PreparedData, results: dict[str, dict],
                training: dict[str, dict]) -> dict:
        return {"data": {"name": prepared.dataset.name, **prepared.info["counts"],
                         "n_items": prepared.taxonomy.n_leaves},
                "models": results}

    def report(self, run: RunDir, config: SequenceConfig, prepared: PreparedData, results: dict[str, dict],
               metrics: dict) -> None:
        write_text(run.path / "metrics.md", results_table(results))
        print_tables(results, config.eval.ks, prepared.taxonomy)

    # `hmtrec evaluate`: the saved models, refitted where they keep no tensors
    def load_saved(self, run: RunDir, config: SequenceConfig, info: dict):
        from hmtrec.serve.artefact import load_sequence_run

        return load_sequence_run(run.path, config=config)

    def ready(self, artefact, config: SequenceConfig, prepared: PreparedData, info: dict) -> dict[str, Any]:
        artefact.check_catalogue(prepared.taxonomy)
        artefact.fit_missing(prepared.fitting_split(config.train.final_fit))
        device = resolve_device(config.train.device)
        return {label: model.to(device) for label, model in artefact.models.items()}

    def print_evaluation(self, config: SequenceConfig, prepared: PreparedData, results: dict[str, dict]) -> None:
        print_tables(results, config.eval.ks, prepared.taxonomy)


SequencePipeline = SequenceKind  # the older name


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
