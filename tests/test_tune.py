"""`hmtrec tune`: the search space is validated against the config, a study is fingerprinted, an
interrupted trial resumes with its parameters, and two worker processes share one SQLite study
without losing or duplicating trials."""

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from hmtrec.errors import ConfigError
from hmtrec.train.callbacks import epoch_listener
from hmtrec.tune import load_tune_spec, tune
from tiny_runs import tiny_sequence

REPO = Path(__file__).resolve().parents[1]
TINY = tiny_sequence(
    baselines=["pop"],
    tune={"n_trials": 3, "startup_trials": 1, "pruner": "none", "heartbeat_interval": 1, "grace_period": 5,
          "params": {"train.lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True}, "model.dim": {"choices": [8, 16]}}})


def write_config(path: Path, **tune_section) -> Path:
    raw = json.loads(json.dumps(TINY))
    raw["tune"].update(tune_section)
    path.write_text(yaml.safe_dump(raw))
    return path


def test_search_space_mistakes_are_named(tmp_path):
    config = write_config(tmp_path / "c.yaml", params={"model.dimm": {"low": 8, "high": 16}})
    with pytest.raises(ConfigError, match=r"tune.params.model.dimm .*unknown key 'model.dimm'"):
        load_tune_spec(config)
    config = write_config(tmp_path / "c.yaml", params={"train.lr": {"low": 0.1, "high": 0.01}})
    with pytest.raises(ConfigError, match="low < high"):
        load_tune_spec(config)
    config = write_config(tmp_path / "c.yaml", params={"train.epochs": {"low": -2, "high": 2}})
    with pytest.raises(ConfigError, match=r"train.epochs = -2"):
        load_tune_spec(config)
    spec = load_tune_spec(write_config(tmp_path / "c.yaml"))
    assert spec.settings.params["model.dim"].kind == "categorical"
    assert spec.settings.params["train.lr"].kind == "float"
    assert "tune" not in spec.base


class Interrupt(Exception):
    pass


def test_an_interrupted_study_resumes_its_trial_and_refuses_a_changed_space(tmp_path):
    config = write_config(tmp_path / "c.yaml", n_trials=2)
    spec = load_tune_spec(config)
    out = tmp_path / "study"

    def interrupt(trainer, state):
        if trainer.run_dir.name == "0001" and state.epoch == 1:
            raise Interrupt()

    with epoch_listener(interrupt), pytest.raises(Interrupt):
        tune(spec, out)
    result = tune(spec, out)
    trials = sorted(result.study.get_trials(), key=lambda t: t.number)
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == 2 and states.count(TrialState.FAIL) == 1
    failed = next(t for t in trials if t.state == TrialState.FAIL)
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == failed.number)
    assert retry.state == TrialState.COMPLETE and retry.params == failed.params
    # The retry resumed the failed trial's run directory (its checkpoint of epoch 1).
    assert retry.user_attrs["run_dir"] == failed.user_attrs["run_dir"]
    log = (Path(retry.user_attrs["run_dir"]) / "log.txt").read_text()
    assert "resumed from" in log
    summary = json.loads((out / "tune.json").read_text())
    assert summary["best"]["value"] == max(t.value for t in trials if t.state == TrialState.COMPLETE)
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["train"]["lr"] == summary["best"]["params"]["train.lr"]
    assert "tune" not in best and [spec["name"] for spec in best["baselines"]] == ["pop"]  # the full config

    changed = load_tune_spec(write_config(tmp_path / "c2.yaml", study_name="c", n_trials=2,
                                          params={"train.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True}}))
    with pytest.raises(ConfigError, match="another base config, search space or objective"):
        tune(changed, out)


def test_two_worker_processes_share_one_sqlite_study_without_loss(tmp_path):
    n_trials = 4
    config = write_config(tmp_path / "shared.yaml", n_trials=n_trials, pruner="median", pruner_startup_trials=1,
                          pruner_warmup_epochs=0)
    out = tmp_path / "study"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HMTREC_PROGRESS": "0"}
    command = [sys.executable, "-m", "hmtrec.cli", "tune", str(config), "-o", str(out)]
    workers = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]
    outputs = []
    for worker in workers:
        try:
            outputs.append(worker.communicate(timeout=240)[0])
        finally:
            worker.kill()
    assert [w.returncode for w in workers] == [0, 0], outputs
    ran = [int(output.split("this worker ran ")[1].split(" ")[0]) for output in outputs]
    assert all(n >= 1 for n in ran), outputs  # both workers took part
    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{out / 'study.db'}")
    trials = study.get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    # No trial lost (failed, left running) and none counted twice; each worker may finish the trial it had
    # started when the other reached the total.
    assert len(trials) == len(finished) == sum(ran)
    assert n_trials <= len(finished) <= n_trials + 1
    assert len({t.number for t in trials}) == len(trials)
    for trial in finished:
        if trial.state == TrialState.COMPLETE:
            assert (Path(trial.user_attrs["run_dir"]) / "metrics.json").exists()
