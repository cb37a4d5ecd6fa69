"""The Python API round trip (hmtrec.train / load / evaluate / recommend / predict), batch
recommendation from files, and the split scorer against the model's own predictions."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import hmtrec
from hmtrec.cli import app
from hmtrec.data.sequences import PAD
from hmtrec.errors import DataError, HmtrecError
from hmtrec.models.sequence.base import query_batch
from hmtrec.serve.scoring import HeadScorer, pad_histories

from test_ranking_pipeline import write_config as write_ranking_config

SEQUENCE = {
    "kind": "sequence",
    "data": {"source": "synthetic", "synthetic": {"n_items": 300, "level_sizes": [5, 30], "n_sessions": 2000,
                                                  "days": 10}},
    "model": {"name": "hiersrec", "dim": 16, "id_dim": 16, "level_dim": 8, "text_dim": 8, "text_buckets": 256,
              "layers": 1, "heads": 1, "repeat_explore": False},  # the head path the split scorer and ONNX cover
    "train": {"epochs": 1, "batch_size": 64, "max_len": 6, "threads": 1, "monitor": None},
    "eval": {"ks": [5]},
    "baselines": ["pop"],
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return hmtrec.train(SEQUENCE, tmp_path_factory.mktemp("api") / "run")


def some_histories(run, n=12, seed=0):
    labels = run.artefact().taxonomy.node_labels[-1]
    rng = np.random.default_rng(seed)
    return [[str(labels[i]) for i in rng.integers(0, len(labels), rng.integers(1, 10))] for _ in range(n)]


def test_train_returns_a_run_and_load_reads_it_back(run):
    assert isinstance(run, hmtrec.Run) and run.kind == "sequence" and run.info["status"] == "done"
    loaded = hmtrec.load(run.path)
    assert loaded.config.model == run.config.model
    assert set(loaded.metrics["models"]) == {"hiersrec", "pop"}
    again = loaded.evaluate({"eval.ks": [5, 10]})
    assert again["hiersrec"]["full"]["item"]["Recall@5"] == run.metrics["models"]["hiersrec"]["full"]["item"]["Recall@5"]
    import importlib

    importlib.import_module("hmtrec.train.trainer")   # the callable package is still the training subpackage
    assert callable(hmtrec.train) and hasattr(hmtrec.train, "trainer")


def test_many_histories_at_once_match_one_at_a_time(run):
    histories = some_histories(run)
    many = run.recommend(histories, k=5)
    assert len(many) == len(histories)
    for history, result in zip(histories, many):
        single = run.recommend([history], k=5)[0]
        assert [r["id"] for r in result["recommendations"]] == [r["id"] for r in single["recommendations"]]
        np.testing.assert_allclose([r["probability"] for r in result["recommendations"]],
                                   [r["probability"] for r in single["recommendations"]], rtol=1e-5)
    pop = run.recommend(histories[:2], k=3, model="pop")
    assert pop[0]["model"] == "pop" and pop[0]["recommendations"] == pop[1]["recommendations"]


def test_histories_as_frames_and_files(run, tmp_path):
    histories = some_histories(run, 5)
    rows = pd.DataFrame([{"session": f"s{i}", "item": item} for i, h in enumerate(histories) for item in h])
    from_lists = run.recommend(histories, k=4)
    from_frame = run.recommend(rows, k=4)
    assert [r["id"] for r in from_frame] == [f"s{i}" for i in range(5)]
    assert [r["recommendations"] for r in from_frame] == [r["recommendations"] for r in from_lists]
    import polars as pl

    assert [r["recommendations"] for r in run.recommend(pl.from_pandas(rows), k=4)] == \
        [r["recommendations"] for r in from_lists]
    rows.to_csv(tmp_path / "rows.csv", index=False)
    (tmp_path / "h.txt").write_text("\n".join(" ".join(h) for h in histories) + "\n")
    (tmp_path / "h.jsonl").write_text("".join(json.dumps({"id": i, "history": h}) + "\n"
                                              for i, h in enumerate(histories)))
    for name in ("rows.csv", "h.txt", "h.jsonl"):
        result = CliRunner().invoke(app, ["recommend", str(run.path), "--input", str(tmp_path / name), "-k", "4",
                                          "--output", str(tmp_path / f"{name}.out")])
        assert result.exit_code == 0, (name, result.output, result.exception)
        lines = [json.loads(line) for line in (tmp_path / f"{name}.out").read_text().splitlines()]
        assert [line["recommendations"] for line in lines] == [r["recommendations"] for r in from_lists], name
    (tmp_path / "bad.jsonl").write_text('{"history": ["a"]}\n{"nope": 1}\n')
    result = CliRunner().invoke(app, ["recommend", str(run.path), "--input", str(tmp_path / "bad.jsonl")])
    assert isinstance(result.exception, DataError) and "row 2" in str(result.exception)
    with pytest.raises(HmtrecError, match=r"unknown item id\(s\) in history 1: 'nope'"):
        run.recommend([histories[0], ["nope", histories[0][0]]])
    skipped = run.recommend([histories[0], ["nope", histories[0][0]]], skip_unknown=True)
    assert skipped[1]["skipped"] == ["nope"]


def test_the_split_scorer_equals_the_model(run):
    artefact = run.artefact()
    model, taxonomy = artefact.model(), artefact.taxonomy
    scorer = artefact.scorer()
    assert isinstance(scorer, HeadScorer)
    histories = [taxonomy.index_of(h) for h in some_histories(run, 9, seed=1)]
    batch = pad_histories(histories, artefact.config.eval_max_len)
    with torch.no_grad():
        expected = model.score_next(batch)
        # the evaluation path: the same histories as windows whose last position is the target
        windows = {"inputs": batch, "targets": torch.where(query_batch(batch)["score_at"], 0, PAD)}
        evaluated = model.predict(windows)
    split = scorer.score(batch)
    for level, value in expected.items():
        torch.testing.assert_close(split.levels[level], value.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(evaluated[level], value, rtol=1e-5, atol=1e-5)


def test_a_model_the_split_scorer_does_not_reproduce_is_scored_in_full_by_itself(tmp_path):
    """The default HierSRec mixes a copy distribution over the history into the item head, which
    the split (candidate) scorer does not model: serving must fall back to the model's own scores."""
    config = {**SEQUENCE, "model": {**SEQUENCE["model"], "repeat_explore": True}, "baselines": []}
    copying = hmtrec.train(config, tmp_path / "run")
    artefact = copying.artefact()
    scorer = artefact.scorer()
    assert not isinstance(scorer, HeadScorer) and not scorer.supports_candidates
    histories = [artefact.taxonomy.index_of(h) for h in some_histories(copying, 5, seed=3)]
    batch = pad_histories(histories, artefact.config.eval_max_len)
    with torch.no_grad():
        expected = artefact.model().score_next(batch)
    for level, value in expected.items():
        torch.testing.assert_close(scorer.score(batch).levels[level], value.float())


