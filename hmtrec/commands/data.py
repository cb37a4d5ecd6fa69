"""`hmtrec data info` (what a data config loads: sizes, levels, protocol, what filters removed) and
`hmtrec data synth OUT` (write the synthetic catalogue and log in the generic format)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Literal, Optional

import typer

from hmtrec.data.sources import Source
from hmtrec.errors import ConfigError


def data_config(config: Path | None, overrides: list[str] | None, source: str | None):
    """The `data:` section of a config file (or the defaults), with `--set key=value` overrides
    relative to that section and an optional `--source`."""
    from pydantic import ValidationError

    from hmtrec.config import _format_validation_error, _set_dotted, parse_overrides, read_yaml, resolve_data_path
    from hmtrec.data.loading import DataConfig

    raw: dict = {}
    if config is not None:
        loaded = read_yaml(config)
        section = loaded.get("data", loaded if "source" in loaded else {})
        raw = dict(resolve_data_path({"data": dict(section)}, config)["data"])
    if source is not None:
        raw["source"] = source
    for key, value in parse_overrides(overrides):
        _set_dotted(raw, key[5:] if key.startswith("data.") else key, value)
    try:
        return DataConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, str(config or "data")).replace("key '", "key 'data.")) from None


def register(app: typer.Typer) -> None:
    group = typer.Typer(no_args_is_help=True, help="Inspect data sources and write synthetic data.")
    app.add_typer(group, name="data")

    @group.command("info")
    def info(
        source: Optional[Source] = typer.Option(None, "--source", help="A data source."),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="A config file; its data: section is used."),
        overrides: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Override a data key: split.test_days=3."),
    ):
        """Load a data source as a run would and print its sizes, protocol and filter reports."""
        from rich.table import Table

        from hmtrec.data.loading import load_data
        from hmtrec.progress import console

        prepared = load_data(data_config(config, overrides, source))
        taxonomy = prepared.taxonomy
        console.print(f"[bold]{prepared.dataset.name}[/bold]: "
                      + " ⊃ ".join(f"{name} ({taxonomy.n_nodes(name):,})" for name in taxonomy.level_names)
                      + f"; item text: {'yes' if prepared.dataset.leaf_text is not None else 'no'}")
        table = Table("split", "sequences", "events", "targets", "mean length")
        for name in ("train", "valid", "test"):
            part = getattr(prepared, name)
            mean = part.n_events / part.n_sequences if part.n_sequences else 0.0
            table.add_row(name, f"{part.n_sequences:,}", f"{part.n_events:,}", f"{part.n_targets:,}", f"{mean:.1f}")
        console.print(table)
        reports = Table("filter / protocol step", "rows removed", "sequences removed", "items removed")
        for report in prepared.reports:
            reports.add_row(report.name, f"{report.rows_removed:,}", f"{report.sequences_removed:,}",
                            f"{report.items_removed:,}")
        console.print(reports)
        console.print(f"protocol: {prepared.info['protocol_description']}")
        for note in prepared.info["notes"]:
            console.print(f"note: {note}")
        for warning in prepared.info.get("warnings", []):
            console.print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True)
        console.print(f"loaded in {prepared.info['seconds']:.1f}s")

    @group.command("synth")
    def synth(
        out: Path = typer.Argument(..., help="Folder to write interactions and items into."),
        format: Literal["parquet", "csv"] = typer.Option("parquet", "--format", help="File format."),
        seed: int = typer.Option(0, "--seed"),
        overrides: Optional[List[str]] = typer.Option(None, "--set", "-s",
                                                      help="Generator setting: n_items=100000, n_sessions=200000."),
    ):
        """Write the synthetic catalogue and session log in the generic format (see docs/data.md)."""
        from hmtrec.data.synthetic import generate
        from hmtrec.progress import console

        cfg = data_config(None, [f"synthetic.{item}" for item in overrides or []], "synthetic").synthetic
        data = generate(cfg, seed=seed)
        paths = data.write(out, format=format)
        console.print(f"wrote {len(data.events):,} events to {paths['interactions']} and "
                      f"{data.taxonomy.n_leaves:,} items to {paths['items']}")
