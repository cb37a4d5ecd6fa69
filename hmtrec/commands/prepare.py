"""`hmtrec prepare CONFIG -o DIR`: streaming preparation of a log larger than memory (hmtrec/data/streaming.py)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from hmtrec.progress import console


def register(app: typer.Typer) -> None:
    @app.command()
    def prepare(
        config: Path = typer.Argument(..., help="A config whose `data:` section is a generic CSV/Parquet log."),
        output: Path = typer.Option(..., "--output", "-o", help="Folder for the prepared shards."),
        overrides: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Override a key: a.b=value."),
        memory_mb: int = typer.Option(2048, "--memory-mb", help="Memory the engine may hold before spilling to disk."),
        threads: Optional[int] = typer.Option(None, "--threads", help="Engine threads (default: all cores)."),
        temp_dir: Optional[Path] = typer.Option(None, "--temp-dir", help="Where to spill (default OUTPUT/.spill)."),
    ):
        """Read, validate, filter, encode and split the log with bounded memory into memory-mapped shards;
        train on them with `--set data.source=prepared --set data.path=OUTPUT`."""
        import yaml

        from hmtrec.config import load_config
        from hmtrec.data.streaming import PrepareSettings, prepare as run_prepare
        from hmtrec.errors import ConfigError

        raw = yaml.safe_load(config.read_text()) if config.exists() else None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {config} does not exist or is not a mapping")
        data_overrides = [item for item in (overrides or []) if item.split("=", 1)[0].strip().startswith("data.")]
        if len(data_overrides) != len(overrides or []):
            raise ConfigError("--set: `hmtrec prepare` reads only the data section; override data.* keys")
        section = {"kind": raw.get("kind", "sequence"), "data": raw.get("data", {})}
        cfg = load_config(None, data_overrides, base=section).data
        manifest = run_prepare(cfg, output, PrepareSettings(memory_mb=memory_mb, threads=threads,
                                                            temp_dir=str(temp_dir) if temp_dir else None))
        for report in manifest["reports"]:
            console.print(f"  {report['name']}: removed {report['rows_removed']:,} of {report['rows_before']:,} rows")
        counts = manifest["counts"]
        console.print(f"prepared {output} in {manifest['seconds']:.1f}s: " + ", ".join(
            f"{name} {c['sequences']:,} sequences / {c['events']:,} events" for name, c in counts.items()))
        console.print(f"train on it: hmtrec train -c {config} --set data.source=prepared --set data.path={output}")
