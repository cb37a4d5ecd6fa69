"""Every benchmark of issue 3, in priority order, through `hmtrec bench` (one heavy job at a time).

    python benchmarks/baselines.py                    # everything, in the order below
    python benchmarks/baselines.py --stage fsq ml1m   # some stages only
    python benchmarks/baselines.py --list

Each stage is one `hmtrec bench ...` command; each rewrites its own section of
docs/benchmarks.md, stamped with that exact command, so any table can be regenerated alone. Runs
already finished in bench-results/ are reused, so the script can be stopped and restarted.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

MAIN = "pop,spop,sknn,vsknn,gru4rec,sasrec,hiersrec"
ABLATIONS = {
    "foursquare-nyc": "hiersrec-no-hierarchy,hiersrec-no-metadata,hiersrec-no-ids,hiersrec-parallel,"
                      "hiersrec-consistency,hiersrec-coarse-w0.5,hiersrec-coarse-w2",
    "movielens-1m": "hiersrec-no-hierarchy,hiersrec-no-metadata,hiersrec-no-ids,hiersrec-parallel,"
                    "hiersrec-consistency,hiersrec-coarse-w0.5,hiersrec-coarse-w2",
    "diginetica": "hiersrec-no-hierarchy,hiersrec-no-metadata,hiersrec-no-ids,hiersrec-parallel,"
                  "hiersrec-consistency,hiersrec-coarse-w0.25,hiersrec-coarse-w0.5,hiersrec-coarse-w2",
}

STAGES: list[tuple[str, list[str]]] = [
    ("speed", ["bench", "speed", "--report"]),
    ("digi-full", ["bench", "run", "diginetica-full-train", "--report"]),
    ("sweep", ["bench", "candidates", "bench-results/diginetica-full-train/runs/hiersrec/seed0",
               "bench-results/diginetica-full-train/runs/sasrec/seed0", "--level", "category", "--report"]),
    ("digi", ["bench", "run", "diginetica", "--models", MAIN, "--report"]),
    ("fsq", ["bench", "run", "foursquare-nyc", "--models", MAIN, "--report"]),
    ("ml1m", ["bench", "run", "movielens-1m", "--models", MAIN, "--report"]),
    ("fsq-ablations", ["bench", "run", "foursquare-nyc", "--models", ABLATIONS["foursquare-nyc"], "--seeds", "0",
                       "--report"]),
    ("ml1m-ablations", ["bench", "run", "movielens-1m", "--models", ABLATIONS["movielens-1m"], "--seeds", "0",
                        "--report"]),
    ("digi-ablations", ["bench", "run", "diginetica", "--models", ABLATIONS["diginetica"], "--seeds", "0",
                        "--report"]),
    ("speed-again", ["bench", "speed", "--report"]),
    ("conclude", ["bench", "conclude", "diginetica-full-train", "diginetica", "movielens-1m", "foursquare-nyc",
                  "--report"]),
    ("fsq-ablation-seeds", ["bench", "run", "foursquare-nyc", "--models", ABLATIONS["foursquare-nyc"],
                            "--seeds", "0,1,2", "--report"]),
    ("ml1m-ablation-seeds", ["bench", "run", "movielens-1m", "--models", ABLATIONS["movielens-1m"],
                             "--seeds", "0,1,2", "--report"]),
    ("digi-ablation-seeds", ["bench", "run", "diginetica", "--models", ABLATIONS["diginetica"],
                             "--seeds", "0,1,2", "--report"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", nargs="*", help="stages to run (default: all, in order)")
    parser.add_argument("--list", action="store_true", help="print the stages and their commands")
    args = parser.parse_args()
    known = [name for name, _ in STAGES]
    unknown = [name for name in args.stage or [] if name not in known]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; stages: {known}")
    for name, command in STAGES:
        if args.list:
            print(f"{name:>20}: hmtrec {' '.join(command)}")
            continue
        if args.stage and name not in args.stage:
            continue
        started = time.perf_counter()
        print(f"== {name}: hmtrec {' '.join(command)}", flush=True)
        result = subprocess.run([sys.executable, "-m", "hmtrec.cli", *command])
        print(f"== {name}: exit {result.returncode} after {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
