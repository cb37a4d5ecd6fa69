import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from hmtrec.cli import app
from hmtrec.config import load_config
from hmtrec.data.features import FeatureEncoder, FeatureSchema, TaskSpec
from hmtrec.errors import ConfigError, DataError
from hmtrec.evaluate.classification import auc, average_ranks, binary_metrics_by_group, logloss, task_metrics
from hmtrec.pipelines import get_pipeline
from hmtrec.pipelines.ranking import Ranker, predict_file


# ---- metrics ----------------------------------------------------------------------------------
def test_auc_and_logloss_by_hand():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: pairs won 1 + 0 + 1 + 1 = 3 of 4
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    # a tie between a positive and a negative counts one half: (0.5 + 1 + 1 + 1) / 4
    assert auc(np.array([0.5, 0.5, 0.2, 0.9]), np.array([1, 0, 0, 1])) == pytest.approx(0.875)
    assert logloss(np.array([0.8, 0.25]), np.array([1, 0])) == pytest.approx(-(np.log(0.8) + np.log(0.75)) / 2)
    assert average_ranks(np.array([2.0, 1.0, 2.0, 2.0])).tolist() == [3.0, 1.0, 3.0, 3.0]


def test_grouped_auc_matches_brute_force_pairs():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, 400) / 5.0          # many ties
    labels = rng.integers(0, 2, 400).astype(float)
    labels[::17] = np.nan
    groups = rng.choice(["a", "b", "c"], 400)
    table = binary_metrics_by_group(scores, labels, groups)
    for name in ("a", "b", "c"):
        keep = (groups == name) & ~np.isnan(labels)
        pos, neg = scores[keep & (labels == 1)], scores[keep & (labels == 0)]
        wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
        assert table.loc[name, "auc"] == pytest.approx(wins / (len(pos) * len(neg)))
        assert table.loc[name, "n"] == keep.sum()


def test_single_class_group_has_no_auc():
    frame = pd.DataFrame({"s": ["x", "x", "y", "y"], "click": [0.2, 0.7, 0.4, 0.6], "click_label": [1, 1, 0, 1]})
    metrics = task_metrics(frame, [("click", "binary")], scenario_column="s")
    assert metrics["scenario"]["x"]["click"]["auc"] is None
    assert metrics["scenario"]["y"]["click"]["auc"] == 1.0
    assert metrics["auc"] == 1.0                     # the mean skips the undefined cell


# ---- pipeline ---------------------------------------------------------------------------------
def synthetic_rows(n, seed):
    """Clicks depend on the item and the scenario; likes on a numeric feature; some likes unlabelled."""
    rng = np.random.default_rng(seed)
    item = rng.integers(0, 30, n)
    scenario = rng.choice(["home", "search"], n)
    quality = rng.normal(size=n)
    click_logit = np.where(item < 15, 2.0, -2.0) + np.where(scenario == "home", 0.5, -0.5)
    click = (rng.random(n) < 1 / (1 + np.exp(-click_logit))).astype(int)
    like = (rng.random(n) < 1 / (1 + np.exp(-2 * quality))).astype(float)
    like[rng.random(n) < 0.2] = np.nan
    return pd.DataFrame({"user": rng.integers(0, 50, n), "item": item, "quality": quality.round(4),
                         "genres": np.where(item % 2 == 0, "a|b", "c"), "scenario": scenario,
                         "group": np.where(rng.random(n) < 0.5, "new", "old"), "click": click, "like": like})


