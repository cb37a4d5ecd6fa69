"""The two end-to-end jobs behind `hmtrec calibrate` and `hmtrec tune-utility`, with their configs
(kinds `calibration` and `utility`). Each reads a ranking run directory (its predictions_valid.csv /
predictions_test.csv) or any score table, and writes its artefact and report to a folder."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from hmtrec.bench.report import markdown_table
from hmtrec.calibrate.calibration import (Calibration, CalibrationSettings, fit_calibration,
                                          load_calibration)
from hmtrec.calibrate.plots import optimisation_history, pareto_plot
from hmtrec.calibrate.report import ReportSettings, compare_calibrators, write_calibration_report
from hmtrec.calibrate.scores import ScoreColumns, ScoreTable, read_scores
from hmtrec.calibrate.tuning import (MEMORY, TuningSettings, WeightRange, best_so_far, best_trials,
                                     completed_trials, default_storage_url, default_weight_ranges,
                                     evaluation_row, is_feasible, make_storage, run_study, weights_of)
from hmtrec.calibrate.utility import Constraints, Objective, Transform, UtilityEvaluator
from hmtrec.config import StrictModel, dump_config, register_config
from hmtrec.errors import ConfigError, DataError
from hmtrec.rundir import close_run_dir, get_logger, open_run_dir, write_json

VALID_PREDICTIONS = "predictions_valid.csv"
TEST_PREDICTIONS = "predictions_test.csv"
UTILITY_FILE = "utility.json"


@register_config("calibration")
class CalibrateConfig(StrictModel):
    kind: Literal["calibration"] = "calibration"
    columns: ScoreColumns = ScoreColumns()
    calibration: CalibrationSettings = CalibrationSettings()
    report: ReportSettings = ReportSettings()


@register_config("utility")
class UtilityConfig(StrictModel):
    kind: Literal["utility"] = "utility"
    columns: ScoreColumns = ScoreColumns()
    apply_calibration: bool = True
    """Calibrate the scores first with the run's calibration.json (or --calibration), when one exists."""
    transforms: dict[str, Transform] = {}
    objectives: list[Objective] = [Objective()]
    constraints: Constraints | None = None
    weights: dict[str, WeightRange] = {}
    """Search range per head; default: the first head fixed to 1, others log-uniform in [0.01, 100]."""
    tuning: TuningSettings = TuningSettings()


@dataclass
class Inputs:
    fit: Path
    heldout: Path | None
    out_dir: Path
    artefact_dir: Path
    run_dir: Path | None


def resolve_inputs(target: str | Path, heldout: str | Path | None, output: str | Path | None,
                   report_name: str) -> Inputs:
    """A run directory: fit on its valid predictions, measure on its test predictions, put the
    artefact in the run directory and the report in <run>/<report_name>. A file: fit on it, measure
    on `heldout` (or cross-fit), write both to `output` (default <file stem>-<report_name>)."""
    target = Path(target)
    if target.is_dir():
        if not (target / "run.json").exists():
            raise DataError("not a run directory (no run.json) nor a score table", file=str(target))
        from hmtrec.rundir import RunDir

        RunDir(target).require_done(f"{report_name} fitting")  # status is written last: no torn predictions
        fit = target / VALID_PREDICTIONS
        if not fit.exists():
            raise DataError(f"the run has no {VALID_PREDICTIONS}: train it with the ranking pipeline "
                            "(eval.write_predictions: true) first", file=str(target))
        test = Path(heldout) if heldout is not None else target / TEST_PREDICTIONS
        out_dir = Path(output) if output is not None else target / report_name
        return Inputs(fit, test if test.exists() else None, out_dir, target, target)
    if not target.exists():
        raise DataError("score table or run directory does not exist", file=str(target))
    out_dir = Path(output) if output is not None else target.with_name(f"{target.name.split('.')[0]}-{report_name}")
    return Inputs(target, Path(heldout) if heldout is not None else None, out_dir, out_dir, None)


def _read_pair(inputs: Inputs, columns: ScoreColumns, require_group: bool = False
               ) -> tuple[ScoreTable, ScoreTable | None]:
    fit = read_scores(inputs.fit, columns, require_group=require_group)
    heldout = None
    if inputs.heldout is not None:
        # The held-out table must have the same heads as the fitted one.
        same = columns.model_copy(update={"heads": fit.heads})
        heldout = read_scores(inputs.heldout, same, require_group=require_group)
    for note in fit.notes:
        get_logger().info("score table: %s", note)
    return fit, heldout


