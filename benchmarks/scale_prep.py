"""Streaming data preparation at scale (issue 17): synthetic logs of 1M-50M events over 1M items,
the engine choice (DuckDB vs Polars lazy/streaming, same work, measured), and peak RSS and wall time
of `hmtrec prepare` plus one training epoch on the prepared shards.

    python benchmarks/scale_prep.py generate --events 10000000 --out /tmp/scale-logs/10m
    python benchmarks/scale_prep.py engines --log /tmp/scale-logs/10m
    python benchmarks/scale_prep.py run --events 1000000 10000000 50000000 --work /tmp/scale-logs --epoch --keep --report
    python benchmarks/scale_prep.py steps --events 50000000 --work /tmp/scale-logs   # s per batch by setting
    python benchmarks/scale_prep.py windows --events 50000000 --work /tmp/scale-logs   # pread vs mapping
    python benchmarks/scale_prep.py ddp          # torchrun with 2 gloo processes vs one process

Every measured step runs in its own child process; its peak RSS is the child's ru_maxrss (wait4).
Generated logs, shards and runs are deleted after each size unless --keep; --stage prepare|train
splits the two.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # the driver reads run directories with this checkout's hmtrec
N_ITEMS = 1_000_000
LEVEL_SIZES = (20, 1000)            # categories > subcategories > 1M items
MEAN_SESSION_LENGTH = 5
DAYS = 30
SESSIONS_PER_CHUNK = 500_000


# ---- synthetic logs, written in chunks (memory independent of the log size) --------------------

def generate(events: int, out: Path, seed: int = 0) -> dict:
    """items.csv (item_id, category, subcategory) and interactions.csv (session_id, item_id, timestamp):
    sessions of geometric length (>= 1, mean 5) dwelling in one subcategory, power-law popularity
    within it, starts uniform over 30 days, one event a minute."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_sub = N_ITEMS // LEVEL_SIZES[1]
    item = np.arange(N_ITEMS, dtype=np.int64)
    sub = item // per_sub
    cat = sub * LEVEL_SIZES[0] // LEVEL_SIZES[1]
    pacsv.write_csv(pa.table({"item_id": item, "category": [f"c{c}" for c in cat],
                              "subcategory": [f"s{s}" for s in sub]}), out / "items.csv")
    written, session = 0, 0
    with open(out / "interactions.csv", "wb") as sink:
        sink.write(b"session_id,item_id,timestamp\n")
        while written < events:
            n = SESSIONS_PER_CHUNK
            lengths = rng.geometric(1.0 / MEAN_SESSION_LENGTH, size=n)
            lengths = lengths[np.cumsum(lengths) <= events - written] if lengths.sum() > events - written else lengths
            if len(lengths) == 0:
                lengths = np.array([events - written])
            total = int(lengths.sum())
            ids = np.repeat(np.arange(session, session + len(lengths)), lengths)
            # subcategory per session: Zipf-like over the 1000 subcategories
            session_sub = np.minimum((LEVEL_SIZES[1] * rng.random(len(lengths)) ** 2.5).astype(np.int64),
                                     LEVEL_SIZES[1] - 1)
            rank = np.minimum((per_sub * rng.random(total) ** 3).astype(np.int64), per_sub - 1)
            items = np.repeat(session_sub, lengths) * per_sub + rank
            start = rng.integers(1_700_000_000, 1_700_000_000 + DAYS * 86_400, size=len(lengths))
            within = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            stamps = np.repeat(start, lengths) + 60 * within
            chunk = pa.table({"session_id": ids, "item_id": items, "timestamp": stamps})
            buffer = pa.BufferOutputStream()
            pacsv.write_csv(chunk, buffer, write_options=pacsv.WriteOptions(include_header=False))
            sink.write(buffer.getvalue().to_pybytes())
            written += total
            session += len(lengths)
    info = {"events": written, "sessions": session, "items": N_ITEMS,
            "bytes": (out / "interactions.csv").stat().st_size}
    (out / "log.json").write_text(json.dumps(info))
    return info


# ---- the engine comparison: the same work in DuckDB and in Polars ------------------------------

