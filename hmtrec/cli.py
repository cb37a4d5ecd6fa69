"""The `hmtrec` command. `train`, `evaluate` and `refit` run the one lifecycle (`hmtrec.lifecycle`) for the
config's or run's `kind`; every module in hmtrec/commands with a `register(app)` function adds its
own commands."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import List, Optional

import typer

from hmtrec.errors import HmtrecError
from hmtrec.progress import console, status_console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Hierarchical multi-task recommendation.")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("hmtrec")
        except PackageNotFoundError:  # run from a source tree without an install
            number = "unknown (not installed)"
        console.print(f"hmtrec {number}")
        raise typer.Exit()


@app.callback()
def _options(
    show_version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                      help="Print the version and exit."),
):
    """Hierarchical multi-task recommendation."""


def default_run_dir(config_path: Path | None, config) -> Path:
    """runs/<config stem>-<config hash>: rerunning the same command resumes the same run."""
    from hmtrec.rundir import default_run_dir as named_from_config

    return named_from_config(config, config_path)


@app.command()
def train(
    config: Path = typer.Option(..., "--config", "-c", help="YAML config file (required; e.g. configs/quickstart.yaml)."),
    overrides: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Override a key: a.b=value."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", "-o", help="Run directory (resumes if it holds a checkpoint)."),
    track: bool = typer.Option(False, "--track/--no-track", help="Log params, epochs and the run directory to MLflow."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default ./mlruns)."),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment (default hmtrec-<kind>)."),
    loader_workers: int = typer.Option(0, "--loader-workers", help="DataLoader processes building the training batches."),
):
    """Train a model from a config; writes config, checkpoint, weights, metrics and log to the run directory.
    Results go to stdout, progress to stderr. Under `torchrun` it trains data-parallel (docs/scale.md)."""
    from hmtrec.config import load_config
    from hmtrec.train.launch import train_run

    cfg = load_config(config, overrides)
    run_dir = run_dir or default_run_dir(config, cfg)
    metrics = train_run(cfg, run_dir, track=track, tracking_uri=tracking_uri, experiment=experiment,
                        loader_workers=loader_workers)
    console.print(f"run directory: {run_dir}")
    return metrics


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="A run directory written by `hmtrec train`."),
    overrides: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Override an evaluation key."),
):
    """Evaluate a trained run on its test split and print the metric table."""
    from hmtrec import lifecycle
    from hmtrec.rundir import RunDir

    kind = RunDir(run_dir).read_info()["kind"]
    return lifecycle.evaluate(lifecycle.get_kind(kind), run_dir, overrides or [])


@app.command()
def refit(
    run_dir: Path = typer.Argument(..., help="A finished run directory written by `hmtrec train`."),
    overrides: Optional[List[str]] = typer.Option(None, "--set", "-s",
                                                  help="Override a key fitted after training (or an evaluation key)."),
    into: Optional[Path] = typer.Option(None, "--run-dir", "-o",
                                        help="Write the refitted run here (the source's files copied; the source "
                                             "is left as it was). Default: refit the run in place."),
):
    """Fit the stages that follow training (e.g. a geo run's reference blend and region conditioning)
    again on the trained weights, with keys overridden, and evaluate on test; no retraining."""
    from hmtrec import lifecycle
    from hmtrec.rundir import RunDir

    kind = RunDir(run_dir).read_info()["kind"]
    metrics = lifecycle.refit(lifecycle.get_kind(kind), run_dir, overrides or [], into=into)
    console.print(f"run directory: {into or run_dir}")
    return metrics


def _register_command_modules() -> None:
    import hmtrec.commands as commands

    for module in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        loaded = importlib.import_module(f"hmtrec.commands.{module.name}")
        if hasattr(loaded, "register"):
            loaded.register(app)


_register_command_modules()


def main() -> None:
    try:
        app()
    except HmtrecError as error:
        status_console.print(f"[red]error:[/red] {error}", soft_wrap=True)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