def write_config(tmp_path, model, **extra):
    frames = {"train": synthetic_rows(3000, 0), "valid": synthetic_rows(600, 1), "test": synthetic_rows(600, 2)}
    for split, frame in frames.items():
        frame.to_csv(tmp_path / f"{split}.csv", index=False)
    config = {
        "kind": "ranking",
        "data": {"train": str(tmp_path / "train.csv"), "valid": str(tmp_path / "valid.csv"),
                 "test": str(tmp_path / "test.csv")},
        "features": {"categorical": ["user", "item"], "numeric": ["quality"], "multi_valued": [{"column": "genres"}],
                     "scenario": "scenario", "facets": ["group"]},
        "tasks": [{"name": "click"}, {"name": "like", "weight": 0.5}],
        "model": {"name": model, "embedding_init_std": 0.05, **extra},
        "train": {"epochs": 3, "batch_size": 128, "lr": 0.01, "threads": 1, "patience": 2}}
    import yaml
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("model,extra", [("mmoe", {"expert_hidden": [16]}),
                                         ("hinet", {"scenario_expert_hidden": [16], "task_expert_hidden": [8]}),
                                         ("mfh", {"level_hidden": [[16], [8]], "switcher": "ple"}),
                                         # the fixed rate offsets are fitted at train time and reloaded with
                                         # the weights: `evaluate` and `predict` reproduce the run's scores
                                         ("mmoe", {"expert_hidden": [16], "rate_prior": {
                                             "kind": "movie-demographic", "item": "item",
                                             "demographics": ["scenario"], "smoothing": 5}}),
                                         # the rate blend is fitted after training and saved with the weights
                                         ("mmoe", {"expert_hidden": [16], "rate_blend": {
                                             "item": "item", "user": "user", "demographics": ["scenario"],
                                             "smoothings": [5, 50]}})])
def test_train_evaluate_predict_round_trip(tmp_path, model, extra):
    config = load_config(write_config(tmp_path, model, **extra))
    run_dir = tmp_path / "run"
    metrics = get_pipeline("ranking").train(config, run_dir)
    for name in ("run.json", "config.yaml", "features.json", "model.safetensors", "checkpoint.pt",
                 "metrics.json", "predictions_valid.csv", "predictions_test.csv", "log.txt"):
        assert (run_dir / name).exists(), name
    # the signal is learnable: per-scenario click AUC well above chance, like AUC too
    assert metrics["test"]["scenario"]["home"]["click"]["auc"] > 0.75
    assert metrics["test"]["scenario"]["search"]["click"]["auc"] > 0.75
    assert metrics["test"]["overall"]["like"]["auc"] > 0.75
    assert set(metrics["test"]["groups"]["group"]) == {"new", "old"}
    predictions = pd.read_csv(run_dir / "predictions_test.csv")
    assert list(predictions.columns) == ["scenario", "group", "click", "click_label", "like", "like_label"]
    assert predictions["like_label"].isna().sum() == pd.read_csv(tmp_path / "test.csv")["like"].isna().sum()

    evaluated = get_pipeline("ranking").evaluate(run_dir, [])
    assert evaluated["auc"] == pytest.approx(metrics["test"]["auc"], abs=1e-6)

    result = CliRunner().invoke(app, ["predict", str(run_dir), "--input", str(tmp_path / "test.csv"),
                                      "--output", str(tmp_path / "scores.csv"), "--keep", "item"])
    assert result.exit_code == 0, result.output
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert list(scores.columns) == ["scenario", "group", "item", "click", "click_label", "like", "like_label"]
    np.testing.assert_allclose(scores["click"], predictions["click"], rtol=1e-5)


