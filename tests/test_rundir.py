"""The run directory's guarantees (issue 16): one test per defect found by attacking it, plus the
kill -9 resume of every kind staying bit-identical."""

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from hmtrec.cli import app
from hmtrec.config import build_config, load_config
from hmtrec.errors import ConfigError, HmtrecError
from hmtrec.pipelines import get_pipeline
from hmtrec.rundir import ArtefactError, RunDir, default_run_dir, open_run_dir, close_run_dir

from test_ranking_pipeline import write_config as write_ranking_config

REPO = Path(__file__).resolve().parents[1]
SEQUENCE = {
    "kind": "sequence",
    "data": {"source": "synthetic", "synthetic": {"n_items": 300, "level_sizes": [5, 30], "n_sessions": 2000,
                                                  "days": 10}},
    "model": {"name": "hiersrec", "dim": 16, "id_dim": 16, "level_dim": 8, "text_dim": 8, "text_buckets": 256,
              "layers": 1, "heads": 1},
    "train": {"epochs": 2, "batch_size": 64, "max_len": 6, "threads": 1, "monitor": None},
    "eval": {"ks": [5]},
    "baselines": ["pop"],
}
runner = CliRunner()


def sequence_config(**changes):
    return build_config({**SEQUENCE, **changes})


@pytest.fixture(scope="module")
def sequence_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rundir") / "seq"
    metrics = get_pipeline("sequence").train(sequence_config(), run_dir)
    return run_dir, metrics


def invoke(*args):
    """The CLI's exception (None when it succeeded)."""
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return result.exception
    assert result.exit_code == 0, result.output
    return None


def one_line_naming(error, path):
    assert isinstance(error, HmtrecError), repr(error)
    message = str(error)
    assert "\n" not in message and str(path) in message, message
    return message


# ---- writing through a symlink, labels ---------------------------------------------------------

def test_a_symlinked_log_is_never_written_through(sequence_run, tmp_path):
    run_dir, _ = sequence_run
    target = tmp_path / "victim.pth"
    target.write_text("untouched\n")
    log = run_dir / "log.txt"
    saved = log.read_bytes()
    log.unlink()
    log.symlink_to(target)
    try:
        error = invoke("evaluate", run_dir)
        assert "symbolic link" in one_line_naming(error, log)
        assert target.read_text() == "untouched\n"
        with pytest.raises(ArtefactError, match="symbolic link"):
            open_run_dir(run_dir)
    finally:
        log.unlink()
        log.write_bytes(saved)


@pytest.mark.parametrize("label", ["../escape", "a/b", "x\nimport os; os.system('id')", "..", ".hidden"])
def test_a_model_label_must_be_a_plain_name(label):
    with pytest.raises(ConfigError, match="baselines.0.label"):
        sequence_config(baselines=[{"name": "pop", "label": label}])


def test_a_logged_message_cannot_start_a_new_line(tmp_path):
    from hmtrec.rundir import get_logger

    open_run_dir(tmp_path)
    try:
        get_logger().info("label %s", "x\nimport os")
    finally:
        close_run_dir(tmp_path)
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert len(lines) == 1 and lines[0].endswith("label x\\nimport os")


# ---- the same-run guard, for every kind ----------------------------------------------------------