def test_the_split_scorer_follows_the_models_own_readout(tmp_path):
    """The split scorer encodes through the model itself, so a readout switch needs no copy of it."""
    config = {**SEQUENCE, "model": {**SEQUENCE["model"], "readout": "attention", "reversed_positions": True},
              "baselines": []}
    attending = hmtrec.train(config, tmp_path / "run")
    artefact = attending.artefact()
    scorer = artefact.scorer()
    assert isinstance(scorer, HeadScorer)
    batch = pad_histories([artefact.taxonomy.index_of(h) for h in some_histories(attending, 7, seed=4)],
                          artefact.config.eval_max_len)
    with torch.no_grad():
        expected = artefact.model().score_next(batch)
    for level, value in expected.items():
        torch.testing.assert_close(scorer.score(batch).levels[level], value.float(), rtol=1e-5, atol=1e-5)


def test_candidates_score_only_items_under_the_chosen_nodes(run):
    artefact = run.artefact()
    taxonomy = artefact.taxonomy
    histories = some_histories(run, 6, seed=2)
    full = run.recommend(histories, k=10)
    everything = run.recommend(histories, k=10, top_nodes=taxonomy.n_nodes("L2"))
    for a, b in zip(everything, full):
        assert [r["id"] for r in a["recommendations"]] == [r["id"] for r in b["recommendations"]]
        np.testing.assert_allclose([r["probability"] for r in a["recommendations"]],
                                   [r["probability"] for r in b["recommendations"]], rtol=1e-5)
    for fraction in (0.05, 0.2):
        some = run.recommend(histories, k=taxonomy.n_leaves, candidate_fraction=fraction)
        for result in some:
            assert result["scored"]["mode"] == "candidates" and result["scored"]["fraction"] >= fraction
            assert len(result["recommendations"]) == round(result["scored"]["fraction"] * taxonomy.n_leaves)
            # the best node is always among the candidates
            assert result["levels"]["L2"]["label"] in {r["ancestors"]["L2"] for r in result["recommendations"]}
    top2 = run.recommend(histories, k=50, top_nodes=2)
    scores = artefact.scorer().query(pad_histories([taxonomy.index_of(h) for h in histories], 6))[0]["L2"]
    for row, result in enumerate(top2):
        chosen = set(taxonomy.labels_of(torch.topk(scores[row], 2).indices.numpy(), "L2"))
        assert {r["ancestors"]["L2"] for r in result["recommendations"]} <= chosen
        assert len(result["recommendations"]) == min(50, sum(
            int(taxonomy.leaf_counts("L2")[taxonomy.index_of([c], "L2")[0]]) for c in chosen))
    pop = run.recommend(histories[:1], k=5, model="pop", top_nodes=1)[0]       # generic path: masked scores
    assert len({r["ancestors"]["L2"] for r in pop["recommendations"]}) == 1


def test_ranking_run_predicts_frames_and_files_calibrated(tmp_path):
    config = write_ranking_config(tmp_path, "shared_bottom", bottom_hidden=[8])
    run = hmtrec.train(config, tmp_path / "run", overrides={"train.epochs": 1, "train.max_steps_per_epoch": 5})
    rows = pd.read_csv(tmp_path / "test.csv")
    from_frame = run.predict(rows)
    from_file = run.predict(tmp_path / "test.csv")
    np.testing.assert_allclose(from_frame["click"], from_file["click"], rtol=1e-6)
    assert "click_raw" not in from_frame
    result = CliRunner().invoke(app, ["calibrate", str(run.path), "--method", "platt"])
    assert result.exit_code == 0, result.output
    calibrated = hmtrec.load(run.path).predict(rows)
    np.testing.assert_allclose(calibrated["click_raw"], from_frame["click"], rtol=1e-6)
    assert not np.allclose(calibrated["click"], from_frame["click"])
    with pytest.raises(HmtrecError, match="needs a sequence run"):
        run.recommend([["a"]])


def test_serve_data_and_models_import_nothing_from_pipelines():
    import re
    from pathlib import Path

    package = Path(hmtrec.__file__).parent
    upward = re.compile(r"^\s*(from|import)\s+hmtrec\.pipelines", re.M)
    offenders = [str(path.relative_to(package)) for folder in ("serve", "data", "models")
                 for path in (package / folder).rglob("*.py") if upward.search(path.read_text())]
    assert offenders == []
