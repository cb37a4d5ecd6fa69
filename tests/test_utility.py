"""Utility blending objectives and Optuna weight tuning (resume, interruption, stale trials, Pareto)."""

from __future__ import annotations

import time
import warnings

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from hmtrec.calibrate.scores import from_arrays
from hmtrec.calibrate.synthetic import SyntheticEngagementSettings, make_engagement_data
from hmtrec.calibrate.scores import ScoreColumns, validate_scores
from hmtrec.calibrate.tuning import (TuningSettings, WeightRange, best_trials, completed_trials,
                                     default_weight_ranges, make_storage, pareto_front, run_study)
from hmtrec.calibrate.utility import Constraints, Objective, Transform, UtilityEvaluator
from hmtrec.errors import ConfigError


def _random_table(seed=0, n_groups=40, heads=("click", "buy")):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 12, n_groups)
    group = np.repeat(np.arange(n_groups), sizes)
    rng.shuffle(group)  # requests need not be contiguous in the input
    n = len(group)
    scores = {h: rng.random(n) for h in heads}
    labels = {h: (rng.random(n) < 0.3).astype(float) for h in heads}
    return from_arrays(scores, labels, group=group), scores, labels, group


def _brute_ndcg(utility, gain, group, k):
    values = []
    for g in np.unique(group):
        rows = np.flatnonzero(group == g)
        order = sorted(rows, key=lambda i: -utility[i])
        dcg = sum(gain[i] / np.log2(pos + 2) for pos, i in enumerate(order[:k]))
        ideal = sorted(gain[rows], reverse=True)[:k]
        idcg = sum(v / np.log2(pos + 2) for pos, v in enumerate(ideal))
        if idcg > 0:
            values.append(dcg / idcg)
    return float(np.mean(values))


def test_ndcg_and_value_match_a_brute_force_loop():
    table, scores, labels, group = _random_table()
    objectives = [Objective(name="ndcg", k=5, gains={"click": 1.0, "buy": 3.0}),
                  Objective(name="value", k=3, gains={"click": 1.0, "buy": 3.0}),
                  Objective(name="head_ndcg", k=None, head="buy")]
    evaluator = UtilityEvaluator(table, objectives, transforms={"buy": Transform(kind="power", exponent=0.5)})
    result = evaluator.evaluate({"click": 1.0, "buy": 2.5}).objectives
    utility = scores["click"] + 2.5 * np.sqrt(scores["buy"])
    gain = labels["click"] + 3.0 * labels["buy"]
    assert result["ndcg@5"] == pytest.approx(_brute_ndcg(utility, gain, group, 5), rel=1e-12)
    assert result["ndcg[buy]"] == pytest.approx(_brute_ndcg(utility, labels["buy"], group, 10**9), rel=1e-12)
    brute_value = []
    for g in np.unique(group):
        rows = np.flatnonzero(group == g)
        top = sorted(rows, key=lambda i: -utility[i])[:3]
        brute_value.append(gain[top].sum() / min(3, len(rows)))
    assert result["value@3"] == pytest.approx(np.mean(brute_value), rel=1e-12)


def test_ties_are_broken_at_random_not_by_input_order():
    # Every request's engaged item comes first in the input; all utilities are equal.
    group = np.repeat(np.arange(300), 5)
    labels = np.tile([1.0, 0, 0, 0, 0], 300)
    table = from_arrays({"click": np.full(1500, 0.5)}, {"click": labels}, group=group)
    first = UtilityEvaluator(table, [Objective(k=1)], seed=0).evaluate({"click": 1.0}).objectives["ndcg@1"]
    again = UtilityEvaluator(table, [Objective(k=1)], seed=0).evaluate({"click": 1.0}).objectives["ndcg@1"]
    assert first == again and 0.1 < first < 0.3  # about 1 in 5, not 1


