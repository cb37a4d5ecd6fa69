"""Run a suite: every (model, seed) is one `hmtrec train` in a child process with its own run
directory, so a run that already finished is reused and an interrupted one resumes.

Layout of the results folder:
    <out>/runs/<label>/seed<seed>.yaml     the complete config of the run
    <out>/runs/<label>/seed<seed>/         its run directory (metrics.json, log.txt, weights, ...)
    <out>/runs/<label>/seed<seed>/bench.json  wall time, peak memory and exit code of the child
    <out>/runs/<label>/seed<seed>.log      the child's console output
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from hmtrec.bench.measure import run_measured
from hmtrec.bench.suites import Suite, SuiteModel
from hmtrec.config import build_config
from hmtrec.errors import ConfigError
from hmtrec.models.registry import validate_model_params
from hmtrec.progress import console
from hmtrec.rundir import read_json, write_json


@dataclass
class RunRecord:
    """What one (model, seed) run produced, flattened for tables."""

    label: str
    seed: int
    group: str
    status: str                                     # done | failed
    metrics: dict[str, float] = field(default_factory=dict)             # "level/metric" -> test value
    candidate_metrics: dict[str, float] = field(default_factory=dict)
    candidate_coverage: float | None = None
    candidate_fraction: float | None = None
    n_cases: int = 0
    eval_seconds: float = 0.0
    epochs: int = 0
    best_epoch: int = 0
    epoch_seconds: float | None = None              # mean training seconds per epoch (trainable models)
    fit_seconds: float | None = None                # non-trainable models
    train_seconds: float = 0.0
    train_targets: int = 0
    parameters: int = 0
    peak_rss_mb: float = 0.0
    wall_seconds: float = 0.0                       # the whole child process (data, training, evaluation)
    cpu_seconds: float = 0.0                        # its CPU time: below wall time when the machine is shared
    history: list[dict] = field(default_factory=list)
    # validation figures of the model as finally chosen, where a post-training choice changed it
    # (knn-hybrid's weight): "level/metric" -> value
    tuned_valid: dict[str, float] = field(default_factory=dict)
    # with train.final_fit: the selection model's test metrics (trained on the training split alone)
    selection_metrics: dict[str, float] = field(default_factory=dict)
    # test metrics by the target item's training frequency: bucket -> "level/metric" -> value
    frequency_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    frequency_cases: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    @property
    def eval_seconds_per_10k(self) -> float:
        return self.eval_seconds / max(self.n_cases, 1) * 1e4

    def time_to_quality(self, metric: str, value: float) -> tuple[float | None, int | None]:
        """Training seconds (validation passes excluded) until the validation `metric` first
        reaches `value`, and that epoch; (None, None) if it never does."""
        elapsed = 0.0
        for record in self.history:
            elapsed += float(record.get("epoch_seconds", 0.0))
            reached = record.get(f"valid_{metric}")
            if reached is not None and reached >= value:
                return elapsed, int(record["epoch"])
        return None, None

    def cpu_seconds_to_quality(self, metric: str, value: float) -> float | None:
        """Training CPU seconds (all threads) until `metric` first reaches `value`; None when it
        never does or the history predates CPU timing. On a shared machine this is the figure the
        other processes do not stretch."""
        elapsed = 0.0
        for record in self.history:
            if "epoch_cpu_seconds" not in record:
                return None
            elapsed += float(record["epoch_cpu_seconds"])
            reached = record.get(f"valid_{metric}")
            if reached is not None and reached >= value:
                return elapsed
        return None


def flat(section: dict | None) -> dict[str, float]:
    return {f"{level}/{name}": float(value) for level, metrics in (section or {}).items()
            for name, value in metrics.items()}


def read_record(run_dir: Path, model: SuiteModel, seed: int) -> RunRecord:
    bench = read_json(run_dir / "bench.json") if (run_dir / "bench.json").exists() else {}
    record = RunRecord(label=model.label, seed=seed, group=model.group, status="failed",
                       peak_rss_mb=float(bench.get("peak_rss_mb", 0.0)),
                       wall_seconds=float(bench.get("wall_seconds", 0.0)),
                       cpu_seconds=float(bench.get("cpu_seconds", 0.0)))
    if not (run_dir / "metrics.json").exists():
        record.error = bench.get("error", "no metrics.json (the run did not finish)")
        return record
    metrics = read_json(run_dir / "metrics.json")
    result = metrics["models"][model.label]
    training = result.get("training", {})
    record.status = "done"
    record.metrics = flat(result.get("full"))
    record.candidate_metrics = flat(result.get("candidate"))
    record.candidate_coverage = result.get("candidate_coverage")
    record.candidate_fraction = result.get("candidate_fraction")
    record.n_cases = int(result.get("n_cases", 0))
    record.eval_seconds = float(result.get("seconds", 0.0))
    record.epochs = int(training.get("epochs", 0))
    record.best_epoch = int(training.get("best_epoch", 0))
    record.epoch_seconds = training.get("epoch_seconds")
    record.fit_seconds = training.get("fit_seconds")
    record.train_seconds = float(training.get("train_seconds", training.get("fit_seconds", 0.0)))
    counts = metrics.get("data", {})      # a final fit's model learnt from train + valid
    record.train_targets = int(counts.get("train_all", counts.get("train", {})).get("targets", 0))
    record.parameters = int(training.get("parameters", 0))
    record.history = training.get("history", [])
    record.tuned_valid = tuned_validation(training.get("tuned"), result.get("levels", []))
    record.selection_metrics = flat((training.get("selection") or {}).get("test", {}).get("full"))
    record.frequency_metrics = {bucket: flat(by_level) for bucket, by_level in
                                result.get("segments", {}).get("target_frequency", {}).items()}
    record.frequency_cases = dict(result.get("segment_cases", {}).get("target_frequency", {}))
    return record


def tuned_validation(tuned: dict | None, levels: list[str]) -> dict[str, float]:
    """{"level/metric": value} of a post-training choice on validation (knn-hybrid's `tuned`: the
    figure at the chosen weight). Runs from before the metric was recorded tuned the default,
    MRR@20 at the leaf level."""
    if not tuned or "valid_by_weight" not in tuned or not levels:
        return {}
    metric = tuned.get("metric", f"{levels[-1]}/MRR@20")
    value = tuned["valid_by_weight"].get(f"{tuned['knn_weight']:g}")
    return {metric: float(value)} if value is not None else {}


def run_suite(suite: Suite, out_dir: str | Path, *, labels: list[str] | None = None,
              seeds: list[int] | None = None, threads: int | None = 1, overrides: dict | None = None,
              force: bool = False) -> list[RunRecord]:
    """Run (or reuse) every selected (model, seed) of the suite; returns one record per run."""
    out_dir = Path(out_dir)
    seeds = seeds or suite.seeds
    records = []
    for model in suite.select(labels):
        for seed in ([suite.seeds[0]] if model.deterministic else seeds):
            records.append(run_one(suite, model, seed, out_dir, threads=threads, overrides=overrides, force=force))
    return records


def collect_finished(suite: Suite, out_dir: str | Path, *, threads: int | None = 1,
                     overrides: dict | None = None) -> list[RunRecord]:
    """Records of every finished run of the suite in `out_dir`, whichever invocation ran it: the
    complete picture for tables, even when models or seeds were run separately. A run counts only
    if its config is still what the suite asks for (same overrides; its thread count may differ)."""
    out_dir = Path(out_dir)
    records = []
    for model in suite.models:
        folder = out_dir / "runs" / model.label
        seeds = sorted(int(path.stem[4:]) for path in folder.glob("seed*.yaml") if path.stem[4:].isdigit())
        for seed in (seeds[:1] if model.deterministic else seeds):
            run_dir = folder / f"seed{seed}"
            config = suite.run_config(model, seed, overrides)
            if threads is not None:
                config["train"]["threads"] = threads
            if (run_dir / "bench.json").exists() and _same_config(folder / f"seed{seed}.yaml", config):
                records.append(read_record(run_dir, model, seed))
    return records


def run_one(suite: Suite, model: SuiteModel, seed: int, out_dir: Path, *, threads: int | None,
            overrides: dict | None, force: bool) -> RunRecord:
    base = out_dir / "runs" / model.label
    run_dir, config_path, log_path = base / f"seed{seed}", base / f"seed{seed}.yaml", base / f"seed{seed}.log"
    config = suite.run_config(model, seed, overrides)
    if threads is not None:
        config["train"]["threads"] = threads
    build_config(config, f"suite {suite.name}, model {model.label}")   # fail early, naming the key
    done = (run_dir / "run.json").exists() and read_json(run_dir / "run.json").get("status") == "done" \
        and (run_dir / "bench.json").exists()
    same = _same_config(config_path, config)
    if done and same and not force:
        console.print(f"[dim]{suite.name}/{model.label} seed {seed}: reusing {run_dir}[/dim]")
        return read_record(run_dir, model, seed)
    if run_dir.exists() and (force or not same):
        # a stale run (other config) or a forced rerun starts afresh; an interrupted run of the
        # same config is left in place and resumes from its checkpoint
        shutil.rmtree(run_dir)
        log_path.unlink(missing_ok=True)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    console.print(f"[bold]{suite.name}/{model.label}[/bold] seed {seed} -> {run_dir}")
    result = run_measured("hmtrec.cli", ["train", "--config", str(config_path), "--run-dir", str(run_dir)],
                          log_path=log_path, env={"HMTREC_PROGRESS": "0"})
    bench = {"wall_seconds": result.wall_seconds, "peak_rss_mb": result.peak_rss_mb,
             "cpu_seconds": result.cpu_seconds, "returncode": result.returncode, "command": result.command}
    if result.returncode != 0:
        bench["error"] = f"exit code {result.returncode}; see {log_path}: " + _tail(log_path)
        console.print(f"[red]{model.label} seed {seed} failed[/red]: {bench['error']}")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "bench.json", bench)
    return read_record(run_dir, model, seed)


def _same_config(path: Path, config: dict) -> bool:
    """Whether the run recorded at `path` is this config's run: the same config once model
    parameters are resolved, so spelling out a default (`coupling: cascade`) is not a new run, and
    whatever its thread count (`--threads` changes how fast a run goes, not what it is: a finished
    run is reused, never deleted and trained again, when only that differs)."""
    if not path.exists():
        return False
    recorded, wanted = yaml.safe_load(path.read_text()), yaml.safe_load(yaml.safe_dump(config))
    try:
        return _identity(recorded) == _identity(wanted)
    except ConfigError:   # a recorded model that no longer validates is another run
        return False


def _identity(config: dict) -> dict:
    config = _with_resolved_model(config)
    train = {key: value for key, value in (config.get("train") or {}).items() if key != "threads"}
    return {**config, "train": train}


def _with_resolved_model(config: dict) -> dict:
    model = config.get("model")
    if config.get("kind", "sequence") != "sequence" or not isinstance(model, dict):
        return config
    _, params = validate_model_params("sequence", {k: v for k, v in model.items() if k != "label"})
    return {**config, "model": {"name": model.get("name"), "label": model.get("label"), **params.model_dump()}}


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def records_to_json(records: list[RunRecord]) -> list[dict]:
    return [asdict(record) for record in records]