# ---- calibrate -------------------------------------------------------------------------------------
@dataclass
class CalibrationResult:
    calibration: Calibration
    metrics: pd.DataFrame
    files: dict[str, Path]
    inputs: Inputs


def calibrate(target: str | Path, config: CalibrateConfig | None = None, *, heldout: str | Path | None = None,
              output: str | Path | None = None) -> CalibrationResult:
    config = config or CalibrateConfig()
    inputs = resolve_inputs(target, heldout, output, "calibration")
    open_run_dir(inputs.out_dir)
    try:
        fit_table, heldout_table = _read_pair(inputs, config.columns)
        calibration = fit_calibration(fit_table, config.calibration)
        calibration.notes[:0] = fit_table.notes
        metrics, tables = compare_calibrators(fit_table, heldout_table, config.calibration, config.report)
        note = (f"the held-out table `{inputs.heldout}`" if heldout_table is not None else
                f"`{inputs.fit}` itself, cross-fitted over {config.report.folds} folds")
        files = write_calibration_report(inputs.out_dir, calibration, metrics, tables, config.calibration,
                                         config.report, heldout_note=note, calibration_dir=inputs.artefact_dir)
        dump_config(config, inputs.out_dir / "calibrate_config.yaml")
        get_logger().info("calibration written to %s, report in %s", files["calibration"], inputs.out_dir)
    finally:
        close_run_dir(inputs.out_dir)
    return CalibrationResult(calibration, metrics, files, inputs)


# ---- tune-utility ----------------------------------------------------------------------------------
@dataclass
class UtilityResult:
    best: list[dict]
    """Per sampler and best trial: sampler, trial, weights, objectives on the tuning and held-out tables."""
    comparison: list[dict]
    files: dict[str, Path]
    storage: str
    study_names: dict[str, str]
    runs: dict
    reference: list[dict] = field(default_factory=list)
    """Equal weights and each head alone, evaluated like the best rows."""
    verdict: str = ""
    beats_references: bool = False


def parse_objective(text: str) -> Objective:
    """`ndcg@10`, `value@5`, `ndcg@10[click]` (one head's NDCG), `ndcg` (whole request)."""
    match = re.fullmatch(r"(ndcg|value)(?:@(\d+))?(?:\[(\w+)\])?", text.strip())
    if not match:
        raise ConfigError(f"--objective {text!r}: expected ndcg@K, value@K or ndcg@K[head]")
    name, k, head = match.groups()
    if head is not None and name != "ndcg":
        raise ConfigError(f"--objective {text!r}: only ndcg takes a [head]")
    return Objective(name="head_ndcg" if head else name, k=int(k) if k else None, head=head)


def _calibration_for(inputs: Inputs, config: UtilityConfig, calibration_path: str | Path | None
                     ) -> Calibration | None:
    if not config.apply_calibration:
        return None
    if calibration_path is not None:
        calibration = load_calibration(calibration_path)
        if calibration is None:
            raise ConfigError(f"--calibration {calibration_path}: no calibration.json there")
        return calibration
    return load_calibration(inputs.run_dir) if inputs.run_dir is not None else None


def _reference_rows(evaluators: dict[str, UtilityEvaluator], heads: list[str]) -> list[dict]:
    """Equal weights and each head alone: the points a tuned blend should beat."""
    rows = []
    candidates = {"equal weights": {h: 1.0 for h in heads}}
    candidates.update({f"{h} only": {g: float(g == h) for g in heads} for h in heads})
    for name, weights in candidates.items():
        row = {"sampler": "reference", "trial": name, "weights": weights}
        for split, evaluator in evaluators.items():
            row[split] = evaluation_row(evaluator.evaluate(weights))
        rows.append(row)
    return rows


def _flat(rows: list[dict], labels: list[str], heads: list[str]) -> list[dict]:
    flat = []
    for row in rows:
        item = {"sampler": row["sampler"], "trial": row["trial"]}
        item.update({f"w[{h}]": row["weights"][h] for h in heads})
        for split in ("tuning", "heldout"):
            if split in row:
                item.update({f"{label} ({split})": row[split][label] for label in labels})
                item[f"feasible ({split})"] = row[split]["feasible"]
        flat.append(item)
    return flat


