"""The benchmark harness: suites, aggregation over seeds, time to quality, the candidate sweep
(against the evaluator), speed measurements, and one real run through `hmtrec bench run`."""

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from hmtrec.bench.candidate_sweep import candidate_sweep, default_ks
from hmtrec.bench.measure import run_measured, step_flops
from hmtrec.bench.results import summarize, summary_rows, write_results
from hmtrec.bench.runner import RunRecord, _same_config, run_suite
from hmtrec.bench.sections import ablation_effects, report_suite, verdict
from hmtrec.bench.speed import scoring_benchmark, synthetic_catalogue, training_benchmark
from hmtrec.bench.suites import Suite, builtin_suites, load_suite
from hmtrec.cli import app
from hmtrec.config import build_config
from hmtrec.data.loading import DataConfig, load_data
from hmtrec.data.synthetic import SyntheticConfig
from hmtrec.errors import ConfigError
from hmtrec.evaluate.ranking import EvalSettings, evaluate_model
from hmtrec.models.sequence.sasrec import SASRec, SASRecParams
from hmtrec.models.sequence.spop import SessionPop

torch.set_num_threads(1)

TINY_DATA = {"source": "synthetic", "synthetic": {"n_items": 300, "level_sizes": [5, 20], "n_sessions": 400}}


def tiny_suite(**changes) -> Suite:
    raw = {"name": "tiny", "title": "Tiny",
           "config": {"data": TINY_DATA, "train": {"epochs": 1, "batch_size": 64, "max_len": 10,
                                                    "valid_max_sequences": 50},
                      "eval": {"ks": [10, 20], "candidate_fraction": 0.2}},
           "seeds": [0, 1, 2], "quality": {"metric": "item/MRR@20", "value": 0.05},
           "models": [{"label": "pop", "model": {"name": "pop"}, "deterministic": True},
                      {"label": "sasrec", "model": {"name": "sasrec", "dim": 8}},
                      {"label": "hiersrec", "group": "hiersrec", "model": {"name": "hiersrec", "dim": 16}}]}
    raw.update(changes)
    return Suite.model_validate(raw)


def record(label, seed, mrr, recall, history=(), **fields) -> RunRecord:
    return RunRecord(label=label, seed=seed, group="baseline", status="done",
                     metrics={"item/MRR@20": mrr, "item/Recall@20": recall, "item/NDCG@10": mrr},
                     history=list(history), **fields)


# ---- suites ------------------------------------------------------------------------------------
def test_builtin_suites_are_valid_configs():
    assert {"diginetica", "movielens-1m", "foursquare-nyc", "synthetic-large"} <= set(builtin_suites())
    for name in builtin_suites():
        suite = load_suite(name)
        for model in suite.models:  # every run config validates, model parameters included
            config = build_config(suite.run_config(model, suite.seeds[0]), f"{name}/{model.label}")
            assert config.model["label"] == model.label and config.train.seed == suite.seeds[0]


def test_run_config_merges_model_training_overrides_and_seed():
    suite = tiny_suite(models=[{"label": "fast", "model": {"name": "sasrec", "dim": 8}, "train": {"lr": 0.01}}])
    config = suite.run_config(suite.models[0], 7, {"train": {"epochs": 3}, "eval": {"ks": [5]}})
    assert config["train"] == {"epochs": 3, "batch_size": 64, "max_len": 10, "valid_max_sequences": 50,
                               "lr": 0.01, "seed": 7}
    assert config["model"] == {"name": "sasrec", "dim": 8, "label": "fast"} and config["baselines"] == []
    assert config["eval"]["ks"] == [5] and suite.config["train"]["epochs"] == 1   # the suite is untouched


def test_a_plain_sequence_config_is_a_suite(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"kind": "sequence", "data": TINY_DATA, "model": {"name": "sasrec", "dim": 8},
                                    "baselines": ["pop", {"name": "spop", "label": "session-pop"}]}))
    suite = load_suite(path)
    assert [m.label for m in suite.models] == ["sasrec", "pop", "session-pop"] and suite.seeds == [0, 1, 2]


