"""The one run lifecycle (hmtrec.lifecycle), checked for every config kind: the same-run refusal
names the differing key and writes nothing, the status is written last, one process per run
directory, the default run directory comes from the config's hash, `hmtrec evaluate` changes only
evaluation keys, and a model of another family is refused before anything is trained."""

import copy
import json
import os

import pytest

from hmtrec import lifecycle
from hmtrec.config import build_config, load_config
from hmtrec.errors import ConfigError, HmtrecError
from hmtrec.models.families import GEO_ACTIONS, MULTI_TASK_ROWS, SEQUENCE_WINDOWS
from hmtrec.rundir import default_run_dir

from test_ranking_pipeline import write_config as write_ranking_config
from test_rundir import SEQUENCE, lock_held_elsewhere

KINDS = ["sequence", "ranking", "geo"]
GEO_QUICK = ["data.max_sequences=40", "examples.max_targets=200", "train.epochs=1", "eval.max_targets=100",
             "train.valid_max_targets=100", "model.dim=16", "model.n_layers=1", "train.batch_size=128",
             "train.threads=1", "baselines=[geo-history-pop]"]


def small_config(kind, tmp_path, data_dir, overrides=()):
    """A config of `kind` that trains in a few seconds."""
    overrides = list(overrides)
    if kind == "sequence":
        return load_config(None, ["train.epochs=1", *overrides], base=copy.deepcopy(SEQUENCE))
    if kind == "ranking":
        return load_config(write_ranking_config(tmp_path, "shared_bottom", bottom_hidden=[8]),
                           ["train.epochs=1", "train.max_steps_per_epoch=2", *overrides])
    return load_config("configs/geo/foursquare-nyc.yaml",
                       [*GEO_QUICK, f"data.path={data_dir / 'foursquare-nyc'}", *overrides])


@pytest.fixture(scope="module", params=KINDS)
def trained(request, tmp_path_factory):
    """(kind, config folder, data folder, run directory, every file the run renamed into place, in
    order). The geo kind trains on the shared Foursquare sample (skipped outside CI when absent)."""
    kind = request.param
    data_dir = request.getfixturevalue("data_dir") if kind == "geo" else None
    folder = tmp_path_factory.mktemp(kind)
    config = small_config(kind, folder, data_dir)
    run_dir = folder / "run"
    written, real_replace = [], os.replace

    def recording(source, destination):
        real_replace(source, destination)
        if os.path.basename(destination) == "run.json":
            written.append(("run.json", json.loads(open(destination).read())["status"]))
        else:
            written.append((os.path.relpath(destination, run_dir), None))

    os.replace = recording
    try:
        lifecycle.get_kind(kind).train(config, run_dir)
    finally:
        os.replace = real_replace
    return kind, folder, data_dir, run_dir, written


def test_the_status_is_written_last(trained):
    kind, _, _, run_dir, written = trained
    assert written[0] == ("config.yaml", None) and written[1] == ("run.json", "training")
    assert written[-1] == ("run.json", "done")                    # after every output file
    assert ("metrics.json", None) in written[2:-1]
    assert json.loads((run_dir / "run.json").read_text())["kind"] == kind


def test_a_changed_config_is_refused_naming_the_key_and_nothing_is_written(trained):
    kind, folder, data_dir, run_dir, _ = trained
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    changed = small_config(kind, folder, data_dir, ["train.lr=0.5"])
    with pytest.raises(ConfigError, match=r"differs in: train\.lr\)"):
        lifecycle.get_kind(kind).train(changed, run_dir)
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_a_config_of_another_kind_is_refused(trained, tmp_path):
    kind, _, _, run_dir, _ = trained
    other = "ranking" if kind == "sequence" else "sequence"
    config = small_config(other, tmp_path, None)
    with pytest.raises(ConfigError, match=f"holds a {kind!r} run"):
        lifecycle.get_kind(other).train(config, run_dir)


def test_one_process_at_a_time(trained):
    kind, folder, data_dir, run_dir, _ = trained
    with lock_held_elsewhere(run_dir):
        with pytest.raises(HmtrecError, match="another hmtrec process"):
            lifecycle.get_kind(kind).train(small_config(kind, folder, data_dir), run_dir)
        with pytest.raises(HmtrecError, match="another hmtrec process"):
            lifecycle.get_kind(kind).evaluate(run_dir, [])


