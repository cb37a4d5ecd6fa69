"""Search the utility weights with Optuna: Bayesian optimisation (TPE) or, for comparison, random
search with the same budget; one objective (best trial) or several (Pareto front).

Studies live in a database (SQLite in the output folder by default, any URL Optuna's RDBStorage
accepts otherwise), so a study resumes after an interruption and several workers can share it:
- `n_trials` is the number of COMPLETE trials the study should hold in total; a resumed or extra
  worker runs only what is missing (all workers stop when the total is reached).
- A trial interrupted by Ctrl-C is marked FAIL by Optuna; a worker that was killed leaves its trial
  RUNNING, and the heartbeat marks it FAIL once it has been silent for `grace_period` seconds (or at
  once with `fail_running: true`, when you know no other worker is alive).
- Every FAILed trial is re-queued once with the same weights (up to `max_retries` times along a
  chain of retries), so no point of the search is lost.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import optuna
from optuna.trial import TrialState

from hmtrec.calibrate.utility import Evaluation, UtilityEvaluator
from hmtrec.config import StrictModel
from hmtrec.errors import ConfigError

MEMORY = "memory"
RETRY_OF = "retry_of"
RETRY_DEPTH = "retry_depth"
CONSTRAINT_ATTR = "constraint_slack"
_HAS_SET_CONSTRAINT = hasattr(optuna.trial.Trial, "set_constraint")

optuna.logging.set_verbosity(optuna.logging.WARNING)


class WeightRange(StrictModel):
    low: float = 0.01
    high: float = 100.0
    log: bool = True
    fixed: float | None = None
    """A fixed weight (not searched). U only ranks, so one head's weight can be fixed to 1 for free."""


class TuningSettings(StrictModel):
    n_trials: int = 50
    """COMPLETE trials the study should hold in total (a resumed study runs only the rest)."""
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int | None = 0
    startup_trials: int = 10
    """TPE: random trials before the model-based search starts."""
    multivariate: bool = True
    """TPE: model the weights jointly (they interact: only their ratios matter)."""
    storage: str | None = None
    """Optuna storage URL; default sqlite:///<output>/utility_study.db; `memory` keeps nothing."""
    study_name: str = "utility"
    compare_random: bool = False
    """Also run random search with the same budget (study `<study_name>-random`) and report both."""
    heartbeat_interval: int = 10
    grace_period: int = 30
    max_retries: int = 2
    fail_running: bool = False
    """Mark the study's RUNNING trials FAIL (and re-queue them) before starting."""
    timeout_s: float | None = None
    seed_references: bool = True
    """Start a new study with the reference points as its first trials: equal weights and, for each
    head, that head dominant (its weight at the top of its range, the others at the bottom). The
    search then never reports weights worse on the tuning table than a reference it could have tried."""


def reference_weights(ranges: dict[str, WeightRange]) -> dict[str, dict[str, float]]:
    """Equal weights and one 'head dominant' vector per head, clipped to the search ranges (a fixed
    weight stays fixed): the points a tuned blend must beat."""
    def clip(head: str, value: float) -> float:
        item = ranges[head]
        return item.fixed if item.fixed is not None else min(max(value, item.low), item.high)
    points = {"equal weights": {h: clip(h, 1.0) for h in ranges}}
    for head in ranges:
        point = {h: clip(h, ranges[h].low) for h in ranges}
        point[head] = clip(head, ranges[head].high)
        points[f"{head} dominant"] = point
    return points


def default_weight_ranges(heads: list[str], given: dict[str, WeightRange]) -> dict[str, WeightRange]:
    """The first head's weight is fixed to 1 unless the user says otherwise; others use the defaults."""
    unknown = set(given) - set(heads)
    if unknown:
        raise ConfigError(f"utility: weights for unknown heads {sorted(unknown)}; heads are {heads}")
    ranges = {h: given.get(h, WeightRange()) for h in heads}
    if not given and heads:
        ranges[heads[0]] = WeightRange(fixed=1.0)
    for head, item in ranges.items():
        if item.fixed is None and (not 0 <= item.low < item.high or (item.log and item.low <= 0)):
            raise ConfigError(f"utility: weights.{head}: need 0 <= low < high (low > 0 when log), got "
                              f"low={item.low}, high={item.high}")
    if all(item.fixed is not None for item in ranges.values()):
        raise ConfigError("utility: every weight is fixed; nothing to tune")
    return ranges


