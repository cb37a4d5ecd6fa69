"""`hmtrec tune CONFIG`: Optuna over any model or training setting of a config.

The config is an ordinary training config (any `kind`) plus a `tune:` section:

    tune:
      objective: monitored          # a validation key (the metric train.monitor picks), or e.g. item/NDCG@20
      direction: maximize
      n_trials: 20                  # finished trials (complete + pruned) the study should hold in total
      pruner: median                # median | none: stop a trial whose epoch reports trail the median
      params:                       # dotted config key -> range or choices
        train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
        model.dim: {low: 32, high: 128, step: 32}
        model.coupling: {choices: [parallel, cascade]}

Each trial is a full training run in `<out>/trials/<n>/` (so the best one can be evaluated or served
as it is); the objective is read from the VALIDATION records of the main model's Trainer at the epoch
it kept (the test split is never consulted), and every epoch is reported to the pruner.

Studies live in a database: SQLite at `<out>/study.db` by default, any SQLAlchemy URL otherwise
(PostgreSQL for workers on many machines), so several `hmtrec tune` processes may share one study,
and an interrupted one resumes: a trial that failed or whose worker died is re-queued with the same
parameters and resumes from its run directory's last checkpoint. The study records a fingerprint of
the base config, search space and objective, and refuses to continue under a changed one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
import yaml
from optuna.trial import TrialState
from pydantic import Field, model_validator

from hmtrec.calibrate.tuning import RETRY_OF, fail_running_trials, requeue_failed
from hmtrec.config import StrictModel, build_config, dump_config, parse_overrides
from hmtrec.errors import ConfigError, HmtrecError
from hmtrec.train.callbacks import epoch_listener

TUNE_KEY = "tune"
MEMORY = "memory"
FINGERPRINT_ATTR = "fingerprint"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

optuna.logging.set_verbosity(optuna.logging.WARNING)


class ParamSpace(StrictModel):
    """One searched setting: `choices`, or a numeric range `low`..`high` (int when both ends are ints)."""

    choices: list[Any] | None = None
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = Field(None, gt=0)
    type: Literal["int", "float", "categorical"] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "ParamSpace":
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            if not self.choices:
                raise ValueError("choices is empty")
            return self
        if self.low is None or self.high is None:
            raise ValueError("needs choices, or both low and high")
        if not self.low < self.high:
            raise ValueError(f"needs low < high, got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError("log scale needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("log scale and step cannot be combined")
        if self.type == "categorical":
            raise ValueError("type categorical needs choices")
        return self

    @property
    def kind(self) -> str:
        """categorical, int (given, or both ends and the step are ints) or float."""
        if self.choices is not None:
            return "categorical"
        if self.type is not None:
            return self.type
        ints = [v for v in (self.low, self.high, self.step) if v is not None]
        return "int" if all(isinstance(v, int) and not isinstance(v, bool) for v in ints) else "float"

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(name, self.choices)
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, float(self.low), float(self.high), step=self.step, log=self.log)

    def corners(self) -> list[Any]:
        """The values that bound the space (each is tried against the config before any trial runs)."""
        if self.kind == "categorical":
            return list(self.choices)
        cast = int if self.kind == "int" else float
        return [cast(self.low), cast(self.high)]


class TuneSettings(StrictModel):
    """The `tune:` section."""

    params: dict[str, ParamSpace] = Field(..., description="dotted config key -> range or choices")
    objective: str = Field("monitored", description="validation key of the main model's epoch records: "
                                                    "'monitored' (train.monitor's metric) or e.g. item/NDCG@20")
    direction: Literal["maximize", "minimize"] = "maximize"
    n_trials: int = Field(20, ge=1, description="finished (complete + pruned) trials the study should hold")
    timeout_s: float | None = Field(None, gt=0, description="stop this worker after this many seconds")
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int | None = 0
    startup_trials: int = Field(5, ge=0, description="TPE: random trials before the model-based search")
    pruner: Literal["median", "none"] = "median"
    pruner_startup_trials: int = Field(3, ge=0, description="median pruner: trials never pruned")
    pruner_warmup_epochs: int = Field(1, ge=0, description="median pruner: epochs never pruned in a trial")
    storage: str | None = Field(None, description="database URL; default sqlite:///<out>/study.db; "
                                                  "'memory': nothing kept")
    study_name: str | None = Field(None, description="default: the config file's stem")
    heartbeat_interval: int = Field(10, ge=1)
    grace_period: int = Field(60, ge=1, description="a RUNNING trial silent this long is marked FAIL")
    max_retries: int = Field(2, ge=0, description="re-queue a failed trial's parameters this many times")
    fail_running: bool = Field(False, description="mark the study's RUNNING trials FAIL before starting "
                                                  "(when you know no other worker is alive)")
    keep_baselines: bool = Field(False, description="also train the config's baselines in every trial")

    @model_validator(mode="after")
    def _some_params(self) -> "TuneSettings":
        if not self.params:
            raise ValueError("tune.params is empty: nothing to search")
        return self


@dataclass
class TuneSpec:
    """A tune config split into the base training config (raw mapping) and its search settings."""

    base: dict
    settings: TuneSettings
    source: str

    def trial_raw(self, values: dict[str, Any]) -> dict:
        raw = copy.deepcopy(self.base)
        for key, value in values.items():
            _set_dotted(raw, key, value)
        return raw

    def trial_config(self, values: dict[str, Any]):
        return build_config(self.trial_raw(values), f"{self.source} (tune values {values})")

    def fingerprint(self) -> str:
        """What the study's trials depend on: base config, search space, objective and direction."""
        payload = {"base": self.base, "params": {k: v.model_dump(mode="json") for k, v in self.settings.params.items()},
                   "objective": self.settings.objective, "direction": self.settings.direction}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _set_dotted(tree: dict, dotted_key: str, value: Any) -> None:
    node = tree
    parts = dotted_key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, str) and part == "model":  # `model: sasrec` is shorthand for {name: sasrec}
            child = node[part] = {"name": child}
        if not isinstance(child, dict):
            raise ConfigError(f"tune.params.{dotted_key}: {part!r} is not a section of the config")
        node = child
    node[parts[-1]] = value