def engine_duckdb(log: Path, out: Path, memory_mb: int, threads: int) -> int:
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET memory_limit='{memory_mb}MB'; SET threads={threads}; "
                f"SET temp_directory='{out / 'duckdb.tmp'}'; SET preserve_insertion_order=false")
    con.execute(f"""
        CREATE TEMP TABLE ev AS
        SELECT e.session_id, i.leaf, e.timestamp
        FROM read_csv('{log / 'interactions.csv'}', header=true,
                      columns={{'session_id': 'BIGINT', 'item_id': 'BIGINT', 'timestamp': 'BIGINT'}}) e
        JOIN (SELECT item_id, row_number() OVER (ORDER BY item_id) - 1 AS leaf
              FROM read_csv('{log / 'items.csv'}', header=true)) i USING (item_id)""")
    con.execute("""CREATE TEMP TABLE kept AS SELECT * FROM ev
                   WHERE leaf IN (SELECT leaf FROM ev GROUP BY leaf HAVING count(*) >= 5)""")
    con.execute("""CREATE TEMP TABLE seqs AS SELECT session_id, min(timestamp) AS first, max(timestamp) AS last
                   FROM kept GROUP BY session_id HAVING count(*) >= 2""")
    con.execute(f"""COPY (SELECT k.session_id, k.leaf, k.timestamp, s.last > (SELECT max(last) FROM seqs) - 7*86400
                          AS is_test
                          FROM kept k JOIN seqs s USING (session_id)
                          ORDER BY s.first, k.session_id, k.timestamp)
                    TO '{out / 'events.parquet'}' (FORMAT parquet)""")
    return con.execute(f"SELECT count(*) FROM '{out / 'events.parquet'}'").fetchone()[0]


def engine_polars(log: Path, out: Path, memory_mb: int, threads: int) -> int:
    os.environ["POLARS_MAX_THREADS"] = str(threads)
    import polars as pl

    schema = {"session_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64}
    events = pl.scan_csv(log / "interactions.csv", schema=schema)
    items = (pl.scan_csv(log / "items.csv").select("item_id").sort("item_id")
             .with_row_index("leaf"))
    ev = events.join(items, on="item_id", how="inner").select("session_id", "leaf", "timestamp")
    support = ev.group_by("leaf").agg(pl.len().alias("n")).filter(pl.col("n") >= 5).select("leaf")
    kept = ev.join(support, on="leaf", how="semi")
    seqs = (kept.group_by("session_id").agg(pl.col("timestamp").min().alias("first"),
                                            pl.col("timestamp").max().alias("last"), pl.len().alias("n"))
            .filter(pl.col("n") >= 2))
    cut = seqs.select((pl.col("last").max() - 7 * 86400).alias("cut"))
    result = (kept.join(seqs, on="session_id", how="inner").join(cut, how="cross")
              .with_columns((pl.col("last") > pl.col("cut")).alias("is_test"))
              .sort(["first", "session_id", "timestamp"])
              .select("session_id", "leaf", "timestamp", "is_test"))
    result.sink_parquet(out / "events.parquet", engine="streaming")
    return pl.scan_parquet(out / "events.parquet").select(pl.len()).collect().item()


ENGINES = {"duckdb": engine_duckdb, "polars": engine_polars}


# ---- measuring a child process -----------------------------------------------------------------

def measured(command: list[str], log_file: Path, env: dict | None = None) -> dict:
    """Run a command; its wall time and peak RSS (ru_maxrss of the child, in MB)."""
    # Through /usr/bin/time when there is one: a child forked from this (large) process would start its
    # ru_maxrss at this process's size, which hides peaks of small runs.
    maxrss_file = Path(f"{log_file}.maxrss")
    timed = ["/usr/bin/time", "-f", "%M", "-o", str(maxrss_file), *command] if Path("/usr/bin/time").exists() \
        else command
    started = time.perf_counter()
    with open(log_file, "w") as sink:
        process = subprocess.Popen(timed, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed ({code}); see {log_file}")
    peak_kb = int(maxrss_file.read_text().split()[-1]) if timed is not command else usage.ru_maxrss
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(peak_kb / 1024, 1)}


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return ", ".join(f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma") if f in flags)


def machine() -> str:
    return f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}; {cpu_flags()}), shared"


# ---- commands ----------------------------------------------------------------------------------

def command_engines(args) -> None:
    rows = []
    for engine in args.engines:
        out = Path(args.work) / f"engine-{engine}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / 'benchmarks')!r});"
                f"from scale_prep import ENGINES; from pathlib import Path;"
                f"print(ENGINES[{engine!r}](Path({str(args.log)!r}), Path({str(out)!r}), {args.memory_mb}, {args.threads}))")
        result = measured([sys.executable, "-c", code], out.with_suffix(".log"))
        rows.append({"engine": engine, **result})
        print(rows[-1], flush=True)
        shutil.rmtree(out, ignore_errors=True)
    info = json.loads((Path(args.log) / "log.json").read_text())
    Path(args.work, "engines.json").write_text(json.dumps({"log": info, "rows": rows}))
    if args.report:
        report_engines(info, rows, args)