def make_storage(url: str | None, settings: TuningSettings) -> optuna.storages.BaseStorage:
    """An Optuna RDB storage with heartbeats, or an in-memory one for `memory` (kept only as long as
    the returned object lives)."""
    if url is None or url == MEMORY:
        return optuna.storages.InMemoryStorage()
    if "://" not in url:
        raise ConfigError(f"tuning.storage: {url!r} is not a database URL (e.g. sqlite:///study.db) nor "
                          f"{MEMORY!r}")
    try:
        with warnings.catch_warnings():  # heartbeats are marked experimental; they are what resuming needs
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=settings.heartbeat_interval, grace_period=settings.grace_period,
                heartbeat_stale_trial_callback=lambda study, trial: requeue_failed(study, settings.max_retries))
    except Exception as error:  # SQLAlchemy raises many types for bad URLs
        raise ConfigError(f"tuning.storage: cannot open {url!r}: {error}") from None


def requeue_failed(study: optuna.Study, max_retries: int) -> int:
    """Enqueue the weights of every FAILed trial not yet retried (chains stop at `max_retries`).
    Returns how many were enqueued."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs[RETRY_OF] for t in trials if RETRY_OF in t.user_attrs}
    enqueued = 0
    for trial in trials:
        if trial.state != TrialState.FAIL or trial.number in retried or not trial.params:
            continue
        depth = int(trial.user_attrs.get(RETRY_DEPTH, 0))
        if depth >= max_retries:
            continue
        study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number, RETRY_DEPTH: depth + 1})
        enqueued += 1
    return enqueued


def fail_running_trials(study: optuna.Study) -> int:
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in running:
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
    return len(running)


def _sampler(settings: TuningSettings, sampler: str, n_existing: int) -> optuna.samplers.BaseSampler:
    # A resumed study must not replay the random draws of the first session: offset the seed by the
    # number of trials already in the study.
    seed = None if settings.seed is None else settings.seed + 1_000_003 * n_existing
    if sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # Optuna >= 5 reads constraints set on the trial; older versions take a function.
    constraints = {} if _HAS_SET_CONSTRAINT else {"constraints_func": _constraints_of}
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=settings.startup_trials,
                                      multivariate=settings.multivariate, **constraints)


def _constraints_of(trial: optuna.trial.FrozenTrial) -> list[float]:
    return list(trial.user_attrs.get(CONSTRAINT_ATTR, {}).values())


@dataclass
class TuningRun:
    study: optuna.Study
    sampler: str
    objective_labels: list[str]
    ran: int
    requeued: int
    failed_running: int


FINGERPRINT_ATTR = "fingerprint"


def check_fingerprint(study: optuna.Study, fingerprint: dict[str, str], study_name: str) -> None:
    """A study is defined by its inputs (tuning table, calibration), objectives and gains, constraint,
    transforms and weight ranges: resuming one built on other definitions would run 0 trials and
    report its old best. Store the fingerprint on first use; refuse a mismatch, naming what differs."""
    stored = study.user_attrs.get(FINGERPRINT_ATTR)
    if stored is None:
        if study.get_trials(deepcopy=False):
            raise ConfigError(f"study {study_name!r} holds trials but no fingerprint of what defined it (made by an "
                              "older hmtrec): use another study_name or output folder")
        study.set_user_attr(FINGERPRINT_ATTR, fingerprint)
        return
    differs = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
    if differs:
        detail = "; ".join(f"{k}: study {stored.get(k)!r}, now {fingerprint.get(k)!r}" for k in differs)
        raise ConfigError(f"study {study_name!r} was built on other inputs ({', '.join(differs)} differ: {detail}); "
                          "use another --study-name or --output, or delete the study database")


def run_study(evaluator: UtilityEvaluator, ranges: dict[str, WeightRange], settings: TuningSettings, *,
              storage: optuna.storages.BaseStorage, study_name: str, sampler: str | None = None, on_trial=None,
              fingerprint: dict[str, str] | None = None) -> TuningRun:
    """Create or resume a study and run it until it holds `settings.n_trials` COMPLETE trials.
    `on_trial(trial, evaluation)` is called after each evaluation (used by tests to interrupt).
    `fingerprint` (what defines the study, see `check_fingerprint`) must match a resumed study's."""
    sampler = sampler or settings.sampler
    labels = [o.label for o in evaluator.objectives]
    directions = ["maximize"] * len(labels)
    probe = optuna.create_study(storage=storage, study_name=study_name, load_if_exists=True,
                                directions=directions)
    if list(probe.directions) != [optuna.study.StudyDirection.MAXIMIZE] * len(labels):
        raise ConfigError(f"study {study_name!r} exists with {len(probe.directions)} objective(s); "
                          f"this run names {len(labels)}: {labels}. Use another study_name.")
    stored_labels = probe.user_attrs.get("objectives")
    if stored_labels is not None and stored_labels != labels:
        raise ConfigError(f"study {study_name!r} was run with objectives {stored_labels}, not {labels}; "
                          "use another study_name")
    if fingerprint is not None:
        check_fingerprint(probe, fingerprint, study_name)
    probe.set_user_attr("objectives", labels)
    probe.set_user_attr("sampler", sampler)
    failed_running = fail_running_trials(probe) if settings.fail_running else 0
    requeued = requeue_failed(probe, settings.max_retries)
    existing = len(probe.get_trials(deepcopy=False))
    if existing == 0 and settings.seed_references:
        searched = [h for h, item in ranges.items() if item.fixed is None]
        seen = set()
        for point in reference_weights(ranges).values():
            params = {f"w_{h}": point[h] for h in searched}
            key = tuple(sorted(params.items()))
            if key not in seen:
                seen.add(key)
                probe.enqueue_trial(params, user_attrs={"reference": True})
    study = optuna.load_study(storage=storage, study_name=study_name,
                              sampler=_sampler(settings, sampler, existing))
    complete_before = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    def objective(trial: optuna.Trial):
        weights = {}
        for head, item in ranges.items():
            weights[head] = item.fixed if item.fixed is not None else trial.suggest_float(
                f"w_{head}", item.low, item.high, log=item.log)
        evaluation = evaluator.evaluate(weights)
        trial.set_user_attr("weights", weights)
        trial.set_user_attr(CONSTRAINT_ATTR, evaluation.constraint_slack)
        if _HAS_SET_CONSTRAINT:
            for head, slack in evaluation.constraint_slack.items():
                trial.set_constraint(f"min_ndcg[{head}]", slack)
        trial.set_user_attr("head_ndcg", evaluation.head_ndcg)
        if on_trial is not None:
            on_trial(trial, evaluation)
        values = [evaluation.objectives[label] for label in labels]
        if any(not math.isfinite(v) for v in values):
            raise ConfigError(f"utility objective is not finite ({values}): do the held-out requests have "
                              "any engagement?")
        return values if len(values) > 1 else values[0]

    remaining = settings.n_trials - complete_before
    if remaining > 0:
        callback = optuna.study.MaxTrialsCallback(settings.n_trials, states=(TrialState.COMPLETE,))
        study.optimize(objective, n_trials=None, timeout=settings.timeout_s, callbacks=[callback],
                       gc_after_trial=False)
    ran = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) - complete_before
    return TuningRun(study, sampler, labels, ran, requeued, failed_running)


