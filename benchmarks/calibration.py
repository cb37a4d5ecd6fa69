"""Calibration before/after each calibrator on three sources, written to docs/benchmarks.md:

- synthetic engagement data with known true probabilities (4 heads, 3 scenarios): ECE, Brier,
  Σp/Σy and the error against the truth, global and per-scenario calibrators; and a logistic
  regression trained on negatively down-sampled data, where the down-sampling correction must
  recover the true base rate;
- MovieLens-1M (click / like heads of an MMoE run of the ranking pipeline; valid -> test);
- Diginetica view -> purchase (a logistic regression on a time split of the sample; valid -> test).

    python benchmarks/calibration.py                       # all three (trains MMoE if no run given)
    python benchmarks/calibration.py --ml1m-run RUN_DIR    # reuse a trained ranking run
    python benchmarks/calibration.py --only synthetic

Full reports (every scenario, every plot) go to --output (default bench-results/calibration); the
reliability diagrams shown in the docs are copied to docs/img/calibration/.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hmtrec.bench.report import markdown_table, update_section  # noqa: E402
from hmtrec.calibrate.calibration import CalibrationSettings, fit_calibration  # noqa: E402
from hmtrec.calibrate.calibrators import DownsamplingCorrection  # noqa: E402
from hmtrec.calibrate.report import ReportSettings, compare_calibrators, write_calibration_report  # noqa: E402
from hmtrec.calibrate.scores import ScoreColumns, read_scores, validate_scores  # noqa: E402
from hmtrec.calibrate.synthetic import (HEADS, HeadDistortion, SyntheticEngagementSettings,  # noqa: E402
                                        downsample_negatives, make_engagement_data, split_by_request)

IMAGES = REPO / "docs" / "img" / "calibration"
SHOWN = ["head", "method", "rows", "positives", "mean_predicted", "ece", "brier", "ratio", "log_loss", "auc"]
TRUTH = ["true_base_rate", "true_mae"]


def _table(metrics: pd.DataFrame, columns: list[str], scenario: str = "all") -> str:
    rows = metrics[metrics["scenario"] == scenario]
    columns = [c for c in columns if c in rows.columns]
    return markdown_table(rows[columns].to_dict(orient="records"), columns)


def _compare(valid, test, settings: CalibrationSettings, report: ReportSettings, out_dir: Path, note: str,
             per_scenario_too: bool = False) -> tuple[pd.DataFrame, dict]:
    """Metrics of every calibrator (and, optionally, of their per-scenario versions) + full report."""
    metrics, tables = compare_calibrators(valid, test, settings, report)
    write_calibration_report(out_dir, fit_calibration(valid, settings), metrics, tables, settings, report,
                             heldout_note=note)
    if per_scenario_too:
        scenario_settings = settings.model_copy(update={"per_scenario": True})
        scenario_report = report.model_copy(update={"compare": ["platt", "isotonic"]})
        by_scenario, _ = compare_calibrators(valid, test, scenario_settings, scenario_report)
        by_scenario = by_scenario[by_scenario["method"] != "raw"].copy()
        by_scenario["method"] = by_scenario["method"] + " per scenario"
        metrics = pd.concat([metrics, by_scenario], ignore_index=True)
    head_rank = {h: i for i, h in enumerate(valid.heads)}
    method_rank = {m: i for i, m in enumerate(dict.fromkeys(metrics["method"]))}
    metrics = (metrics.assign(_head=metrics["head"].map(head_rank), _method=metrics["method"].map(method_rank),
                              _scenario=metrics["scenario"] != "all")
               .sort_values(["_head", "_scenario", "scenario", "_method"], kind="stable")
               .drop(columns=["_head", "_method", "_scenario"]).reset_index(drop=True))
    return metrics, tables


def _copy_plots(out_dir: Path, prefix: str, heads: list[str]) -> list[str]:
    IMAGES.mkdir(parents=True, exist_ok=True)
    names = []
    for head in heads:
        target = IMAGES / f"{prefix}_{head}.png"
        shutil.copyfile(out_dir / f"reliability_{head}.png", target)
        names.append(f"![{prefix} {head}](img/calibration/{target.name})")
    return names


# ---- synthetic -------------------------------------------------------------------------------------
def synthetic_section(out: Path, n_requests: int, seed: int) -> str:
    started = time.perf_counter()
    report = ReportSettings()
    settings = SyntheticEngagementSettings(n_requests=n_requests, seed=seed)
    parts = split_by_request(make_engagement_data(settings), seed=seed)
    valid, test = (validate_scores(parts[s], ScoreColumns()) for s in ("valid", "test"))
    metrics, _ = _compare(valid, test, CalibrationSettings(method="isotonic"), report, out / "synthetic",
                          "the synthetic test split", per_scenario_too=True)
    plots = _copy_plots(out / "synthetic", "synthetic", ["long_click", "save"])

    # Negative down-sampling with a real fitted model: per head, a logistic regression on the training
    # split keeping a fraction w of that head's negatives.
    from sklearn.linear_model import LogisticRegression

    keep_rate = 0.1
    features = [c for c in parts["train"].columns if c.startswith("f")]
    frames = {s: parts[s].copy() for s in ("valid", "test")}
    removed = []
    for head in HEADS:
        kept, filter_report = downsample_negatives(parts["train"], f"{head}_label", keep_rate, seed=seed)
        removed.append(f"{head}: {filter_report['negatives_removed']} of "
                       f"{filter_report['rows_before']} training rows removed")
        model = LogisticRegression(C=10.0, max_iter=2000).fit(kept[features], kept[f"{head}_label"])
        for split, frame in frames.items():
            frame[head] = model.predict_proba(frame[features])[:, 1]
    ds_valid, ds_test = (validate_scores(frames[s], ScoreColumns()) for s in ("valid", "test"))
    ds_settings = CalibrationSettings(method="isotonic", downsampling={h: keep_rate for h in HEADS})
    ds_report = ReportSettings(compare=["platt", "isotonic"])
    ds_metrics, _ = _compare(ds_valid, ds_test, ds_settings, ds_report, out / "synthetic-downsampled",
                             "the synthetic test split")
    ds_plots = _copy_plots(out / "synthetic-downsampled", "synthetic_downsampled", ["save"])

    # The correction is exact for a perfectly specified model trained on down-sampled data.
    exact = make_engagement_data(SyntheticEngagementSettings(
        n_requests=n_requests // 4, seed=seed, score_noise=0.0, scenario_offset=0.0,
        distortion={h: HeadDistortion() for h in HEADS}, downsampling={h: keep_rate for h in HEADS}))
    exact_error = max(float(np.max(np.abs(DownsamplingCorrection(keep_rate).transform(exact[h])
                                          - exact[f"p_true_{h}"]))) for h in HEADS)

    lines = [
        f"Synthetic impressions with known true probabilities (`hmtrec.calibrate.synthetic`, {n_requests} "
        f"requests x 20 impressions, 3 scenarios, seed {seed}; split 60/20/20 by request; calibrators fitted "
        "on valid, measured on test). The model scores are distorted per head (click over-confident and "
        "too high, long_click under-confident, save too high, purchase too low) with a different bias per "
        "scenario. `true_mae` = mean |p - p_true|, the error against the truth; ECE uses 15 uniform bins; "
        "ratio = Σp / Σy.", "",
        _table(metrics, SHOWN + TRUTH), "", *plots, "",
        f"**Negative down-sampling.** A logistic regression per head trained on the training split with only "
        f"w = {keep_rate} of that head's negatives kept ({'; '.join(removed)}), scored on the full valid/test "
        "splits. `downsampling` is the correction q = p / (p + (1 - p) / w) alone (nothing fitted); the "
        "others chain it with a fitted calibrator. click and save are logistic in the features (the model is "
        "well specified), long_click and purchase are products of two logistics (it is not).", "",
        _table(ds_metrics, ["head", "method", "true_base_rate", "mean_predicted", "ratio", "ece", "brier", "true_mae",
                            "auc"]), "", *ds_plots, "",
        f"For a perfectly specified model (scores generated as a model trained on down-sampled data would "
        f"learn them, no noise), the correction recovers the true probabilities exactly: max |q - p_true| = "
        f"{exact_error:.2e} over {len(exact)} impressions x 4 heads.", "",
        f"Run time: {time.perf_counter() - started:.0f} s.",
    ]
    return "\n".join(lines)


# ---- MovieLens-1M ----------------------------------------------------------------------------------
def _train_mmoe(run_dir: Path, epochs: int) -> Path:
    from hmtrec.config import load_config
    from hmtrec.pipelines import get_pipeline

    if (run_dir / "predictions_valid.csv").exists():
        return run_dir
    config = load_config(REPO / "configs" / "ranking" / "ml1m_mmoe.yaml",
                         # the network's own probabilities, as when these figures were first taken
                         [f"train.epochs={epochs}", "eval.write_predictions=true", "model.rate_blend=null"])
    get_pipeline("ranking").train(config, run_dir)
    return run_dir


def ml1m_section(out: Path, run_dir: Path | None, epochs: int) -> str:
    started = time.perf_counter()
    trained_here = run_dir is None
    run_dir = run_dir or _train_mmoe(out / "ml1m-mmoe-run", epochs)
    valid = read_scores(run_dir / "predictions_valid.csv", ScoreColumns(heads=["click", "like"]))
    test = read_scores(run_dir / "predictions_test.csv", ScoreColumns(heads=["click", "like"]))
    report = ReportSettings()
    metrics, _ = _compare(valid, test, CalibrationSettings(method="isotonic"), report, out / "ml1m",
                          "the MovieLens-1M test split", per_scenario_too=True)
    plots = _copy_plots(out / "ml1m", "ml1m", ["click", "like"])
    scenario_rows = metrics[(metrics["scenario"] != "all") & metrics["method"].isin(["raw", "isotonic",
                                                                                      "isotonic per scenario"])]
    import json

    import yaml

    run_config = yaml.safe_load((run_dir / "config.yaml").read_text())
    run_metrics = json.loads((run_dir / "metrics.json").read_text())
    lines = [
        f"MovieLens-1M multi-scenario protocol (3 age-group scenarios, 8:1:1 split by row order; see the "
        f"ranking benchmark). Model: a `{run_config['model']['name']}` run of `configs/ranking/ml1m_mmoe.yaml` "
        f"(train.epochs={run_config['train']['epochs']}, best epoch {run_metrics.get('best_epoch')}, test mean "
        f"AUC over (scenario, task) {run_metrics['test']['auc']:.4f})"
        + (" trained by this script" if trained_here else f", run directory `{run_dir}`")
        + "; its `predictions_valid.csv` fit the calibrators, `predictions_test.csv` measure them. "
          "Heads: click = rating > 3, like = rating > 4.", "",
        _table(metrics, SHOWN), "", "Per scenario (raw vs isotonic, global and per scenario):", "",
        markdown_table(scenario_rows[["head", "scenario", "method", "rows", "mean_predicted", "ece", "ratio",
                                      "auc"]].to_dict(orient="records")), "", *plots, "",
        f"Run time: {time.perf_counter() - started:.0f} s (calibration and report).",
    ]
    return "\n".join(lines)


# ---- Diginetica ------------------------------------------------------------------------------------
def diginetica_section(out: Path, keep_rate: float, seed: int) -> str:
    from sklearn.linear_model import LogisticRegression

    from hmtrec.calibrate.datasets import diginetica_purchase_table

    started = time.perf_counter()
    table = diginetica_purchase_table()
    frame = table.frame
    train = frame[frame["split"] == "train"]
    kept, filter_report = downsample_negatives(train, "purchase_label", keep_rate, seed=seed)
    model = LogisticRegression(C=1.0, max_iter=2000).fit(kept[table.features], kept["purchase_label"])
    scored = {}
    for split in ("valid", "test"):
        part = frame[frame["split"] == split].copy()
        part["purchase"] = model.predict_proba(part[table.features])[:, 1]
        scored[split] = validate_scores(part, ScoreColumns(heads=["purchase"], group="session_id"),
                                        source=f"diginetica {split}")
    settings = CalibrationSettings(method="isotonic", downsampling={"purchase": keep_rate})
    report = ReportSettings(bins=10, plot_bins=8)
    metrics, _ = _compare(scored["valid"], scored["test"], settings, report, out / "diginetica",
                          "the Diginetica test sessions")
    plots = _copy_plots(out / "diginetica", "diginetica", ["purchase"])
    r = table.report
    lines = [
        f"Diginetica (CIKM Cup 2016) view -> purchase on the sample views file: {r['rows']} viewed (session, "
        f"item) pairs from {r['sessions']} sessions, label = bought in that session ({r['positives']} "
        f"positives); sessions split 60/20/20 by first view date (valid/test positives: "
        f"{r['positives_by_split'].get('valid')}/{r['positives_by_split'].get('test')}). Model: logistic "
        f"regression on {len(table.features)} features ({', '.join(table.features)}; purchase counts only from "
        f"other sessions before {r['evaluation_start']}), trained with negatives down-sampled to w = {keep_rate} "
        f"({filter_report['negatives_removed']} of {filter_report['rows_before']} training rows removed). "
        "ECE with 10 uniform bins. **The sample is tiny: with about 30 held-out purchases these figures "
        "carry large sampling error; they show the workflow, not a claim.**", "",
        _table(metrics, SHOWN), "", *plots, "",
        f"Run time: {time.perf_counter() - started:.0f} s.",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["synthetic", "ml1m", "diginetica"], action="append")
    parser.add_argument("--ml1m-run", type=Path, help="A trained ranking run (click/like heads) to reuse.")
    parser.add_argument("--ml1m-epochs", type=int, default=1)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=REPO / "bench-results" / "calibration")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sections = args.only or ["synthetic", "ml1m", "diginetica"]
    command = "python benchmarks/calibration.py" + "".join(f" --only {s}" for s in args.only or []) + (
        f" --ml1m-run {args.ml1m_run}" if args.ml1m_run and "ml1m" in sections else "")
    if "synthetic" in sections:
        body = synthetic_section(args.output, args.requests, args.seed)
        update_section("calibration-synthetic", body, title="Calibration: synthetic engagement with known truth",
                       command=command)
        print(body)
    if "ml1m" in sections:
        body = ml1m_section(args.output, args.ml1m_run, args.ml1m_epochs)
        update_section("calibration-ml1m", body, title="Calibration: MovieLens-1M click / like (MMoE)",
                       command=command)
        print(body)
    if "diginetica" in sections:
        body = diginetica_section(args.output, keep_rate=0.25, seed=args.seed)
        update_section("calibration-diginetica", body, title="Calibration: Diginetica view -> purchase",
                       command=command)
        print(body)


if __name__ == "__main__":
    main()
