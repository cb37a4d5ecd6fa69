"""`hmtrec suggest RUN_DIR --history "venue@days ..."`: region + city suggestions of a geo run,
consistent by construction (every city inside a suggested region), as JSON on stdout."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def suggest(
        run_dir: Path = typer.Argument(..., help="A run directory written by `hmtrec train` with a geo config."),
        history: str = typer.Option(..., "--history", "-H",
                                    help="Actions as VENUE@DAYS_AGO[:TYPE], separated by spaces or commas."),
        regions: int = typer.Option(3, "--regions", "-r", min=1, help="How many regions to suggest."),
        cities: int = typer.Option(5, "--cities", min=1, help="How many cities (cells) inside each region."),
        at: Optional[str] = typer.Option(None, "--at", help="Prediction time as an ISO date (default: now); "
                                         "sets the calendar context."),
        user: Optional[str] = typer.Option(None, "--user", "-u",
                                           help="The user's id as in the training log, for a model with a user "
                                           "embedding (default: an anonymous history)."),
        indent: Optional[int] = typer.Option(2, "--indent", help="JSON indentation (0: one line)."),
    ):
        """Suggest regions and the cities inside them, with joint probabilities, for a user's history."""
        from hmtrec.serve.geo_suggest import suggest_for_run

        result = suggest_for_run(run_dir, history, k_coarse=regions, k_fine=cities, at=at, user=user)
        sys.stdout.write(json.dumps(result, indent=indent or None, ensure_ascii=False) + "\n")
