"""`hmtrec predict`: score a file of rows with a trained ranking run (one column per task head)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from hmtrec.progress import console


def register(app: typer.Typer) -> None:
    @app.command()
    def predict(
        run_dir: Path = typer.Argument(..., help="A ranking run directory written by `hmtrec train`."),
        input: Path = typer.Option(..., "--input", "-i", help="Rows to score (CSV, TSV or Parquet)."),
        output: Path = typer.Option(..., "--output", "-o", help="CSV to write the scores to."),
        keep: Optional[str] = typer.Option(None, "--keep", help="Comma-separated input columns to copy to the output."),
        calibrated: bool = typer.Option(True, "--calibrated/--raw",
                                        help="Apply the run's calibration.json (from `hmtrec calibrate`), if any."),
    ):
        """Write one probability (or value) column per task, `<task>_label` columns when the input has
        labels, and the scenario and facet columns. Calibrated heads keep their raw score in `<task>_raw`."""
        from hmtrec.calibrate import apply_calibration, load_calibration
        from hmtrec.pipelines.ranking import predict_file

        columns = [c.strip() for c in keep.split(",") if c.strip()] if keep else []
        scores = predict_file(run_dir, input, None, keep=columns)
        calibration = load_calibration(run_dir) if calibrated else None
        scores = apply_calibration(scores, calibration, source=str(input))
        for note in scores.attrs.get("calibration_notes", []):
            console.print(f"calibration: {note}")
        output.parent.mkdir(parents=True, exist_ok=True)
        scores.to_csv(output, index=False)
        console.print(f"wrote {len(scores)} rows x {scores.shape[1]} columns to {output}"
                      + (f" (calibrated: {', '.join(calibration.heads)})" if calibration is not None else ""))