def _trials_frame(study, sampler: str) -> pd.DataFrame:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        row = {"sampler": sampler, "number": trial.number, "state": trial.state.name,
               "retry_of": trial.user_attrs.get("retry_of")}
        row.update({f"w[{h}]": v for h, v in trial.user_attrs.get("weights", {}).items()})
        if trial.values is not None:
            row.update({f"objective_{i}": v for i, v in enumerate(trial.values)})
            row["feasible"] = is_feasible(trial)
        rows.append(row)
    return pd.DataFrame(rows)


def tune_utility(target: str | Path, config: UtilityConfig | None = None, *, heldout: str | Path | None = None,
                 output: str | Path | None = None, calibration: str | Path | None = None) -> UtilityResult:
    config = config or UtilityConfig()
    if config.columns.group is None:
        raise ConfigError("columns.group (--group): name the request column whose impressions are ranked together")
    inputs = resolve_inputs(target, heldout, output, "utility")
    open_run_dir(inputs.out_dir)
    try:
        return _tune(inputs, config, calibration)
    finally:
        close_run_dir(inputs.out_dir)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def study_fingerprint(inputs: Inputs, config: UtilityConfig, calibration: Calibration | None, heads: list[str],
                      ranges: dict) -> dict[str, str]:
    """What defines a tuning study, each part as short text (shown when a resumed study differs)."""
    def text(value) -> str:
        return json.dumps(value, sort_keys=True, default=str)
    return {
        "tuning table": f"{inputs.fit.name} sha256:{_file_digest(inputs.fit)}",
        "heads": text(heads),
        "objectives and gains": text([o.model_dump(mode="json") for o in config.objectives]),
        "constraint": text(config.constraints.model_dump(mode="json") if config.constraints else None),
        "transforms": text({h: t.model_dump(mode="json") for h, t in config.transforms.items()}),
        "weight ranges": text({h: r.model_dump(mode="json") for h, r in ranges.items()}),
        "calibration": "none" if calibration is None else
        "sha256:" + hashlib.sha256(text(calibration.to_dict()["heads"]).encode()).hexdigest()[:16],
    }


def verdict(best_rows: list[dict], reference: list[dict], label: str, sampler: str) -> tuple[str, bool]:
    """Whether the tuned weights beat equal weights and every single head on `label`, on the held-out
    table when there is one (else the tuning table), in one plain sentence."""
    best = [r for r in best_rows if r["sampler"] == sampler]
    if not best:
        return "no completed trial: nothing to compare", False
    split = "heldout" if "heldout" in best[0] else "tuning"
    tuned = best[0][split][label]
    beaten = [(r["trial"], r[split][label]) for r in reference if r[split][label] >= tuned]
    where = "held-out" if split == "heldout" else "tuning (no held-out table)"
    if not beaten:
        margin = tuned - max(r[split][label] for r in reference)
        return (f"tuned weights beat equal weights and every single head on {label} ({where}): {tuned:.4f}, "
                f"+{margin:.4f} over the best reference", True)
    names = ", ".join(f"{name} {value:.4f}" for name, value in beaten)
    return (f"tuned weights do NOT beat every reference on {label} ({where}): tuned {tuned:.4f}, "
            f"but {names}; prefer that reference", False)


