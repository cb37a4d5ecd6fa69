"""The geo pipeline end to end on a Foursquare NYC sample: train, evaluate, suggest."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from hmtrec.cli import app
from hmtrec.config import load_config
from hmtrec.errors import ConfigError, HmtrecError
from hmtrec.pipelines import get_pipeline
from hmtrec.serve.geo_suggest import GeoSuggester, parse_history
from hmtrec.rundir import load_tensors, load_weights, read_json
from hmtrec.train.trainer import lr_factor

QUICK = ["data.max_sequences=60", "examples.max_targets=300", "train.epochs=1", "eval.max_targets=150",
         "train.valid_max_targets=150",
         "model.dim=16", "model.n_layers=1", "train.batch_size=128"]


@pytest.fixture(scope="module")
def geo_run(tmp_path_factory, data_dir):
    run_dir = tmp_path_factory.mktemp("geo") / "run"
    config = load_config("configs/geo/foursquare-nyc.yaml", QUICK + [f"data.path={data_dir / 'foursquare-nyc'}"])
    metrics = get_pipeline("geo").train(config, run_dir)
    return run_dir, metrics


def test_training_writes_a_complete_run_dir(geo_run):
    run_dir, metrics = geo_run
    for name in ("config.yaml", "run.json", "taxonomy.json", "model.safetensors", "checkpoint.pt", "metrics.json",
                 "log.txt"):
        assert (run_dir / name).exists(), name
    assert read_json(run_dir / "run.json")["kind"] == "geo"
    test = metrics["test"]
    assert set(test) == {"action-transformer", "geo-history-pop"}
    results = test["action-transformer"]
    assert set(results["overall"]) == {"region", "cell"}
    assert results["counts"]["active"] > 0 and results["counts"]["dormant"] > 0
    for level in ("region", "cell"):
        metrics_of_level = results["overall"][level]
        assert 0 < metrics_of_level["Acc@1"] <= metrics_of_level["Acc@5"] <= 1
    assert sum(bucket["n"] for bucket in results["by_frequency"]["buckets"].values()) == results["n_examples"]
    # the user's own history is a strong signal on check-in data
    assert test["geo-history-pop"]["overall"]["cell"]["Acc@5"] > 0.4


def test_the_reference_blend_is_chosen_on_validation_and_saved_with_the_weights(geo_run):
    run_dir, metrics = geo_run          # the Foursquare config turns model.reference_blend on
    blend = metrics["reference_blend"]
    assert sum(blend["examples"]) == sum(metrics["examples"]["valid"].values())
    saved = load_weights(run_dir / "model.safetensors")["blend_weights"]
    for head, level in enumerate(("region", "cell")):
        assert blend["weights"][level] == pytest.approx(saved[head].tolist(), abs=1e-4)
        assert all(0 <= w <= 1 for w in blend["weights"][level])
        alone, fitted = blend["valid_alone"]["overall"][level], blend["variants"]["blend"]["fitted"]["overall"][level]
        # weight 0 is a candidate in every bucket, so the fitted blend is never below the model alone
        assert fitted["MRR"] >= alone["MRR"]
        best = metrics["history"][metrics["best_epoch"] - 1]
        assert alone["MRR"] == pytest.approx(best[f"valid_{level}_MRR"])      # the model alone, as validated
        assert 0 < blend["valid_cross_fitted"]["active"][level]["MRR"] <= 1


def test_evaluate_reproduces_the_test_metrics(geo_run):
    run_dir, metrics = geo_run
    again = get_pipeline("geo").evaluate(run_dir, [])
    for name in metrics["test"]:
        assert again["test"][name]["overall"] == metrics["test"][name]["overall"]
    with pytest.raises(ConfigError, match="model.dim"):
        get_pipeline("geo").evaluate(run_dir, ["model.dim=8"])


def test_suggestions_are_consistent_for_a_real_history(geo_run):
    run_dir, _ = geo_run
    suggester = GeoSuggester(run_dir)
    venues = [str(v) for v in suggester.taxonomy.node_labels[-1][:6]]
    result = suggester.suggest(venues, [40.0, 20.0, 9.0, 3.0, 1.0, 0.5], at="2013-02-01", k_coarse=3, k_fine=4)
    assert result["levels"] == ["region", "cell"]
    taxonomy = suggester.taxonomy
    total = 0.0
    for region in result["suggestions"]:
        region_index = taxonomy.index_of([region["region"]], "region")[0]
        cells = [cell["cell"] for cell in region["cells"]]
        parents = taxonomy.node_ancestors(taxonomy.index_of(cells, "cell"), "cell", "region")
        assert np.all(parents == region_index)
        joint = [cell["probability"] for cell in region["cells"]]
        assert joint == sorted(joint, reverse=True) and sum(joint) <= region["probability"] + 1e-6
        total += region["probability"]
    assert total <= 1 + 1e-6
    with pytest.raises(HmtrecError, match="not in the trained catalogue"):
        suggester.suggest(["no-such-venue"], [1.0])


def test_cli_recommend_and_suggest_print_region_and_city_json(geo_run):
    run_dir, _ = geo_run
    venue = GeoSuggester(run_dir).taxonomy.node_labels[-1][0]
    runner = CliRunner()
    outcome = runner.invoke(app, ["suggest", str(run_dir), "--history", f"{venue}@2 {venue}@10", "--regions", "2",
                                  "--cities", "3", "--at", "2013-01-15"])
    assert outcome.exit_code == 0, outcome.output
    printed = json.loads(outcome.stdout)
    assert len(printed["suggestions"]) == 2 and all(len(r["cells"]) <= 3 for r in printed["suggestions"])
    user = "7"
    outcome = runner.invoke(app, ["suggest", str(run_dir), "--history", f"{venue}@2 {venue}@10", "--regions", "2",
                                  "--cities", "3", "--at", "2013-01-15", "--user", user])
    assert outcome.exit_code == 0, outcome.output
    direct = GeoSuggester(run_dir).suggest([venue, venue], [2.0, 10.0], at="2013-01-15", k_coarse=2, k_fine=3,
                                           user=user)
    assert json.loads(outcome.stdout) == json.loads(json.dumps(direct))
    assert json.loads(outcome.stdout) != printed      # the user embedding is used
    outcome = runner.invoke(app, ["recommend", str(run_dir), "--history", f"{venue}@2", "-k", "2"])
    assert outcome.exit_code == 0, outcome.output
    assert json.loads(outcome.stdout)["levels"] == ["region", "cell"]


def test_history_syntax_errors_are_explained():
    assert parse_history("12@1.5 7@30") == (["12", "7"], [1.5, 30.0], None)
    assert parse_history("a@1:view b@2:booking") == (["a", "b"], [1.0, 2.0], ["view", "booking"])
    with pytest.raises(HmtrecError, match="VENUE@DAYS_AGO"):
        parse_history("12 7@3")
    with pytest.raises(HmtrecError, match="not a number"):
        parse_history("12@soon")
    with pytest.raises(HmtrecError, match="every entry or for none"):
        parse_history("12@1:view 7@3")


def test_interrupted_training_resumes_to_the_same_result(tmp_path, data_dir):
    # a constant lr: a run extended by more epochs equals a longer one (a schedule keeps its horizon)
    base = QUICK + [f"data.path={data_dir / 'foursquare-nyc'}", "data.max_sequences=40", "baselines=[]",
                    "train.patience=null", "train.lr_schedule=constant", "train.warmup_fraction=0.0"]
    pipeline = get_pipeline("geo")
    straight = pipeline.train(load_config("configs/geo/foursquare-nyc.yaml", base + ["train.epochs=2"]),
                              tmp_path / "straight")
    # "interrupted" after epoch 1: the same run dir is trained again with epochs=2 and resumes
    first = pipeline.train(load_config("configs/geo/foursquare-nyc.yaml", base + ["train.epochs=1"]),
                           tmp_path / "resumed")
    resumed = pipeline.train(load_config("configs/geo/foursquare-nyc.yaml", base + ["train.epochs=2"]),
                             tmp_path / "resumed")
    assert "resumed from" in (tmp_path / "resumed" / "log.txt").read_text()
    assert resumed["history"][0] == first["history"][0]          # epoch 1 came from the checkpoint
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    assert resumed["test"]["action-transformer"]["overall"] == straight["test"]["action-transformer"]["overall"]


class Interrupt(Exception):
    pass


def test_a_scheduled_run_interrupted_mid_schedule_resumes_on_the_same_curve(tmp_path, data_dir):
    base = QUICK + [f"data.path={data_dir / 'foursquare-nyc'}", "data.max_sequences=40", "baselines=[]",
                    "train.patience=null", "train.epochs=2", "train.lr_schedule=cosine",
                    "train.warmup_fraction=0.25", "train.lr_floor=0.1"]
    config = load_config("configs/geo/foursquare-nyc.yaml", base)
    pipeline = get_pipeline("geo")
    straight = pipeline.train(config, tmp_path / "straight")

    def interrupt_after_epoch_1(state):
        if state.epoch == 1:
            raise Interrupt()

    with pytest.raises(Interrupt):
        pipeline.train(config, tmp_path / "resumed", on_epoch_end=interrupt_after_epoch_1)
    resumed = pipeline.train(config, tmp_path / "resumed")
    assert "resumed from" in (tmp_path / "resumed" / "log.txt").read_text()
    # the lr of each epoch's last step: one warm-up + cosine over both epochs (the horizon is
    # epochs x the first epoch's steps, kept in the checkpoint)
    state = load_tensors(tmp_path / "straight" / "checkpoint.pt")["state"]
    total, first_epoch_steps = state["total_steps"], state["total_steps"] // 2
    warmup = round(0.25 * total)
    expected = [config.train.lr * lr_factor(step, total, "cosine", warmup, 0.1)
                for step in (first_epoch_steps - 1, state["step"] - 1)]
    assert [h["lr"] for h in straight["history"]] == pytest.approx(expected)
    assert expected[1] < 0.2 * config.train.lr < expected[0]
    assert [h["lr"] for h in resumed["history"]] == [h["lr"] for h in straight["history"]]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    assert resumed["test"]["action-transformer"]["overall"] == straight["test"]["action-transformer"]["overall"]


@pytest.mark.parametrize("override, key", [
    ("train.epochs=0", "train.epochs"), ("train.batch_size=0", "train.batch_size"), ("train.lr=0", "train.lr"),
    ("train.lr=-0.1", "train.lr"), ("train.lr=nan", "train.lr"), ("train.lr=inf", "train.lr"),
    ("train.threads=0", "train.threads")])
def test_out_of_range_train_settings_are_refused_before_the_run_dir_is_written(tmp_path, override, key):
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "-c", "configs/geo/foursquare-nyc.yaml", "-o", str(run_dir),
                                      "--set", override])
    assert isinstance(result.exception, ConfigError)
    assert f"key '{key}'" in str(result.exception)
    assert not run_dir.exists()


def test_distance_bias_gets_the_venue_coordinates(data_dir):
    import pandas as pd

    from hmtrec.data.loading import load_data
    from hmtrec.pipelines.geo import build_model, set_coordinates

    config = load_config("configs/geo/foursquare-nyc.yaml", ["model.distance_bias=true",
                                                              f"data.path={data_dir / 'foursquare-nyc'}"])
    taxonomy = load_data(config.data).taxonomy
    model = build_model(config, taxonomy, ["event"])
    set_coordinates(model, config.data, taxonomy)
    venues = pd.read_csv(data_dir / "foursquare-nyc" / "stan_NYC_poi_coords.csv", dtype={"poi": str}).head(3)
    leaves = taxonomy.index_of(venues["poi"].str.strip().tolist(), -1)
    np.testing.assert_allclose(model.leaf_coordinates[leaves].numpy(), venues[["lat", "lon"]].to_numpy(), rtol=1e-6)
    other = config.data.model_copy(update={"source": "movielens-1m"})
    with pytest.raises(ConfigError, match="model.distance_bias"):
        set_coordinates(model, other, taxonomy)


def test_baseline_prior_gets_the_references_training_shares(data_dir):
    import torch

    from hmtrec.pipelines.geo import GeoKind, build_model

    config = load_config("configs/geo/foursquare-nyc.yaml", ["model.baseline_prior=true", "data.max_sequences=40",
                                                              f"data.path={data_dir / 'foursquare-nyc'}"])
    kind = GeoKind()
    data = kind.prepare(config)
    model = kind.build(config.model["name"], None, config, data)
    reference = build_model(config, data.prepared.dataset.taxonomy, data.event_types, {"name": "geo-history-pop"})
    reference.fit(data.prepared.train)
    for level in ("region", "cell"):
        share = getattr(model, f"prior_share_{level}")
        torch.testing.assert_close(share, reference.shares[level])
        assert share.max() > 2.0 / len(share)               # popularity, not the uniform placeholder
    fresh = build_model(config, data.prepared.dataset.taxonomy, data.event_types)
    fresh.load_state_dict(model.state_dict())              # a saved model keeps its shares
    torch.testing.assert_close(fresh.prior_share_cell, model.prior_share_cell)


def test_refit_changes_only_the_post_training_stage_on_the_trained_weights(geo_run, tmp_path):
    run_dir, metrics = geo_run      # the Foursquare config: the blend and the tied region conditioning
    source_metrics = (run_dir / "metrics.json").read_text()
    trained = load_weights(run_dir / "model.safetensors")
    record = metrics["reference_blend"]
    assert record["served"] == "blend + conditioning"
    assert {"model alone", "blend", "conditioning", "blend + conditioning",
            "blend + conditioning, head regions"} <= set(record["variants"])
    assert set(record["variants"]["blend + conditioning"]["violation_cross_fitted"]) == {"overall", "active", "dormant"}
    assert trained["conditioning_alpha"].tolist() == pytest.approx(record["alpha"], abs=1e-4)
    alone = record["variants"]["model alone"]["fitted"]["overall"]["cell"]["MRR"]
    assert record["valid_fitted"]["overall"]["cell"]["MRR"] >= alone    # α 0 and weight 0 are candidates
    target = tmp_path / "three-buckets"
    outcome = CliRunner().invoke(app, ["refit", str(run_dir), "-o", str(target), "--set", "model.blend_count_edges=[1,6]"])
    assert outcome.exit_code == 0, outcome.output
    refitted = read_json(target / "metrics.json")
    assert (run_dir / "metrics.json").read_text() == source_metrics          # the source is left as it was
    assert refitted["history"] == metrics["history"] and refitted["refit"]["from"] == str(run_dir)
    saved = load_weights(target / "model.safetensors")
    assert saved["blend_weights"].shape == (2, 3) and len(refitted["reference_blend"]["alpha"]) == 3
    for key, value in trained.items():                   # the network is the trained one
        if key not in ("blend_weights", "conditioning_alpha"):
            assert (saved[key] == value).all(), key
    assert GeoSuggester(target).suggest(["698"], [2.0], k_coarse=2, k_fine=2)["levels"] == ["region", "cell"]
    again = get_pipeline("geo").evaluate(target, [])      # evaluate serves the refitted stage
    assert again["test"]["action-transformer"]["overall"] == refitted["test"]["action-transformer"]["overall"]
    from hmtrec import lifecycle

    geo = lifecycle.get_kind("geo")
    with pytest.raises(ConfigError, match="model.dim.*refit"):
        lifecycle.refit(geo, target, ["model.dim=8"])
    with pytest.raises(ConfigError, match="model.dim"):
        lifecycle.refit(geo, run_dir, ["model.dim=8"], into=tmp_path / "other")
    assert not (tmp_path / "other").exists()
    # `hmtrec train` still refuses a post-training change into a trained run, and says how to refit
    with pytest.raises(ConfigError, match="hmtrec refit"):
        get_pipeline("geo").train(load_config(target / "config.yaml", ["model.blend_count_edges=[1]"]), target)
    # back to the source's buckets, in place: the source's stage and test figures again
    back = lifecycle.refit(geo, target, ["model.blend_count_edges=[1]"])
    assert back["reference_blend"]["weights"] == record["weights"] and back["reference_blend"]["alpha"] == record["alpha"]
    for name in metrics["test"]:
        assert back["test"][name]["overall"] == metrics["test"][name]["overall"]
    assert read_json(target / "run.json")["status"] == "done"


def test_a_final_fit_keeps_the_selections_epochs_and_post_training_stage(tmp_path, data_dir):
    config = load_config("configs/geo/foursquare-nyc.yaml",
                         QUICK + [f"data.path={data_dir / 'foursquare-nyc'}", "train.epochs=2", "train.patience=1",
                                  "train.final_fit=true"])
    metrics = get_pipeline("geo").train(config, tmp_path)
    selection, final = metrics["selection"], metrics["final_fit"]
    assert final["best_epoch"] == len(final["history"]) == selection["best_epoch"] == metrics["best_epoch"]
    # trained on train + valid: more targets than the training split alone
    from hmtrec.data.loading import load_data
    prepared = load_data(config.data, with_train_all=True)
    assert final["train_targets"] == prepared.train_all.n_targets > prepared.train.n_targets
    # the post-training stage is the selection model's, fitted on validation, and served by the kept model
    kept, chosen = load_weights(tmp_path / "model.safetensors"), load_weights(tmp_path / "selection" / "model.safetensors")
    for name in ("blend_weights", "conditioning_alpha"):
        assert kept[name].tolist() == chosen[name].tolist()
    trained = [name for name in kept if name not in ("blend_weights", "conditioning_alpha") and kept[name].is_floating_point()]
    assert trained and not all(kept[name].equal(chosen[name]) for name in trained)
    # the selection model's test figures are kept beside the final model's, on the same examples
    assert selection["test"]["n_examples"] == metrics["test"]["action-transformer"]["n_examples"]
    again = get_pipeline("geo").evaluate(tmp_path, [])
    for name in ("action-transformer", "geo-history-pop"):
        for level in ("region", "cell"):
            assert again["test"][name]["overall"][level] == pytest.approx(metrics["test"][name]["overall"][level])
    target = tmp_path.parent / f"{tmp_path.name}-refitted"
    outcome = CliRunner().invoke(app, ["refit", str(tmp_path), "-o", str(target)])
    assert outcome.exit_code == 0, outcome.output
    refitted = read_json(target / "metrics.json")
    for level in ("region", "cell"):
        assert refitted["test"]["action-transformer"]["overall"][level] == pytest.approx(
            metrics["test"]["action-transformer"]["overall"][level])


def test_a_final_fit_refuses_a_valid_split_trained_on(data_dir):
    with pytest.raises(ConfigError, match="train_on_all"):
        load_config("configs/geo/foursquare-nyc.yaml", [f"data.path={data_dir / 'foursquare-nyc'}",
                                                        "train.final_fit=true", "data.split.train_on_all=true"])
