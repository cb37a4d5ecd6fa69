"""Benchmark reports: each benchmark owns one named section of docs/benchmarks.md and rewrites
only that section, stamped with machine, date and the command that regenerates it."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import sys
from pathlib import Path

import torch

DEFAULT_REPORT = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nEvery section below is written by the command it names; rerun it to refresh.\n"


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    from hmtrec.train.trainer import cpu_flags

    # the flags that decide how fast (and in which precision) training runs
    flags = sorted(cpu_flags() & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    return (f"{cpu}, {os.cpu_count()} cores" + (f" ({' '.join(flags)})" if flags else "") +
            f", {device}; Python {platform.python_version()}, torch {torch.__version__}")


def stamp(command: str | None = None) -> str:
    command = command or " ".join(["python"] + sys.argv)
    today = _dt.date.today().isoformat()
    return f"*Machine:* {machine_description()}  \n*Date:* {today}  \n*Command:* `{command}`\n"


def markdown_table(rows: list[dict], columns: list[str] | None = None, float_format: str = "{:.4f}") -> str:
    if not rows:
        return "(no rows)\n"
    columns = columns or list(rows[0].keys())

    def cell(value):
        if isinstance(value, float):
            return float_format.format(value)
        return str(value)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def update_section(name: str, body: str, *, title: str | None = None, command: str | None = None,
                   path: str | Path | None = None) -> Path:
    """Replace (or append) the section `name` of the report with `body`, stamped."""
    path = Path(path) if path is not None else DEFAULT_REPORT
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else HEADER
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    section = f"{begin}\n## {title or name}\n\n{stamp(command)}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)
    return path
