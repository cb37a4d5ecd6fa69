"""`hmtrec tune CONFIG`: search model and training settings with Optuna (see hmtrec/tune.py)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from hmtrec.progress import console


def register(app: typer.Typer) -> None:
    @app.command()
    def tune(
        config: Path = typer.Argument(..., help="A training config with a `tune:` section."),
        overrides: Optional[List[str]] = typer.Option(None, "--set", "-s",
                                                      help="Override a key (base or tune.*): a.b=value."),
        output: Optional[Path] = typer.Option(None, "--output", "-o",
                                              help="Study folder (default runs/tune-<config stem>)."),
        n_trials: Optional[int] = typer.Option(None, "--n-trials", help="Finished trials the study should hold."),
        storage: Optional[str] = typer.Option(None, "--storage", help="Database URL shared by the workers "
                                                                      "(default sqlite:///<output>/study.db)."),
        track: bool = typer.Option(False, "--track/--no-track", help="Log every trial to MLflow."),
        tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri",
                                                   help="MLflow tracking URI (default ./mlruns)."),
    ):
        """Run (or resume, or join as one more worker) an Optuna study over the settings the config's
        `tune.params` declares; the objective is a validation metric, never a test one. Writes one run
        directory per trial, tune.json (all trials) and best.yaml (the best trial's config)."""
        from hmtrec.tune import load_tune_spec, tune as run_tune

        extra = list(overrides or [])
        if n_trials is not None:
            extra.append(f"tune.n_trials={n_trials}")
        if storage is not None:
            extra.append(f"tune.storage={storage}")
        spec = load_tune_spec(config, extra)
        out_dir = output or Path("runs") / f"tune-{config.stem}"
        result = run_tune(spec, out_dir, track=track, tracking_uri=tracking_uri)
        study = result.study
        states = [t.state.name for t in study.get_trials(deepcopy=False)]
        counts = ", ".join(f"{states.count(s)} {s.lower()}" for s in sorted(set(states)))
        console.print(f"study {study.study_name!r}: this worker ran {result.ran} trial(s); the study holds {counts}")
        if (out_dir / "best.yaml").exists():
            best = study.best_trial
            console.print(f"best trial {best.number}: {spec.settings.objective} = {best.value:.5f} with {best.params}")
            console.print(f"its config: {out_dir / 'best.yaml'}; its run: {best.user_attrs.get('run_dir')}")
