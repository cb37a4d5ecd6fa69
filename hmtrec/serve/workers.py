"""`hmtrec serve --workers N`: N server processes behind one port, each new connection handed to
the worker that holds the fewest open connections.

Why not uvicorn's own workers: they share the listening socket and race to accept it, and an
asyncio loop accepts every pending connection in one go, so a burst of new connections (a client
pool or a load balancer opening its connections together) lands on whichever worker woke first.
32 connections opened together put 31 on one of two processes on average (benchmarks/
serve_accept_split.py): one process queues while the other idles, and the latency of a whole fleet
of clients is that of the busiest worker. (SO_REUSEPORT spreads connections by a hash of their
addresses: better, but 21 / 11 happens with 32.)

So the parent process accepts, and passes each connection's descriptor (SCM_RIGHTS over a Unix
socket pair) to the least-loaded ready worker, which serves it with uvicorn's HTTP protocol exactly
as if it had accepted it; a worker reports every connection it closes, so the counts stay exact.
A worker that dies is started again; one that fails before it is ready stops the server (a run
that cannot load will not load the second time either). SIGINT / SIGTERM stop the parent, which
stops the workers gracefully (uvicorn finishes what is in flight).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import selectors
import signal
import socket
import time
from dataclasses import asdict
from pathlib import Path

from hmtrec.errors import HmtrecError
from hmtrec.rundir import get_logger

READY = b"R"            # worker -> parent: loaded and serving
HANDED = b"c"           # parent -> worker: one connection (its descriptor rides along)
CLOSED = b"x"           # worker -> parent: one byte per connection it closed
STOP_SECONDS = 30       # how long a stopping worker may take before it is killed


def supported() -> bool:
    """Descriptor passing needs Unix sockets with SCM_RIGHTS (not Windows)."""
    return hasattr(socket, "send_fds") and hasattr(socket, "AF_UNIX")


def listening_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=backlog, reuse_port=False)
    except OSError as error:
        raise HmtrecError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


class _Worker:
    def __init__(self, context, index: int, run_dir: str, settings: dict, log_level: str):
        self.index = index
        self.channel, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process = context.Process(target=worker_main, args=(child, run_dir, settings, log_level),
                                       name=f"hmtrec-serve-{index}", daemon=False)
        self.process.start()
        child.close()
        self.channel.setblocking(False)
        self.ready = False
        self.connections = 0

    def hand(self, connection: socket.socket) -> bool:
        try:
            socket.send_fds(self.channel, [HANDED], [connection.fileno()])
        except OSError:
            return False
        self.connections += 1
        return True

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()

    def close(self) -> None:
        self.channel.close()


def serve_workers(run_dir: str | Path, settings, host: str, port: int, workers: int, log_level: str) -> None:
    """Run `workers` serving processes of `run_dir` on host:port until SIGINT / SIGTERM."""
    if workers < 1:
        raise HmtrecError(f"--workers must be >= 1, got {workers}")
    log = get_logger()
    listener = listening_socket(host, port)
    listener.setblocking(False)
    context = multiprocessing.get_context("spawn")   # a fresh interpreter: no forked torch threads
    described = (str(Path(run_dir).resolve()), asdict(settings), log_level)
    pool = [_Worker(context, i, *described) for i in range(workers)]
    selector = selectors.DefaultSelector()
    for worker in pool:
        selector.register(worker.channel, selectors.EVENT_READ, ("channel", worker))
        selector.register(worker.process.sentinel, selectors.EVENT_READ, ("exit", worker))
    stopping = False

    def stop(signum, frame):
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    accepting = False
    try:
        while not stopping:
            for key, _ in selector.select(timeout=0.5):
                what, worker = key.data
                if worker is not None and worker not in pool:
                    continue             # an event of a worker replaced earlier in this round
                if what == "accept":
                    _accept(listener, pool)
                elif what == "channel":
                    if not _read_channel(worker):          # gone: its exit comes through the sentinel
                        selector.unregister(worker.channel)
                else:
                    code = worker.process.exitcode
                    if not worker.ready:
                        raise HmtrecError(f"serving worker {worker.index} exited (code {code}) before it was "
                                          f"ready; see its messages above")
                    log.error("serving worker %d exited (code %s) with %d open connection(s); starting it again",
                              worker.index, code, worker.connections)
                    try:
                        selector.unregister(worker.channel)
                    except KeyError:                    # already, at its channel's end
                        pass
                    selector.unregister(worker.process.sentinel)
                    worker.close()
                    fresh = _Worker(context, worker.index, *described)
                    pool[pool.index(worker)] = fresh
                    selector.register(fresh.channel, selectors.EVENT_READ, ("channel", fresh))
                    selector.register(fresh.process.sentinel, selectors.EVENT_READ, ("exit", fresh))
            if not accepting and all(worker.ready for worker in pool):
                # from when every worker is ready (the backlog holds earlier connections), so that
                # connections opened during start-up do not all stay on the first worker loaded
                selector.register(listener, selectors.EVENT_READ, ("accept", None))
                accepting = True
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        selector.close()
        listener.close()
        for worker in pool:
            worker.stop()
        deadline = time.monotonic() + STOP_SECONDS
        for worker in pool:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.close()


def _accept(listener: socket.socket, pool: list[_Worker]) -> None:
    while True:
        try:
            connection, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        with connection:   # the worker holds its own duplicate once handed; the parent's copy closes
            for worker in sorted((w for w in pool if w.ready), key=lambda w: w.connections):
                if worker.hand(connection):
                    break
            else:
                get_logger().error("no serving worker took a connection; it is closed")


def _read_channel(worker: _Worker) -> bool:
    """Take the worker's reports; False once its end is closed."""
    while True:
        try:
            message = worker.channel.recv(4096)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            message = b""
        if not message:
            worker.ready = False
            return False
        worker.ready = worker.ready or READY in message
        worker.connections = max(0, worker.connections - message.count(CLOSED))