def report_engines(info: dict, rows: list[dict], args) -> None:
    from hmtrec.bench.report import update_section

    lines = [f"Same work in both engines: read the {info['events']:,}-event CSV ({info['bytes'] / 1e9:.2f} GB) and the "
             f"1M-item table, join (encode items), item support >= 5, sessions >= 2 events, mark test sessions, sort "
             f"by session start and write Parquet. `memory_limit` {args.memory_mb} MB (DuckDB; Polars has no such "
             f"setting), {args.threads} threads. Machine: {machine()}.", "",
             "| engine | wall s | peak RSS MB |", "|---|---:|---:|"]
    lines += [f"| {row['engine']} | {row['seconds']:.1f} | {row['peak_rss_mb']:,.0f} |" for row in rows]
    update_section("scale-engines", "\n".join(lines), title="Streaming preparation: DuckDB vs Polars (engine choice)",
                   command=f"python benchmarks/scale_prep.py engines --log {args.log} --memory-mb {args.memory_mb} "
                           f"--threads {args.threads} --report")


PREP_CONFIG = """kind: sequence
data:
  source: generic
  path: {log}
  split: {{test_days: 0.02, valid_days: 0.02}}
  keep_unused_items: true   # the whole 1M-item catalogue at every log size: the same model each time
  generic:
    interactions: interactions.csv
    items: items.csv
    columns: {{sequence: session_id, item: item_id, time: timestamp}}
    item_columns: {{item: item_id, levels: [category, subcategory]}}
# HierSRec with every head; the item head trains with the sampled softmax (the batch's target items
# plus --negatives uniform ones, log-Q corrected), so a step costs [M, ~M + K] item logits, not [M, 1M].
model: {{name: hiersrec, dim: 32, layers: 1, heads: 1, id_dim: 32, level_dim: 16, text: none, dropout: 0.1,
         item_loss: sampled, uniform_negatives: {negatives}}}
train: {{epochs: 1, batch_size: {batch}, max_len: 20, threads: {threads}, monitor: null, precision: {precision}}}
eval: {{ks: [20], candidate_fraction: null, batch_size: 512, segments: []}}
"""