def test_suite_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="no suite 'nope'"):
        load_suite("nope")
    with pytest.raises(ConfigError, match="unknown model label"):
        tiny_suite().select(["sasrec", "bert4rec"])
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "config": {}, "models": [{"label": "x", "model": {"name": "pop"},
                                                                             "seed": 3}]}))
    with pytest.raises(ConfigError, match="models.0.seed"):
        load_suite(path)
    for field, value in [("metrics", ["item/Recall@5"]), ("metrics", ["Recall@20"]),
                         ("quality", {"metric": "item/MRR@50", "value": 0.1}),
                         ("references", [{"label": "paper", "source": "x", "metrics": {"item/HR@20": 0.5}}])]:
        path.write_text(yaml.safe_dump({"name": "bad", "config": {"eval": {"ks": [10, 20]}},
                                        "models": [{"label": "x", "model": {"name": "pop"}}], field: value}))
        with pytest.raises(ConfigError, match=rf"{field}.*is not computed.*config.eval.ks = \[10, 20\]") as error:
            load_suite(path)
        assert "(got {" not in str(error.value)   # a check across keys does not dump the whole file
    path.write_text(yaml.safe_dump({"name": "bad", "config": {"eval": {"ks": [0]}},
                                    "models": [{"label": "x", "model": {"name": "pop"}}]}))
    with pytest.raises(ConfigError, match=r"config.eval: .*key 'ks': .*positive integers"):
        load_suite(path)


def test_a_recorded_run_matches_its_config_once_model_defaults_are_resolved(tmp_path):
    suite = tiny_suite(models=[{"label": "s", "model": {"name": "sasrec", "dim": 8}}])
    config = suite.run_config(suite.models[0], 0)
    recorded = tmp_path / "seed0.yaml"
    recorded.write_text(yaml.safe_dump(config))
    spelled_out = {**config, "model": {**config["model"], "layers": SASRecParams().layers}}
    assert _same_config(recorded, config) and _same_config(recorded, spelled_out)
    assert not _same_config(recorded, {**config, "model": {**config["model"], "dim": 16}})
    assert not _same_config(recorded, {**config, "train": {**config["train"], "lr": 0.5}})
    # another thread count is the same run (a report rerun with --threads must not retrain it)
    assert _same_config(recorded, {**config, "train": {**config["train"], "threads": 7}})
    assert not _same_config(tmp_path / "missing.yaml", config)
    recorded.write_text(yaml.safe_dump({**config, "model": {**config["model"], "removed_option": 1}}))
    assert not _same_config(recorded, config)   # a recorded model that no longer validates


# ---- aggregation -------------------------------------------------------------------------------
def test_best_valid_reads_a_choice_made_after_training():
    """knn-hybrid picks its weight on validation after the epochs: the column shows the validation
    figure at the chosen weight, not the neural part's best epoch."""
    from hmtrec.bench.runner import tuned_validation

    suite = tiny_suite()
    tuned = {"knn_weight": 0.6, "valid_by_weight": {"0": 0.03, "0.6": 0.08, "1": 0.05}, "metric": "item/MRR@20"}
    assert tuned_validation(tuned, ["category", "item"]) == {"item/MRR@20": 0.08}
    assert tuned_validation(tuned, []) == {} and tuned_validation(None, ["item"]) == {}
    old = {key: value for key, value in tuned.items() if key != "metric"}   # runs before the metric was recorded
    assert tuned_validation(old, ["category", "item"]) == {"item/MRR@20": 0.08}
    history = [{"epoch": 1, "valid_item/MRR@20": 0.03}]
    hybrid = record("sasrec", 0, 0.1, 0.3, history, epoch_seconds=1.0)
    hybrid.tuned_valid = tuned_validation(tuned, ["category", "item"])
    rows = {row["model"]: row for row in summary_rows(suite, summarize(suite, [hybrid]))}
    assert rows["sasrec"]["best valid item/MRR@20"] == "8.00"


