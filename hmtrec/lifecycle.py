"""One run lifecycle: train, evaluate and load a run directory, the same way for every config kind.

    from hmtrec.lifecycle import get_kind, train, evaluate
    train(get_kind("sequence"), config, "runs/qs")       # `get_pipeline(kind).train(config, run_dir)` too
    evaluate(get_kind("ranking"), "runs/hinet", ["eval.groups=[user_activity]"])

The lifecycle owns everything a run directory guarantees (see `hmtrec.rundir`), so each guarantee
holds for every kind because it is written once, here:

train:  the device is checked -> the same-run check (kind and resolved config; nothing is read or
        written before it) -> torch threads -> the kind prepares its data (bad data fails before the
        run directory is written) -> `RunDir.begin` (lock, config.yaml, run.json with status
        "training") -> the kind saves what inference needs of the data -> per model, main first:
        seed, build, check its batch contract against the kind's (`hmtrec.models.families`), fit
        (a trainable model resumes from its checkpoint through the Trainer), evaluate on
        test -> metrics.json -> the kind's derived files and tables -> status "done", written last.
refit:  only the keys fitted after training (the config's `refit_keys`) and the evaluation keys may
        be overridden -> the run must be done -> the same-run check ignores those keys only -> the
        trained weights are loaded (copied first into a new run directory, or in place), the stage
        fitted again, every model evaluated on test -> metrics.json -> status "done", last.
evaluate: only the kind's evaluation keys may be overridden -> the run must be done -> its config
        is read with the overrides and validated again -> lock and log -> the saved models are
        loaded, the data prepared, each model evaluated -> the kind's evaluation file.
load:   `open_finished` (a run of the kind, status done, its config validated again): the one
        entry every consumer (`hmtrec.load`, serving, export, calibration) reads a run through.

A kind (`RunKind`, one per module in hmtrec/pipelines/) supplies only what differs: its config
model, data, batches, the fit of one model, evaluation and what it prints. Kinds are found by the
config registry's `kind` (`hmtrec.config.KIND_MODULES`), so this module imports none of them.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

from pydantic import Field, field_validator

from hmtrec.config import KIND_MODULES, StrictModel
from hmtrec.errors import ConfigError
from hmtrec.models.families import check_family
from hmtrec.rundir import RunDir, get_logger, write_json


# ---- the train settings every kind shares ------------------------------------------------------

class TrainSettings(StrictModel):
    """The `train:` keys that mean the same in every kind. A kind's `train:` section subclasses
    this (changing only defaults and bounds it documents) and adds its own keys."""

    epochs: int = Field(10, ge=0)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)
    grad_clip: float | None = Field(5.0, gt=0, allow_inf_nan=False)
    seed: int = 0
    patience: int | None = Field(None, ge=1, description="stop after this many epochs without improvement")
    device: str = Field("cpu", description="cpu, cuda, cuda:1, mps or auto")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: every core this process "
                                                         "may use)")

    @field_validator("device")
    @classmethod
    def _check_device_name(cls, value: str) -> str:
        import torch

        try:
            torch.device(value) if value != "auto" else None
        except (RuntimeError, ValueError):
            raise ValueError(f"unknown device {value!r}; expected cpu, cuda, cuda:N, mps or auto") from None
        return value

    def trainer_settings(self, **kind_specific):
        """The Trainer's settings from the shared keys (and the schedule keys, in a kind whose
        section mixes in `LrScheduleSettings`), plus what the kind decides (monitor, ...)."""
        from hmtrec.train.trainer import TrainerSettings

        shared = dict(epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay, grad_clip=self.grad_clip,
                      seed=self.seed, device=self.device, patience=self.patience,
                      resume=getattr(self, "resume", True))
        if isinstance(self, LrScheduleSettings):
            shared.update(self.schedule_settings())
        return TrainerSettings(**{**shared, **kind_specific})


class LrScheduleSettings(StrictModel):
    """The learning-rate schedule keys, for a kind whose `train:` section offers one (mixed in beside
    `TrainSettings`). The Trainer applies it per optimiser step (`hmtrec.train.trainer.lr_factor`);
    its horizon (epochs x the first epoch's steps) is fixed at the first epoch and kept in the
    checkpoint, so a resumed run continues the same curve."""

    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="after the warm-up: constant, or cosine / linear decay to lr * lr_floor at the "
                                "last step of the last epoch")
    warmup_fraction: float = Field(0.0, ge=0, lt=1, description="share of all training steps spent warming the "
                                   "learning rate up linearly from lr / warm-up steps to lr")
    lr_floor: float = Field(0.0, ge=0, le=1, description="the decay ends at lr * lr_floor")

    def schedule_settings(self) -> dict:
        """The Trainer's schedule settings (`TrainerSettings` keyword arguments)."""
        return dict(lr_schedule=self.lr_schedule, warmup_fraction=self.warmup_fraction, lr_floor=self.lr_floor)


def check_final_fit(final_fit: bool, data) -> None:
    """A final fit (`train.final_fit`) chooses its epochs on the valid split, so that split must not
    be trained on before (`data.split.train_on_all`)."""
    if final_fit and data.split.train_on_all:
        raise ConfigError("keys 'train.final_fit' and 'data.split.train_on_all': choose one; a final fit "
                          "chooses its epochs on the valid split, which train_on_all trains on")


def set_threads(threads: int | None) -> int:
    """Set torch's CPU threads: `threads`, or every core this process may use when None."""
    import torch

    from hmtrec.train.trainer import usable_cores

    threads = threads or usable_cores()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def check_device(name: str) -> None:
    """A device this machine lacks fails before anything is read or written, naming the key."""
    from hmtrec.train.trainer import check_device as available

    try:
        available(name)
    except ValueError as error:
        raise ConfigError(f"key 'train.device': {error}") from None


def fit_trainable(model, settings, directory: Path, batches: Callable[[int], Iterable[dict]],
                  steps: Callable[[int], int] | None, *, validate: Callable | None = None,
                  on_epoch_end: Callable | None = None):
    """Train (or resume from `directory`'s checkpoint) one model with the shared Trainer; its state."""
    from hmtrec.train.trainer import Trainer

    return Trainer(model, settings, directory, validate=validate, on_epoch_end=on_epoch_end).fit(batches, steps)


# ---- what a kind supplies ------------------------------------------------------------------------

class RunKind:
    """One config kind's part of the lifecycle. Subclasses set `name`, `config_class`,
    `evaluation_overrides` and implement the methods that raise NotImplementedError."""

    name: str = ""
    config_class: type = StrictModel
    batch_contract: str = ""   # the batches it feeds its models (hmtrec.models.families)
    # the keys `hmtrec evaluate --set` may change (a key or a section); the rest describes the models
    evaluation_overrides: tuple[str, ...] = ("eval", "train.device", "train.threads")
    evaluation_file = "evaluation.json"

    # training
    def model_labels(self, config) -> list[str]:
        """Every model of the run, the main one first (labels are checked as plain names)."""
        raise NotImplementedError

    def prepare(self, config, *, for_evaluation: bool = False) -> Any:
        """Load and check the data; nothing of the run directory is written yet."""
        raise NotImplementedError

    def run_info(self, config, data) -> dict:
        """Fields run.json records beside kind, models, status, versions and config hash."""
        return {"model": self.model_labels(config)[0]}

    def save_data(self, run: RunDir, config, data) -> None:
        """What inference needs of the data (catalogue, vocabularies), and the data's summary."""

    def build(self, label: str, run: RunDir, config, data) -> Any:
        """One model, untrained, with what its builder needs of the data."""
        raise NotImplementedError

    def fit(self, label: str, model, run: RunDir, config, data, on_epoch_end: Callable | None) -> dict:
        """Train (resuming from its checkpoint) or fit one model on the kind's batches, and save its
        weights; its training summary."""
        raise NotImplementedError

    def evaluate_model(self, label: str, model, run: RunDir | None, config, data, training: dict | None) -> dict:
        """One model's test results (`training` is its summary when it was just trained)."""
        raise NotImplementedError

    def summary(self, config, data, results: dict[str, dict], training: dict[str, dict]) -> dict:
        """metrics.json from every model's test results and training summaries."""
        return {"models": results}

    def report(self, run: RunDir, config, data, results: dict[str, dict], metrics: dict) -> None:
        """Derived files (written atomically, before the status) and the console tables."""

    # evaluation of a finished run
    def load_saved(self, run: RunDir, config, info: dict) -> Any:
        """The run's saved models (the kind's loaded artefact), before the data is prepared."""
        raise NotImplementedError

    def ready(self, loaded, config, data, info: dict) -> dict[str, Any]:
        """label -> model as evaluation needs it, given the data (refits what keeps no saved state)."""
        raise NotImplementedError

    def evaluate_saved_model(self, label: str, model, config, data) -> dict:
        return self.evaluate_model(label, model, None, config, data, None)

    def evaluation_record(self, overrides: list[str], results: dict[str, dict]) -> dict:
        return {"overrides": list(overrides), "models": results}

    def evaluation_result(self, record: dict) -> dict:
        return record["models"]

    def print_evaluation(self, config, data, results: dict[str, dict]) -> None:
        """The re-evaluated tables on the console."""

    # `hmtrec refit`: the stages fitted after training, again, on the trained weights
    def refit_main(self, label: str, run: RunDir, config, data, previous: dict) -> tuple[Any, dict]:
        """The main model with its trained weights and its post-training stage fitted again under
        `config` (its weights saved); its training summary (`previous`: the run's metrics.json)."""
        raise ConfigError(f"`hmtrec refit`: a {self.name} run has no stage fitted after training")

    # the Pipeline interface (`get_pipeline(kind).train(config, run_dir)`)
    def train(self, config, run_dir: str | Path, *, on_epoch_end: Callable | None = None) -> dict:
        return train(self, config, run_dir, on_epoch_end=on_epoch_end)

    def evaluate(self, run_dir: str | Path, overrides: list[str]) -> dict:
        return evaluate(self, run_dir, overrides)


_KINDS: dict[str, RunKind] = {}


def register_kind(cls):
    """Class decorator: the kind `cls.name` is run by an instance of `cls`."""
    _KINDS[cls.name] = cls()
    return cls


def get_kind(name: str) -> RunKind:
    if name not in _KINDS and name in KIND_MODULES:
        importlib.import_module(KIND_MODULES[name])
    if name not in _KINDS:
        raise ConfigError(f"key 'kind': no pipeline for {name!r}; known: {sorted(KIND_MODULES)}")
    return _KINDS[name]


# ---- the lifecycle -------------------------------------------------------------------------------

def train(kind: RunKind, config, run_dir: str | Path, *, on_epoch_end: Callable | None = None) -> dict:
    """Train (or resume) every model of `config` into `run_dir`; metrics.json's content.
    `on_epoch_end` goes to the main model's Trainer (tests use it to interrupt a run)."""
    check_device(config.train.device)
    RunDir(run_dir).check_same_run(config)          # a refusal costs no data loading
    threads = set_threads(config.train.threads)
    data = kind.prepare(config)                     # bad data fails before the run directory is written
    labels = kind.model_labels(config)
    run = RunDir.begin(run_dir, config, models=labels, **kind.run_info(config, data))
    try:
        get_logger().info("torch CPU threads: %d (%s)", threads, "train.threads" if config.train.threads else
                          "every usable core; train.threads: N to change")
        kind.save_data(run, config, data)
        from hmtrec.train.trainer import seed_everything

        results: dict[str, dict] = {}
        training: dict[str, dict] = {}
        for label in labels:
            seed_everything(config.train.seed)      # each model's initial weights depend on the seed only
            model = kind.build(label, run, config, data)
            check_family(model, kind.batch_contract, label)   # before any training: the model reads these batches
            training[label] = kind.fit(label, model, run, config, data, on_epoch_end if label == labels[0] else None)
            results[label] = kind.evaluate_model(label, model, run, config, data, training[label])
        metrics = kind.summary(config, data, results, training)
        write_json(run.path / "metrics.json", metrics)
        kind.report(run, config, data, results, metrics)
        run.finish()                                # last: every output is complete
        return metrics
    finally:
        run.close()


def refit_keys(config) -> tuple[str, ...]:
    """The config keys fitted after training (the config's `refit_keys()`, none by default)."""
    return tuple(getattr(config, "refit_keys", lambda: ())())


def refit(kind: RunKind, run_dir: str | Path, overrides: list[str], *, into: str | Path | None = None) -> dict:
    """Fit a finished run's post-training stage again on its trained weights, with post-training keys
    (and evaluation keys) overridden, and evaluate it on test: into the run itself, or into `into`
    (a new run directory, the source's files copied; the source is left as it was). A training key
    is refused, as is an `into` holding another trained run. metrics.json's content."""
    import shutil

    from hmtrec.rundir import read_json
    from hmtrec.train.trainer import seed_everything

    overrides = list(overrides or [])
    source = RunDir(run_dir)
    source.read_info(kind.name)
    source.require_done("`hmtrec refit`")
    config = source.read_config(overrides)          # validated again, overrides included
    allowed = refit_keys(config)
    if not allowed:
        raise ConfigError(f"`hmtrec refit`: a {kind.name} run has no stage fitted after training; "
                          f"`hmtrec evaluate` re-evaluates it")
    for item in overrides:
        key = str(item).split("=", 1)[0].strip()
        if not any(key == prefix or key.startswith(prefix + ".") for prefix in (*kind.evaluation_overrides, *allowed)):
            raise ConfigError(f"--set {key}: `hmtrec refit` of a {kind.name} run can only change the keys fitted "
                              f"after training ({', '.join(allowed) or 'none'}) and the evaluation keys "
                              f"({', '.join(kind.evaluation_overrides)}); the rest describes the trained model: "
                              f"train a new run")
    check_device(config.train.device)
    target = Path(into) if into is not None else source.path
    in_place = target.resolve() == source.path.resolve()
    RunDir(target).check_same_run(config, allowed)  # nothing written before it
    previous = read_json(source.path / "metrics.json")
    threads = set_threads(config.train.threads)
    data = kind.prepare(config)
    if not in_place:
        target.mkdir(parents=True, exist_ok=True)
        for item in source.path.iterdir():          # the trained state; the run's own records are rewritten
            if item.name in (".lock", "log.txt", "run.json", "config.yaml", "metrics.json", kind.evaluation_file):
                continue
            (shutil.copytree(item, target / item.name, dirs_exist_ok=True) if item.is_dir()
             else shutil.copy2(item, target / item.name))
    labels = kind.model_labels(config)
    run = RunDir.begin(target, config, models=labels, refittable=allowed, **kind.run_info(config, data))
    try:
        get_logger().info("refit of %s with overrides %s (torch CPU threads: %d)", source.path, overrides, threads)
        results: dict[str, dict] = {}
        training: dict[str, dict] = {}
        for label in labels:
            seed_everything(config.train.seed)
            if label == labels[0]:
                model, training[label] = kind.refit_main(label, run, config, data, previous)
                training[label]["refit"] = {"from": str(source.path), "overrides": overrides}
            else:
                model = kind.build(label, run, config, data)
                training[label] = kind.fit(label, model, run, config, data, None)
            results[label] = kind.evaluate_model(label, model, run, config, data, training[label])
        metrics = kind.summary(config, data, results, training)
        write_json(run.path / "metrics.json", metrics)
        kind.report(run, config, data, results, metrics)
        run.finish()
        return metrics
    finally:
        run.close()


def check_evaluation_overrides(kind: RunKind, overrides: Iterable[str]) -> None:
    allowed = kind.evaluation_overrides
    for item in overrides:
        key = str(item).split("=", 1)[0].strip()
        if not any(key == prefix or key.startswith(prefix + ".") for prefix in allowed):
            shown = ", ".join(f"{p}.*" if "." not in p and p not in ("baselines",) else p for p in allowed)
            raise ConfigError(f"--set {key}: `hmtrec evaluate` of a {kind.name} run can only change {shown} "
                              f"(the rest describes the trained models)")


def open_finished(run_dir: str | Path, kind: str | None, consumer: str):
    """(RunDir, run.json, config) of a finished run (of `kind`, when given), its config validated
    again: how every consumer of a run's outputs reads it."""
    run = RunDir(run_dir)
    info = run.read_info(kind)
    run.require_done(consumer)
    return run, info, run.read_config()


def evaluate(kind: RunKind, run_dir: str | Path, overrides: list[str]) -> dict:
    """Reload a finished run's models and evaluate them on the test split again, with evaluation
    keys overridden; writes the kind's evaluation file (with the overrides used)."""
    overrides = list(overrides or [])
    check_evaluation_overrides(kind, overrides)
    run = RunDir(run_dir)
    info = run.read_info(kind.name)
    run.require_done("`hmtrec evaluate`")
    config = run.read_config(overrides)             # validated again, overrides included
    set_threads(config.train.threads)
    run = RunDir.open_existing(run_dir, kind.name)
    try:
        get_logger().info("evaluate with overrides %s", overrides)
        loaded = kind.load_saved(run, config, info)
        data = kind.prepare(config, for_evaluation=True)
        models = kind.ready(loaded, config, data, info)
        results = {}
        for label, model in models.items():
            results[label] = kind.evaluate_saved_model(label, model, config, data)
        record = kind.evaluation_record(overrides, results)
        write_json(run.path / kind.evaluation_file, record)
        kind.print_evaluation(config, data, results)
        return kind.evaluation_result(record)
    finally:
        run.close()


__all__ = ["TrainSettings", "RunKind", "register_kind", "get_kind", "train", "evaluate", "refit", "open_finished",
           "set_threads", "check_device", "fit_trainable", "check_evaluation_overrides"]
