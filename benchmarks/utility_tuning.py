"""Utility weight tuning on synthetic engagement data, written to docs/benchmarks.md:

1. Bayesian optimisation (Optuna TPE) against random search with the same number of trials, repeated
   with different seeds; the median best objective on the tuning (valid) split and the objective of
   each search's best weights on the held-out (test) split. Unconstrained and constrained.
2. A study interrupted mid-trial and resumed from its SQLite storage: no trial is lost.
3. Two objectives: the Pareto front of click NDCG against purchase NDCG.

    python benchmarks/utility_tuning.py [--trials 40] [--repeats 7] [--requests 6000]
    python benchmarks/utility_tuning.py --ranking-run RUN [--repeats 3]   # a real ranking run (section 2)

4. With `--ranking-run RUN` (a ranking run directory whose predictions carry a `user_id` column, e.g.
   one of benchmarks/ml1m_multiscenario.py's): tuned weights of U = w_click p_click + w_like p_like
   against equal weights and each head alone, tuned on the run's validation predictions and
   scored on its test predictions, each user's rows one request, repeated with several seeds.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hmtrec.bench.report import markdown_table, update_section  # noqa: E402
from hmtrec.calibrate.calibration import CalibrationSettings, fit_calibration  # noqa: E402
from hmtrec.calibrate.plots import optimisation_history, pareto_plot  # noqa: E402
from hmtrec.calibrate.scores import ScoreColumns, validate_scores  # noqa: E402
from hmtrec.calibrate.synthetic import SyntheticEngagementSettings, make_engagement_data, split_by_request  # noqa: E402
from hmtrec.calibrate.tuning import (TuningSettings, best_so_far, best_trials, completed_trials,  # noqa: E402
                                     default_weight_ranges, make_storage, run_study, weights_of)
from hmtrec.calibrate.utility import Constraints, Objective, UtilityEvaluator  # noqa: E402

IMAGES = REPO / "docs" / "img" / "calibration"
GAINS = {"click": 1.0, "long_click": 2.0, "save": 4.0, "purchase": 20.0}


def _tables(n_requests: int, seed: int):
    parts = split_by_request(make_engagement_data(SyntheticEngagementSettings(n_requests=n_requests, seed=seed)),
                             seed=seed)
    columns = ScoreColumns(group="request_id")
    valid, test = (validate_scores(parts[s], columns, source=f"synthetic {s}") for s in ("valid", "test"))
    # Tune on calibrated probabilities, as in production: calibrators fitted on valid.
    calibration = fit_calibration(valid, CalibrationSettings(method="isotonic"))
    return calibration.transform(valid), calibration.transform(test)


def compare_samplers(valid, test, objective: Objective, constraints, trials: int, repeats: int, startup: int):
    tuning = UtilityEvaluator(valid, [objective], constraints)
    heldout = UtilityEvaluator(test, [objective], constraints)
    ranges = default_weight_ranges(tuning.heads, {})
    label = objective.label
    results, histories = {}, {}
    for sampler in ("tpe", "random"):
        best_valid, best_test, curves = [], [], []
        for seed in range(repeats):
            settings = TuningSettings(n_trials=trials, sampler=sampler, seed=seed, startup_trials=startup)
            run = run_study(tuning, ranges, settings, storage=make_storage("memory", settings),
                            study_name=f"{sampler}-{seed}")
            best = best_trials(run.study)
            curves.append(best_so_far(run.study))
            if best:
                best_valid.append(best[0].values[0])
                evaluation = heldout.evaluate(weights_of(best[0]))
                best_test.append(evaluation.objectives[label] if evaluation.feasible else np.nan)
            else:
                best_valid.append(np.nan)
                best_test.append(np.nan)
        results[sampler] = (np.array(best_valid), np.array(best_test))
        histories[sampler] = np.array(curves)
    wins = int(np.sum(results["tpe"][0] > results["random"][0]))
    # equal weights and every head alone, on test: what the tuned weights must beat
    to_beat = max(value for _, value in reference_scores(tuning, heldout, label).values())
    rows = []
    for sampler, (best_valid, best_test) in results.items():
        rows.append({"objective": label + (" (constrained)" if constraints else ""), "sampler": sampler,
                     "trials": trials, "repeats": repeats,
                     "median best (valid)": float(np.nanmedian(best_valid)),
                     "min-max (valid)": f"{np.nanmin(best_valid):.4f}-{np.nanmax(best_valid):.4f}",
                     "median of best weights (test)": float(np.nanmedian(best_test)),
                     "beat equal weights and every single head (test)":
                         f"{int(np.sum(best_test > to_beat))}/{repeats}",
                     "TPE wins": f"{wins}/{repeats}" if sampler == "tpe" else ""})
    references = {"equal weights": {h: 1.0 for h in tuning.heads}, "gain weights": dict(GAINS)}
    references.update({f"{head} only": {h: float(h == head) for h in tuning.heads} for head in tuning.heads})
    reference_rows = []
    for name, weights in references.items():
        v, t = tuning.evaluate(weights), heldout.evaluate(weights)
        reference_rows.append({"objective": label + (" (constrained)" if constraints else ""), "weights": name,
                               "valid": v.objectives[label], "test": t.objectives[label],
                               "feasible (valid)": v.feasible})
    return rows, reference_rows, histories


def resume_demo(valid, trials: int) -> tuple[list[dict], str]:
    """Run a study, interrupt it inside a trial, resume from SQLite; count every trial."""
    evaluator = UtilityEvaluator(valid, [Objective(k=10, gains=GAINS)])
    ranges = default_weight_ranges(evaluator.heads, {})
    folder = Path(tempfile.mkdtemp(prefix="hmtrec-resume-"))
    url = f"sqlite:///{folder / 'study.db'}"
    settings = TuningSettings(n_trials=trials, storage=url, seed=0)
    interrupt_at = trials // 2
    seen = []

    def interrupt(trial, evaluation):
        seen.append(trial.params)
        if len(seen) == interrupt_at:
            raise KeyboardInterrupt  # what Ctrl-C does inside a trial

    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # Optuna logs the interrupted trial with a traceback
    try:
        run_study(evaluator, ranges, settings, storage=make_storage(url, settings), study_name="utility",
                  on_trial=interrupt)
    except KeyboardInterrupt:
        pass
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)

    before = optuna.load_study(study_name="utility", storage=url)
    states_before = [t.state.name for t in before.trials]
    resumed = run_study(evaluator, ranges, settings, storage=make_storage(url, settings), study_name="utility")
    complete = completed_trials(resumed.study)
    retried = [t for t in complete if t.user_attrs.get("retry_of") is not None]
    distinct = len({tuple(sorted(t.params.items())) for t in complete})
    shutil.rmtree(folder, ignore_errors=True)
    rows = [{"stage": "first session (Ctrl-C in trial %d)" % (interrupt_at - 1),
             "COMPLETE": states_before.count("COMPLETE"), "FAIL": states_before.count("FAIL"),
             "total COMPLETE": states_before.count("COMPLETE")},
            {"stage": "resumed with the same storage", "COMPLETE": resumed.ran, "FAIL": 0,
             "total COMPLETE": len(complete)}]
    note = (f"The interrupted trial's weights were re-queued ({len(retried)} retry, "
            f"same parameters: {bool(retried) and retried[0].params == seen[interrupt_at - 1]}); "
            f"{distinct} distinct weight vectors among the {len(complete)} COMPLETE trials "
            f"(the resumed sampler does not replay the first session's draws).")
    return rows, note


def pareto_demo(valid, test, trials: int) -> tuple[list[dict], Path]:
    objectives = [Objective(name="head_ndcg", head="click", k=10), Objective(name="head_ndcg", head="purchase", k=10)]
    tuning = UtilityEvaluator(valid, objectives)
    heldout = UtilityEvaluator(test, objectives)
    ranges = default_weight_ranges(tuning.heads, {})
    settings = TuningSettings(n_trials=trials, seed=0)
    run = run_study(tuning, ranges, settings, storage=make_storage("memory", settings), study_name="pareto")
    front = sorted(best_trials(run.study), key=lambda t: t.values[0])
    labels = [o.label for o in objectives]
    rows = []
    for trial in front:
        weights = weights_of(trial)
        test_values = heldout.evaluate(weights).objectives
        rows.append({"trial": trial.number, **{f"w[{h}]": w for h, w in weights.items()},
                     **{f"{l} (valid)": v for l, v in zip(labels, trial.values)},
                     **{f"{l} (test)": test_values[l] for l in labels}})
    points = np.array([t.values for t in completed_trials(run.study)])
    path = pareto_plot(points, np.array([t.values for t in front]), IMAGES / "utility_pareto.png",
                       labels=(labels[0], labels[1]), title=f"Pareto front, {trials} TPE trials (valid)")
    return rows, path


def reference_scores(tuning: UtilityEvaluator, heldout: UtilityEvaluator, label: str) -> dict[str, tuple]:
    """Equal weights and each head alone: (tuning, held-out) objective."""
    points = {"equal weights": {h: 1.0 for h in tuning.heads}}
    points.update({f"{h} only": {g: float(g == h) for g in tuning.heads} for h in tuning.heads})
    return {name: (tuning.evaluate(w).objectives[label], heldout.evaluate(w).objectives[label])
            for name, w in points.items()}


def ranking_run_comparison(run_dir: Path, gains: dict[str, float], trials: int, repeats: int,
                           startup: int) -> tuple[str, str]:
    """Tuned vs equal weights vs single heads on a real ranking run's predictions (request = user)."""
    from hmtrec.calibrate.scores import read_scores

    columns = ScoreColumns(group="user_id")
    valid = read_scores(run_dir / "predictions_valid.csv", columns)
    test = read_scores(run_dir / "predictions_test.csv", columns.model_copy(update={"heads": valid.heads}))
    objective = Objective(name="ndcg", k=10, gains={h: gains.get(h, 1.0) for h in valid.heads})
    tuning, heldout = UtilityEvaluator(valid, [objective]), UtilityEvaluator(test, [objective])
    label = objective.label
    ranges = default_weight_ranges(tuning.heads, {})
    references = reference_scores(tuning, heldout, label)
    rows = []
    for seed in range(repeats):
        settings = TuningSettings(n_trials=trials, seed=seed, startup_trials=startup)
        run = run_study(tuning, ranges, settings, storage=make_storage("memory", settings), study_name=f"r{seed}")
        best = best_trials(run.study)[0]
        weights = weights_of(best)
        tuned_test = heldout.evaluate(weights).objectives[label]
        best_reference = max(references.items(), key=lambda item: item[1][1])
        rows.append({"repeat (seed)": seed, **{f"w[{h}]": round(w, 4) for h, w in weights.items()},
                     f"tuned {label} (valid)": best.values[0], f"tuned {label} (test)": tuned_test,
                     f"equal weights (test)": references["equal weights"][1],
                     **{f"{h} only (test)": references[f"{h} only"][1] for h in tuning.heads},
                     "tuned beats all (test)": tuned_test > best_reference[1][1]})
    body = (f"Run `{run_dir.name}`: {len(valid)} validation rows tuned on, {len(test)} test rows reported, each "
            f"user's rows one request (NDCG@10 of g = Σ gain_k y_k, gains {objective.gains}), scores as the model "
            f"wrote them (raw). {trials} TPE trials per repeat ({startup} start-up; the study starts from equal "
            "weights and each head dominant, `tuning.seed_references`), click weight fixed to 1.\n\n"
            + markdown_table(rows) + "\nReferences (valid, test): "
            + "; ".join(f"{name} {v:.4f}, {t:.4f}" for name, (v, t) in references.items()) + ".\n")
    return body, label


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--startup", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-ratio", type=float, default=0.85,
                        help="Constrained run: each head's NDCG@10 >= this fraction of its single-head optimum.")
    parser.add_argument("--ranking-run", type=Path, default=None,
                        help="Only section 4: tune on this ranking run's predictions (request = user_id).")
    parser.add_argument("--ranking-gains", default="click=1,like=3")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.ranking_run is not None:
        gains = {k: float(v) for k, v in (item.split("=") for item in args.ranking_gains.split(","))}
        body, _ = ranking_run_comparison(args.ranking_run, gains, args.trials, args.repeats, args.startup)
        body += f"\nRun time: {time.perf_counter() - started:.0f} s.\n"
        update_section("utility-tuning-ranking", body, title="Utility weight tuning on a real ranking run "
                       "(MovieLens-1M click / like)", command="python benchmarks/utility_tuning.py" + "".join(
                           f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                           if v != parser.get_default(k)))
        print(body)
        return
    valid, test = _tables(args.requests, args.seed)
    cases = [(Objective(name="value", k=5, gains=GAINS), None),
             (Objective(name="ndcg", k=10, gains=GAINS), None),
             (Objective(name="ndcg", k=10, gains=GAINS), Constraints(min_head_ndcg_ratio=args.min_ratio, k=10))]
    rows, references, histories = [], [], {}
    for objective, constraints in cases:
        case_rows, case_references, case_histories = compare_samplers(
            valid, test, objective, constraints, args.trials, args.repeats, args.startup)
        rows += case_rows
        references += case_references
        if not histories:
            histories = case_histories
    IMAGES.mkdir(parents=True, exist_ok=True)
    optimisation_history(histories, IMAGES / "utility_history.png",
                         title=f"best {cases[0][0].label} so far ({args.repeats} seeds; median and range)",
                         ylabel=cases[0][0].label)
    resume_rows, resume_note = resume_demo(valid, trials=20)
    pareto_rows, _ = pareto_demo(valid, test, args.trials)
    seconds = time.perf_counter() - started
    body = "\n".join([
        f"Synthetic engagement data (`hmtrec.calibrate.synthetic`, {args.requests} requests x 20 impressions, "
        f"seed {args.seed}; 60/20/20 split by request). Scores calibrated with isotonic regression fitted on "
        f"valid; U = Σ w_k p_k with w_click fixed to 1 and the other three weights log-uniform in [0.01, 100]. "
        f"Objectives, with the engagement gain g = Σ gain_k y_k, gains {GAINS}: value@5 = mean gain of each "
        "request's top 5 impressions (value per shown impression), and NDCG@10 of g per request. Weights are "
        f"tuned on valid ({len(valid)} impressions) and the best weights then scored on test. Each search gets "
        f"{args.trials} trials (TPE: {args.startup} random start-up trials, multivariate); {args.repeats} repeats "
        f"with seeds 0..{args.repeats - 1}; 'TPE wins' counts the seeds where TPE's best beats random's. "
        f"Constrained: every head's NDCG@10 must stay >= {args.min_ratio:.0%} of its single-head optimum "
        "(ranking by that head alone); only feasible trials count.", "",
        markdown_table(rows), "",
        "Fixed weight vectors for reference (`gain weights`: w_k = gain_k, i.e. ranking by the expected "
        "gain Σ gain_k p_k, which is what calibrated probabilities make possible):", "",
        markdown_table(references), "",
        "![history](img/calibration/utility_history.png)", "",
        "**Resuming.** 20 trials in SQLite, interrupted by a KeyboardInterrupt inside trial "
        f"{20 // 2 - 1}, then the same command again:", "", markdown_table(resume_rows), "", resume_note, "",
        f"**Two objectives** (NDCG@10 of click against NDCG@10 of purchase, {args.trials} TPE trials): the "
        "Pareto front on valid and the same weights on test.", "", markdown_table(pareto_rows), "",
        "![pareto](img/calibration/utility_pareto.png)", "",
        f"Run time: {seconds:.0f} s.",
    ])
    update_section("utility-tuning", body, title="Utility weight tuning: TPE vs random search",
                   command="python benchmarks/utility_tuning.py" + "".join(
                       f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v != parser.get_default(k)))
    print(body)


if __name__ == "__main__":
    main()
