"""`hmtrec serve RUN_DIR`: the HTTP service of a finished run (hmtrec/serve/app.py), on uvicorn."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        run_dir: Path = typer.Argument(..., help="A finished sequence or ranking run directory."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (another than this machine's "
                                                              "needs --api-key)."),
        port: int = typer.Option(8000, "--port", min=0, max=65535),
        api_key: Optional[str] = typer.Option(None, "--api-key", envvar="HMTREC_API_KEY",
                                              help="Require this key in the X-API-Key header (all but /health)."),
        backend: str = typer.Option("torch", "--backend", help="torch, or onnx (after `hmtrec export`)."),
        unknown: str = typer.Option("error", "--unknown", help="Unknown item ids: error (422) or ignore."),
        max_k: int = typer.Option(1000, "--max-k", min=1),
        max_history: int = typer.Option(1000, "--max-history", min=1),
        max_rows: int = typer.Option(10_000, "--max-rows", min=1),
        max_body_bytes: int = typer.Option(2 * 2**20, "--max-body-bytes", min=1024),
        batch_size: int = typer.Option(64, "--batch-size", min=1, help="Most requests scored together."),
        batch_wait_ms: float = typer.Option(0.0, "--batch-wait-ms", min=0.0,
                                            help="How long a busy scorer's next batch waits for more requests "
                                                 "(0: it takes what is waiting; a lone request never waits)."),
        threads: Optional[int] = typer.Option(None, "--threads", min=1,
                                              help="torch / ONNX Runtime threads of the scoring thread "
                                                   "(default: all cores; 1 leaves the others to the HTTP loop)."),
        trace: bool = typer.Option(True, "--trace/--no-trace",
                                   help="torch backend: run the encoder as a frozen TorchScript trace (checked "
                                        "against the eager model at start; eager if it differs)."),
        score_in_loop: Optional[bool] = typer.Option(
            None, "--score-in-loop/--score-in-thread",
            help="Score batches on the HTTP event loop (no thread hand-over; the loop answers nothing else "
                 "meanwhile) or on a scoring thread (default: on the loop when --workers is at least the "
                 "number of cores, so that no worker has two busy threads)."),
        workers: int = typer.Option(1, "--workers", min=1,
                                    help="Server processes behind the port, each with its own copy of the model; "
                                         "each new connection goes to the one holding the fewest (on a machine "
                                         "with several cores, one per core with --threads 1)."),
    ):
        """Serve POST /recommend (sequence runs) or POST /rank (ranking runs), GET /health and GET /model;
        the OpenAPI schema is at /openapi.json and the interactive docs at /docs."""
        import uvicorn

        from hmtrec.errors import HmtrecError
        from hmtrec.serve.app import ServeSettings, check_bind, create_app, score_in_loop_for, usable_cores

        if backend not in ("torch", "onnx"):
            raise HmtrecError(f"--backend {backend!r}: choose torch or onnx")
        if unknown not in ("error", "ignore"):
            raise HmtrecError(f"--unknown {unknown!r}: choose error or ignore")
        check_bind(host, api_key)
        if score_in_loop is None:
            score_in_loop = score_in_loop_for(workers)
            typer.echo(f"hmtrec serve: scoring batches {'on the event loop' if score_in_loop else 'on a scoring thread'} "
                       f"({workers} worker(s), {usable_cores()} usable core(s); --score-in-loop / --score-in-thread "
                       f"to choose)", err=True)
        settings = ServeSettings(api_key=api_key or None, backend=backend, max_k=max_k, max_history=max_history,
                                 max_rows=max_rows, max_body_bytes=max_body_bytes, unknown=unknown,
                                 batch_size=batch_size, batch_wait_ms=batch_wait_ms, threads=threads,
                                 trace=trace, score_in_loop=score_in_loop)
        log_level = os.environ.get("HMTREC_SERVE_LOG", "warning")
        if workers == 1:
            from hmtrec.serve.app import freeze_loaded

            uvicorn.run(freeze_loaded(create_app(run_dir, settings)), host=host, port=port, log_level=log_level,
                        access_log=False)
            return
        from hmtrec.serve.app import servable_run
        from hmtrec.serve.workers import serve_workers, supported

        if not supported():
            raise HmtrecError("--workers above 1 needs Unix sockets that pass descriptors (not on this system)")
        servable_run(run_dir)          # a run that cannot be served fails here, before any worker starts
        serve_workers(run_dir, settings, host, port, workers, log_level)
