"""`hmtrec export RUN_DIR --format onnx`: the model's graphs for ONNX Runtime (hmtrec/serve/onnx.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def export(
        run_dir: Path = typer.Argument(..., help="A finished sequence run directory (HierSRec main model)."),
        format: str = typer.Option("onnx", "--format", "-f", help="onnx (the only format)."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder (default RUN_DIR/onnx)."),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="Which of the run's models."),
    ):
        """Write encoder.onnx, items.onnx, items_full.onnx, items_rows.onnx and manifest.json, checked
        against PyTorch (the largest difference is printed and kept in the manifest); `hmtrec serve
        --backend onnx` then runs them on ONNX Runtime."""
        from hmtrec.errors import HmtrecError

        if format != "onnx":
            raise HmtrecError(f"--format {format!r}: only onnx is supported")
        from hmtrec.serve.onnx import export_onnx

        manifest = export_onnx(run_dir, output, label=model)
        sys.stdout.write(json.dumps(manifest, indent=2) + "\n")