def load_tune_spec(path: str | Path, overrides: list[str] | None = None) -> TuneSpec:
    """Read a tune config; `overrides` (key=value) may change base keys and `tune.*` keys alike.
    Every corner of the search space is validated against the config before anything runs."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping")
    for key, value in parse_overrides(overrides):
        _set_dotted(raw, key, value)
    section = raw.pop(TUNE_KEY, None)
    if section is None:
        raise ConfigError(f"{path}: no 'tune:' section (it declares the search space; see docs/scale.md)")
    try:
        settings = TuneSettings.model_validate(section)
    except Exception as error:  # pydantic's message names the key
        raise ConfigError(f"{path}: invalid 'tune' section: {_one_line(error)}") from None
    spec = TuneSpec(base=raw, settings=settings, source=str(path))
    build_config(spec.base, str(path))
    for key, space in settings.params.items():
        for value in space.corners():
            try:
                spec.trial_config({key: value})
            except ConfigError as error:
                raise ConfigError(f"{path}: tune.params.{key} = {value!r} makes an invalid config: "
                                  f"{str(error).split('invalid config: ')[-1]}") from None
    return spec


def _one_line(error: Exception) -> str:
    errors = getattr(error, "errors", None)
    if callable(errors):
        return "; ".join(f"tune.{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in errors())
    return str(error)


# ---- storage and study -------------------------------------------------------------------------

def default_storage_url(out_dir: str | Path) -> str:
    return f"sqlite:///{Path(out_dir).resolve() / 'study.db'}"


def make_storage(url: str, settings: TuneSettings) -> optuna.storages.BaseStorage:
    """An RDB storage with heartbeats (a dead worker's trial is failed and re-queued); for SQLite a
    generous lock timeout, since several local workers write to one file."""
    if url == MEMORY:
        return optuna.storages.InMemoryStorage()
    if "://" not in url:
        raise ConfigError(f"tune.storage: {url!r} is not a database URL (e.g. sqlite:///study.db, "
                          f"postgresql://user@host/db) nor {MEMORY!r}")
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    last_error = None
    for attempt in range(5):  # workers started together race to create the schema
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=settings.heartbeat_interval,
                    grace_period=settings.grace_period,
                    heartbeat_stale_trial_callback=lambda study, trial: requeue_failed(study, settings.max_retries))
        except Exception as error:  # SQLAlchemy raises many types for bad URLs and races
            last_error = error
            time.sleep(0.5 * (attempt + 1))
    raise ConfigError(f"tune.storage: cannot open {url!r}: {last_error}")


def _sampler(settings: TuneSettings, n_existing: int) -> optuna.samplers.BaseSampler:
    # A resumed or second worker must not replay the first one's random draws.
    seed = None if settings.seed is None else settings.seed + 1_000_003 * n_existing
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=settings.startup_trials)


def _pruner(settings: TuneSettings) -> optuna.pruners.BasePruner:
    if settings.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=settings.pruner_startup_trials,
                                       n_warmup_steps=settings.pruner_warmup_epochs)


def open_study(spec: TuneSpec, storage: optuna.storages.BaseStorage, study_name: str) -> optuna.Study:
    """Create or load the study; refuse one made for another config, search space or objective."""
    settings = spec.settings
    study = None
    for attempt in range(5):
        try:
            study = optuna.create_study(storage=storage, study_name=study_name, load_if_exists=True,
                                        direction=settings.direction)
            break
        except Exception:  # two workers creating the same study at once: the loser loads it
            if attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))
    if study.direction.name.lower() != settings.direction:
        raise ConfigError(f"study {study_name!r} exists with direction {study.direction.name.lower()}, not "
                          f"{settings.direction}; use another tune.study_name")
    fingerprint = spec.fingerprint()
    stored = study.user_attrs.get(FINGERPRINT_ATTR)
    if stored is not None and stored != fingerprint:
        raise ConfigError(f"study {study_name!r} was run with another base config, search space or objective "
                          f"(fingerprint {stored}, this config {fingerprint}); use another tune.study_name "
                          f"or output folder, or restore the config")
    if stored is None:
        study.set_user_attr(FINGERPRINT_ATTR, fingerprint)
        study.set_user_attr("objective", settings.objective)
    return optuna.load_study(storage=storage, study_name=study_name,
                             sampler=_sampler(settings, len(study.get_trials(deepcopy=False))),
                             pruner=_pruner(settings))


# ---- one trial ----------------------------------------------------------------------------------

def _chain_root(trial: optuna.Trial) -> int:
    """The trial number a retry descends from: its run directory is the one to resume."""
    frozen = {t.number: t for t in trial.study.get_trials(deepcopy=False)}
    number = trial.number
    while RETRY_OF in frozen[number].user_attrs:
        number = int(frozen[number].user_attrs[RETRY_OF])
    return number


class _EpochReporter:
    """Listens to the main model's Trainer (the one writing to the trial's run directory): reports
    each epoch's validation objective to the pruner and keeps the last state."""

    def __init__(self, trial: optuna.Trial, run_dir: Path, objective: str):
        self.trial, self.run_dir, self.key = trial, run_dir.resolve(), f"valid_{objective}"
        self.state = None

    def __call__(self, trainer, state) -> None:
        if trainer.run_dir is None or Path(trainer.run_dir).resolve() != self.run_dir:
            return  # a baseline's Trainer
        self.state = state
        record = state.history[-1]
        if self.key not in record:
            valid = sorted(k.removeprefix("valid_") for k in record if k.startswith("valid_"))
            raise ConfigError(f"tune.objective: {self.key.removeprefix('valid_')!r} is not among the main "
                              f"model's validation keys {valid}" + ("" if valid else " (set train.monitor so "
                                                                                      "the model is validated)"))
        value = float(record[self.key])
        self.trial.report(value, state.epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {state.epoch} ({self.key} = {value:.5f})")

    def value(self) -> float:
        if self.state is None or not self.state.history:
            raise HmtrecError("tune: the main model was not trained by the Trainer (no epochs), so it has no "
                              "validation objective; tune a trainable model")
        history = self.state.history
        epoch = self.state.best_epoch or history[-1]["epoch"]
        record = next((r for r in history if r["epoch"] == epoch), history[-1])
        return float(record[self.key])


def run_trial(spec: TuneSpec, trial: optuna.Trial, out_dir: Path, track: bool = False,
              tracking_uri: str | None = None) -> float:
    from hmtrec.pipelines import get_pipeline

    values = {key: space.suggest(trial, key) for key, space in spec.settings.params.items()}
    raw = spec.trial_raw(values)
    if not spec.settings.keep_baselines and "baselines" in raw:
        raw["baselines"] = []
    config = build_config(raw, f"{spec.source} (trial {trial.number})")
    run_dir = out_dir / "trials" / f"{_chain_root(trial):04d}"
    trial.set_user_attr("run_dir", str(run_dir))
    reporter = _EpochReporter(trial, run_dir, spec.settings.objective)
    with epoch_listener(reporter):
        if track:
            from hmtrec.tracking import tracked_run

            with tracked_run(config, run_dir, tracking_uri=tracking_uri,
                             tags={"hmtrec.tune.study": trial.study.study_name,
                                   "hmtrec.tune.trial": str(trial.number)}):
                get_pipeline(config.kind).train(config, run_dir)
        else:
            get_pipeline(config.kind).train(config, run_dir)
    value = reporter.value()
    if not math.isfinite(value):
        raise HmtrecError(f"tune: trial {trial.number}'s objective is not finite ({value})")
    return value


@dataclass
class TuneResult:
    study: optuna.Study
    ran: int
    requeued: int
    failed_running: int


def tune(spec: TuneSpec, out_dir: str | Path, *, track: bool = False, tracking_uri: str | None = None) -> TuneResult:
    """Run this worker until the study holds `n_trials` finished trials (or `timeout_s` passes)."""
    settings = spec.settings
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    url = settings.storage or default_storage_url(out_dir)
    storage = make_storage(url, settings)
    study_name = settings.study_name or Path(spec.source).stem
    study = open_study(spec, storage, study_name)
    failed_running = fail_running_trials(study) if settings.fail_running else 0
    requeued = requeue_failed(study, settings.max_retries)
    ran = []  # the trials this worker finished (others may be running the same study)

    def count(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state in FINISHED:
            ran.append(trial.number)

    if len(study.get_trials(deepcopy=False, states=FINISHED)) < settings.n_trials:
        callback = optuna.study.MaxTrialsCallback(settings.n_trials, states=FINISHED)
        study.optimize(lambda trial: run_trial(spec, trial, out_dir, track, tracking_uri), n_trials=None,
                       timeout=settings.timeout_s, callbacks=[count, callback], catch=(), gc_after_trial=True)
    write_summary(spec, study, out_dir)
    return TuneResult(study, len(ran), requeued, failed_running)


def write_summary(spec: TuneSpec, study: optuna.Study, out_dir: Path) -> None:
    """tune.json (every trial) and, once a trial is complete, best.yaml: the best trial's full config,
    ready for `hmtrec train -c best.yaml`."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    rows = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
             "epochs_reported": len(t.intermediate_values), "run_dir": t.user_attrs.get("run_dir"),
             "retry_of": t.user_attrs.get(RETRY_OF)} for t in trials]
    summary = {"study": study.study_name, "objective": spec.settings.objective,
               "direction": spec.settings.direction, "fingerprint": spec.fingerprint(), "trials": rows}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        summary["best"] = {"number": best.number, "value": best.value, "params": best.params,
                           "run_dir": best.user_attrs.get("run_dir")}
        dump_config(spec.trial_config(best.params), out_dir / "best.yaml")
    from hmtrec.rundir import write_json

    write_json(out_dir / "tune.json", summary)