def completed_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)


def is_feasible(trial: optuna.trial.FrozenTrial) -> bool:
    return all(v <= 1e-12 for v in _constraints_of(trial))


def pareto_front(points: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated rows of `points` [n, m] (all objectives maximised)."""
    points = np.asarray(points, dtype=np.float64)
    if len(points) == 0:
        return np.zeros(0, dtype=np.int64)
    at_least = (points[:, None, :] >= points[None, :, :]).all(-1)
    better = (points[:, None, :] > points[None, :, :]).any(-1)
    dominated = (at_least & better).any(0)
    return np.flatnonzero(~dominated)


def best_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The best feasible trial (one objective) or the feasible Pareto front (several)."""
    feasible = [t for t in completed_trials(study) if is_feasible(t)]
    if not feasible:
        return []
    values = np.array([t.values for t in feasible])
    if values.shape[1] == 1:
        return [feasible[int(np.argmax(values[:, 0]))]]
    return [feasible[i] for i in pareto_front(values)]


def best_so_far(study: optuna.Study) -> np.ndarray:
    """Best feasible value of the first objective after each COMPLETE trial (nan before any)."""
    values = [t.values[0] if is_feasible(t) else -np.inf for t in completed_trials(study)]
    best = np.maximum.accumulate(np.array(values, dtype=np.float64)) if values else np.zeros(0)
    return np.where(np.isfinite(best), best, np.nan)


def weights_of(trial: optuna.trial.FrozenTrial) -> dict[str, float]:
    return dict(trial.user_attrs["weights"])


def evaluation_row(evaluation: Evaluation) -> dict:
    cut = f"@{evaluation.head_k}" if evaluation.head_k is not None else ""
    return {**evaluation.objectives, **{f"ndcg{cut}[{h}]": v for h, v in evaluation.head_ndcg.items()},
            "feasible": evaluation.feasible}


def default_storage_url(out_dir: str | Path) -> str:
    return f"sqlite:///{Path(out_dir).resolve() / 'utility_study.db'}"