def test_a_learning_rate_schedule_warms_up_and_decays_over_the_epoch_cap(tmp_path):
    from hmtrec.train.trainer import lr_factor

    config = load_config(write_config(tmp_path, "mmoe", expert_hidden=[16]),
                         ["train.lr_schedule=cosine", "train.warmup_fraction=0.1", "train.lr_floor=0.05",
                          "train.patience=null"])
    metrics = get_pipeline("ranking").train(config, tmp_path / "run")
    history = metrics["history"]
    steps = -(-3000 // 128)     # 3,000 training rows in batches of 128, 3 epochs
    total = 3 * steps
    expected = [0.01 * lr_factor(epoch * steps - 1, total, "cosine", round(0.1 * total), 0.05) for epoch in (1, 2, 3)]
    assert [record["lr"] for record in history] == pytest.approx(expected, rel=1e-6)
    assert history[-1]["lr"] == pytest.approx(0.01 * 0.05, rel=0.02)     # the decay ends at lr x lr_floor


def test_predict_without_labels_and_bad_rows(tmp_path):
    config = load_config(write_config(tmp_path, "shared_bottom", bottom_hidden=[16]), ["train.epochs=1"])
    get_pipeline("ranking").train(config, tmp_path / "run")
    rows = pd.read_csv(tmp_path / "test.csv").drop(columns=["click", "like"]).iloc[:20]
    rows.to_csv(tmp_path / "unlabelled.csv", index=False)
    scores = predict_file(tmp_path / "run", tmp_path / "unlabelled.csv")
    assert list(scores.columns) == ["scenario", "group", "click", "like"] and len(scores) == 20
    rows["quality"] = rows["quality"].astype(object)
    rows.loc[7, "quality"] = "n/a"
    rows.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=r"bad.csv, row 8, column 'quality': not a finite number"):
        predict_file(tmp_path / "run", tmp_path / "bad.csv")
    rows.loc[7, "quality"] = 0.1
    rows.loc[3, "scenario"] = "feed"
    rows.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=r"row 4, column 'scenario': unknown value 'feed'"):
        Ranker.load(tmp_path / "run").predict_frame(pd.read_csv(tmp_path / "bad.csv"), file="bad.csv")


def test_config_errors_name_the_key(tmp_path):
    path = write_config(tmp_path, "mmoe")
    with pytest.raises(ConfigError, match="model.n_expert"):
        load_config(path, ["model.n_expert=3"])
    with pytest.raises(ConfigError, match="train.epoch"):
        load_config(path, ["train.epoch=3"])


@pytest.mark.parametrize("override, key", [
    ("train.epochs=-1", "train.epochs"), ("train.epochs=0", "train.epochs"), ("train.batch_size=0", "train.batch_size"),
    ("train.lr=-0.001", "train.lr"), ("train.lr=0", "train.lr"), ("train.lr=inf", "train.lr"),
    ("train.lr=nan", "train.lr"), ("train.threads=0", "train.threads")])
def test_out_of_range_training_settings_fail_before_data_loads(tmp_path, override, key):
    path = write_config(tmp_path, "mmoe")
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        load_config(path, [override])


def test_movielens_protocol_smoke(data_dir, tmp_path):
    config = load_config("configs/ranking/ml1m_hinet.yaml",
                         ["data.max_rows=30000", "train.epochs=1", "train.max_steps_per_epoch=3"])
    metrics = get_pipeline("ranking").train(config, tmp_path / "run")
    assert set(metrics["test"]["scenario"]) <= {"young", "25-34", "35+"}
    assert set(metrics["test"]["groups"]["user_activity"]) <= {"new", "old"}
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["test"]["auc"] == pytest.approx(metrics["test"]["auc"])
    # the rows file of docs/ranking.md ("Building the rows file hmtrec predict takes"), built by hand
    from hmtrec.data.readers.movielens_ranking import AGE_SCENARIOS

    folder = data_dir / "movielens-1m"
    users = pd.read_csv(folder / "users.dat", sep="::", engine="python", encoding="latin-1",
                        names=["user_id", "gender", "age", "occupation", "zip"])
    movies = pd.read_csv(folder / "movies.dat", sep="::", engine="python", encoding="latin-1",
                         names=["movie_id", "title", "genres"])
    movies["genre"] = movies["genres"].str.split("|").str[0]
    pairs = pd.DataFrame({"user_id": [1, 1, 2], "movie_id": [1193, 661, 3105]})
    rows = pairs.merge(users, on="user_id").merge(movies[["movie_id", "genre"]], on="movie_id")
    rows["scenario"] = rows["age"].map(AGE_SCENARIOS)
    rows["user_activity"] = "old"
    rows.to_csv(tmp_path / "rows.csv", index=False)
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "run"), "--input", str(tmp_path / "rows.csv"),
                                      "--output", str(tmp_path / "scores.csv"), "--keep", "user_id,movie_id"])
    assert result.exit_code == 0, result.output
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert scores["movie_id"].tolist() == [1193, 661, 3105] and scores["click"].between(0, 1).all()
    rows.drop(columns=["genre", "scenario"]).to_csv(tmp_path / "short.csv", index=False)
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "run"), "--input", str(tmp_path / "short.csv"),
                                      "--output", str(tmp_path / "scores.csv")])
    assert "2 missing columns ['genre', 'scenario']" in " ".join(str(result.exception or result.output).split())


