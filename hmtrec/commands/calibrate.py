"""`hmtrec calibrate`, `hmtrec tune-utility` and `hmtrec synthetic-engagement`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Literal, Optional

import typer

from hmtrec.progress import console


def _pairs(items: list[str] | None, option: str) -> dict[str, float]:
    """`head=value` options -> {head: float}."""
    from hmtrec.errors import ConfigError

    out = {}
    for item in items or []:
        head, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[head.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"{option} {item!r}: expected head=number") from None
    return out


def _load(kind: str, config: Path | None, overrides: list[str] | None):
    from hmtrec.calibrate import workflow  # noqa: F401  (registers the config kinds)
    from hmtrec.config import load_config

    cfg = load_config(config, overrides, base={"kind": kind})
    if cfg.kind != kind:
        from hmtrec.errors import ConfigError

        raise ConfigError(f"{config}: key 'kind' is {cfg.kind!r}; this command reads kind {kind!r}")
    return cfg


def _print_calibration(metrics) -> None:
    from rich.table import Table

    table = Table(title="calibration on held-out rows (all scenarios)")
    columns = [c for c in ("head", "method", "ece", "brier", "ratio", "auc", "true_mae") if c in metrics.columns]
    for column in columns:
        table.add_column(column, justify="left" if column in ("head", "method") else "right")
    for row in metrics[metrics["scenario"] == "all"].to_dict(orient="records"):
        table.add_row(*[f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in columns])
    console.print(table)


def register(app: typer.Typer) -> None:
    @app.command()
    def calibrate(
        target: Path = typer.Argument(..., help="A ranking run directory, or a score table (CSV/Parquet)."),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (kind: calibration)."),
        overrides: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Override a key: a.b=value."),
        method: Optional[Literal["platt", "isotonic", "temperature", "downsampling", "none"]] = typer.Option(
            None, "--method", help="Calibration method."),
        per_scenario: Optional[bool] = typer.Option(None, "--per-scenario/--global",
                                                    help="One calibrator per scenario."),
        downsampling: Optional[List[str]] = typer.Option(
            None, "--downsampling", help="head=w: kept fraction of the head's negatives in training (repeat)."),
        heads: Optional[str] = typer.Option(None, "--heads", help="Comma-separated heads (default: detected)."),
        heldout: Optional[Path] = typer.Option(None, "--heldout", help="Table to measure on (default: the run's "
                                                                       "test predictions, else cross-fitting)."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="Report folder."),
    ):
        """Fit calibrators on validation scores, save calibration.json, and report ECE, Brier, Σp/Σy and
        reliability diagrams before and after each calibrator on held-out rows."""
        from hmtrec.calibrate.workflow import calibrate as run_calibration

        extra = list(overrides or [])
        if method is not None:
            extra.append(f"calibration.method={method}")
        if per_scenario is not None:
            extra.append(f"calibration.per_scenario={str(per_scenario).lower()}")
        for head, rate in _pairs(downsampling, "--downsampling").items():
            extra.append(f"calibration.downsampling.{head}={rate}")
        if heads:
            extra.append(f"columns.heads=[{heads}]")
        cfg = _load("calibration", config, extra)
        result = run_calibration(target, cfg, heldout=heldout, output=output)
        _print_calibration(result.metrics)
        for note in result.calibration.notes:   # e.g. a scenario too small for its own calibrator
            console.print(f"note: {note}")
        console.print(f"calibration: {result.files['calibration']}\nreport: {result.files['report']}")

    @app.command("tune-utility")
    def tune_utility(
        target: Path = typer.Argument(..., help="A ranking run directory, or a score table to tune on."),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (kind: utility)."),
        overrides: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Override a key: a.b=value."),
        group: Optional[str] = typer.Option(None, "--group", "-g", help="Request column (ranked together)."),
        heads: Optional[str] = typer.Option(None, "--heads", help="Comma-separated heads (default: detected)."),
        objective: Optional[List[str]] = typer.Option(
            None, "--objective", help="ndcg@K | value@K | ndcg@K[head]; repeat for a Pareto front."),
        gain: Optional[List[str]] = typer.Option(None, "--gain", help="head=value: engagement value (repeat)."),
        min_head_ratio: Optional[float] = typer.Option(
            None, "--min-head-ratio", help="Each head's NDCG >= this fraction of its single-head optimum."),
        n_trials: Optional[int] = typer.Option(None, "--n-trials", "-n", help="COMPLETE trials in total."),
        sampler: Optional[Literal["tpe", "random"]] = typer.Option(None, "--sampler", help="Optuna sampler."),
        compare_random: Optional[bool] = typer.Option(None, "--compare-random/--no-compare-random",
                                                      help="Also run random search with the same budget."),
        storage: Optional[str] = typer.Option(None, "--storage", help="Optuna DB URL, or 'memory'."),
        study_name: Optional[str] = typer.Option(None, "--study-name"),
        fail_running: bool = typer.Option(False, "--fail-running",
                                          help="Fail and re-queue RUNNING trials first (no other worker alive)."),
        heldout: Optional[Path] = typer.Option(None, "--heldout", help="Table to report the best weights on."),
        calibration: Optional[Path] = typer.Option(None, "--calibration",
                                                   help="calibration.json (or its folder) to apply first."),
        no_calibration: bool = typer.Option(False, "--no-calibration", help="Tune on the raw scores."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="Report folder."),
    ):
        """Tune the weights of U = Σ w_k f(p_k) by Bayesian optimisation (Optuna TPE, resumable SQLite
        study) on the validation scores; report the best weights (or Pareto front) on held-out rows."""
        from hmtrec.calibrate.workflow import parse_objective, tune_utility as run_tuning

        extra = list(overrides or [])
        if group is not None:
            extra.append(f"columns.group={group}")
        if heads:
            extra.append(f"columns.heads=[{heads}]")
        gains = _pairs(gain, "--gain")
        if objective:
            parsed = [parse_objective(o).model_copy(update={"gains": gains} if gains else {}) for o in objective]
            extra.append("objectives=" + json.dumps([o.model_dump(mode="json") for o in parsed]))
        elif gains:
            extra.append("objectives=" + json.dumps([{"name": "ndcg", "k": 10, "gains": gains}]))
        if min_head_ratio is not None:
            extra.append(f"constraints.min_head_ndcg_ratio={min_head_ratio}")
        for key, value in (("n_trials", n_trials), ("sampler", sampler), ("storage", storage),
                           ("study_name", study_name)):
            if value is not None:
                extra.append(f"tuning.{key}={value}")
        if compare_random is not None:
            extra.append(f"tuning.compare_random={str(compare_random).lower()}")
        if fail_running:
            extra.append("tuning.fail_running=true")
        if no_calibration:
            extra.append("apply_calibration=false")
        cfg = _load("utility", config, extra)
        result = run_tuning(target, cfg, heldout=heldout, output=output, calibration=calibration)
        from rich.markup import escape

        def line(tag: str, row: dict) -> str:
            return escape(f"[{tag}] weights " + ", ".join(f"{h}={w:.4g}" for h, w in row["weights"].items())
                          + "; tuning " + ", ".join(f"{k}={v:.4f}" for k, v in row["tuning"].items()
                                                    if isinstance(v, float))
                          + ("; held-out " + ", ".join(f"{k}={v:.4f}" for k, v in row["heldout"].items()
                                                       if isinstance(v, float)) if "heldout" in row else ""))
        for row in result.best:
            console.print(line(f"{row['sampler']} trial {row['trial']}", row))
        for row in result.reference:
            console.print(line(row["trial"], row))
        console.print(("" if result.beats_references else "[bold red]") + escape(f"verdict: {result.verdict}")
                      + ("" if result.beats_references else "[/bold red]"))
        console.print(f"utility: {result.files['utility']}\nreport: {result.files['report']}\n"
                      f"study storage: {result.storage}")

    @app.command("synthetic-engagement")
    def synthetic_engagement(
        output: Path = typer.Argument(..., help="Folder for train.csv, valid.csv and test.csv."),
        requests: int = typer.Option(2000, "--requests", help="Number of requests."),
        items: int = typer.Option(20, "--items", help="Impressions per request."),
        downsampling: Optional[List[str]] = typer.Option(
            None, "--downsampling", help="head=w: scores as if trained keeping a fraction w of negatives."),
        seed: int = typer.Option(0, "--seed"),
    ):
        """Write synthetic impressions with 4 engagement heads (click, long_click, save, purchase), their
        true probabilities (p_true_<head>), labels and miscalibrated model scores, split by request."""
        from hmtrec.calibrate.synthetic import SyntheticEngagementSettings, make_engagement_data, split_by_request

        settings = SyntheticEngagementSettings(n_requests=requests, items_per_request=items, seed=seed,
                                               downsampling=_pairs(downsampling, "--downsampling"))
        output.mkdir(parents=True, exist_ok=True)
        for name, part in split_by_request(make_engagement_data(settings), seed=seed).items():
            part.to_csv(output / f"{name}.csv", index=False)
            console.print(f"{output / f'{name}.csv'}: {len(part)} impressions")