def test_summary_is_mean_and_sample_std_over_seeds(tmp_path):
    suite = tiny_suite()
    history = [{"epoch": 1, "epoch_seconds": 10.0, "valid_item/MRR@20": 0.03},
               {"epoch": 2, "epoch_seconds": 12.0, "valid_item/MRR@20": 0.06}]
    records = [record("pop", 0, 0.05, 0.2, fit_seconds=0.5, peak_rss_mb=300.0),
               record("sasrec", 0, 0.10, 0.30, history, epoch_seconds=11.0, eval_seconds=2.0, n_cases=1000,
                      parameters=2_000_000, peak_rss_mb=400.0),
               record("sasrec", 1, 0.12, 0.34, history[:1], epoch_seconds=13.0, eval_seconds=4.0, n_cases=1000,
                      parameters=2_000_000, peak_rss_mb=500.0),
               record("sasrec", 2, 0.14, 0.32, history, epoch_seconds=12.0, eval_seconds=3.0, n_cases=1000,
                      parameters=2_000_000, peak_rss_mb=600.0),
               RunRecord("hiersrec", 0, "hiersrec", "failed", error="exit code 1")]
    rows = {row["model"]: row for row in summary_rows(suite, summarize(suite, records))}
    assert rows["sasrec"]["item/MRR@20"] == "12.00 ± 2.00"         # mean 0.12, sample std 0.02
    assert rows["sasrec"]["item/Recall@20"] == "32.00 ± 2.00"
    assert rows["pop"]["item/MRR@20"] == "5.00" and rows["pop"]["train s/epoch"] == "fit 0.5"
    assert rows["sasrec"]["train s/epoch"] == "12.0"
    assert rows["sasrec"]["eval s/10k cases"] == "30.0"              # 3 s per 1,000 cases on average
    assert rows["sasrec"]["peak RSS MB"] == "500" and rows["sasrec"]["params"] == "2.00M"
    # quality 0.05 reached at epoch 2 (22 s) by two runs; the second run stopped before reaching it
    assert rows["sasrec"]["time to item/MRR@20 ≥ 0.05"] == "22 s (2/3 runs)"
    assert rows["pop"]["time to item/MRR@20 ≥ 0.05"] == "n/a"
    # best validation epoch per run: 0.06, 0.03, 0.06
    assert rows["sasrec"]["best valid item/MRR@20"] == "5.00 ± 1.73" and rows["pop"]["best valid item/MRR@20"] == "n/a"
    assert rows["hiersrec"]["runs"] == "0 (+1 failed)" and rows["hiersrec"]["item/MRR@20"] == "—"

    paths = write_results(suite, records, tmp_path)
    with open(paths["runs_csv"]) as f:
        runs = list(csv.DictReader(f))
    assert [(r["model"], r["seed"], r["status"]) for r in runs][-1] == ("hiersrec", "0", "failed")
    with open(paths["summary_csv"]) as f:
        summary = {row["model"]: row for row in csv.DictReader(f)}
    assert float(summary["sasrec"]["item/MRR@20 mean"]) == pytest.approx(0.12)
    assert float(summary["sasrec"]["item/MRR@20 std"]) == pytest.approx(0.02)
    assert float(summary["sasrec"]["time_to_quality_seconds"]) == pytest.approx(22.0)
    assert paths["metrics_plot"].stat().st_size > 1000 and paths["quality_plot"].stat().st_size > 1000


def test_verdict_states_who_wins_and_by_how_much():
    suite = tiny_suite(metrics=["item/MRR@20", "item/Recall@20"])
    records = [record("hiersrec", s, 0.20 + 0.001 * s, 0.50) for s in range(3)] + \
              [record("sasrec", s, 0.18 + 0.001 * s, 0.52 + 0.001 * s) for s in range(3)] + \
              [record("gru4rec", s, 0.10, 0.40) for s in range(3)]
    for r in records:
        r.group = "hiersrec" if r.label == "hiersrec" else "baseline"
    text = verdict(suite, summarize(suite, records))
    assert "HierSRec is mixed against sasrec: item/MRR@20 20.10 vs 18.10 (+2.00 points, +11.0%)" in text
    assert "item/Recall@20 50.00 vs 52.10 (-2.10 points" in text
    assert "HierSRec beats gru4rec: item/MRR@20 20.10 vs 10.00 (+10.10 points, +101.0%)" in text