def test_one_table_is_split_by_row_order(tmp_path):
    from hmtrec.pipelines.ranking import RankingData, load_splits

    synthetic_rows(100, 0).assign(row=range(100)).to_csv(tmp_path / "all.csv", index=False)
    frames, files, reports = load_splits(RankingData(path=str(tmp_path / "all.csv"), fractions=[0.7, 0.2, 0.1]))
    assert [len(frames[k]) for k in ("train", "valid", "test")] == [70, 20, 10]
    assert frames["valid"]["row"].astype(int).tolist() == list(range(70, 90))
    assert "split 70/20/10 by row order" in reports[0]
    # a bad value in the validation part is reported with its row in the file, not in the split
    frame = pd.read_csv(tmp_path / "all.csv").astype({"quality": object})
    frame.loc[74, "quality"] = "??"
    frame.to_csv(tmp_path / "all.csv", index=False)
    frames, files, _ = load_splits(RankingData(path=str(tmp_path / "all.csv"), fractions=[0.7, 0.2, 0.1]))
    encoder = FeatureEncoder(FeatureSchema(numeric=["quality"]), [TaskSpec(name="click")]).fit(frames["train"])
    with pytest.raises(DataError, match=r"all.csv, row 75, column 'quality'"):
        encoder.transform(frames["valid"], file=files["valid"], first_row=frames["valid"].attrs["first_row"])
    with pytest.raises(ConfigError, match="data.valid"):
        load_splits(RankingData(train=str(tmp_path / "all.csv")))
    with pytest.raises(ValueError, match="data.split=random are for source movielens-1m"):
        RankingData(path=str(tmp_path / "all.csv"), split="random")


def test_refit_adds_the_rate_blend_to_a_trained_run_and_keeps_the_network(tmp_path):
    """`hmtrec refit` fits the blend on a run trained without it: the network's own test scores are
    those of the source run (the ablation in the same metrics), the weights are chosen on
    validation, and the blend comes off again with rate_blend=null."""
    from hmtrec.lifecycle import get_kind, refit

    config = load_config(write_config(tmp_path, "mmoe", expert_hidden=[16]))
    source = tmp_path / "run"
    trained = get_pipeline("ranking").train(config, source)
    assert "rate_blend" not in trained and "without_rate_blend" not in trained["test"]
    blend = '{item: item, user: user, demographics: [scenario], smoothings: [5]}'
    metrics = refit(get_kind("ranking"), source, [f"model.rate_blend={blend}"], into=tmp_path / "blended")
    record = metrics["rate_blend"]
    assert record["kind"] in ("movie", "movie+user", "movie-demographic") and len(record["candidates"]) == 3
    assert set(record["weights"]) == {"click", "like"}
    assert record["valid"]["blend"] >= record["valid"]["network"] - 1e-12
    assert metrics["test"]["without_rate_blend"]["auc"] == pytest.approx(trained["test"]["auc"], abs=1e-9)
    assert metrics["best_epoch"] == trained["best_epoch"]          # the training record carried over
    evaluated = get_pipeline("ranking").evaluate(tmp_path / "blended", [])
    assert evaluated["auc"] == pytest.approx(metrics["test"]["auc"], abs=1e-6)
    off = refit(get_kind("ranking"), tmp_path / "blended", ["model.rate_blend=null"], into=tmp_path / "off")
    assert "rate_blend" not in off and off["test"]["auc"] == pytest.approx(trained["test"]["auc"], abs=1e-9)
    with pytest.raises(ConfigError, match="keys fitted after training"):
        refit(get_kind("ranking"), source, ["model.expert_hidden=[8]"], into=tmp_path / "other")
