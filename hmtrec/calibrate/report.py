"""Compare calibrators on held-out data and write the report: metrics before and after each
calibrator per head (and per scenario), reliability diagrams, and a Markdown summary.

Held-out means: fitted on one table and measured on another (valid -> test), or, with a single
table, cross-fitted: each fold is calibrated by a calibrator fitted on the other folds (whole
requests stay together when the table has a request column).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hmtrec.bench.report import markdown_table
from hmtrec.calibrate.calibration import (Calibration, CalibrationSettings, fit_calibration,
                                          save_calibration)
from hmtrec.calibrate.metrics import BinStrategy, calibration_metrics
from hmtrec.calibrate.plots import reliability_diagram
from hmtrec.calibrate.scores import ScoreTable
from hmtrec.config import StrictModel
from hmtrec.errors import ConfigError
from hmtrec.rundir import write_json

RAW = "raw"
METRIC_COLUMNS = ["rows", "positives", "base_rate", "mean_predicted", "ece", "brier", "ratio", "log_loss",
                  "auc", "true_base_rate", "true_mae", "true_rmse"]


class ReportSettings(StrictModel):
    compare: list[str] = ["platt", "temperature", "isotonic"]
    """Calibrators measured beside the raw scores (the saved one is `calibration.method`)."""
    bins: int = 15
    bin_strategy: BinStrategy = "uniform"
    """Bins of the ECE: `uniform` (the usual definition) or `quantile` (equal-count)."""
    plot_bins: int = 15
    plot_strategy: BinStrategy = "quantile"
    folds: int = 5
    """Cross-fitting folds when no separate evaluation table is given."""
    seed: int = 0


def _settings_for(method: str, settings: CalibrationSettings) -> CalibrationSettings:
    return settings.model_copy(update={"method": method, "methods": {}})


def _fold_ids(table: ScoreTable, folds: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if table.group_column is not None:
        codes, groups = pd.factorize(table.frame[table.group_column])
        return rng.permutation(len(groups))[codes] % folds
    return rng.permutation(len(table)) % folds


def calibrated_heldout(fit_table: ScoreTable, eval_table: ScoreTable | None, settings: CalibrationSettings,
                       folds: int = 5, seed: int = 0) -> ScoreTable:
    """Calibrated scores on held-out rows: `eval_table` calibrated by a fit on `fit_table`, or (when
    `eval_table` is None) `fit_table` cross-fitted over `folds` folds."""
    if eval_table is not None:
        return fit_calibration(fit_table, settings).transform(eval_table)
    if folds < 2:
        raise ConfigError("report.folds must be >= 2 to measure calibration without a separate table")
    fold = _fold_ids(fit_table, folds, seed)
    calibrated = {head: np.empty(len(fit_table)) for head in fit_table.heads}
    for k in range(folds):
        held = fold == k
        part = fit_calibration(fit_table.subset(~held), settings).transform(fit_table.subset(held))
        for head in fit_table.heads:
            calibrated[head][held] = part.scores(head)
    return fit_table.with_scores(calibrated)


def _metric_rows(table: ScoreTable, method: str, settings: ReportSettings) -> list[dict]:
    rows = []
    scenarios = table.scenarios()
    for head in table.heads:
        labelled = table.labelled(head)
        p, y, truth = table.scores(head)[labelled], table.labels(head)[labelled], table.truth(head)
        truth = None if truth is None else truth[labelled]
        groups = [("all", slice(None))]
        if scenarios is not None:
            head_scenarios = scenarios[labelled]
            groups += [(str(s), head_scenarios == s) for s in np.unique(head_scenarios)]
        for scenario, rows_mask in groups:
            metrics = calibration_metrics(p[rows_mask], y[rows_mask],
                                          true_p=None if truth is None else truth[rows_mask],
                                          n_bins=settings.bins, strategy=settings.bin_strategy)
            rows.append({"head": head, "scenario": scenario, "method": method, **metrics})
    return rows


def compare_calibrators(fit_table: ScoreTable, eval_table: ScoreTable | None, settings: CalibrationSettings,
                        report: ReportSettings | None = None) -> tuple[pd.DataFrame, dict[str, ScoreTable]]:
    """Metrics of the raw scores and of each calibrator on held-out rows.
    Returns (metrics frame: head, scenario, method, metrics...; {method: calibrated held-out table})."""
    report = report or ReportSettings()
    heldout_raw = eval_table if eval_table is not None else fit_table
    methods = [RAW]
    if settings.downsampling:
        methods.append("downsampling")
    methods += [m for m in [*report.compare, settings.method, *settings.methods.values()]
                if m not in methods and m != "none"]
    tables: dict[str, ScoreTable] = {}
    for method in methods:
        if method == RAW:
            tables[RAW] = heldout_raw
            continue
        method_settings = _settings_for(method, settings)
        if method == "downsampling":
            # The correction alone, for the heads that have a keep rate; others stay raw.
            method_settings = settings.model_copy(update={"method": "none", "methods": {}})
        tables[method] = calibrated_heldout(fit_table, eval_table, method_settings, report.folds, report.seed)
    rows = []
    for method, table in tables.items():
        for row in _metric_rows(table, method, report):
            label = _chain_label(method, row["head"], settings)
            if label is not None:
                rows.append({**row, "method": label})
    frame = pd.DataFrame(rows)
    columns = ["head", "scenario", "method"] + [c for c in METRIC_COLUMNS if c in frame.columns]
    return frame[columns], tables


def _chain_label(method: str, head: str, settings: CalibrationSettings) -> str | None:
    """What was applied to `head` under `method` (None: nothing new, e.g. the correction alone for a
    head without a keep rate)."""
    if method == RAW:
        return RAW
    keep_rate = settings.downsampling.get(head)
    if method == "downsampling":
        return "downsampling" if keep_rate is not None else None
    return f"downsampling+{method}" if keep_rate is not None else method


def write_calibration_report(out_dir: str | Path, calibration: Calibration, metrics: pd.DataFrame,
                             tables: dict[str, ScoreTable], settings: CalibrationSettings,
                             report: ReportSettings, *, heldout_note: str,
                             calibration_dir: str | Path | None = None) -> dict[str, Path]:
    """calibration.json (in `calibration_dir`, default `out_dir`), and in `out_dir`: metrics.csv,
    metrics.json, report.md and reliability_<head>.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"calibration": save_calibration(calibration, calibration_dir or out_dir)}
    metrics.to_csv(out_dir / "metrics.csv", index=False)
    write_json(out_dir / "metrics.json", metrics.to_dict(orient="records"))
    written["metrics"] = out_dir / "metrics.csv"
    raw = tables[RAW]
    for head in raw.heads:
        labelled = raw.labelled(head)
        curves = {_chain_label(m, head, settings): (t.scores(head)[labelled], t.labels(head)[labelled])
                  for m, t in tables.items() if _chain_label(m, head, settings) is not None}
        written[f"plot_{head}"] = reliability_diagram(
            curves, out_dir / f"reliability_{head}.png", title=f"{head}: reliability on held-out rows",
            n_bins=report.plot_bins, strategy=report.plot_strategy)
    lines = ["# Calibration report", "",
             f"Fitted on `{calibration.fitted_on.get('source')}` ({calibration.fitted_on.get('rows')} rows); "
             f"saved method: `{settings.method}`"
             + (f" (per head: {settings.methods})" if settings.methods else "")
             + (f"; down-sampling keep rates {settings.downsampling}" if settings.downsampling else "")
             + ("; one calibrator per scenario" if settings.per_scenario else "") + ".",
             f"Metrics are measured on {heldout_note}. ECE uses {report.bins} {report.bin_strategy} bins; "
             "ratio = Σp / Σy.", ""]
    shown = [c for c in ["method", "rows", "positives", "base_rate", "mean_predicted", "ece", "brier", "ratio",
                         "log_loss", "auc", "true_base_rate", "true_mae"] if c in metrics.columns]
    for head in raw.heads:
        lines += [f"## {head}", "", f"![reliability]({f'reliability_{head}.png'})", ""]
        head_rows = metrics[(metrics["head"] == head) & (metrics["scenario"] == "all")]
        lines.append(markdown_table(head_rows[shown].to_dict(orient="records"), shown))
        by_scenario = metrics[(metrics["head"] == head) & (metrics["scenario"] != "all")]
        if not by_scenario.empty:
            lines += ["", "By scenario:", ""]
            columns = ["scenario"] + shown
            lines.append(markdown_table(by_scenario[columns].to_dict(orient="records"), columns))
        lines.append("")
    if calibration.notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in calibration.notes] + [""]
    (out_dir / "report.md").write_text("\n".join(lines))
    written["report"] = out_dir / "report.md"
    return written