def test_ablation_effects_are_differences_from_full_hiersrec():
    suite = tiny_suite(metrics=["item/MRR@20", "item/Recall@20"])
    records = [record("hiersrec", s, 0.20 + 0.001 * s, 0.50) for s in range(3)] + \
              [record("hiersrec-no-ids", s, 0.15 + 0.001 * s, 0.45) for s in range(3)] + \
              [record("hiersrec-parallel", 0, 0.21, 0.49)]
    for r in records:
        r.group = "hiersrec" if r.label == "hiersrec" else "ablation"
    text = ablation_effects(suite, summarize(suite, records))
    assert "- hiersrec-no-ids vs hiersrec: item/MRR@20 15.10 vs 20.10 (-5.00 points, -24.9%)" in text
    assert "- hiersrec-parallel vs hiersrec: item/MRR@20 21.00 vs 20.10 (+0.90 points, +4.5%, one seed)" in text
    assert ablation_effects(suite, summarize(suite, records[:3])) == ""     # no ablation run: no paragraph


def test_frequency_breakdown_is_mean_and_std_per_bucket():
    from hmtrec.bench.sections import frequency_breakdown
    suite = tiny_suite(metrics=["item/MRR@20", "item/Recall@20"])
    records = [record("hiersrec", s, 0.2, 0.5, frequency_cases={"unseen": 3, "100+": 7},
                      frequency_metrics={"unseen": {"item/MRR@20": 0.01 * s, "item/Recall@20": 0.1},
                                         "100+": {"item/MRR@20": 0.3, "item/Recall@20": 0.6}}) for s in range(3)]
    records.append(record("pop", 0, 0.1, 0.2))          # recorded no breakdown: no row
    text = frequency_breakdown(suite, summarize(suite, records))
    assert "test cases: unseen 3, 100+ 7" in text
    assert "| model | unseen item/MRR@20 | unseen item/Recall@20 | 100+ item/MRR@20 | 100+ item/Recall@20 |" in text
    assert "| hiersrec | 1.00 ± 1.00 | 10.00 ± 0.00 | 30.00 ± 0.00 | 60.00 ± 0.00 |" in text
    assert "| pop |" not in text
    assert frequency_breakdown(suite, summarize(suite, records[3:])) == ""


def test_final_fit_effects_set_each_run_against_its_selection_model():
    from hmtrec.bench.sections import final_fit_effects
    suite = tiny_suite(metrics=["item/MRR@20", "item/Recall@20"])
    records = [record("hiersrec", s, 0.20 + 0.01 * s, 0.50, best_epoch=3 + s,
                      selection_metrics={"item/MRR@20": 0.19, "item/Recall@20": 0.48}) for s in range(2)]
    records.append(record("pop", 0, 0.1, 0.2))           # no final fit: no row
    text = final_fit_effects(suite, summarize(suite, records))
    assert "| hiersrec | 2 | 3/4 | 20.50 ± 0.71 | 19.00 ± 0.00 | 1.50 ± 0.71 | 50.00 ± 0.00 | 48.00 ± 0.00 | 2.00 ± 0.00 |" in text
    assert "| pop |" not in text
    assert final_fit_effects(suite, summarize(suite, records[2:])) == ""


