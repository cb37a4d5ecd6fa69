"""Measuring: wall time and peak memory of a child process, repeated timings, and FLOP rates.

Each benchmark run is a child process, so its peak resident memory belongs to that run only and
one failing run cannot take the suite down.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch


@dataclass
class ProcessResult:
    returncode: int
    wall_seconds: float
    peak_rss_mb: float
    cpu_seconds: float
    command: list[str]


def run_measured(module: str, arguments: Sequence[str], *, log_path: str | Path, env: dict | None = None,
                 cwd: str | Path | None = None) -> ProcessResult:
    """Run `python -m module arguments...` in a child process, its stdout and stderr appended to
    `log_path`; return the exit code, wall time, and the child's own peak RSS (MB) and CPU time,
    which the child reports itself (`hmtrec.bench.child`)."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    usage_path = log_path.with_name(log_path.name + ".usage.json")
    usage_path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "hmtrec.bench.child", str(usage_path), module, *arguments]
    started = time.perf_counter()
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})}, cwd=cwd)
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            process.kill()
            process.wait()
            raise
        process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if usage_path.exists():
        reported = json.loads(usage_path.read_text())
        peak, cpu = float(reported["peak_rss_mb"]), float(reported["cpu_seconds"])
        usage_path.unlink()
    else:  # killed before it could report: the parent's view, an upper bound
        peak = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
        cpu = usage.ru_utime + usage.ru_stime
    return ProcessResult(process.returncode, wall, peak, cpu, command)


def time_call(function: Callable[[], object], *, repeats: int = 5, warmup: int = 1,
              min_seconds: float = 0.0) -> dict[str, float]:
    """Median, min and max seconds of `function()` over `repeats` timed calls after `warmup`
    untimed ones; keeps repeating until `min_seconds` of timed calls have accumulated."""
    for _ in range(warmup):
        function()
    times: list[float] = []
    while len(times) < repeats or sum(times) < min_seconds:
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
        if len(times) >= 1000:
            break
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "repeats": len(times)}


def matmul_gflops(size: int = 1024, *, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Achieved GFLOP/s of a plain [size, size] @ [size, size] matrix multiply (2 size^3 FLOPs),
    the reference a model's training step is compared with."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    timing = time_call(lambda: a @ b, repeats=repeats, warmup=1)
    return 2 * size**3 / timing["median"] / 1e9


def step_flops(step: Callable[[], object]) -> int:
    """FLOPs of one call of `step` (forward and backward) as counted by torch's FlopCounterMode
    (matrix multiplies, convolutions and attention; element-wise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())
