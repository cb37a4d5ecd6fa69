"""How a burst of new connections splits across server processes that accept for themselves: why
`hmtrec serve --workers N` hands connections out from the parent instead (hmtrec/serve/workers.py).

Two ways worker processes commonly share a port, each with a minimal asyncio server per process
(the loop uvicorn runs) that answers every connection with its pid:

    shared socket   one listening socket inherited by every process, each loop accepting from it
                    (uvicorn's --workers, gunicorn's default)
    SO_REUSEPORT    a listening socket per process on the same port; the kernel picks one by a hash
                    of the connection's addresses

A client opens `--connections` connections at once (as a client pool or load generator does), and
the split is counted; `--trials` times per way. The hand-off of `hmtrec serve --workers` is measured
with the model in the `serve-load` section (its 'connections per worker' column).

    python benchmarks/serve_accept_split.py                 # writes the "serve-accept-split" section
    python benchmarks/serve_accept_split.py --print-only
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _serve(sock: socket.socket, ready) -> None:
    async def answer(reader, writer):
        writer.write(f"{os.getpid()}\n".encode())
        await writer.drain()
        await reader.read()          # hold the connection until the client closes it
        writer.close()

    async def main():
        server = await asyncio.start_server(answer, sock=sock)
        ready.set()
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def _listener(port: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(2048)
    return sock


def one_trial(way: str, processes: int, connections: int) -> list[int]:
    context = multiprocessing.get_context("spawn")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    shared = _listener(port, False) if way == "shared socket" else None
    workers = []
    try:
        for _ in range(processes):
            ready = context.Event()
            sock = shared if shared is not None else _listener(port, True)
            process = context.Process(target=_serve, args=(sock, ready), daemon=True)
            process.start()
            if not ready.wait(60):
                raise SystemExit("a server process did not start in 60 s")
            workers.append(process)
        time.sleep(0.2)                                  # every loop idle in its selector, as in service
        clients = []
        for _ in range(connections):                     # opened back to back, answers read after
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        pids = []
        for client in clients:
            pids.append(client.makefile().readline().strip())
        for client in clients:
            client.close()
        return sorted((pids.count(pid) for pid in set(pids)), reverse=True) + [0] * (processes - len(set(pids)))
    finally:
        for process in workers:
            process.terminate()
            process.join(10)
        if shared is not None:
            shared.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--print-only", action="store_true")
    args = parser.parse_args()
    rows = []
    for way in ("shared socket", "SO_REUSEPORT"):
        splits = [one_trial(way, args.processes, args.connections) for _ in range(args.trials)]
        busiest = [split[0] for split in splits]
        rows.append({"way": way, "trials": args.trials,
                     "splits (busiest first)": ", ".join(" / ".join(map(str, split)) for split in splits),
                     "busiest process, mean": sum(busiest) / len(busiest),
                     "busiest process, worst": max(busiest),
                     "even share": args.connections / args.processes})
        print(rows[-1], flush=True)
    if args.print_only:
        return
    from hmtrec.bench.report import markdown_table, update_section

    body = (f"{args.connections} connections opened back to back against {args.processes} processes, each an "
            f"asyncio server (the loop uvicorn runs) that answers with its pid; {args.trials} trials per way. "
            f"'shared socket': one listening socket inherited by every process (uvicorn's and gunicorn's "
            f"workers); 'SO_REUSEPORT': a socket per process on one port, the kernel choosing by a hash of "
            f"the addresses. `hmtrec serve --workers` hands each connection to the process holding the "
            f"fewest instead: its split is the 'connections per worker' column of the serve-load section.\n\n"
            + markdown_table(rows, float_format="{:.1f}"))
    update_section("serve-accept-split", body, title="Serving: how new connections split across worker processes",
                   command="python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