def test_only_weight_ratios_matter_and_a_perfect_ranker_scores_one():
    table, *_ = _random_table(seed=1)
    evaluator = UtilityEvaluator(table, [Objective(k=5)])
    a = evaluator.evaluate({"click": 1.0, "buy": 2.0}).objectives["ndcg@5"]
    b = evaluator.evaluate({"click": 10.0, "buy": 20.0}).objectives["ndcg@5"]
    assert a == b
    labels = np.array([1.0, 0.0, 0.0, 1.0, 0.0])
    perfect = from_arrays({"click": labels * 0.9 + 0.05}, {"click": labels}, group=np.array([0, 0, 0, 1, 1]))
    assert UtilityEvaluator(perfect, [Objective(k=2)]).evaluate({"click": 1.0}).objectives["ndcg@2"] == 1.0


def test_head_constraint_compares_with_the_single_head_optimum():
    rng = np.random.default_rng(2)
    group = np.repeat(np.arange(200), 8)
    labels = {h: (rng.random(1600) < 0.3).astype(float) for h in ("click", "buy")}
    scores = {h: 0.6 * labels[h] + 0.4 * rng.random(1600) for h in labels}  # each head predicts its own label
    table = from_arrays(scores, labels, group=group)
    evaluator = UtilityEvaluator(table, [Objective(k=5)], Constraints(min_head_ndcg_ratio=0.98, k=5))
    alone = evaluator.evaluate({"click": 1.0, "buy": 0.0})
    # Ranking by click alone reaches click's optimum exactly; buy's NDCG then falls short.
    assert alone.head_ndcg["click"] == pytest.approx(evaluator.single_head_optimum["click"])
    assert alone.constraint_slack["click"] == pytest.approx(-0.02 * evaluator.single_head_optimum["click"])
    assert alone.constraint_slack["buy"] > 0 and not alone.feasible
    with pytest.raises(ConfigError, match="min_head_ndcg_ratio"):
        UtilityEvaluator(table, [Objective()], Constraints(min_head_ndcg_ratio={"click": 1.5}))


def test_evaluator_errors_name_the_problem():
    table, *_ = _random_table()
    with pytest.raises(ConfigError, match="unknown heads"):
        UtilityEvaluator(table, [Objective(gains={"view": 1.0})])
    with pytest.raises(ConfigError, match="head_ndcg needs `head`"):
        UtilityEvaluator(table, [Objective(name="head_ndcg")])
    no_group = from_arrays({"click": np.array([0.1])}, {"click": np.array([1.0])})
    with pytest.raises(ConfigError, match="request column"):
        UtilityEvaluator(no_group, [Objective()])


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(3)
    points = rng.random((60, 2))
    front = set(pareto_front(points).tolist())
    brute = {i for i in range(60) if not any((points[j] >= points[i]).all() and (points[j] > points[i]).any()
                                             for j in range(60))}
    assert front == brute


def _synthetic_evaluator(objectives=None, constraints=None, n_requests=150):
    frame = make_engagement_data(SyntheticEngagementSettings(n_requests=n_requests, items_per_request=10, seed=9))
    table = validate_scores(frame, ScoreColumns(group="request_id"))
    return UtilityEvaluator(table, objectives or [Objective(k=5, gains={"click": 1, "long_click": 2, "save": 3,
                                                                        "purchase": 10})], constraints)


def _params(study):
    return [(t.number, t.params) for t in completed_trials(study)]


def test_a_study_resumes_from_sqlite_without_losing_trials(tmp_path):
    evaluator = _synthetic_evaluator()
    ranges = default_weight_ranges(evaluator.heads, {})
    assert ranges["click"].fixed == 1.0 and ranges["save"].log
    url = f"sqlite:///{tmp_path / 'study.db'}"
    first = TuningSettings(n_trials=4, storage=url, seed=1)
    run = run_study(evaluator, ranges, first, storage=make_storage(url, first), study_name="u")
    assert run.ran == 4
    before = _params(run.study)
    # A new process: the same storage, a larger total.
    second = first.model_copy(update={"n_trials": 7})
    resumed = run_study(evaluator, ranges, second, storage=make_storage(url, second), study_name="u")
    assert resumed.ran == 3
    after = _params(resumed.study)
    assert len(after) == 7 and after[:4] == before
    assert len({tuple(sorted(p.items())) for _, p in after}) == 7  # the resumed sampler did not replay draws
    again = run_study(evaluator, ranges, second, storage=make_storage(url, second), study_name="u")
    assert again.ran == 0  # already complete


