"""`hmtrec recommend RUN_DIR --history "id1 id2 ..." -k 10`: the top-k items after a history, with the
predicted label and probability at every coarser level. Prints JSON on stdout (progress and
messages go to stderr), so the output can be piped."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from hmtrec.errors import HmtrecError


def register(app: typer.Typer) -> None:
    @app.command()
    def recommend(
        run_dir: Path = typer.Argument(..., help="A run directory written by `hmtrec train`."),
        history: str = typer.Option(..., "--history", "-H",
                                    help="Item ids of the history, oldest first, separated by spaces or commas."),
        k: int = typer.Option(10, "--k", "-k", min=1, help="How many items to return."),
        model: Optional[str] = typer.Option(None, "--model", "-m",
                                            help="Which of the run's models (default: the main one)."),
        exclude_history: bool = typer.Option(False, "--exclude-history",
                                             help="Never recommend an item already in the history."),
        skip_unknown: bool = typer.Option(False, "--skip-unknown",
                                          help="Skip unknown ids (listed under 'skipped') instead of failing."),
        indent: Optional[int] = typer.Option(2, "--indent", help="JSON indentation (0: one line)."),
    ):
        """Recommend the next items for a history, with the predicted label at every coarser level."""
        from hmtrec.serve.artefact import load_sequence_run
        from hmtrec.serve.geo_suggest import is_geo_run, suggest_for_run

        if is_geo_run(run_dir):  # a geo run answers with regions and the top k cities inside each
            result = suggest_for_run(run_dir, history, k_fine=k)
            sys.stdout.write(json.dumps(result, indent=indent or None, ensure_ascii=False) + "\n")
            return
        ids = [token for token in history.replace(",", " ").split() if token]
        if not ids:
            raise HmtrecError("--history is empty: give at least one item id")
        artefact = load_sequence_run(run_dir, labels=[model] if model else None)
        if artefact.needs_fit:
            from hmtrec.data.loading import load_data

            artefact.fit_missing(load_data(artefact.config.data).train)
        result = artefact.recommend(ids, k, label=model, exclude_history=exclude_history,
                                    skip_unknown=skip_unknown)
        sys.stdout.write(json.dumps(result, indent=indent or None, ensure_ascii=False) + "\n")
