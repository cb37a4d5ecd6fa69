"""Config and CLI hygiene (issue 18): YAML syntax errors located, `train` needs a config, results on
stdout and progress on stderr, --version, choice lists, consistent short flags, a candidate level
the data lacks fails before anything is written, data.path relative to the config file, per-epoch
lines off a terminal, a note when K >= a level's node count, and the configs ship in the wheel."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

import click
import pytest
import typer
import yaml
from typer.testing import CliRunner

from hmtrec.cli import app
from hmtrec.config import load_config
from hmtrec.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "kind": "sequence",
    "data": {"source": "synthetic",
             "synthetic": {"n_items": 300, "level_sizes": [4, 20], "n_sessions": 1500, "days": 10}},
    "model": {"name": "hiersrec", "dim": 16, "id_dim": 16, "level_dim": 8, "text_dim": 8, "text_buckets": 256},
    "train": {"epochs": 1, "batch_size": 64, "max_len": 8, "threads": 1},
    "eval": {"ks": [10], "candidate_level": "L2", "candidate_fraction": 0.1},
    "baselines": ["pop"],
}


def _write_config(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def test_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("kind: sequence\ntrain:\n  epochs: 2\n  lr: [0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}:") and "YAML syntax error" in message and "\n" not in message
    line, column = message.split(":")[1:3]
    assert line.isdigit() and column.isdigit()


def test_train_needs_a_config_and_version_prints():
    runner = CliRunner()
    result = runner.invoke(app, ["train"])
    assert result.exit_code != 0 and "Missing option '--config'" in result.output
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("hmtrec ")


def test_short_flags_mean_one_thing_and_free_text_options_have_choices():
    command = typer.main.get_command(app)
    meanings: dict[str, set[str]] = {}

    def walk(group, prefix=""):
        for name, sub in group.commands.items():
            if isinstance(sub, click.Group):
                walk(sub, f"{prefix}{name} ")
                continue
            for parameter in sub.params:
                shorts = [o for o in parameter.opts if o.startswith("-") and not o.startswith("--")]
                for short in shorts:
                    meanings.setdefault(short, set()).add(parameter.opts[0])

    walk(command)
    assert meanings["-c"] == {"--config"} and meanings["-s"] == {"--set"}
    assert meanings["-m"] <= {"--model", "--models"}
    assert meanings["-o"] <= {"--output", "--out", "--run-dir"}
    runner = CliRunner()
    result = runner.invoke(app, ["data", "info", "--source", "movielens-2m"])
    assert result.exit_code != 0 and "movielens-1m" in result.output
    result = runner.invoke(app, ["data", "synth", "out", "--format", "xlsx"])
    assert result.exit_code != 0 and "'parquet'" in result.output and "'csv'" in result.output


def test_results_on_stdout_progress_lines_on_stderr_and_k_notes(tmp_path, monkeypatch):
    monkeypatch.setenv("HMTREC_PROGRESS", "1")     # not a terminal: one line per epoch
    config = _write_config(tmp_path / "tiny.yaml", TINY)
    result = CliRunner().invoke(app, ["train", "-c", str(config), "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "Recall@10" in result.stdout and "Recall@10" not in result.stderr
    assert "epoch 1/1  loss " in result.stderr and "valid MRR@20" in result.stderr and "best " in result.stderr
    assert "note: level 'L1' has 4 nodes <= K=10: its Recall@10 is 1.0 for every model" in result.stdout


def test_unknown_candidate_level_fails_before_anything_is_written(tmp_path):
    raw = {**TINY, "eval": {**TINY["eval"], "candidate_level": "brand"}}
    config = _write_config(tmp_path / "tiny.yaml", raw)
    result = CliRunner().invoke(app, ["train", "-c", str(config), "-o", str(tmp_path / "run")])
    assert result.exit_code != 0
    assert "key 'eval.candidate_level': the data has no level 'brand'; choose one of ['L1', 'L2']" \
        in str(result.exception)
    assert not (tmp_path / "run").exists()


def test_relative_data_path_is_relative_to_the_config_file(tmp_path, monkeypatch):
    config = _write_config(tmp_path / "project" / "configs" / "run.yaml",
                           {"kind": "sequence", "data": {"source": "movielens-1m", "path": "../data/ml"}})
    monkeypatch.chdir(tmp_path)
    loaded = load_config(config)
    assert Path(loaded.data.path) == (tmp_path / "project" / "data" / "ml").resolve()
    # --set is relative to the working directory, made absolute when the config is built (so a run
    # directory's config.yaml reads the same data from anywhere); a missing folder names the real keys
    loaded = load_config(config, ["data.path=elsewhere"])
    assert loaded.data.path == str((tmp_path / "elsewhere").resolve())
    from hmtrec.data.loading import load_data
    with pytest.raises(DataError, match="set data.path in the config, relative to the config file's folder, "
                                        "or the HMT_DATA_DIR environment variable"):
        load_data(loaded.data)


def test_wheel_ships_every_config():
    """hmtrec/configs links to configs/, and the package-data patterns cover every YAML file in it
    (.ci/run builds the wheel and runs `hmtrec bench list` from a fresh venv)."""
    link = REPO / "hmtrec" / "configs"
    assert link.is_symlink() and link.resolve() == (REPO / "configs").resolve()
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["hmtrec.configs"]
    files = [path.relative_to(REPO / "configs").as_posix() for path in (REPO / "configs").rglob("*.yaml")]
    assert files and all(any(fnmatch.fnmatch(name, pattern) and name.count("/") == pattern.count("/")
                             for pattern in patterns) for name in files)
    from hmtrec.bench.suites import builtin_suites
    from hmtrec.paths import configs_dir
    assert (configs_dir() / "quickstart.yaml").exists() and "diginetica" in builtin_suites()