def test_report_rewrites_only_the_suite_section(tmp_path):
    report = tmp_path / "benchmarks.md"
    report.write_text("# Benchmarks\n\n<!-- BEGIN other -->\nkeep me\n<!-- END other -->\n")
    suite = tiny_suite()
    records = [record("hiersrec", 0, 0.2, 0.5), record("sasrec", 0, 0.1, 0.4)]
    report_suite(suite, records, {}, command="hmtrec bench run tiny", report=report)
    report_suite(suite, records, {}, command="hmtrec bench run tiny", report=report)
    text = report.read_text()
    assert "keep me" in text and text.count("<!-- BEGIN bench-tiny -->") == 1
    assert "`hmtrec bench run tiny`" in text and "| hiersrec |" in text
    assert "Last updated by" not in text
    report_suite(suite, records, {}, command="hmtrec bench run tiny --report",
                 updated_by="hmtrec bench run tiny --models sasrec --report", report=report)
    text = report.read_text()
    assert "*Command:* `hmtrec bench run tiny --report`" in text
    assert "*Last updated by:* `hmtrec bench run tiny --models sasrec --report`" in text


# ---- candidate sweep ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_data():
    return load_data(DataConfig(source="synthetic", synthetic=SyntheticConfig(
        n_items=300, level_sizes=[5, 20], n_sessions=300)))


def test_candidate_sweep_equals_the_evaluator_at_every_k(tiny_data):
    taxonomy = tiny_data.taxonomy
    torch.manual_seed(0)
    spop = SessionPop(taxonomy)
    spop.fit(tiny_data.train)
    for model in (SASRec(taxonomy, SASRecParams(dim=8), max_len=10), spop):   # aggregated vs own L2 scores
        sweep = candidate_sweep(model, tiny_data.test, taxonomy, "L2", max_len=10, cutoff=10, score_budget_mb=0.05)
        assert len(sweep.ks) == taxonomy.n_nodes("L2") and sweep.n_cases == tiny_data.test.n_targets
        for k in (1, 3, taxonomy.n_nodes("L2")):
            result = evaluate_model(model, tiny_data.test, taxonomy,
                                    EvalSettings(ks=[10], candidate_level="L2", candidate_k=k, segments=[]),
                                    max_len=10)
            assert sweep.recall[k - 1] == pytest.approx(result["candidate"]["item"]["Recall@10"], abs=1e-12)
            assert sweep.mrr[k - 1] == pytest.approx(result["candidate"]["item"]["MRR@10"], abs=1e-12)
            assert sweep.coverage[k - 1] == pytest.approx(result["candidate_coverage"], abs=1e-12)
            assert sweep.fraction[k - 1] == pytest.approx(result["candidate_fraction"], abs=1e-12)
        assert sweep.coverage[-1] == 1.0 and sweep.fraction[-1] == pytest.approx(1.0)
        assert np.all(np.diff(sweep.coverage) >= 0) and np.all(np.diff(sweep.fraction) > 0)


def test_default_ks_run_from_one_to_all():
    assert default_ks(995) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 995]
    assert default_ks(20) == [1, 2, 5, 10, 20] and default_ks(1) == [1]


# ---- measurement and speed ---------------------------------------------------------------------
def test_child_process_reports_its_own_peak_memory_and_exit_code(tmp_path, monkeypatch):
    # the measuring parent holds a big buffer too: it must not show up in the child's peak
    parent_ballast = bytearray(300 * 2**20)
    parent_ballast[::4096] = b"1" * len(parent_ballast[::4096])
    (tmp_path / "allocate.py").write_text("import sys\nx = bytearray(int(sys.argv[1]) * 2**20)\n"
                                          "x[::4096] = b'1' * len(x[::4096])\nprint('done', len(sys.argv))\n")
    (tmp_path / "fail.py").write_text("import sys\nprint('boom')\nsys.exit(3)\n")
    env = {"PYTHONPATH": str(tmp_path)}
    result = run_measured("allocate", ["120"], log_path=tmp_path / "log.txt", env=env)
    assert result.returncode == 0 and 120 <= result.peak_rss_mb < 250 and result.wall_seconds > 0
    failed = run_measured("fail", [], log_path=tmp_path / "log.txt", env=env)
    assert failed.returncode == 3
    assert "done 2" in (tmp_path / "log.txt").read_text() and "boom" in (tmp_path / "log.txt").read_text()
    del parent_ballast


