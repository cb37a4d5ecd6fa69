"""Load benchmark of `hmtrec serve`: latency (p50/p95/p99) and throughput of POST /recommend at 1, 8
and 32 concurrent clients, PyTorch vs ONNX Runtime, full-catalogue vs candidate scoring.

Loopback only: each server is a `hmtrec serve RUN_DIR --host 127.0.0.1` child process; the clients
are closed loops (send, wait for the answer, send again at once: no think time), each row bounded
by a request count and a time limit. Histories are drawn once (fixed seed) from the run's
catalogue, 1 to 20 items long; the same list is replayed for every setting.

The load generator shares the machine with the server, so it must be cheap: `wrk` (C, HTTP/1.1
keep-alive, one thread, bodies pre-encoded in a Lua script that also stops it at the request
bound) when it is installed (`apt-get install wrk`), else raw asyncio streams in this process
(`--client python`). `--server-cpus` / `--client-cpus` pin them with taskset. Beside latency each
row reports the server process's CPU time per request (utime + stime from /proc, every thread),
which contention from other jobs does not inflate the way it inflates wall-clock latency.

    python benchmarks/serve_load.py RUN_DIR [RUN_DIR ...]          # writes the "serve-load" section
    python benchmarks/serve_load.py RUN_DIR --quick                  # fewer requests, prints only

Each run directory must hold a HierSRec run exported with `hmtrec export RUN_DIR --format onnx`
(the ONNX rows are skipped otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CLIENTS = (1, 8, 32)
MODES = {"full": {}, "candidates 5%": {"candidate_fraction": 0.05}}
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")
# how the two run directories of the published figures are made (before this script runs)
RUN_DIRS = """*Run directories* (made before the command above, RUNS being their folder; each then
`hmtrec export RUN_DIR --format onnx`):
`hmtrec train -c configs/diginetica.yaml --set train.epoch_fraction=0.15 --set model.repeat_explore=false \
--set "baselines=[]" --set "eval.segments=[]" -o RUNS/diginetica` (HierSRec dim 64, 2 layers, cascade,
15% of one epoch, 824 s; test item R@20 0.252, MRR@20 0.062: a small model for latency, not for accuracy; its
export about 1 minute) and `hmtrec train -c benchmarks/serve_synthetic_1m.yaml -o RUNS/synthetic-1m`
(1,000,000 items under 50 > 2,000 categories, the same architecture, untrained: `train.epochs: 0`, latency only;
1:47 to build, its export 2-4 minutes)."""

# wrk: the bodies replayed in turn, the request bound, and the percentiles printed at the end
WRK_SCRIPT = r"""
local bodies, sent, done_count = {}, 0, 0
for line in io.lines(os.getenv("SERVE_LOAD_BODIES")) do bodies[#bodies + 1] = line end
local limit = tonumber(os.getenv("SERVE_LOAD_REQUESTS"))
local headers = {["Content-Type"] = "application/json"}
request = function()
  sent = sent + 1
  return wrk.format("POST", "/recommend", headers, bodies[(sent % #bodies) + 1])
end
response = function(status, headers, body)
  done_count = done_count + 1
  if done_count >= limit then wrk.thread:stop() end
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("SERVE_LOAD requests=%d errors=%d p50=%.3f p95=%.3f p99=%.3f mean=%.4f seconds=%.3f\n",
    summary.requests, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000, latency:percentile(99) / 1000,
    latency.mean / 1000, summary.duration / 1e6))
end
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pinned(command: list[str], cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus, *command] if cpus else command


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) and of its living child processes (the workers
    of `hmtrec serve --workers N`)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:                       # a process that ended meanwhile
            continue
        if stat.parent.name == str(pid) or int(fields[1]) == pid:   # fields[1]: the parent's pid
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def start_server(run_dir: Path, backend: str, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HMTREC_PROGRESS": "0", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "hmtrec.cli", "serve", str(run_dir), "--host", "127.0.0.1",
               "--port", str(port), "--backend", backend, "--threads", str(args.threads), "--workers", str(args.workers),
               "--batch-wait-ms", str(args.batch_wait_ms), "--unknown", "ignore", *args.server_arg]
    process = subprocess.Popen(pinned(command, args.server_cpus), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"server for {run_dir} ({backend}) exited: {process.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"server for {run_dir} ({backend}) did not start in 10 minutes")
        time.sleep(0.5)


class Connection:
    """One keep-alive HTTP/1.1 connection on asyncio streams: a far cheaper client than a general
    one, so the figures measure the server rather than the load generator (they share the cores)."""

    def __init__(self, reader, writer, host: str):
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, url: str) -> "Connection":
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer, f"{host}:{port}")

    def request(self, path: str, body: bytes) -> bytes:
        return (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    async def post(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def python_closed_loop(url: str, bodies: list[bytes], clients: int, max_requests: int,
                             max_seconds: float) -> tuple[np.ndarray, float]:
    """Latencies (s) of every answered request, and the wall time, for `clients` closed loops."""
    latencies: list[float] = []
    connections = [await Connection.open(url) for _ in range(clients)]
    requests = [connections[0].request("/recommend", body) for body in bodies]   # encoded once
    counter = iter(range(10**9))
    started = time.perf_counter()

    async def worker(connection):
        while len(latencies) < max_requests and time.perf_counter() - started < max_seconds:
            request = requests[next(counter) % len(requests)]
            sent = time.perf_counter()
            status, answer = await connection.post(request)
            if status != 200:
                raise SystemExit(f"{status}: {answer[:300]!r}")
            latencies.append(time.perf_counter() - sent)

    try:
        await asyncio.gather(*(worker(c) for c in connections))
    finally:
        for connection in connections:
            connection.close()
    return np.asarray(latencies), time.perf_counter() - started


def run_level(url: str, bodies: list[bytes], clients: int, max_requests: int, max_seconds: float, args,
              folder: Path) -> dict:
    """One closed-loop level: requests, p50/p95/p99 (ms) and wall seconds."""
    if args.client == "wrk":
        body_file = folder / "bodies.jsonl"
        body_file.write_bytes(b"\n".join(bodies) + b"\n")
        script = folder / "post.lua"
        script.write_text(WRK_SCRIPT)
        env = {**os.environ, "SERVE_LOAD_BODIES": str(body_file), "SERVE_LOAD_REQUESTS": str(max_requests)}
        command = ["wrk", "-t1", f"-c{clients}", f"-d{max_seconds:.0f}s", "--timeout", "30s", "-s", str(script), url]
        load = subprocess.Popen(pinned(command, args.client_cpus), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(min(1.0, max_seconds / 4))          # every connection is open by then
        split = connections_per_process(int(url.rsplit(":", 1)[1]))
        stdout, stderr = load.communicate(timeout=max_seconds + 60)
        found = re.search(r"SERVE_LOAD requests=(\d+) errors=(\d+) p50=([\d.]+) p95=([\d.]+) p99=([\d.]+) "
                          r"mean=([\d.]+) seconds=([\d.]+)", stdout)
        if found is None:
            raise SystemExit(f"wrk failed: {stdout[-1000:]} {stderr[-1000:]}")
        n, errors = int(found[1]), int(found[2])
        if errors:
            raise SystemExit(f"wrk saw {errors} failed requests (non-2xx or socket errors) at {clients} clients")
        p50, p95, p99, mean, wall = (float(found[i]) for i in range(3, 8))
        if n >= max_requests:
            # stopped at the request bound, but wrk reports its whole -d time: in a closed loop with no
            # think time every connection is always busy, so the time taken is requests x mean / clients
            wall = n * mean / 1000 / clients
        return {"requests": n, "p50 ms": p50, "p95 ms": p95, "p99 ms": p99, "wall": wall, "split": split}
    latencies, wall = asyncio.run(python_closed_loop(url, bodies, clients, max_requests, max_seconds))
    p50, p95, p99 = (float(np.percentile(latencies, q)) * 1000 for q in (50, 95, 99))
    return {"requests": len(latencies), "p50 ms": p50, "p95 ms": p95, "p99 ms": p99, "wall": wall, "split": ""}


def connections_per_process(port: int) -> str:
    """How the open connections to `port` sit on the server's processes, busiest first ("16 / 16"),
    from `ss` (empty where it is missing)."""
    if shutil.which("ss") is None:
        return ""
    listing = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                             capture_output=True, text=True).stdout
    pids = re.findall(r"pid=(\d+)", listing)
    return " / ".join(str(n) for n in sorted((pids.count(pid) for pid in set(pids)), reverse=True))


def histories_for(run_dir: Path, n: int, seed: int = 0) -> list[list[str]]:
    taxonomy = json.loads((run_dir / "taxonomy.json").read_text())
    labels = taxonomy["node_labels"][-1]
    rng = np.random.default_rng(seed)
    return [[str(labels[i]) for i in rng.integers(0, len(labels), size=rng.integers(1, 21))] for _ in range(n)]


def measure(run_dir: Path, backend: str, args) -> list[dict]:
    process, url = start_server(run_dir, backend, args)
    rows = []
    try:
        model = httpx.get(f"{url}/model", timeout=10).json()
        histories = histories_for(run_dir, 512)
        with tempfile.TemporaryDirectory(prefix="serve-load-") as folder:
            for mode, options in MODES.items():
                bodies = [json.dumps({"history": h, "k": 20, **options}).encode() for h in histories]
                run_level(url, bodies, 4, 64, 3, args, Path(folder))          # warm-up
                for clients in CLIENTS:
                    repeats = []
                    for _ in range(args.repeats):
                        before = cpu_seconds(process.pid)
                        level = run_level(url, bodies, clients, args.requests, args.seconds, args, Path(folder))
                        used = cpu_seconds(process.pid) - before
                        repeats.append({**level, "requests/s": level["requests"] / level["wall"],
                                        "server CPU ms/request": 1000 * used / max(1, level["requests"])})
                        print(run_dir.name, backend, mode, clients, repeats[-1], flush=True)
                    rows.append(summarised(repeats, {"model": f"{run_dir.name} ({model['n_items']:,} items)",
                                                     "backend": backend, "scoring": mode, "clients": clients}))
        batches = httpx.get(f"{url}/model", timeout=10).json().get("batches", {})
        print(f"{run_dir.name} {backend}: {batches}", flush=True)
    finally:
        process.terminate()
        process.wait(timeout=60)
    return rows


def summarised(repeats: list[dict], row: dict) -> dict:
    """One table row from a level's repeats: the median of each figure, and with several repeats
    the range of p99 and of the throughput (the shared machine's spread between identical rows)."""
    def median(key: str) -> float:
        return float(np.median([r[key] for r in repeats]))

    row = {**row, "requests": int(sum(r["requests"] for r in repeats))}
    for key in ("p50 ms", "p95 ms", "p99 ms", "requests/s", "server CPU ms/request"):
        row[key] = median(key)
    if len(repeats) > 1:
        p99s, rates = [r["p99 ms"] for r in repeats], [r["requests/s"] for r in repeats]
        row["p99 range"] = f"{min(p99s):.2f}-{max(p99s):.2f}"
        row["requests/s range"] = f"{min(rates):.0f}-{max(rates):.0f}"
    row["connections per worker"] = repeats[-1]["split"]
    return row


def machine() -> str:
    flags = set()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    shown = ", ".join(flag for flag in CPU_FLAGS if flag in flags) or "unknown"
    return f"{os.cpu_count()} cores ({platform.machine()}; {shown})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--backends", default="torch,onnx")
    parser.add_argument("--requests", type=int, default=20_000, help="most requests per (setting, clients)")
    parser.add_argument("--seconds", type=float, default=8.0, help="longest time per (setting, clients)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure each (setting, clients) this many times: the row gives the medians and the ranges")
    parser.add_argument("--threads", type=int, default=1, help="scoring threads of the server")
    parser.add_argument("--workers", type=int, default=1, help="server worker processes (hmtrec serve --workers)")
    parser.add_argument("--batch-wait-ms", type=float, default=0.0)
    parser.add_argument("--client", choices=["auto", "wrk", "python"], default="auto",
                        help="load generator (auto: wrk when installed)")
    parser.add_argument("--server-cpus", help="taskset CPU list for the server (e.g. 0)")
    parser.add_argument("--client-cpus", help="taskset CPU list for wrk (e.g. 1)")
    parser.add_argument("--section", default="serve-load", help="section of docs/benchmarks.md to write")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="one more `hmtrec serve` argument (repeatable; e.g. --server-arg=--no-trace)")
    parser.add_argument("--quick", action="store_true", help="300 requests / 3 s per level; print only")
    args = parser.parse_args()
    if args.client == "auto":
        args.client = "wrk" if shutil.which("wrk") else "python"
    if args.quick:
        args.requests, args.seconds = 300, 3.0
    load_before = os.getloadavg()
    rows = []
    for run_dir in args.run_dirs:
        for backend in args.backends.split(","):
            if backend == "onnx" and not (run_dir / "onnx" / "manifest.json").exists():
                print(f"skipping onnx for {run_dir}: run `hmtrec export {run_dir} --format onnx` first")
                continue
            rows += measure(run_dir, backend, args)
    if args.quick:
        return
    from hmtrec.bench.report import markdown_table, update_section

    load = os.getloadavg()
    client = ("wrk (one thread, Lua-scripted bodies)" if args.client == "wrk"
              else "raw asyncio HTTP/1.1 streams in the harness process")
    pins = (f"; taskset: server on CPU {args.server_cpus or 'any'}, clients on CPU {args.client_cpus or 'any'}"
            if args.server_cpus or args.client_cpus else "")
    from hmtrec.serve import kernels
    from hmtrec.serve.app import score_in_loop_for

    chosen = {"--score-in-loop": True, "--score-in-thread": False}
    in_loop = next((chosen[a] for a in args.server_arg if a in chosen), None)
    where = ("on the event loop" if (score_in_loop_for(args.workers) if in_loop is None else in_loop)
             else "on a scoring thread") + (" (the default for this worker count)" if in_loop is None else "")
    candidates_by = (f"the compiled kernels (Numba {kernels.numba.__version__})" if kernels.available()
                     else "NumPy / torch (no Numba)")
    body = (f"Closed-loop clients (no think time) on loopback against `hmtrec serve` (uvicorn, "
            f"`--workers {args.workers}`, `--threads {args.threads}` for scoring, `--batch-wait-ms {args.batch_wait_ms:g}`"
            f"{''.join(' `' + a + '`' for a in args.server_arg)}; batches scored {where}, candidates by "
            f"{candidates_by}), load from "
            f"{client}{pins}; POST /recommend with k=20, histories of 1-20 random catalogue items; at most "
            f"{args.requests} requests or {args.seconds:.0f} s per measurement, after a warm-up"
            f"{f'; each row the median of {args.repeats} measurements in a row (ranges beside: the spread between identical measurements)' if args.repeats > 1 else ''}. "
            f"Machine: {machine()}, "
            f"shared: load average {load_before[0]:.1f} at the start, {load[0]:.1f} at the end (other jobs "
            f"inflate latency; 'server CPU ms/request' is the server's own CPU time per answered request). "
            f"'candidates 5%': items under the best categories until they cover 5% of the catalogue. "
            f"'connections per worker': how the clients' connections sat on the server processes one second "
            f"into the row (`ss`), busiest first.\n\n"
            + RUN_DIRS + "\n\n" + markdown_table(rows, float_format="{:.2f}"))
    title = "Serving: latency and throughput of `hmtrec serve`"
    update_section(args.section, body, title=title if args.section == "serve-load" else f"{title} ({args.section})",
                   command="python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