# Run a command (python -m MODULE ARGS) in this interpreter with a thread sampling /proc/self/status,
# so that a child's peak resident memory splits into anonymous memory (what it allocated) and
# file-backed pages (memory-mapped shards it touched, which the kernel can drop again).
RSS_WRAPPER = """
import atexit, json, runpy, sys, threading, time
out, module, sys.argv = sys.argv[1], sys.argv[2], [sys.argv[2], *sys.argv[3:]]
peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
def sample():
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in peak:
            peak[key] = max(peak[key], int(value.split()[0]))
def watch():
    while True:
        sample(); time.sleep(0.2)
threading.Thread(target=watch, daemon=True).start()
atexit.register(lambda: (sample(), open(out, "w").write(json.dumps({k: v / 1024 for k, v in peak.items()}))))
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def measured_rss(module_args: list[str], log_file: Path, env: dict) -> dict:
    """`measured` for `python -m ...`, plus the peaks of anonymous and file-backed RSS (MB)."""
    rss_file = Path(f"{log_file}.rss.json")
    rss_file.unlink(missing_ok=True)
    result = measured([sys.executable, "-c", RSS_WRAPPER, str(rss_file), *module_args], log_file, env)
    rss = json.loads(rss_file.read_text())
    return {**result, "peak_anon_mb": round(rss["RssAnon"], 1), "peak_file_mb": round(rss["RssFile"], 1)}


def command_run(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results_file = work / "run.json"
    rows = json.loads(results_file.read_text()) if results_file.exists() else {}
    env = {"PYTHONPATH": str(REPO), "HMTREC_PROGRESS": "0"}
    for events in args.events:
        key = str(events)
        row = rows.get(key, {})
        log, shards = work / f"log-{events}", work / f"shards-{events}"
        config = work / f"prep-{events}.yaml"
        config.write_text(PREP_CONFIG.format(log=log, batch=args.batch_size, negatives=args.negatives,
                                             threads=args.threads, precision=args.precision))
        if args.stage == "prepare" and row.get("memory_mb", args.memory_mb) != args.memory_mb:
            # the same log under another memory limit: measured beside the main row, shards discarded
            other = work / f"shards-{events}-{args.memory_mb}mb"
            shutil.rmtree(other, ignore_errors=True)
            prep = measured_rss(["hmtrec.cli", "prepare", str(config), "-o", str(other), "--memory-mb",
                                 str(args.memory_mb), "--threads", "2"],
                                work / f"prepare-{events}-{args.memory_mb}mb.log", env)
            row.setdefault("prepare_at", {})[str(args.memory_mb)] = prep
            rows[key] = row
            _save_row(results_file, rows, key)
            print(key, "prepare at", args.memory_mb, prep, flush=True)
            shutil.rmtree(other, ignore_errors=True)
            continue
        if args.stage in ("prepare", "all") and ("prepare" not in row or args.force
                                                  or not (shards / "prepared.json").exists()):
            shutil.rmtree(shards, ignore_errors=True)
            if not (log / "log.json").exists():
                generate(events, log)
            info = json.loads((log / "log.json").read_text())
            prep = measured_rss(["hmtrec.cli", "prepare", str(config), "-o", str(shards), "--memory-mb",
                                 str(args.memory_mb), "--threads", "2"], work / f"prepare-{events}.log", env)
            manifest = json.loads((shards / "prepared.json").read_text())
            row = {"events": info["events"], "log_gb": round(info["bytes"] / 1e9, 2), "memory_mb": args.memory_mb,
                   "train_events": manifest["counts"]["train"]["events"],
                   "train_sequences": manifest["counts"]["train"]["sequences"],
                   "items_kept": manifest["n_items"], "prepare": prep}
            rows[key] = row
            _save_row(results_file, rows, key)
            print(key, "prepare", prep, flush=True)
        if args.stage in ("train", "all"):
            if not (shards / "prepared.json").exists():
                raise SystemExit(f"no shards for {events} events in {shards}: run --stage prepare first")
            runs = ([("steps", args.steps)] if args.steps else []) + ([("epoch", None)] if args.epoch else [])
            for label, steps in runs:
                run = work / f"run-{events}-{label}"
                shutil.rmtree(run, ignore_errors=True)
                # windows hold <= 21 events and these sessions are short, so windows ~ training sequences
                fraction = 1.0 if steps is None else min(1.0, steps * args.batch_size / row["train_sequences"])
                train = measured_rss(["hmtrec.cli", "train", "-c", str(config), "--set", "data.source=prepared",
                                      "--set", f"data.path={shards}", "--set", f"train.epoch_fraction={fraction:.8f}",
                                      "-o", str(run)], work / f"train-{events}-{label}.log", env)
                metrics = json.loads((run / "metrics.json").read_text())["models"]["hiersrec"]
                batches = _count_steps(run)
                history = metrics["training"]["history"][0]
                row[label] = {**train, "epoch_fraction": fraction, "batches": batches,
                              "threads": args.threads, "precision": args.precision, "steps_requested": steps,
                              "model_mb": round(history["model_bytes"] / 2**20, 1),
                              "optimizer_mb": round(history["optimizer_bytes"] / 2**20, 1),
                              "epoch_peak_rss_mb": (None if history.get("peak_rss_bytes") is None
                                                    else round(history["peak_rss_bytes"] / 2**20, 1)),
                              "epoch_seconds": round(metrics["training"]["epoch_seconds"], 1),
                              "epoch_cpu_seconds": round(metrics["training"]["history"][0]["epoch_cpu_seconds"], 1),
                              "seconds_per_batch": round(metrics["training"]["epoch_seconds"] / max(batches, 1), 3),
                              "item_recall20": metrics["full"][list(metrics["full"])[-1]]["Recall@20"],
                              "subcategory_recall20": metrics["full"]["subcategory"]["Recall@20"]}
                rows[key] = row
                _save_row(results_file, rows, key)
                print(key, label, row[label], flush=True)
                if not args.keep:
                    shutil.rmtree(run, ignore_errors=True)
        if not args.keep:
            for folder in (log, shards):
                shutil.rmtree(folder, ignore_errors=True)
    if args.report:
        report_run(rows, args)


def _save_row(results_file: Path, rows: dict, key: str) -> None:
    """Write one size's row into run.json as it is on disk now (another size's run may have written)."""
    on_disk = json.loads(results_file.read_text()) if results_file.exists() else {}
    on_disk[key] = rows[key]
    rows.update(on_disk)
    results_file.write_text(json.dumps(on_disk, indent=1))


def _count_steps(run: Path) -> int:
    """Batches the epoch trained (the step counter of the run's last checkpoint)."""
    from hmtrec.rundir import load_tensors

    return int(load_tensors(run / "checkpoint.pt")["state"]["step"])


def report_run(rows: dict, args) -> None:
    from hmtrec.bench.report import update_section

    def rss(entry: dict) -> str:
        return f"{entry['peak_rss_mb']:,.0f} ({entry['peak_anon_mb']:,.0f} / {entry['peak_file_mb']:,.0f})"

    lines = [f"Synthetic logs over 1,000,000 items (20 categories > 1,000 subcategories; sessions of mean length 5 "
             f"over 30 days; CSV), `hmtrec prepare --memory-mb {args.memory_mb} --threads 2` (DuckDB) with "
             f"`data.keep_unused_items: true`, so that every size trains the same model over the whole catalogue "
             f"(items kept = 1,000,000) and memory growth is the log's, then `hmtrec train` on the memory-mapped "
             f"shards: HierSRec with every head (category, subcategory, item; dim 32, 1 layer, no text), the item "
             f"head trained with the sampled softmax (`model.item_loss: sampled`, the batch's target items plus "
             f"{args.negatives:,} uniform negatives, log-Q corrected) and `train.sparse_updates: auto` (on: sparse "
             f"gradients and lazy Adam for the item-id table), batch {args.batch_size} windows, "
             f"{args.precision}, {args.threads} thread(s) (the `scale-step` section compares threads, precision and "
             f"sparse updates); test and valid = the sessions ending in the last 0.02 + 0.02 days, so that "
             "evaluation (over the whole catalogue) stays small. One whole epoch per size where this machine's time "
             "allowed, else the first batches of it (marked in the row, `--steps`: the whole epoch's batch plan is "
             "built and the first N batches of it trained), then the test evaluation. CPU s per batch: the training loop's process CPU seconds per batch, in brackets wall "
             "seconds (this machine is shared with other jobs). Run s: the whole `hmtrec train` (loading, the "
             "epoch's batch plan, the epoch, test evaluation, saving). Epoch peak RSS: the training process's "
             "ru_maxrss at the end of the epoch, before the test evaluation (loading, the plan and the batches; "
             "recorded in the run's training history since this column was added). Train peak RSS is the child process's "
             "ru_maxrss over the whole run, the test evaluation included (whose [cases, items] score blocks are "
             "bounded by `eval.score_budget_mb`, and fill up only once the test split has enough cases); in brackets the peaks of its anonymous memory and of its file-backed pages "
             "(/proc/self/status RssAnon / RssFile, sampled every 0.2 s), which for training are mostly the "
             "memory-mapped shards' pages it touched (the kernel may drop them again). Model + optimizer: the "
             f"parameters' bytes and Adam's moments (both optimizers' state). Machine: {machine()}.", "",
             "| events | CSV GB | prepare s | prepare peak RSS MB (anon / file) | train events kept | items kept | "
             "batches per epoch | CPU s per batch (wall) | epoch s | run s | epoch peak RSS MB | "
             "train peak RSS MB (anon / file) | model + optimizer MB | test item Recall@20 after the epoch |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for key in sorted(rows, key=int):
        r = rows[key]
        if "prepare" not in r or "peak_anon_mb" not in r["prepare"]:
            continue
        head = (f"| {r['events']:,} | {r['log_gb']:.2f} | {r['prepare']['seconds']:.0f} | {rss(r['prepare'])} | "
                f"{r['train_events']:,} | {r['items_kept']:,} | ")
        label = "epoch" if "epoch" in r else "steps" if "model_mb" in r.get("steps", {}) else None
        if label is None:
            lines.append(head + f"≈{math.ceil(r['train_sequences'] / args.batch_size):,} | not run | not run | "
                                f"not run | not run | not run | n/a | n/a |")
            continue
        e = r[label]
        if label == "epoch":
            batches, epoch_s, recall = f"{e['batches']:,}", f"{e['epoch_seconds']:,.0f}", f"{e['item_recall20']:.4f}"
        else:   # only the first batches ran: what they took, and the whole epoch at their rate
            whole = math.ceil(e["batches"] / e["epoch_fraction"])
            batches = f"≈{whole:,} (the first {e['batches']:,} run)"
            at_rate = whole * e["epoch_seconds"] / e["batches"]
            epoch_s = (f"not run: {e['epoch_seconds']:,.0f} for the first {e['batches']:,} batches (≈{at_rate:,.0f} "
                       f"for the epoch at that rate)")
            recall = f"{e['item_recall20']:.4f} after the first {e['batches']:,} batches"
        epoch_peak = "n/a" if e.get("epoch_peak_rss_mb") is None else f"{e['epoch_peak_rss_mb']:,.0f}"
        lines.append(head + f"{batches} | {e['epoch_cpu_seconds'] / e['batches']:.3f} ({e['seconds_per_batch']:.3f}) | "
                            f"{epoch_s} | {e['seconds']:,.0f} | {epoch_peak} | {rss(e)} | {e['model_mb']:,.0f} + "
                            f"{e['optimizer_mb']:,.0f} | {recall} |")
    others = sorted({int(m) for r in rows.values() for m in r.get("prepare_at", {})})
    if others:
        lines += ["", f"`hmtrec prepare` alone on the same logs under other `--memory-mb` settings (DuckDB's "
                      f"memory_limit; command: `python benchmarks/scale_prep.py run --events ... --work {args.work} "
                      f"--stage prepare --memory-mb M`):", "",
                  "| events | --memory-mb | prepare s | peak RSS MB (anon / file) |", "|---:|---:|---:|---|"]
        for key in sorted(rows, key=int):
            r = rows[key]
            if "prepare" in r and "peak_anon_mb" in r["prepare"]:
                lines.append(f"| {r['events']:,} | {r['memory_mb']:,} | {r['prepare']['seconds']:.0f} | "
                             f"{rss(r['prepare'])} |")
            for memory in others:
                if str(memory) in r.get("prepare_at", {}):
                    entry = r["prepare_at"][str(memory)]
                    lines.append(f"| {r['events']:,} | {memory:,} | {entry['seconds']:.0f} | {rss(entry)} |")
    # one command per group of sizes that ran alike (a whole epoch, or only its first N batches)
    groups: dict[tuple, list[str]] = {}
    for key in sorted(rows, key=int):
        r = rows[key]
        steps = r["steps"].get("steps_requested", r["steps"]["batches"]) if "model_mb" in r.get("steps", {}) else 0
        groups.setdefault((steps, "epoch" in r), []).append(key)
    commands = [f"python benchmarks/scale_prep.py run --events {' '.join(keys)} --work {args.work} "
                f"--memory-mb {args.memory_mb} --steps {steps} --batch-size {args.batch_size} "
                f"--negatives {args.negatives} --threads {args.threads} --precision {args.precision}"
                f"{' --epoch' if epoch else ''}{' --stage train' if args.stage == 'train' else ''} --keep"
                for (steps, epoch), keys in groups.items()]
    if args.stage == "train":
        lines[1:1] = ["", f"Training only (`--stage train`): on the shards in {args.work}, whose prepare columns "
                          f"are those of the runs that prepared them (the `scale-prepare` section's command)."]
    title = "Streaming preparation and one epoch: 1M to 50M events"
    update_section(args.section, "\n".join(lines),
                   title=title if args.section == "scale-prepare" else f"{title} ({args.section})",
                   command="; ".join(commands) + " --report"
                   + (f" --section {args.section}" if args.section != "scale-prepare" else ""))


STEP_PROBE = """
import json, sys, time
from hmtrec.config import load_config
from hmtrec.data.loading import load_data
from hmtrec.lifecycle import set_threads
from hmtrec.pipelines.sequence import build_sequence_model, training_batches
from hmtrec.train.trainer import Trainer
config, shards, batches, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
cfg = load_config(config, ["data.source=prepared", f"data.path={shards}", *overrides])
set_threads(cfg.train.threads)
prepared = load_data(cfg.data)
model = build_sequence_model(cfg.model_specs()[0], prepared, cfg, None)
fraction = batches * cfg.train.batch_size / prepared.train.n_sequences
cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epoch_fraction": fraction})})
make, steps = training_batches(model, prepared.train, cfg.train)
trainer = Trainer(model, cfg.train.trainer_settings())
state = trainer.fit(make, steps)
record = state.history[0]
print(json.dumps({"batches": state.step, "cpu_s": record["epoch_cpu_seconds"], "wall_s": record["epoch_seconds"],
                  "sparse_updates": state.sparse_updates, "loss": record["loss"]}))
"""


def run_probe(code: str, arguments: list, env: dict, label: str) -> dict:
    """Run a probe script in its own process; its last stdout line is its JSON result."""
    output = subprocess.run([sys.executable, "-c", code, *map(str, arguments)], env=env, capture_output=True,
                            text=True)
    if output.returncode != 0:
        raise SystemExit(f"{label} failed:\n{output.stderr[-2000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def command_steps(args) -> None:
    """CPU and wall seconds per training batch of the `run` model on prepared shards, for each
    combination of train.threads, train.precision and train.sparse_updates (the real training loop,
    `Trainer.fit`, over the first --batches batches of the epoch), each in its own process."""
    from hmtrec.bench.report import update_section

    work = Path(args.work)
    config = work / f"prep-{args.events}.yaml"
    shards = work / f"shards-{args.events}"
    if not (shards / "prepared.json").exists() or not config.exists():
        raise SystemExit(f"no prepared shards / config for {args.events} events in {work}: run `run --stage prepare`")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HMTREC_PROGRESS": "0"}
    rows = []
    for threads in args.threads:
        for precision in args.precision:
            for sparse in args.sparse_updates:
                overrides = [f"train.threads={threads}", f"train.precision={precision}",
                             f"train.sparse_updates={sparse}"]
                result = run_probe(STEP_PROBE, [config, shards, args.batches, *overrides], env, f"step probe {overrides}")
                rows.append({"threads": threads, "precision": precision, "sparse_updates": sparse, **result})
                print(rows[-1], flush=True)
    manifest = json.loads((shards / "prepared.json").read_text())
    lines = [f"The `run` model (HierSRec, dim 32, 1 layer, sampled item softmax with the batch's targets plus "
             f"{args.negatives} uniform negatives, batch {args.batch_size} windows) on the prepared "
             f"{args.events:,}-event log ({manifest['n_items']:,} items): the first {rows[0]['batches']} batches of the "
             f"epoch through the training loop, each setting in its own process, one after the other. CPU s: "
             f"process CPU seconds (all threads) per batch; wall s in brackets. Machine: {machine()}, load from "
             f"other jobs during the runs; with 2 threads on a loaded 2-core machine the threads' waits for each "
             f"other cost CPU time too.", "",
             "| train.threads | train.precision | train.sparse_updates | CPU s per batch (wall) |", "|---:|---|---|---:|"]
    for row in rows:
        lines.append(f"| {row['threads']} | {row['precision']} | {row['sparse_updates']} | "
                     f"{row['cpu_s'] / row['batches']:.3f} ({row['wall_s'] / row['batches']:.3f}) |")
    update_section("scale-step", "\n".join(lines), title="One training batch at scale: threads, precision, sparse updates",
                   command=f"python benchmarks/scale_prep.py steps --events {args.events} --work {args.work} "
                           f"--batches {args.batches} --threads {' '.join(map(str, args.threads))} "
                           f"--precision {' '.join(args.precision)} --sparse-updates {' '.join(args.sparse_updates)}")


WINDOW_PROBE = r"""
import json, resource, sys, time
import numpy as np
import hmtrec.data.sequences as sequences
from hmtrec.data.loading import DataConfig, load_data

shards, mode, batches, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
train = load_data(DataConfig.model_validate({"source": "prepared", "path": shards})).train
windows = sequences.make_windows(train, 20)
train.release_mapped_pages()
if mode == "mapping":
    sequences.PREAD_MIN_BYTES = 1 << 62      # every array read through its mapping
rng = np.random.default_rng(0)
def rss_file():
    return int(open("/proc/self/status").read().split("RssFile:")[1].split()[0]) / 1024
before = rss_file()
started = time.process_time()
for _ in range(batches):
    sequences.collate_windows(train, windows, rng.integers(0, len(windows.start), batch_size))
print(json.dumps({"cpu_ms": 1000 * (time.process_time() - started) / batches,
                  "file_mb_added": rss_file() - before, "windows": len(windows.start)}))
"""


def command_windows(args) -> None:
    """Reading a batch's windows from large prepared shards: by pread (the default from
    PREAD_MIN_BYTES) vs through the memory mapping, CPU ms per batch and the file-backed memory the
    batches left resident, each in its own process (the mapping's first batches pay the faults)."""
    from hmtrec.bench.report import update_section

    shards = Path(args.work) / f"shards-{args.events}"
    if not (shards / "prepared.json").exists():
        raise SystemExit(f"no prepared shards for {args.events} events in {args.work}: run `run --stage prepare`")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rows = []
    for mode in ("pread", "mapping"):
        rows.append({"mode": mode, **run_probe(WINDOW_PROBE, [shards, mode, args.batches, args.batch_size], env,
                                               f"window probe {mode}")})
        print(rows[-1], flush=True)
    lines = [f"`collate_windows` alone on the prepared {args.events:,}-event log ({rows[0]['windows']:,} training "
             f"windows): {args.batches} batches of {args.batch_size} random windows of up to 21 events (leaves, times, "
             f"target flags), read by one pread per window and array (what training does for shard arrays of at "
             f"least `hmtrec.data.sequences.PREAD_MIN_BYTES`, 16 MiB) or through the arrays' memory mappings. File MB "
             f"added: the process's RssFile after the batches minus before. Machine: {machine()}, shared.", "",
             "| read | CPU ms per batch | file-backed MB left resident |", "|---|---:|---:|"]
    lines += [f"| {row['mode']} | {row['cpu_ms']:.1f} | {row['file_mb_added']:,.0f} |" for row in rows]
    update_section("scale-windows", "\n".join(lines), title="Reading training windows from large shards: pread vs the mapping",
                   command=f"python benchmarks/scale_prep.py windows --events {args.events} --work {args.work} "
                           f"--batches {args.batches} --batch-size {args.batch_size}")


DDP_CONFIG = {
    "kind": "sequence",
    "data": {"source": "synthetic", "synthetic": {"n_items": 400, "level_sizes": [6, 40], "n_sessions": 3000,
                                                  "days": 10}},
    "model": {"name": "sasrec", "dim": 32, "layers": 1, "heads": 1, "dropout": 0.0},
    "train": {"epochs": 2, "batch_size": 64, "max_len": 10, "threads": 1, "lr": 0.003},
    "eval": {"ks": [10, 20]},
}


def command_ddp(args) -> None:
    """One process vs `torchrun --nproc-per-node 2` (gloo) on the same config: test metrics and losses."""
    import yaml

    work = Path(args.work) / "ddp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(DDP_CONFIG))
    env = {"PYTHONPATH": str(REPO), "HMTREC_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    train = ["-m", "hmtrec.cli", "train", "-c", str(config), "-o"]
    runs = {"1 process": [sys.executable, *train, str(work / "single")],
            "torchrun, 2 processes (gloo)": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                             "--nproc-per-node", "2", *train, str(work / "ddp")]}
    rows = []
    for label, command in runs.items():
        measured(command, work / f"{label.split(',')[0].replace(' ', '-')}.log", env)
        folder = work / ("single" if label == "1 process" else "ddp")
        model = json.loads((folder / "metrics.json").read_text())["models"]["sasrec"]
        rows.append({"label": label, "item": model["full"]["item"],
                     "losses": [h["loss"] for h in model["training"]["history"]],
                     "epoch_seconds": model["training"]["epoch_seconds"]})
        print(rows[-1], flush=True)
    from hmtrec.bench.report import update_section

    lines = ["SASRec (dim 32, dropout 0) on synthetic sessions (400 items, 3,000 sessions), 2 epochs, global "
             "batch 64 (each of the 2 ranks trains 32 rows of every batch). The stated tolerance "
             "(tests/test_distributed.py): test metrics within 0.01 absolute, each epoch's loss within 1%. "
             f"Machine: {machine()}; epoch times of such a small model measure process overhead, not speed.", "",
             "| run | item Recall@10 | MRR@10 | Recall@20 | MRR@20 | NDCG@20 | epoch losses | epoch s |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for row in rows:
        item = row["item"]
        lines.append(f"| {row['label']} | {item['Recall@10']:.4f} | {item['MRR@10']:.4f} | {item['Recall@20']:.4f} | "
                     f"{item['MRR@20']:.4f} | {item['NDCG@20']:.4f} | "
                     f"{', '.join(f'{v:.4f}' for v in row['losses'])} | {row['epoch_seconds']:.2f} |")
    gap = max(abs(rows[0]["item"][k] - rows[1]["item"][k]) for k in rows[0]["item"])
    lines += ["", f"Largest test-metric gap: {gap:.4f}."]
    update_section("scale-ddp", "\n".join(lines), title="Data-parallel training: torchrun (2 processes) vs 1",
                   command=f"python benchmarks/scale_prep.py ddp --work {args.work}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate")
    gen.add_argument("--events", type=int, required=True)
    gen.add_argument("--out", type=Path, required=True)
    eng = sub.add_parser("engines")
    eng.add_argument("--log", type=Path, required=True)
    eng.add_argument("--work", type=Path, default=Path("/tmp/scale-logs"))
    eng.add_argument("--engines", nargs="+", default=["duckdb", "polars"])
    eng.add_argument("--memory-mb", type=int, default=2048)
    eng.add_argument("--threads", type=int, default=2)
    eng.add_argument("--report", action="store_true")
    run = sub.add_parser("run")
    run.add_argument("--events", type=int, nargs="+", required=True)
    run.add_argument("--work", type=Path, default=Path("/tmp/scale-logs"))
    run.add_argument("--memory-mb", type=int, default=2048)
    run.add_argument("--steps", type=int, default=20, help="training batches timed per size (0: none)")
    run.add_argument("--epoch", action="store_true", help="then train one whole epoch")
    run.add_argument("--batch-size", type=int, default=1024)
    run.add_argument("--negatives", type=int, default=256, help="uniform negatives of the sampled item loss")
    run.add_argument("--threads", type=int, default=1, help="train.threads (1: see the `steps` comparison)")
    run.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    run.add_argument("--stage", choices=["prepare", "train", "all"], default="all")
    run.add_argument("--keep", action="store_true", help="keep the logs, shards and runs")
    run.add_argument("--force", action="store_true", help="prepare again sizes already in run.json")
    run.add_argument("--report", action="store_true")
    run.add_argument("--section", default="scale-prepare", help="section of docs/benchmarks.md --report writes")
    steps = sub.add_parser("steps", help="seconds per training batch by threads, precision and sparse updates")
    steps.add_argument("--events", type=int, default=50_000_000)
    steps.add_argument("--work", type=Path, default=Path("/tmp/scale-logs"))
    steps.add_argument("--batches", type=int, default=40)
    steps.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    steps.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    steps.add_argument("--sparse-updates", nargs="+", default=["true", "false"])
    steps.add_argument("--batch-size", type=int, default=1024, help="as given to `run` (for the text)")
    steps.add_argument("--negatives", type=int, default=256, help="as given to `run` (for the text)")
    windows = sub.add_parser("windows", help="a batch's windows read by pread vs through the mapping")
    windows.add_argument("--events", type=int, default=50_000_000)
    windows.add_argument("--work", type=Path, default=Path("/tmp/scale-logs"))
    windows.add_argument("--batches", type=int, default=100)
    windows.add_argument("--batch-size", type=int, default=1024)
    ddp = sub.add_parser("ddp")
    ddp.add_argument("--work", type=Path, default=Path("/tmp/scale-logs"))
    args = parser.parse_args()
    if args.command == "generate":
        print(generate(args.events, args.out))
    elif args.command == "engines":
        command_engines(args)
    elif args.command == "run":
        command_run(args)
    elif args.command == "steps":
        command_steps(args)
    elif args.command == "windows":
        command_windows(args)
    elif args.command == "ddp":
        command_ddp(args)


if __name__ == "__main__":
    main()