# ---- the worker process -----------------------------------------------------------------------------

def worker_main(channel: socket.socket, run_dir: str, settings: dict, log_level: str) -> None:
    """One serving process: loads the run, then serves every connection the parent hands it."""
    import uvicorn

    from hmtrec.serve.app import ServeSettings, create_app, freeze_loaded

    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the whole group: the parent decides
    app = freeze_loaded(create_app(run_dir, ServeSettings(**settings)))
    config = uvicorn.Config(app, log_level=log_level, access_log=False)
    server = uvicorn.Server(config)
    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(_serve_handed(server, config, channel))


async def _serve_handed(server, config, channel: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    serving = asyncio.create_task(server.serve(sockets=[]))    # no listener of its own
    while not server.started:
        if serving.done():
            return await serving
        await asyncio.sleep(0.01)
    channel.setblocking(False)
    unsent = 0

    def report(message: bytes) -> None:
        nonlocal unsent
        try:
            channel.send(message + CLOSED * unsent)
            unsent = 0
        except BlockingIOError:       # the parent is behind: the count goes with the next report
            unsent += message.count(CLOSED)
        except OSError:
            server.should_exit = True

    base = config.http_protocol_class

    class CountedProtocol(base):
        def connection_lost(self, exc):
            super().connection_lost(exc)
            report(CLOSED)

    def protocol():
        return CountedProtocol(config=config, server_state=server.server_state, app_state=server.lifespan.state)

    def handed() -> None:
        try:
            message, descriptors, _, _ = socket.recv_fds(channel, 64, 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            message, descriptors = b"", []
        if not message:              # the parent is gone: stop serving
            server.should_exit = True
            loop.remove_reader(channel.fileno())
            return
        for descriptor in descriptors:
            connection = socket.socket(fileno=descriptor)
            connection.setblocking(False)
            loop.create_task(loop.connect_accepted_socket(protocol, connection))

    loop.add_reader(channel.fileno(), handed)
    report(READY)
    await serving
