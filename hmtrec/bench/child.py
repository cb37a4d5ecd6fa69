"""Run a module as a measured child: `python -m hmtrec.bench.child USAGE.json MODULE [ARGS...]`.

Runs MODULE as `__main__` with ARGS and, however it exits, writes its own peak resident memory and
CPU time to USAGE.json. The peak is read inside the child (VmHWM of its own address space) because
the parent's view (`ru_maxrss` from wait4) also counts the parent's pages the child had mapped
between fork and exec, which would inflate every small run by the size of the harness process.
"""

from __future__ import annotations

import json
import os
import resource
import runpy
import sys


def peak_rss_mb() -> float:
    """Peak resident memory of this process's current address space, in MB."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 1024)


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit("usage: python -m hmtrec.bench.child USAGE.json MODULE [ARGS...]")
    usage_path, module, arguments = sys.argv[1], sys.argv[2], sys.argv[3:]
    sys.argv = [module, *arguments]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        with open(usage_path, "w") as f:
            json.dump({"peak_rss_mb": peak_rss_mb(), "cpu_seconds": usage.ru_utime + usage.ru_stime,
                       "pid": os.getpid()}, f)


if __name__ == "__main__":
    main()