def test_a_ranking_run_refuses_another_learning_rate(tmp_path):
    config = load_config(write_ranking_config(tmp_path, "shared_bottom", bottom_hidden=[8]),
                         ["train.epochs=1", "train.max_steps_per_epoch=2"])
    get_pipeline("ranking").train(config, tmp_path / "run")
    changed = load_config(write_ranking_config(tmp_path, "shared_bottom", bottom_hidden=[8]),
                          ["train.epochs=1", "train.max_steps_per_epoch=2", "train.lr=0.5"])
    with pytest.raises(ConfigError, match=r"different config \(differs in: train.lr\)"):
        get_pipeline("ranking").train(changed, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "done"


def test_a_ranking_or_geo_config_cannot_land_in_a_sequence_run(sequence_run, tmp_path):
    run_dir, _ = sequence_run
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    ranking = load_config(write_ranking_config(tmp_path, "shared_bottom", bottom_hidden=[8]))
    with pytest.raises(ConfigError, match="holds a 'sequence' run"):
        get_pipeline("ranking").train(ranking, run_dir)
    geo = build_config({"kind": "geo", "data": {"source": "synthetic"}})
    with pytest.raises(ConfigError, match="holds a 'sequence' run"):
        get_pipeline("geo").train(geo, run_dir)
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before   # nothing written


def test_the_default_run_directory_is_named_from_the_config():
    config = sequence_config()
    first = default_run_dir(config, "configs/small.yaml")
    assert first == default_run_dir(sequence_config(), "configs/small.yaml")           # rerun: resume
    assert first.name.startswith("small-")
    assert default_run_dir(sequence_config(eval={"ks": [10]}), "configs/small.yaml") == first
    assert default_run_dir(sequence_config(train={**SEQUENCE["train"], "lr": 0.01}), "configs/small.yaml") != first


@contextlib.contextmanager
def lock_held_elsewhere(run_dir: Path):
    """Another process holding `run_dir`'s lock for the duration of the block."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        os.makedirs({str(run_dir)!r}, exist_ok=True)
        handle = os.open({str(run_dir / '.lock')!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(handle, fcntl.LOCK_EX)
        print('locked', flush=True)
        time.sleep(30)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.wait()


def test_one_process_at_a_time_per_run_directory(tmp_path):
    with lock_held_elsewhere(tmp_path / "run"):
        with pytest.raises(HmtrecError, match="another hmtrec process"):
            RunDir.begin(tmp_path / "run", sequence_config(), models=["hiersrec"])
        assert not (tmp_path / "run" / "run.json").exists()
    RunDir.begin(tmp_path / "run", sequence_config(), models=["hiersrec"]).close()   # free again


# ---- torn outputs and the status written last --------------------------------------------------

def test_calibrate_refuses_a_run_killed_while_writing_predictions(tmp_path, monkeypatch):
    config = load_config(write_ranking_config(tmp_path, "shared_bottom", bottom_hidden=[8]),
                         ["train.epochs=1", "train.max_steps_per_epoch=2"])
    real_to_csv = pd.DataFrame.to_csv
    calls = {"n": 0}

    def second_write_is_torn(frame, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:     # predictions_valid.csv is written, predictions_test.csv is torn
            real_to_csv(frame.iloc[: len(frame) // 2], path, *args, **kwargs)
            raise KeyboardInterrupt("killed while writing")
        return real_to_csv(frame, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", second_write_is_torn)
    with pytest.raises(KeyboardInterrupt):
        get_pipeline("ranking").train(config, tmp_path / "run")
    monkeypatch.setattr(pd.DataFrame, "to_csv", real_to_csv)
    run_dir = tmp_path / "run"
    assert not (run_dir / "predictions_test.csv").exists()          # never torn in place
    assert json.loads((run_dir / "run.json").read_text())["status"] == "training"
    error = invoke("calibrate", run_dir)
    assert "status 'training'" in one_line_naming(error, run_dir)
    get_pipeline("ranking").train(config, run_dir)                  # finishing it makes it usable
    assert invoke("calibrate", run_dir) is None


# ---- read errors: one line naming the file and the remedy ----------------------------------------

def test_a_corrupt_or_empty_checkpoint_is_named(tmp_path):
    run_dir = tmp_path / "run"
    RunDir.begin(run_dir, sequence_config(), models=["hiersrec", "pop"]).close()
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(SEQUENCE))
    for content in (b"", b"not a checkpoint"):
        (run_dir / "checkpoint.pt").write_bytes(content)
        error = invoke("train", "-c", config_file, "-o", run_dir)
        assert "delete it" in one_line_naming(error, run_dir / "checkpoint.pt")


def test_damaged_artefacts_are_named(sequence_run, tmp_path):
    run_dir, _ = sequence_run
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(run_dir), str(copy)], check=True)
    (copy / "model.safetensors").write_bytes(b"\x00" * 20)
    one_line_naming(invoke("recommend", copy, "--history", "x"), copy / "model.safetensors")
    (copy / "taxonomy.json").write_text("{not json")
    one_line_naming(invoke("recommend", copy, "--history", "x"), copy / "taxonomy.json")
    (copy / "config.yaml").write_text("model: [unclosed")
    one_line_naming(invoke("evaluate", copy), copy / "config.yaml")
    (copy / "run.json").write_text(json.dumps({"status": "done"}))
    assert "no 'kind'" in one_line_naming(invoke("evaluate", copy), copy / "run.json")


def test_run_dir_pointing_at_a_file_is_named(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(SEQUENCE))
    target = tmp_path / "a-file"
    target.write_text("mine")
    error = invoke("train", "-c", config_file, "-o", target)
    assert "is a file" in one_line_naming(error, target)
    assert target.read_text() == "mine"
    assert "is a file" in one_line_naming(invoke("evaluate", target), target)


@pytest.mark.parametrize("code, remedy", [(errno.ENOSPC, "disk is full"), (errno.EACCES, "no permission")])
def test_a_full_disk_or_a_permission_error_is_named(tmp_path, monkeypatch, code, remedy):
    real_replace = os.replace

    def failing(source, destination):
        if str(destination).endswith("run.json"):
            raise OSError(code, os.strerror(code))
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(ArtefactError, match=remedy) as caught:
        RunDir.begin(tmp_path / "run", sequence_config(), models=["hiersrec"])
    one_line_naming(caught.value, tmp_path / "run" / "run.json")
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")] == []


def test_orphaned_temporary_files_are_removed_on_resume(tmp_path):
    run_dir = tmp_path / "run"
    RunDir.begin(run_dir, sequence_config(), models=["hiersrec"]).close()
    (run_dir / "baselines" / "pop").mkdir(parents=True)
    orphans = [run_dir / ".checkpoint.pt.k3j4h5g6", run_dir / ".model.safetensors.a1b2c3d4.tmp",
               run_dir / "baselines" / "pop" / ".checkpoint.pt.zz99yy88"]
    for orphan in orphans:
        orphan.write_bytes(b"half")
    (run_dir / "notes.txt").write_text("kept")
    RunDir.begin(run_dir, sequence_config(), models=["hiersrec"]).close()
    assert not any(orphan.exists() for orphan in orphans)
    assert (run_dir / "notes.txt").read_text() == "kept" and (run_dir / ".lock").exists()


# ---- kill -9 and resume, every kind ----------------------------------------------------------------

# A training process that kills itself with SIGKILL right after its first checkpoint (a real kill -9,
# at a deterministic point: no race with a polling parent).
KILLED_CHILD = """
import os, signal, sys
from hmtrec.train.trainer import Trainer
save = Trainer.save_checkpoint
def save_then_die(self):
    save(self)
    os.kill(os.getpid(), signal.SIGKILL)
Trainer.save_checkpoint = save_then_die
from hmtrec.cli import app
app(sys.argv[1:])
"""


@pytest.mark.parametrize("kind", ["sequence", "ranking", "geo"])
def test_kill_9_then_resume_is_bit_identical(kind, tmp_path, request):
    if kind == "sequence":
        config = tmp_path / "c.yaml"
        # precision fixed: `auto` times a probe in each of the two runs, and on a busy machine the
        # straight and the killed run could choose differently (a resumed run keeps its own choice)
        config.write_text(yaml.safe_dump({**SEQUENCE, "train": {**SEQUENCE["train"], "precision": "fp32"}}))
        overrides = []
    elif kind == "geo":   # the shared Foursquare sample, two epochs
        config = REPO / "configs" / "geo" / "foursquare-nyc.yaml"
        quick = ["data.max_sequences=40", "examples.max_targets=200", "train.epochs=2", "train.patience=null",
                 "eval.max_targets=100", "train.valid_max_targets=100", "model.dim=16", "model.n_layers=1",
                 "train.batch_size=128", "train.threads=1",
                 f"data.path={request.getfixturevalue('data_dir') / 'foursquare-nyc'}"]
        overrides = [part for item in quick for part in ("--set", item)]
    else:
        config = write_ranking_config(tmp_path, "shared_bottom", bottom_hidden=[8])
        overrides = ["--set", "train.epochs=2", "--set", "train.patience=null", "--set", "train.max_steps_per_epoch=6"]
    arguments = ["train", "-c", str(config), *overrides]
    env = {**os.environ, "HMTREC_PROGRESS": "0", "PYTHONPATH": str(REPO)}
    assert invoke(*arguments, "-o", tmp_path / "straight") is None      # uninterrupted, in this process
    killed = subprocess.run([sys.executable, "-c", KILLED_CHILD, *arguments, "-o", str(tmp_path / "killed")],
                            env=env, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((tmp_path / "killed" / "run.json").read_text())["status"] == "training"
    assert invoke(*arguments, "-o", tmp_path / "killed") is None       # the same command resumes it
    assert "resumed from" in (tmp_path / "killed" / "log.txt").read_text()
    from safetensors.torch import load_file

    straight, resumed = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("straight", "killed"))
    assert straight.keys() == resumed.keys()
    assert all(bool((straight[key] == resumed[key]).all()) for key in straight)     # bit-identical
    metrics = [json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("straight", "killed")]
    if kind == "sequence":
        assert metrics[0]["models"]["hiersrec"]["full"] == metrics[1]["models"]["hiersrec"]["full"]
    elif kind == "geo":
        # every test figure but the timing, compared as text (an empty bucket's NaN equals nothing)
        figures = [json.dumps({model: {k: v for k, v in result.items() if k != "seconds"}
                               for model, result in m["test"].items()}, sort_keys=True) for m in metrics]
        assert figures[0] == figures[1]
        assert [h["loss"] for h in metrics[0]["history"]] == [h["loss"] for h in metrics[1]["history"]]
    else:
        assert metrics[0]["test"] == metrics[1]["test"]


def test_a_run_saved_before_a_switch_existed_reads_as_it_was_trained(sequence_run, tmp_path):
    run_dir, _ = sequence_run
    assert RunDir(run_dir).read_config().model["repeat_explore"] is True      # today's default, saved
    old = tmp_path / "old"
    old.mkdir()
    for name in ("config.yaml", "run.json"):
        (old / name).write_bytes((run_dir / name).read_bytes())
    saved = yaml.safe_load((old / "config.yaml").read_text())
    del saved["model"]["repeat_explore"]            # as written by a version without the switch
    (old / "config.yaml").write_text(yaml.safe_dump(saved))
    assert RunDir(old).read_config().model["repeat_explore"] is False
    # and the same-run check compares it as trained: today's config (repeat_explore true) differs
    with pytest.raises(ConfigError, match="repeat_explore"):
        RunDir(old).check_same_run(sequence_config())
    explicit = sequence_config(model={**SEQUENCE["model"], "repeat_explore": False})
    RunDir(old).check_same_run(explicit)