def test_the_same_config_resumes_and_evaluate_reproduces_the_metrics(trained):
    kind, folder, data_dir, run_dir, _ = trained
    metrics = json.loads((run_dir / "metrics.json").read_text())
    again = lifecycle.get_kind(kind).train(small_config(kind, folder, data_dir), run_dir)
    assert "resumed from" in (run_dir / "log.txt").read_text() and json.loads(json.dumps(again)).keys() == metrics.keys()
    evaluated = lifecycle.get_kind(kind).evaluate(run_dir, ["train.threads=1"])
    if kind == "sequence":
        assert evaluated["hiersrec"]["full"] == metrics["models"]["hiersrec"]["full"]
    elif kind == "ranking":
        assert evaluated["auc"] == pytest.approx(metrics["test"]["auc"], abs=1e-6)
    else:
        assert evaluated["test"]["action-transformer"]["overall"] == metrics["test"]["action-transformer"]["overall"]


def test_evaluate_changes_only_evaluation_keys(trained):
    kind, _, _, run_dir, _ = trained
    with pytest.raises(ConfigError, match=f"--set train.lr: `hmtrec evaluate` of a {kind} run can only change"):
        lifecycle.get_kind(kind).evaluate(run_dir, ["train.lr=0.1"])


def test_refit_refuses_a_training_key_and_a_kind_without_a_post_training_stage(trained):
    kind, _, _, run_dir, _ = trained
    before = {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file() and path.name != ".lock"}
    with pytest.raises(ConfigError, match="train.lr|no stage fitted after training"):
        lifecycle.refit(lifecycle.get_kind(kind), run_dir, ["train.lr=0.1"])
    if kind == "sequence":
        with pytest.raises(ConfigError, match="no stage fitted after training"):
            lifecycle.refit(lifecycle.get_kind(kind), run_dir, [])
    after = {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file() and path.name != ".lock"}
    assert after == before                                 # nothing written


def test_the_default_run_directory_is_named_from_the_config_hash(trained):
    kind, folder, data_dir, _, _ = trained
    config = small_config(kind, folder, data_dir)
    first = default_run_dir(config, f"configs/{kind}-small.yaml")
    assert first.name.startswith(f"{kind}-small-")
    assert default_run_dir(small_config(kind, folder, data_dir), f"configs/{kind}-small.yaml") == first
    # where and how fast it runs does not change the run; what it learns does
    assert default_run_dir(small_config(kind, folder, data_dir, ["train.threads=2"]),
                           f"configs/{kind}-small.yaml") == first
    assert default_run_dir(small_config(kind, folder, data_dir, ["train.lr=0.5"]),
                           f"configs/{kind}-small.yaml") != first


@pytest.mark.parametrize("kind, contract", [("sequence", SEQUENCE_WINDOWS), ("ranking", MULTI_TASK_ROWS),
                                            ("geo", GEO_ACTIONS)])
def test_each_kind_feeds_one_batch_contract(kind, contract):
    assert lifecycle.get_kind(kind).batch_contract == contract


def test_a_model_of_another_family_is_refused_before_training(tmp_path):
    config = build_config({**SEQUENCE, "model": {"name": "action-transformer", "dim": 16, "n_layers": 1},
                           "baselines": []})
    with pytest.raises(ConfigError, match="'action-transformer' does not read sequence windows.*geo config"):
        lifecycle.get_kind("sequence").train(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "training"


def test_every_loader_refuses_an_unfinished_run(trained):
    """`open_finished` is the one way a run is read for use: the API's, serving's and export's loaders."""
    import hmtrec
    from hmtrec.rundir import ArtefactError
    from hmtrec.serve.artefact import load_geo_run, load_sequence_run
    from hmtrec.serve.ranker import Ranker

    kind, _, _, run_dir, _ = trained
    loader = {"sequence": load_sequence_run, "ranking": Ranker.load, "geo": load_geo_run}[kind]
    info_file = run_dir / "run.json"
    saved = info_file.read_text()
    info_file.write_text(json.dumps({**json.loads(saved), "status": "training"}))
    try:
        for load in (loader, hmtrec.load, lambda path: lifecycle.get_kind(kind).evaluate(path, [])):
            with pytest.raises(ArtefactError, match="status 'training'"):
                load(run_dir)
    finally:
        info_file.write_text(saved)
    loader(run_dir)
