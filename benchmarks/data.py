"""Data layer speed and memory: loading every real dataset through `load_data`, and generating
the large synthetic catalogue (1M items, ~10M events) with and without the full preparation.

Each case runs in a fresh process so its time and peak resident memory are its own; the
"baseline" column is the process's resident memory after imports, before the case starts.

    python benchmarks/data.py            # writes the "data" section of docs/benchmarks.md
    python benchmarks/data.py --quick    # smaller synthetic sizes, prints only
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time

from hmtrec.bench.report import markdown_table, update_section


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _run_case(case: dict, queue) -> None:
    import torch

    torch.set_num_threads(1)
    from hmtrec.data.loading import DataConfig, load_data
    from hmtrec.data.synthetic import SyntheticConfig, generate

    baseline = _rss_mb()
    started = time.perf_counter()
    row = {"case": case["name"]}
    if case["kind"] == "generate":
        data = generate(SyntheticConfig(**case["synthetic"]), seed=0)
        row.update(items=f"{data.taxonomy.n_leaves:,}", events=f"{len(data.events):,}",
                   sequences=f"{data.events['sequence'].iloc[-1]:,}", test_targets="-")
    else:
        config = DataConfig(**case["config"])
        prepared = load_data(config)
        counts = prepared.info["counts"]
        events = prepared.info["events_after_filters"]
        if events is None:  # a shipped split: its train and test events
            events = counts["train"]["events"] + counts["valid"]["events"] + counts["test"]["events"]
        row.update(items=f"{prepared.taxonomy.n_leaves:,}", events=f"{events:,}",
                   sequences=f"{counts['train']['sequences']:,} / {counts['valid']['sequences']:,} / "
                             f"{counts['test']['sequences']:,}",
                   test_targets=f"{counts['test']['targets']:,}")
    row["seconds"] = f"{time.perf_counter() - started:.1f}"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row["peak RSS MB"] = round(peak)
    row["baseline MB"] = round(baseline)
    queue.put(row)


def run(case: dict) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_run_case, args=(case, queue))
    process.start()
    row = queue.get()
    process.join()
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small synthetic sizes; print, don't write")
    args = parser.parse_args()
    large_items, large_sessions = (100_000, 170_000) if args.quick else (1_000_000, 1_700_000)
    large = dict(n_items=large_items, level_sizes=[100, 10_000], n_sessions=large_sessions, days=60)
    cases = [
        {"name": "movielens-100k (leave-one-out)", "kind": "load", "config": {"source": "movielens-100k"}},
        {"name": "movielens-1m users 1-2999 (leave-one-out)", "kind": "load", "config": {"source": "movielens-1m"}},
        {"name": "diginetica-sessions (given split)", "kind": "load", "config": {"source": "diginetica-sessions"}},
        {"name": "diginetica raw sample (session split)", "kind": "load", "config": {"source": "diginetica"}},
        {"name": "foursquare-nyc grid (time split)", "kind": "load", "config": {"source": "foursquare-nyc"}},
        {"name": "synthetic default (session split)", "kind": "load", "config": {"source": "synthetic"}},
        {"name": f"synthetic {large_items:,} items: generate only", "kind": "generate", "synthetic": large},
        {"name": f"synthetic {large_items:,} items: generate + filter + split", "kind": "load",
         "config": {"source": "synthetic", "synthetic": large}},
    ]
    rows = [run(case) for case in cases]
    table = markdown_table(rows, ["case", "items", "events", "sequences", "test_targets", "seconds",
                                  "peak RSS MB", "baseline MB"])
    print(table)
    if args.quick:
        return
    body = ("Time and peak memory of `load_data` per source (each in a fresh process, one torch "
            "thread; events: after filtering; sequences: train / valid / test). The large synthetic rows generate 1M items "
            "in 3 levels (100 ⊃ 10,000 ⊃ 1M) and 1.7M sessions, with item text; the last row includes "
            "the generation. The 2 cores are shared with other jobs, so seconds vary by up to 2x "
            "between runs; peak memory does not.\n\n" + table)
    update_section("data", body, title="Data loading and synthetic generation",
                   command="python benchmarks/data.py")


if __name__ == "__main__":
    main()
