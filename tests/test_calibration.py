"""Calibrators, calibration metrics, score tables and the `hmtrec calibrate` command."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from hmtrec.calibrate import apply_calibration, load_calibration
from hmtrec.calibrate.calibration import CalibrationSettings, fit_calibration, save_calibration
from hmtrec.calibrate.calibrators import (DownsamplingCorrection, IsotonicCalibrator, PlattCalibrator,
                                          TemperatureCalibrator, build_chain, logit, sigmoid)
from hmtrec.calibrate.metrics import (auc, brier_score, calibration_metrics, calibration_ratio,
                                      expected_calibration_error, reliability_curve)
from hmtrec.calibrate.scores import ScoreColumns, from_arrays, read_scores, validate_scores
from hmtrec.calibrate.synthetic import (HEADS, HeadDistortion, SyntheticEngagementSettings,
                                        downsample_negatives, make_engagement_data, split_by_request)
from hmtrec.errors import ConfigError, DataError


def _repeat(score_rate_count):
    """Rows with score p and exactly round(rate * n) positives out of n, per (p, rate, n)."""
    p, y = [], []
    for score, rate, n in score_rate_count:
        positives = int(round(rate * n))
        p += [score] * n
        y += [1] * positives + [0] * (n - positives)
    return np.array(p), np.array(y, dtype=float)


# ---- calibrators on tiny cases with known answers -------------------------------------------------
def test_platt_recovers_the_closed_form_with_two_distinct_scores():
    # Two score values: the 2-parameter logistic fit matches both empirical rates exactly.
    p, y = _repeat([(0.2, 0.1, 200), (0.7, 0.4, 100)])
    platt = PlattCalibrator().fit(p, y)
    z1, z2, r1, r2 = logit(0.2), logit(0.7), logit(0.1), logit(0.4)
    a = (r1 - r2) / (z1 - z2)
    assert platt.a == pytest.approx(a, abs=1e-6)
    assert platt.b == pytest.approx(r1 - a * z1, abs=1e-6)
    np.testing.assert_allclose(platt.transform(np.array([0.2, 0.7])), [0.1, 0.4], atol=1e-7)


def test_platt_recovers_a_known_distortion_on_a_large_sample():
    rng = np.random.default_rng(0)
    true_p = sigmoid(rng.normal(-1.5, 1.0, 200_000))
    y = (rng.random(len(true_p)) < true_p).astype(float)
    distorted = sigmoid(2.0 * logit(true_p) + 0.5)  # true = sigmoid((z - 0.5) / 2)
    platt = PlattCalibrator().fit(distorted, y)
    assert platt.a == pytest.approx(0.5, abs=0.02)
    assert platt.b == pytest.approx(-0.25, abs=0.03)


def test_temperature_of_a_single_score_value_is_the_logit_ratio():
    p, y = _repeat([(0.9, 0.75, 400)])
    temperature = TemperatureCalibrator().fit(p, y)
    assert temperature.temperature == pytest.approx(logit(0.9) / logit(0.75), rel=1e-6)
    assert temperature.transform(np.array([0.9]))[0] == pytest.approx(0.75, abs=1e-7)


def test_temperature_fit_is_the_likelihood_optimum():
    p, y = _repeat([(0.9, 0.7, 100), (0.2, 0.3, 150), (0.6, 0.55, 80)])
    fitted = TemperatureCalibrator().fit(p, y).temperature

    def nll(t):
        q = np.clip(sigmoid(logit(p) / t), 1e-15, 1 - 1e-15)
        return -np.sum(y * np.log(q) + (1 - y) * np.log(1 - q))
    assert nll(fitted) <= min(nll(fitted * 0.99), nll(fitted * 1.01))


def test_isotonic_is_pool_adjacent_violators_by_hand():
    # Labels 1,0,1,1 at scores .1,.2,.3,.4: the first two violate order and pool to 0.5.
    iso = IsotonicCalibrator().fit(np.array([0.1, 0.2, 0.3, 0.4]), np.array([1.0, 0.0, 1.0, 1.0]))
    np.testing.assert_allclose(iso.transform(np.array([0.1, 0.2, 0.3, 0.4])), [0.5, 0.5, 1.0, 1.0])
    # Linear between breakpoints, flat beyond them.
    assert iso.transform(np.array([0.25]))[0] == pytest.approx(0.75)
    np.testing.assert_allclose(iso.transform(np.array([0.0, 1.0])), [0.5, 1.0])


def test_isotonic_pools_equal_scores_with_weights():
    iso = IsotonicCalibrator().fit(np.array([0.5, 0.5, 0.5, 0.8]), np.array([1.0, 0.0, 0.0, 1.0]))
    assert iso.transform(np.array([0.5]))[0] == pytest.approx(1 / 3)


def test_downsampling_correction_formula_and_its_logit_form():
    p = np.array([0.0, 0.01, 0.3, 0.5, 0.99, 1.0])
    w = 0.05
    corrected = DownsamplingCorrection(w).transform(p)
    inner = p[1:-1]
    np.testing.assert_allclose(corrected[1:-1], inner / (inner + (1 - inner) / w), rtol=1e-12)
    np.testing.assert_allclose(logit(corrected[1:-1]), logit(inner) + np.log(w), rtol=1e-9)
    assert corrected[0] == 0.0 and corrected[-1] == 1.0
    with pytest.raises(ConfigError, match="keep_rate"):
        DownsamplingCorrection(0.0)


def test_downsampling_correction_is_exact_on_synthetic_data_and_recovers_the_base_rate():
    settings = SyntheticEngagementSettings(
        n_requests=400, seed=3, score_noise=0.0, scenario_offset=0.0, downsampling={"click": 0.1},
        distortion={h: HeadDistortion() for h in HEADS})
    frame = make_engagement_data(settings)
    scores, truth = frame["click"].to_numpy(), frame["p_true_click"].to_numpy()
    assert scores.mean() > 2 * truth.mean()  # trained on down-sampled data: far too high
    corrected = DownsamplingCorrection(0.1).transform(scores)
    np.testing.assert_allclose(corrected, truth, rtol=1e-6, atol=1e-12)
    assert corrected.mean() == pytest.approx(truth.mean(), rel=1e-6)


def test_downsample_negatives_keeps_every_positive_and_reports_removals():
    frame = make_engagement_data(SyntheticEngagementSettings(n_requests=300, seed=1))
    kept, report = downsample_negatives(frame, "click_label", 0.2, seed=0)
    assert kept["click_label"].sum() == frame["click_label"].sum()
    negatives_before = int((frame["click_label"] == 0).sum())
    assert report["negatives_removed"] == negatives_before - int((kept["click_label"] == 0).sum())
    assert 0.15 < (kept["click_label"] == 0).sum() / negatives_before < 0.25


@pytest.mark.parametrize("method", ["platt", "temperature", "isotonic", "downsampling"])
def test_monotone_calibrators_never_reverse_the_order_of_scores(method):
    frame = make_engagement_data(SyntheticEngagementSettings(n_requests=300, seed=2))
    table = validate_scores(frame, ScoreColumns())
    if method == "downsampling":
        settings = CalibrationSettings(method="none", methods={"save": "downsampling"}, downsampling={"save": 0.2})
    else:
        settings = CalibrationSettings(method=method, per_scenario=True, min_scenario_rows=100,
                                       min_scenario_positives=5)
    calibrated = fit_calibration(table, settings).transform(table)
    scenarios = table.scenarios()
    for head in (["save"] if method == "downsampling" else table.heads):
        for scenario in np.unique(scenarios):
            rows = scenarios == scenario
            raw, new = table.scores(head)[rows], calibrated.scores(head)[rows]
            order = np.argsort(raw, kind="stable")
            assert (np.diff(new[order]) >= -1e-15).all(), f"{method} reversed {head} in {scenario}"
            if method != "isotonic":  # strictly increasing maps keep distinct scores distinct
                distinct = np.diff(raw[order]) > 1e-9
                assert (np.diff(new[order])[distinct] > 0).all()


def test_per_scenario_calibration_removes_a_scenario_bias_a_global_one_cannot():
    settings = SyntheticEngagementSettings(n_requests=3000, seed=4, scenario_offset=1.0)
    parts = split_by_request(make_engagement_data(settings), seed=0)
    valid, test = (validate_scores(parts[s], ScoreColumns()) for s in ("valid", "test"))
    scenario_errors = {}
    for per_scenario in (False, True):
        calibrated = fit_calibration(valid, CalibrationSettings(method="platt", per_scenario=per_scenario)
                                     ).transform(test)
        scenarios = test.scenarios()
        # Measured against the known truth, so the noise of the test labels does not blur the comparison.
        scenario_errors[per_scenario] = np.mean([
            abs(calibrated.scores("click")[scenarios == s].mean() / test.truth("click")[scenarios == s].mean() - 1)
            for s in np.unique(scenarios)])
    assert scenario_errors[True] < 0.5 * scenario_errors[False]


def test_small_scenarios_fall_back_to_the_global_calibrator_with_a_note():
    frame = make_engagement_data(SyntheticEngagementSettings(n_requests=200, seed=5))
    table = validate_scores(frame, ScoreColumns(heads=["click"]))
    calibration = fit_calibration(table, CalibrationSettings(method="platt", per_scenario=True,
                                                             min_scenario_rows=10_000))
    assert calibration.heads["click"].by_scenario == {}
    assert len(calibration.notes) == 3 and "min_scenario_rows" in calibration.notes[0]


def test_rows_of_a_scenario_without_calibration_data_are_reported_when_applied():
    frame = make_engagement_data(SyntheticEngagementSettings(n_requests=300, seed=5))
    table = validate_scores(frame, ScoreColumns(heads=["click"]))
    scenario_column = table.scenario_column
    scenarios = sorted(frame[scenario_column].astype(str).unique())
    fitted_on = frame[frame[scenario_column].astype(str) != scenarios[0]]       # one scenario has no rows
    calibration = fit_calibration(validate_scores(fitted_on, ScoreColumns(heads=["click"])),
                                  CalibrationSettings(method="platt", per_scenario=True, min_scenario_rows=100,
                                                      min_scenario_positives=5))
    assert scenarios[0] not in calibration.heads["click"].by_scenario
    applied = apply_calibration(frame, calibration)
    unseen = int((frame[scenario_column].astype(str) == scenarios[0]).sum())
    notes = applied.attrs["calibration_notes"]
    assert notes == [f"head 'click': {unseen} rows of scenario {scenarios[0]!r} got the global calibrator "
                     "(no calibration data of their own for that scenario)"]
    rows = (frame[scenario_column].astype(str) == scenarios[0]).to_numpy()
    global_only = calibration.heads["click"].chain.transform(frame["click"].to_numpy(dtype=float)[rows])
    np.testing.assert_allclose(applied["click"].to_numpy()[rows], global_only)
    assert apply_calibration(fitted_on, calibration).attrs["calibration_notes"] == []


# ---- saving, loading, applying ---------------------------------------------------------------------
def test_calibration_round_trips_through_json_and_applies_to_a_frame(tmp_path):
    frame = make_engagement_data(SyntheticEngagementSettings(n_requests=300, seed=6))
    table = validate_scores(frame, ScoreColumns())
    settings = CalibrationSettings(method="isotonic", methods={"click": "platt", "long_click": "temperature"},
                                   downsampling={"save": 0.5}, per_scenario=True, min_scenario_rows=100,
                                   min_scenario_positives=5)
    calibration = fit_calibration(table, settings)
    path = save_calibration(calibration, tmp_path)
    data = json.loads(path.read_text())  # plain JSON, no pickle
    assert data["heads"]["click"]["steps"][0].keys() == {"method", "a", "b"}
    assert data["heads"]["long_click"]["steps"][0].keys() == {"method", "temperature"}
    assert [s["method"] for s in data["heads"]["save"]["steps"]] == ["downsampling", "isotonic"]
    assert data["heads"]["purchase"]["steps"][0].keys() == {"method", "x", "y"}

    loaded = load_calibration(tmp_path)
    applied = apply_calibration(frame, loaded)
    expected = calibration.transform(table)
    for head in HEADS:
        np.testing.assert_allclose(applied[head].to_numpy(), expected.scores(head), rtol=1e-12)
        np.testing.assert_array_equal(applied[f"{head}_raw"].to_numpy(), frame[head].to_numpy())
    assert load_calibration(tmp_path / "elsewhere") is None
    assert apply_calibration(frame, None) is frame


def test_a_corrupt_calibration_file_names_the_key(tmp_path):
    (tmp_path / "calibration.json").write_text(json.dumps(
        {"format": "hmtrec.calibration", "version": 1, "heads": {"click": {"steps": []}}}))
    with pytest.raises(ConfigError, match="heads.click.score_column"):
        load_calibration(tmp_path)
    (tmp_path / "calibration.json").write_text(json.dumps(
        {"format": "hmtrec.calibration", "version": 1,
         "heads": {"click": {"score_column": "click", "steps": [{"method": "platt", "slope": 1}]}}}))
    with pytest.raises(ConfigError, match="platt"):
        load_calibration(tmp_path)


# ---- metrics ---------------------------------------------------------------------------------------
def test_metrics_against_brute_force_references():
    rng = np.random.default_rng(7)
    p = rng.random(500)
    y = (rng.random(500) < p ** 2).astype(float)
    bins = np.minimum((p * 10).astype(int), 9)
    brute = sum((bins == b).sum() / len(p) * abs(p[bins == b].mean() - y[bins == b].mean())
                for b in range(10) if (bins == b).any())
    assert expected_calibration_error(p, y, 10) == pytest.approx(brute, rel=1e-12)
    assert brier_score(p, y) == pytest.approx(np.mean((p - y) ** 2))
    assert calibration_ratio(p, y) == pytest.approx(p.sum() / y.sum())
    pairs = [(i, j) for i in np.flatnonzero(y == 1) for j in np.flatnonzero(y == 0)]
    brute_auc = np.mean([1.0 if p[i] > p[j] else 0.5 if p[i] == p[j] else 0.0 for i, j in pairs])
    assert auc(p, y) == pytest.approx(brute_auc, rel=1e-12)


def test_auc_counts_ties_as_half_and_metrics_with_truth():
    assert auc(np.array([0.5, 0.5, 0.2]), np.array([1.0, 0.0, 0.0])) == pytest.approx(0.75)
    m = calibration_metrics(np.array([0.2, 0.4]), np.array([0.0, 1.0]), true_p=np.array([0.1, 0.6]))
    assert m["true_mae"] == pytest.approx(0.15) and m["true_base_rate"] == pytest.approx(0.35)
    curve = reliability_curve(np.array([0.05, 0.06, 0.95]), np.array([0.0, 1.0, 1.0]), n_bins=10)
    assert curve["count"].tolist() == [2, 1] and curve["observed_rate"].tolist() == [0.5, 1.0]


def test_calibrators_lower_ece_and_the_truth_error_on_held_out_synthetic_data():
    parts = split_by_request(make_engagement_data(SyntheticEngagementSettings(n_requests=2500, seed=8)), seed=1)
    valid, test = (validate_scores(parts[s], ScoreColumns()) for s in ("valid", "test"))
    head = "long_click"  # under-confident and shifted: all calibrators should help
    raw = calibration_metrics(test.scores(head), test.labels(head), true_p=test.truth(head))
    for method in ("platt", "isotonic"):
        calibrated = fit_calibration(valid, CalibrationSettings(method=method)).transform(test)
        after = calibration_metrics(calibrated.scores(head), test.labels(head), true_p=test.truth(head))
        assert after["ece"] < 0.5 * raw["ece"]
        assert after["true_mae"] < 0.6 * raw["true_mae"]
        assert abs(after["ratio"] - 1) < 0.15


# ---- score tables ----------------------------------------------------------------------------------
def _write(tmp_path, frame, name="scores.csv"):
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def test_score_table_detects_heads_labels_and_scenarios(tmp_path):
    frame = pd.DataFrame({"click": [0.1, 0.9], "click_label": [0, 1], "like": [0.2, 0.3], "label_like": [1, 0],
                          "scenario": ["a", "b"], "user": [1, 2]})
    table = read_scores(_write(tmp_path, frame))
    assert table.heads == ["click", "like"]
    assert table.label_columns == {"click": "click_label", "like": "label_like"}
    assert table.scenario_column == "scenario" and table.group_column is None


def test_score_table_missing_score_column_names_it(tmp_path):
    path = _write(tmp_path, pd.DataFrame({"click": [0.1], "click_label": [1]}))
    with pytest.raises(DataError, match=r"column 'like'.*score column of head 'like' is missing") as error:
        read_scores(path, ScoreColumns(heads=["click", "like"]))
    assert error.value.file == str(path) and error.value.column == "like"


def test_score_table_missing_label_column_names_it(tmp_path):
    path = _write(tmp_path, pd.DataFrame({"click": [0.1, 0.2]}))
    with pytest.raises(DataError, match="label column of head 'click' is missing") as error:
        read_scores(path, ScoreColumns(heads=["click"]))
    assert error.value.column == "click_label"


def test_nan_scores_give_the_row_and_column(tmp_path):
    path = _write(tmp_path, pd.DataFrame({"click": [0.1, 0.2, np.nan, 0.4], "click_label": [0, 1, 0, 1]}))
    with pytest.raises(DataError, match="missing or not finite") as error:
        read_scores(path)
    assert (error.value.row, error.value.column) == (3, "click")


def test_bad_values_give_the_row_and_column(tmp_path):
    cases = [({"click": [0.1, 1.5], "click_label": [0, 1]}, 2, "click", "not a probability"),
             ({"click": [0.1, "x"], "click_label": [0, 1]}, 2, "click", "not a number"),
             ({"click": [0.1, 0.2], "click_label": [0, 2]}, 2, "click_label", "expected 0 or 1")]
    for data, row, column, message in cases:
        with pytest.raises(DataError, match=message) as error:
            read_scores(_write(tmp_path, pd.DataFrame(data)), ScoreColumns(heads=["click"]))
        assert (error.value.row, error.value.column) == (row, column)
    with pytest.raises(DataError, match="scenario column is missing"):
        read_scores(_write(tmp_path, pd.DataFrame({"click": [0.1], "click_label": [1]})),
                    ScoreColumns(scenario="domain"))


def test_rows_without_a_label_are_left_out_of_that_head(tmp_path):
    # A task outside its facet has no label (NaN): the fit and the metrics skip those rows.
    p = np.array([0.2] * 100 + [0.7] * 100 + [0.9] * 50)
    y = np.array([1.0] * 10 + [0.0] * 90 + [1.0] * 40 + [0.0] * 60 + [np.nan] * 50)
    table = from_arrays({"click": p}, {"click": y})
    calibrated = fit_calibration(table, CalibrationSettings(method="platt")).transform(table)
    np.testing.assert_allclose(calibrated.scores("click")[[0, 100]], [0.1, 0.4], atol=1e-6)
    path = _write(tmp_path, pd.DataFrame({"click": p, "click_label": np.full(len(p), np.nan)}))
    with pytest.raises(DataError, match="no labelled row"):
        read_scores(path)


def test_build_chain_needs_a_keep_rate_for_downsampling_only():
    with pytest.raises(ConfigError, match="kept fraction"):
        build_chain("downsampling")
    table = from_arrays({"click": np.array([0.1, 0.8])}, {"click": np.array([0.0, 1.0])})
    with pytest.raises(ConfigError, match="head 'click'.*calibration.downsampling.click"):
        fit_calibration(table, CalibrationSettings(method="downsampling"))
    assert build_chain("platt", 1.0).method == "platt"
    assert build_chain("none", 0.5).method == "downsampling"


# ---- the command ----------------------------------------------------------------------------------
def test_calibrate_command_on_a_run_directory(tmp_path):
    from typer.testing import CliRunner

    from hmtrec.cli import app

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"kind": "ranking", "status": "done"}))
    parts = split_by_request(make_engagement_data(SyntheticEngagementSettings(n_requests=400, seed=10)), seed=0)
    columns = ["scenario", "click", "click_label", "purchase", "purchase_label"]
    parts["valid"][columns].to_csv(run_dir / "predictions_valid.csv", index=False)
    parts["test"][columns].to_csv(run_dir / "predictions_test.csv", index=False)
    result = CliRunner().invoke(app, ["calibrate", str(run_dir), "--method", "platt", "--set", "report.bins=10"])
    assert result.exit_code == 0, result.output
    calibration = load_calibration(run_dir)
    assert set(calibration.heads) == {"click", "purchase"}
    assert calibration.fitted_on["rows"] == len(parts["valid"])
    report = run_dir / "calibration"
    for name in ("report.md", "metrics.csv", "reliability_click.png", "reliability_purchase.png"):
        assert (report / name).stat().st_size > 0
    metrics = pd.read_csv(report / "metrics.csv")
    overall = metrics[(metrics.scenario == "all") & (metrics["head"] == "click")].set_index("method")
    assert overall.loc["raw", "rows"] == len(parts["test"])  # measured on the test predictions
    assert overall.loc["platt", "ece"] < overall.loc["raw", "ece"]
    assert "the held-out table" in (report / "report.md").read_text()


def test_calibrate_command_reports_bad_input_cleanly(tmp_path):
    from hmtrec.calibrate.workflow import CalibrateConfig, calibrate

    path = tmp_path / "scores.csv"
    pd.DataFrame({"click": [0.1, 0.2, 0.3], "click_label": [0, 1, np.nan], "like": [0.1, np.nan, 0.3],
                  "like_label": [1, 0, 1]}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"row 2, column 'like'"):
        calibrate(path, CalibrateConfig())
    with pytest.raises(DataError, match="no run.json"):
        calibrate(tmp_path, CalibrateConfig())


def test_shipped_calibration_and_utility_configs_validate():
    from pathlib import Path

    from hmtrec.calibrate import workflow  # noqa: F401  (registers the config kinds)
    from hmtrec.config import load_config

    paths = sorted((Path(__file__).resolve().parents[1] / "configs" / "calibrate").glob("*.yaml"))
    assert len(paths) >= 4
    kinds = {load_config(path).kind for path in paths}
    assert kinds == {"calibration", "utility"}


def test_a_trained_ranking_run_is_calibrated_and_predict_applies_it(tmp_path):
    """The whole chain: train a ranker (shared bottom, 1 epoch), calibrate its heads from the run's
    valid predictions, and `hmtrec predict` writes calibrated probabilities with the raw ones beside."""
    import yaml
    from typer.testing import CliRunner

    from hmtrec.cli import app
    from hmtrec.config import load_config
    from hmtrec.pipelines import get_pipeline

    frame = make_engagement_data(SyntheticEngagementSettings(n_requests=300, items_per_request=10, seed=12))
    rows = frame[["scenario", "f0", "f1", "f2", "f3"]].assign(click=frame["click_label"],
                                                            purchase=frame["purchase_label"])
    parts = split_by_request(rows.assign(request_id=frame["request_id"]), seed=0)
    for split, part in parts.items():
        part.drop(columns="request_id").to_csv(tmp_path / f"{split}.csv", index=False)
    config = {"kind": "ranking",
              "data": {s: str(tmp_path / f"{s}.csv") for s in ("train", "valid", "test")},
              "features": {"categorical": [], "numeric": ["f0", "f1", "f2", "f3"], "scenario": "scenario"},
              "tasks": [{"name": "click"}, {"name": "purchase"}],
              "model": {"name": "shared_bottom", "bottom_hidden": [8]},
              "train": {"epochs": 1, "batch_size": 256, "lr": 0.01, "threads": 1}}
    (tmp_path / "ranking.yaml").write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    get_pipeline("ranking").train(load_config(tmp_path / "ranking.yaml"), run_dir)

    runner = CliRunner()
    result = runner.invoke(app, ["calibrate", str(run_dir), "--method", "platt", "--set", "report.compare=[platt]"])
    assert result.exit_code == 0, result.output
    calibration = load_calibration(run_dir)
    assert set(calibration.heads) == {"click", "purchase"}

    result = runner.invoke(app, ["predict", str(run_dir), "--input", str(tmp_path / "test.csv"),
                                 "--output", str(tmp_path / "scores.csv")])
    assert result.exit_code == 0, result.output
    scores = pd.read_csv(tmp_path / "scores.csv")
    raw = pd.read_csv(run_dir / "predictions_test.csv")
    np.testing.assert_allclose(scores["click_raw"], raw["click"], rtol=1e-5)
    platt = calibration.heads["click"].chain.steps[0]
    np.testing.assert_allclose(scores["click"], platt.transform(scores["click_raw"].to_numpy()), rtol=1e-9)
    result = runner.invoke(app, ["predict", str(run_dir), "--input", str(tmp_path / "test.csv"),
                                 "--output", str(tmp_path / "raw.csv"), "--raw"])
    assert result.exit_code == 0 and "click_raw" not in pd.read_csv(tmp_path / "raw.csv").columns


def test_diginetica_purchase_table_labels_and_leakage_guard(data_dir):
    from hmtrec.calibrate.datasets import diginetica_purchase_table

    table = diginetica_purchase_table(data_dir / "diginetica")
    frame = table.frame
    views = pd.read_csv(data_dir / "diginetica" / "sample_train-item-views.csv", sep=";")
    purchases = pd.read_csv(data_dir / "diginetica" / "train-purchases.csv.gz", sep=";")
    assert len(frame) == len(views[["session_id", "item_id"]].drop_duplicates())
    bought = set(zip(purchases.sessionId, purchases.itemId))
    expected = np.array([(s, i) in bought for s, i in zip(frame.session_id, frame.item_id)])
    np.testing.assert_array_equal(frame.purchase_label.to_numpy() == 1, expected)
    # Sessions split in time order, and purchase counts only from other sessions before the evaluation period.
    first_day = views.groupby("session_id").eventdate.min()
    split_days = {s: first_day[frame.session_id[frame.split == s]] for s in ("train", "valid", "test")}
    assert split_days["train"].max() <= split_days["valid"].min() <= split_days["valid"].max() <= split_days["test"].min()
    earlier = purchases[(~purchases.sessionId.isin(set(views.session_id)))
                        & (purchases.eventdate < table.report["evaluation_start"])]
    some_item = frame.item_id[frame.item_purchases_before > 0].iloc[0]
    assert frame.item_purchases_before[frame.item_id == some_item].iloc[0] == (earlier.itemId == some_item).sum()
    assert frame[table.features].notna().all().all()