def _tune(inputs: Inputs, config: UtilityConfig, calibration_path) -> UtilityResult:
    log = get_logger()
    tuning_table, heldout_table = _read_pair(inputs, config.columns, require_group=True)
    calibration = _calibration_for(inputs, config, calibration_path)
    if calibration is not None:
        tuning_table = calibration.transform(tuning_table)
        heldout_table = calibration.transform(heldout_table) if heldout_table is not None else None
    seed = config.tuning.seed or 0
    evaluators = {"tuning": UtilityEvaluator(tuning_table, config.objectives, config.constraints,
                                             config.transforms, seed)}
    if heldout_table is not None:
        evaluators["heldout"] = UtilityEvaluator(heldout_table, config.objectives, config.constraints,
                                                 config.transforms, seed)
    heads = tuning_table.heads
    ranges = default_weight_ranges(heads, config.weights)
    url = config.tuning.storage or default_storage_url(inputs.out_dir)
    storage = make_storage(url, config.tuning)
    samplers = [config.tuning.sampler] + (["random"] if config.tuning.compare_random
                                          and config.tuning.sampler != "random" else [])
    labels = [o.label for o in config.objectives]
    fingerprint = study_fingerprint(inputs, config, calibration, heads, ranges)
    study_names, runs, best_rows, histories, trial_frames = {}, {}, [], {}, []
    for sampler in samplers:
        name = config.tuning.study_name + ("" if sampler == config.tuning.sampler else f"-{sampler}")
        run = run_study(evaluators["tuning"], ranges, config.tuning, storage=storage, study_name=name,
                        sampler=sampler, fingerprint=fingerprint)
        log.info("study %s (%s): %d trials run now, %d re-queued, %d RUNNING failed", name, sampler, run.ran,
                 run.requeued, run.failed_running)
        study_names[sampler], runs[sampler] = name, run
        histories[sampler] = best_so_far(run.study)
        trial_frames.append(_trials_frame(run.study, sampler))
        for trial in best_trials(run.study):
            weights = weights_of(trial)
            row = {"sampler": sampler, "trial": trial.number, "weights": weights}
            for split, evaluator in evaluators.items():
                row[split] = evaluation_row(evaluator.evaluate(weights))
            best_rows.append(row)
    reference = _reference_rows(evaluators, heads)
    summary, beats = verdict(best_rows, reference, labels[0], config.tuning.sampler)

    out = inputs.out_dir
    files: dict[str, Path] = {}
    pd.concat(trial_frames, ignore_index=True).to_csv(out / "trials.csv", index=False)
    files["trials"] = out / "trials.csv"
    if len(labels) == 1:
        files["history"] = optimisation_history(
            {s: h for s, h in histories.items()}, out / "history.png", title=f"utility tuning on {inputs.fit.name}",
            ylabel=labels[0])
    if len(labels) == 2:
        run = runs[config.tuning.sampler]
        points = np.array([t.values for t in completed_trials(run.study)])
        front = np.array([[r["tuning"][labels[0]], r["tuning"][labels[1]]] for r in best_rows
                          if r["sampler"] == config.tuning.sampler])
        files["pareto"] = pareto_plot(points, front, out / "pareto.png", labels=(labels[0], labels[1]),
                                      title="utility weights: Pareto front (tuning table)")
    main_best = [r for r in best_rows if r["sampler"] == config.tuning.sampler]
    artefact = {"heads": heads, "transforms": {h: t.model_dump() for h, t in config.transforms.items()},
                "objectives": labels, "storage": url if url != MEMORY else None, "study": study_names,
                "calibrated": calibration is not None, "verdict": summary, "beats_references": beats,
                "best": [{"trial": r["trial"], "weights": r["weights"], "tuning": r["tuning"],
                          "heldout": r.get("heldout")} for r in main_best]}
    write_json(inputs.artefact_dir / UTILITY_FILE, artefact)
    files["utility"] = inputs.artefact_dir / UTILITY_FILE
    dump_config(config, out / "utility_config.yaml")

    comparison = []
    if len(samplers) > 1 and len(labels) == 1:
        for sampler in samplers:
            best = [r for r in best_rows if r["sampler"] == sampler]
            row = {"sampler": sampler, "trials": len(histories[sampler]),
                   f"best {labels[0]} (tuning)": best[0]["tuning"][labels[0]] if best else float("nan")}
            if best and "heldout" in best[0]:
                row[f"{labels[0]} (held-out)"] = best[0]["heldout"][labels[0]]
            comparison.append(row)
    lines = ["# Utility tuning", "",
             f"U = Σ w_k · f_k(p_k) over heads {heads}"
             + (" (scores calibrated here by the run's or the given calibration.json)" if calibration is not None
                else " (scores as given in the table)") + "; "
             f"tuned on `{inputs.fit}`" + (f", reported on `{inputs.heldout}`" if inputs.heldout else "") + ".",
             f"Objectives: {labels}" + (f"; constraints: {config.constraints.model_dump()}" if config.constraints else "")
             + f". Storage: `{url}`, studies {study_names}.", "", f"**Verdict:** {summary}.", ""]
    if comparison:
        lines += ["## Search comparison (same budget)", "", markdown_table(comparison), ""]
    lines += ["## Best weights" + (" (Pareto front)" if len(labels) > 1 else ""), "",
              markdown_table(_flat(best_rows, labels, heads)), "", "## References", "",
              markdown_table(_flat(reference, labels, heads)), ""]
    if "history" in files:
        lines += ["![history](history.png)", ""]
    if "pareto" in files:
        lines += ["![pareto](pareto.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    files["report"] = out / "report.md"
    return UtilityResult(best_rows, comparison, files, url, study_names, runs, reference, summary, beats)
