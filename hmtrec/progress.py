"""One console for results (stdout, so `hmtrec train ... > out.txt` captures them), one for progress
and errors (stderr), and the progress bars of every long step.

On a terminal a bar is drawn and kept on screen when its step ends; elsewhere (nohup, CI, a pipe)
no bar is drawn and each training epoch prints one line instead (loss, validation metric, best so
far, time). HMTREC_PROGRESS=0 hides both.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

console = Console()                     # results and messages: stdout
status_console = Console(stderr=True)   # progress bars, epoch lines and errors: stderr
T = TypeVar("T")


def progress_enabled() -> bool:
    return os.environ.get("HMTREC_PROGRESS", "1") != "0"


def bars_drawn() -> bool:
    """Bars only on a terminal; elsewhere they would print nothing until the step ends."""
    return progress_enabled() and status_console.is_terminal


@contextmanager
def progress_bar() -> Iterator[Progress]:
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                  console=status_console, transient=False, disable=not bars_drawn()) as bar:
        yield bar


def epoch_summary(record: dict, monitor: str | None, best_value: float | None, best_epoch: int | None,
                  epochs: int, label: str | None = None) -> str:
    """'epoch 3/10  loss 4.1234  valid MRR@20 0.1234  best 0.1301 (epoch 2)  12.3s'; `label` names
    the monitored validation metric (default: its key `monitor`)."""
    parts = [f"epoch {record['epoch']}/{epochs}", f"loss {record['loss']:.4f}"]
    if monitor is not None and f"valid_{monitor}" in record:
        parts.append(f"valid {label or monitor} {float(record[f'valid_{monitor}']):.4f}")
        if best_value is not None and not math.isnan(best_value):
            parts.append(f"best {best_value:.4f} (epoch {best_epoch})")
    parts.append(f"{record['epoch_seconds']:.1f}s")
    return "  ".join(parts)


def end_epoch(bar: Progress, task, summary: str) -> None:
    """Show an epoch's summary: on its bar (kept on screen) on a terminal, as a line elsewhere."""
    if bars_drawn():
        bar.update(task, info=summary.split("  ", 1)[-1])
    elif progress_enabled():
        status_console.print(summary, soft_wrap=True)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar (hidden when HMTREC_PROGRESS=0)."""
    with progress_bar() as bar:
        task = bar.add_task(description, total=total if total is not None else len(items), info="")
        for item in items:
            yield item
            bar.advance(task)