def test_flop_count_covers_the_output_layer():
    torch.manual_seed(0)
    taxonomy = synthetic_catalogue(500, 10)
    model = SASRec(taxonomy, SASRecParams(dim=16, layers=1), max_len=8)
    batch = {"inputs": torch.randint(0, 500, (4, 8)), "targets": torch.randint(0, 500, (4, 8))}
    flops = step_flops(lambda: model.loss(batch)[0].backward())
    output_layer = 3 * 2 * 32 * 500 * 16   # forward + two backward matmuls of [32, 16] x [16, 500]
    assert output_layer < flops < 20 * output_layer


def test_scoring_benchmark_reaches_the_requested_fractions():
    figures, taxonomy = scoring_benchmark(20_000, 50, 16, fractions=(0.05, 0.2), batch=32, repeats=2)
    assert taxonomy.n_leaves == 20_000 and taxonomy.leaf_counts("node").min() >= 1
    assert [f.mode for f in figures][0] == "full" and figures[0].candidate_fraction == 1.0
    assert 0.01 < figures[1].candidate_fraction < figures[2].candidate_fraction < 0.6
    assert all(f.latency_ms > 0 and f.throughput_qps > 0 for f in figures)


def test_training_benchmark_reports_consistent_rates():
    [figure] = training_benchmark([{"name": "gru4rec", "hidden_size": 16}], n_items=1000, n_nodes=10,
                                  batch_size=8, max_len=6, steps=2, matmul_size=128)
    assert figure.examples_per_second == pytest.approx(8 * 6 / figure.step_seconds)
    assert figure.achieved_gflops == pytest.approx(figure.gflop_per_step / figure.step_seconds)
    assert figure.matmul_gflops > 0


# ---- end to end --------------------------------------------------------------------------------
def test_bench_run_end_to_end_and_reuse(tmp_path):
    suite = tiny_suite(seeds=[0], models=[{"label": "sasrec", "model": {"name": "sasrec", "dim": 8}}])
    suite_file = tmp_path / "tiny.yaml"
    suite_file.write_text(yaml.safe_dump(suite.model_dump(mode="json")))
    out = tmp_path / "results"
    result = CliRunner().invoke(app, ["bench", "run", str(suite_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    folder = out / "tiny"
    records = json.loads((folder / "records.json").read_text())
    assert [(r["label"], r["status"]) for r in records] == [("sasrec", "done")]
    sasrec = records[0]
    assert sasrec["epochs"] == 1 and sasrec["peak_rss_mb"] > 50 and sasrec["n_cases"] > 0
    assert 0 < sasrec["metrics"]["item/MRR@20"] <= sasrec["metrics"]["item/Recall@20"] <= 1
    stored = json.loads((folder / "runs" / "sasrec" / "seed0" / "metrics.json").read_text())
    assert stored["models"]["sasrec"]["full"]["item"]["MRR@20"] == sasrec["metrics"]["item/MRR@20"]
    assert (folder / "results.md").read_text().count("| sasrec |") == 1
    # a second call reuses the finished run: no new child process, identical records
    again = run_suite(suite, folder)
    assert [r.metrics for r in again] == [r["metrics"] for r in records]


def test_max_train_sequences_keeps_the_latest_training_sequences_only():
    base = {"source": "synthetic", "synthetic": {"n_items": 300, "level_sizes": [5, 20], "n_sessions": 400}}
    full = load_data(DataConfig(**base, keep_unused_items=True))
    cut = load_data(DataConfig(**base, keep_unused_items=True, max_train_sequences=50))
    assert cut.train.n_sequences == 50 < full.train.n_sequences
    np.testing.assert_array_equal(cut.test.leaves, full.test.leaves)
    np.testing.assert_array_equal(cut.valid.leaves, full.valid.leaves)
    last_time = full.train.timestamps[full.train.offsets[1:] - 1]
    kept = set(cut.train.sequence_ids.tolist())
    threshold = np.sort(last_time)[-50]
    assert kept == set(full.train.sequence_ids[last_time >= threshold].tolist())
    assert any(r.name.startswith("max_train_sequences") for r in cut.reports)