def test_an_interrupted_trial_is_failed_and_requeued_with_the_same_weights(tmp_path):
    evaluator = _synthetic_evaluator()
    ranges = default_weight_ranges(evaluator.heads, {})
    url = f"sqlite:///{tmp_path / 'study.db'}"
    settings = TuningSettings(n_trials=6, storage=url, seed=2, seed_references=False)   # trial mechanics only
    seen = []

    def interrupt_on_fourth(trial, evaluation):
        seen.append(dict(trial.params))
        if len(seen) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_study(evaluator, ranges, settings, storage=make_storage(url, settings), study_name="u",
                  on_trial=interrupt_on_fourth)
    study = optuna.load_study(study_name="u", storage=url)
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE] * 3 + [TrialState.FAIL]
    interrupted = seen[3]

    resumed = run_study(evaluator, ranges, settings, storage=make_storage(url, settings), study_name="u")
    assert resumed.requeued == 1
    complete = completed_trials(resumed.study)
    assert len(complete) == 6
    retried = [t for t in complete if t.user_attrs.get("retry_of") == 3]
    assert len(retried) == 1 and retried[0].params == interrupted
    # Resuming again re-queues nothing more.
    assert run_study(evaluator, ranges, settings, storage=make_storage(url, settings), study_name="u").requeued == 0


def test_a_trial_left_running_by_a_killed_worker_is_failed_and_requeued(tmp_path):
    evaluator = _synthetic_evaluator()
    ranges = default_weight_ranges(evaluator.heads, {})
    url = f"sqlite:///{tmp_path / 'study.db'}"
    settings = TuningSettings(n_trials=2, storage=url, seed=3, heartbeat_interval=1, grace_period=1,
                              seed_references=False)   # trial mechanics only
    run_study(evaluator, ranges, settings, storage=make_storage(url, settings), study_name="u")
    # A worker that died mid-trial: RUNNING, with a heartbeat that then went silent.
    storage = make_storage(url, settings)
    study = optuna.load_study(study_name="u", storage=storage)
    with warnings.catch_warnings():  # Optuna warns that heartbeats are meant for optimize(): we fake a worker
        warnings.simplefilter("ignore", UserWarning)
        orphan = study.ask({"w_long_click": optuna.distributions.FloatDistribution(0.01, 100, log=True),
                            "w_save": optuna.distributions.FloatDistribution(0.01, 100, log=True),
                            "w_purchase": optuna.distributions.FloatDistribution(0.01, 100, log=True)})
    storage.record_heartbeat(orphan._trial_id)
    time.sleep(2.5)  # well past grace_period (heartbeat times are stored to the second): now stale
    more = settings.model_copy(update={"n_trials": 4})
    resumed = run_study(evaluator, ranges, more, storage=make_storage(url, more), study_name="u")
    trials = resumed.study.trials
    assert trials[orphan.number].state == TrialState.FAIL
    retried = [t for t in completed_trials(resumed.study) if t.user_attrs.get("retry_of") == orphan.number]
    assert len(retried) == 1 and retried[0].params == orphan.params
    assert len(completed_trials(resumed.study)) == 4

    # Without a heartbeat (e.g. written by another tool), `fail_running` clears it explicitly.
    silent = optuna.load_study(study_name="u", storage=url).ask()
    forced = more.model_copy(update={"fail_running": True})
    cleared = run_study(evaluator, ranges, forced, storage=make_storage(url, forced), study_name="u")
    assert cleared.failed_running == 1
    assert cleared.study.trials[silent.number].state == TrialState.FAIL


def test_a_study_cannot_be_resumed_with_other_objectives(tmp_path):
    evaluator = _synthetic_evaluator()
    ranges = default_weight_ranges(evaluator.heads, {})
    settings = TuningSettings(n_trials=2)
    storage = make_storage("memory", settings)
    run_study(evaluator, ranges, settings, storage=storage, study_name="u")
    other = _synthetic_evaluator([Objective(name="value", k=5)])
    with pytest.raises(ConfigError, match="objectives"):
        run_study(other, ranges, settings, storage=storage, study_name="u")
    with pytest.raises(ConfigError, match="not a database URL"):
        make_storage("study.db", settings)


