"""Load benchmark of `hmtrec serve`: latency (p50/p95/p99) and throughput of POST /recommend at 1, 8
and 32 concurrent clients, PyTorch vs ONNX Runtime, full-catalogue vs candidate scoring.

Loopback only: each server is a `hmtrec serve RUN_DIR --host 127.0.0.1` child process; the clients
are closed loops (send, wait for the answer, send again) in this process, each level bounded by a
request count and a time limit. Histories are drawn once (fixed seed) from the run's catalogue, 1
to 20 items long; the same list is replayed for every setting.

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
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLIENTS = (1, 8, 32)
MODES = {"full": {}, "candidates 5%": {"candidate_fraction": 0.05}}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(run_dir: Path, backend: str, threads: int, batch_wait_ms: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HMTREC_PROGRESS": "0", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "hmtrec.cli", "serve", str(run_dir), "--host", "127.0.0.1",
                                "--port", str(port), "--backend", backend, "--threads", str(threads),
                                "--batch-wait-ms", str(batch_wait_ms), "--unknown", "ignore"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def closed_loop(url: str, bodies: list[bytes], clients: int, max_requests: int, max_seconds: float
                      ) -> tuple[np.ndarray, float]:
    """Latencies (s) of every answered request, and the wall time, for `clients` closed loops."""
    latencies: list[float] = []
    next_body = iter(range(10**9))
    connections = [await Connection.open(url) for _ in range(clients)]
    started = time.perf_counter()

    async def worker(connection):
        while len(latencies) < max_requests and time.perf_counter() - started < max_seconds:
            body = bodies[next(next_body) % len(bodies)]
            sent = time.perf_counter()
            status, answer = await connection.post("/recommend", body)
            if status != 200:
                raise SystemExit(f"{status}: {answer[:300]!r}")
            latencies.append(time.perf_counter() - sent)

    try:
        await asyncio.gather(*(worker(c) for c in connections))
    finally:
        for connection in connections:
            connection.close()
    return np.asarray(latencies), time.perf_counter() - started


def histories_for(run_dir: Path, n: int, seed: int = 0) -> list[list[str]]:
    taxonomy = json.loads((run_dir / "taxonomy.json").read_text())
    labels = taxonomy["node_labels"][-1]
    rng = np.random.default_rng(seed)
    return [[str(labels[i]) for i in rng.integers(0, len(labels), size=rng.integers(1, 21))] for _ in range(n)]


def measure(run_dir: Path, backend: str, args) -> list[dict]:
    process, url = start_server(run_dir, backend, args.threads, args.batch_wait_ms)
    rows = []
    try:
        model = httpx.get(f"{url}/model", timeout=10).json()
        histories = histories_for(run_dir, 512)
        for mode, options in MODES.items():
            bodies = [json.dumps({"history": h, "k": 20, **options}).encode() for h in histories]
            asyncio.run(closed_loop(url, bodies, 4, 64, 10))          # warm-up
            for clients in CLIENTS:
                latencies, wall = asyncio.run(closed_loop(url, bodies, clients, args.requests, args.seconds))
                p50, p95, p99 = (float(np.percentile(latencies, q)) * 1000 for q in (50, 95, 99))
                rows.append({"model": f"{run_dir.name} ({model['n_items']:,} items)", "backend": backend,
                             "scoring": mode, "clients": clients, "requests": len(latencies),
                             "p50 ms": p50, "p95 ms": p95, "p99 ms": p99,
                             "requests/s": len(latencies) / wall})
                print(rows[-1], flush=True)
        batches = httpx.get(f"{url}/model", timeout=10).json().get("batches", {})
        rows[-1]["_batches"] = batches
    finally:
        process.terminate()
        process.wait(timeout=60)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--backends", default="torch,onnx")
    parser.add_argument("--requests", type=int, default=1500, help="most requests per (setting, clients)")
    parser.add_argument("--seconds", type=float, default=12.0, help="longest time per (setting, clients)")
    parser.add_argument("--threads", type=int, default=1, help="scoring threads of the server")
    parser.add_argument("--batch-wait-ms", type=float, default=2.0)
    parser.add_argument("--section", default="serve-load", help="section of docs/benchmarks.md to write")
    parser.add_argument("--quick", action="store_true", help="100 requests / 3 s per level; print only")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.seconds = 100, 3.0
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

    for row in rows:
        row.pop("_batches", None)
    load = os.getloadavg()
    body = (f"Closed-loop clients on loopback against one `hmtrec serve` process (uvicorn, one worker, "
            f"`--threads {args.threads}` for scoring, micro-batching window {args.batch_wait_ms} ms); "
            f"POST /recommend with k=20, histories of 1-20 random catalogue items; at most "
            f"{args.requests} requests or {args.seconds:.0f} s per row, after a warm-up. The clients share "
            f"the machine's 2 cores with the server (load average at the end: {load[0]:.1f}). "
            f"'candidates 5%': items under the best categories until they cover 5% of the catalogue.\n\n"
            + markdown_table(rows, float_format="{:.1f}"))
    title = "Serving: latency and throughput of `hmtrec serve`"
    update_section(args.section, body, title=title if args.section == "serve-load" else f"{title} ({args.section})",
                   command="python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