def test_two_objectives_give_a_feasible_pareto_front():
    objectives = [Objective(name="head_ndcg", head="click", k=5), Objective(name="head_ndcg", head="purchase", k=5)]
    evaluator = _synthetic_evaluator(objectives, Constraints(min_head_ndcg_ratio={"save": 0.5}, k=5))
    ranges = default_weight_ranges(evaluator.heads, {"click": WeightRange(fixed=1.0)})
    settings = TuningSettings(n_trials=16, startup_trials=6)
    run = run_study(evaluator, ranges, settings, storage=make_storage("memory", settings), study_name="p")
    front = best_trials(run.study)
    assert front
    values = np.array([t.values for t in front])
    assert len(pareto_front(values)) == len(values)  # nobody on the front dominates another
    assert all(all(v <= 1e-12 for v in t.user_attrs["constraint_slack"].values()) for t in front)


def test_tune_utility_command_writes_weights_report_and_a_resumable_study(tmp_path):
    from typer.testing import CliRunner

    from hmtrec.cli import app

    frame = make_engagement_data(SyntheticEngagementSettings(n_requests=120, items_per_request=8, seed=11))
    frame[frame.request_id < 60].to_csv(tmp_path / "valid.csv", index=False)
    frame[frame.request_id >= 60].to_csv(tmp_path / "test.csv", index=False)
    out = tmp_path / "utility"
    args = ["tune-utility", str(tmp_path / "valid.csv"), "--heldout", str(tmp_path / "test.csv"), "--group",
            "request_id", "--gain", "purchase=10", "--objective", "ndcg@5", "--n-trials", "3", "--compare-random",
            "--output", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    import json

    artefact = json.loads((out / "utility.json").read_text())
    assert artefact["objectives"] == ["ndcg@5"] and artefact["best"][0]["weights"]["click"] == 1.0
    assert artefact["storage"].endswith("utility_study.db")
    assert "Search comparison" in (out / "report.md").read_text()
    assert (out / "history.png").stat().st_size > 0
    # the console shows equal weights and every head alone beside the tuned rows, and a verdict
    output = " ".join(result.output.split())
    assert "[equal weights] weights" in output and "[purchase only] weights" in output
    assert "verdict: tuned weights " in output and artefact["verdict"] in output
    result = CliRunner().invoke(app, [a if a != "3" else "5" for a in args])  # resume to 5 trials in total
    assert result.exit_code == 0, result.output
    for name in ("utility", "utility-random"):
        study = optuna.load_study(study_name=name, storage=artefact["storage"])
        assert len(completed_trials(study)) == 5
    # the same study rerun on other gains, another tuning table or another constraint is refused
    changed = {"gains": [a if a != "purchase=10" else "purchase=3" for a in args],
               "tuning table": [a if a != str(tmp_path / "valid.csv") else str(tmp_path / "test.csv") for a in args],
               "constraint": args + ["--min-head-ratio", "0.5"]}
    for what, changed_args in changed.items():
        result = CliRunner().invoke(app, changed_args)
        assert result.exit_code != 0
        message = " ".join(str(result.exception).split())
        assert "study 'utility' was built on other inputs" in message and what in message, (what, message)
    assert len(completed_trials(optuna.load_study(study_name="utility", storage=artefact["storage"]))) == 5


def test_a_new_study_starts_from_the_reference_points_so_the_best_is_never_below_them():
    from hmtrec.calibrate.tuning import reference_weights, weights_of

    evaluator = _synthetic_evaluator()
    ranges = default_weight_ranges(evaluator.heads, {})
    points = reference_weights(ranges)
    assert points["equal weights"] == {h: 1.0 for h in evaluator.heads}
    assert points["purchase dominant"] == {"click": 1.0, "long_click": 0.01, "save": 0.01, "purchase": 100.0}
    settings = TuningSettings(n_trials=7, seed=0)
    run = run_study(evaluator, ranges, settings, storage=make_storage("memory", settings), study_name="r")
    trials = completed_trials(run.study)
    assert [weights_of(t) for t in trials[:len(points)]] == list(points.values())
    label = evaluator.objectives[0].label
    best = best_trials(run.study)[0].values[0]
    assert best >= max(evaluator.evaluate(p).objectives[label] for p in points.values())
