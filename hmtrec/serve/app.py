"""The HTTP service behind `hmtrec serve RUN_DIR` (FastAPI; the OpenAPI schema is at /openapi.json).

    POST /recommend   sequence runs: a history of item ids -> top-k items, each with its ancestors,
                      and the predicted node and probability at every coarser level
    POST /rank        ranking runs: feature rows -> per-head (calibrated) probabilities and utility
    GET  /health      liveness, and what the server holds
    GET  /model       the run: kind, models, levels, catalogue size, limits, versions

Safety: the CLI binds 127.0.0.1 unless told otherwise, and refuses any other bind without an API key
(`X-API-Key` header, compared in constant time). Request bodies, histories, rows and k are bounded;
every bad input is a 4xx whose `detail` names the field (never a 5xx). Unknown item ids are reported
per request (`unknown`) and either ignored or an error, by option.

Concurrent /recommend requests are micro-batched: a request that finds the scorer idle is scored at
once; requests that arrive while it is busy wait, and when it is free everything waiting with the
same scoring options (up to `batch_size`) is scored in one pass through the model (the encoder and
item head are matrix products, much cheaper per row in a batch). `batch_wait_ms` (default 0) makes
a batch after the first wait up to that long for more requests. Where a batch is scored:
`score_in_loop` False, on one scoring thread while the event loop goes on reading requests; True,
on the event loop itself, which then reads what arrived meanwhile before the next batch: no
hand-over between threads and no contention for the interpreter lock, at the cost of a loop that
answers nothing else (/health included) while a batch is scored. `hmtrec serve` picks the loop
when it runs at least one worker per usable core (`score_in_loop_for`): a scoring thread beside
each loop would then put two busy threads per core, and the tail latency measured worse
(docs/serving.md); one process on several cores keeps the thread, which overlaps scoring with
reading requests.

POST /recommend is answered by a lean ASGI handler in front of FastAPI's routing (`HmtrecApp`): the
same request model validates the raw body (pydantic's JSON parser), the same checks run, and the
answer is encoded once with orjson without re-validating it, which saves most of the per-request
cost of FastAPI's stack at thousands of requests per second. FastAPI still serves the route's
schema, /docs and the other endpoints.
"""

import asyncio
import gc
import hmac
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hmtrec.errors import DataError, HmtrecError
from hmtrec.rundir import RunDir

API_KEY_HEADER = "X-API-Key"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeSettings:
    api_key: str | None = None
    backend: Literal["torch", "onnx"] = "torch"
    max_k: int = 1000
    max_history: int = 1000           # ids per history (only the most recent max_len are used)
    max_rows: int = 10_000            # rows per /rank request
    max_body_bytes: int = 2 * 2**20
    unknown: Literal["error", "ignore"] = "error"
    batch_size: int = 64              # most requests scored together
    batch_wait_ms: float = 0.0        # longest a busy scorer's next batch waits for more requests
    threads: int | None = None        # torch / ONNX Runtime threads of the scoring thread (None: all cores)
    trace: bool = True                # torch backend: the query stage as a frozen TorchScript trace
    score_in_loop: bool = False       # score batches on the event loop instead of a scoring thread


# ---- request and response bodies -----------------------------------------------------------------

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecommendRequest(Strict):
    history: list[str] = Field(..., min_length=1, description="item ids (or action tokens), oldest first")
    k: int = Field(10, ge=1, description="how many items to return (at most the server's max_k)")
    candidate_fraction: float | None = Field(
        None, gt=0, le=1, description="score only items under the best coarse nodes, up to this share of "
                                      "the catalogue")
    top_nodes: int | None = Field(None, ge=1, description="score only items under this many best coarse nodes")
    candidate_level: str | None = Field(None, description="level whose nodes pick candidates (default: the "
                                                          "level above the items)")
    exclude_seen: bool = Field(False, description="never return an item of the history")
    unknown: Literal["error", "ignore"] | None = Field(
        None, description="unknown ids: an error (422), or ignored and listed in the response "
                          "(default: the server's setting)")
    model: str | None = Field(None, description="one of the run's models (default: the main one)")

    @field_validator("history")
    @classmethod
    def _plain_ids(cls, value: list[str]) -> list[str]:
        for i, item in enumerate(value):
            if not item or len(item) > 200:
                raise ValueError(f"item {i}: an id is 1 to 200 characters")
        return value


class Item(BaseModel):
    rank: int
    id: str
    probability: float = Field(..., description="softmax over the scored items (all, or the candidates)")
    ancestors: dict[str, str]


class LevelPrediction(BaseModel):
    label: str
    probability: float
    source: str
    contains_top: bool


class RecommendResponse(BaseModel):
    model: str
    level: str
    items: list[Item]
    levels: dict[str, LevelPrediction]
    unknown: list[str] = Field(..., description="ids of the history not in the catalogue (ignored)")
    truncated: int = Field(..., description="oldest history events beyond the model's window")
    scored: dict[str, Any] = Field(..., description="'full' or 'candidates', and the share of items scored")


class RankRequest(Strict):
    rows: list[dict[str, str | float | int | bool | None]] = Field(
        ..., min_length=1, description="feature rows: column -> value, as in the training table")
    calibrated: bool = Field(True, description="apply the run's calibration.json when it has one")
    weights: dict[str, float] | None = Field(
        None, description="utility weight per head (default: the run's tuned utility.json, if any)")

    @field_validator("weights")
    @classmethod
    def _finite(cls, value):
        for head, weight in (value or {}).items():
            if not math.isfinite(weight):
                raise ValueError(f"weight of {head!r} must be a finite number")
        return value


class RankResponse(BaseModel):
    heads: list[str]
    rows: list[dict[str, float | None]] = Field(..., description="per row: head -> probability (or value)")
    utility: list[float | None] | None = Field(None, description="U = sum of weight x transformed probability, per row")
    calibrated: bool


class Health(BaseModel):
    status: str
    kind: str
    backend: str
    uptime_seconds: float
    pid: int = Field(description="the serving process (with --workers, the worker that holds this connection)")


class BadInput(HmtrecError):
    """A 4xx: `field` names the request field (a dotted path), `status` the code."""

    def __init__(self, message: str, field: str, status: int = 422):
        self.field, self.status = field, status
        super().__init__(message)


def _problem_body(field: str, message: str) -> bytes:
    return orjson.dumps({"detail": [{"loc": ["body", *field.split(".")] if field else ["body"], "msg": message}]})


def _problem(status: int, field: str, message: str) -> Response:
    return Response(_problem_body(field, message), status_code=status, media_type="application/json")


class Guard:
    """Plain ASGI middleware (cheaper per request than Starlette's BaseHTTPMiddleware): the API key
    and the body size limit, checked before any endpoint runs."""

    def __init__(self, app, settings: ServeSettings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", ()))
        key = self.settings.api_key
        if key is not None and scope.get("path") != "/health":
            given = headers.get(API_KEY_HEADER.lower().encode(), b"")
            if not hmac.compare_digest(given, key.encode()):
                return await _problem(401, "", f"missing or wrong {API_KEY_HEADER} header")(scope, receive, send)
        limit = self.settings.max_body_bytes

        def too_large() -> Response:   # built only when needed: this runs for every request
            return _problem(413, "", f"request body over {limit} bytes")

        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await too_large()(scope, receive, send)
        if length is not None:
            return await self.app(scope, receive, send)
        received, started = 0, False

        async def counted():   # a body sent without a length is counted as it arrives
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise _TooLarge
            return message

        async def sending(message):
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except _TooLarge:
            if not started:
                await too_large()(scope, receive, send)


class _TooLarge(Exception):
    pass


# ---- micro-batching -------------------------------------------------------------------------------

@dataclass
class _Pending:
    options: tuple
    leaves: list[str]
    k: int
    future: asyncio.Future
    arrived: float


@dataclass
class Batcher:
    """Scores waiting requests in batches: an idle scorer starts at once; while it is busy requests
    queue, and each next batch takes every waiting request with the oldest one's options (up to
    `batch_size`). No timer runs when a request is alone."""

    score: Any                                    # (options, [histories], k) -> [results]
    settings: ServeSettings
    waiting: list[_Pending] = field(default_factory=list)
    busy: bool = False
    batches: int = 0
    scored: int = 0
    executor: ThreadPoolExecutor | None = None    # the one scoring thread
    draining: asyncio.Task | None = None

    async def submit(self, options: tuple, history: list[str], k: int) -> dict:
        loop = asyncio.get_running_loop()
        pending = _Pending(options, history, k, loop.create_future(), time.perf_counter())
        self.waiting.append(pending)
        if not self.busy:
            self.busy = True
            # started on the next turn of the loop: requests read in this turn join the first batch
            # (the reference keeps the task alive: the loop holds tasks only weakly)
            self.draining = loop.create_task(self._drain())
        return await pending.future

    def _take(self) -> list[_Pending]:
        options = self.waiting[0].options
        batch, rest = [], []
        for pending in self.waiting:
            (batch if pending.options == options and len(batch) < self.settings.batch_size else rest).append(pending)
        self.waiting = rest
        return batch

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        if self.executor is None and not self.settings.score_in_loop:
            self.executor = ThreadPoolExecutor(1, thread_name_prefix="hmtrec-score",
                                               initializer=_set_threads, initargs=(self.settings.threads,))
        first = True
        try:
            while self.waiting:
                wait = self.settings.batch_wait_ms / 1000
                if not first and wait > 0 and len(self.waiting) < self.settings.batch_size:
                    remaining = self.waiting[0].arrived + wait - time.perf_counter()
                    if remaining > 0:
                        await asyncio.sleep(remaining)
                first = False
                batch = [p for p in self._take() if not p.future.done()]   # drop cancelled requests
                if not batch:
                    continue
                try:
                    if self.settings.score_in_loop:
                        results = self.score(batch[0].options, [p.leaves for p in batch], max(p.k for p in batch))
                        # two turns of the loop: one reads the sockets that became readable while
                        # scoring, the next runs their requests up to `submit`, so they join the next batch
                        await asyncio.sleep(0)
                        await asyncio.sleep(0)
                    else:
                        results = await loop.run_in_executor(self.executor, self.score, batch[0].options,
                                                             [p.leaves for p in batch], max(p.k for p in batch))
                except Exception as error:  # every request of the batch gets the error
                    for pending in batch:
                        if not pending.future.done():
                            pending.future.set_exception(error)
                    continue
                self.batches += 1
                self.scored += len(batch)
                for pending, result in zip(batch, results):
                    if not pending.future.done():
                        result["recommendations"] = result["recommendations"][:pending.k]
                        pending.future.set_result(result)
        finally:
            self.busy = False


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def score_in_loop_for(workers: int) -> bool:
    """Where `hmtrec serve --workers N` scores by default: on the event loop when N covers every usable core."""
    return workers >= usable_cores()


def _set_threads(threads: int | None) -> None:
    """Torch's intra-op thread count is per thread: set it on the scoring thread itself."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


class HmtrecApp(FastAPI):
    """FastAPI, with lean ASGI handlers tried first for the hot routes (`fast_routes`: (method,
    path) -> ASGI app); a handler returns False to hand the request on to FastAPI untouched."""

    fast_routes: dict[tuple[str, str], Any]

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            handler = self.__dict__.get("fast_routes", {}).get((scope["method"], scope["path"]))
            if handler is not None and await handler(scope, receive, send) is not False:
                return
        await super().__call__(scope, receive, send)


JSON_HEADERS = [(b"content-type", b"application/json")]


async def _send_json(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _validation_detail(error: ValidationError) -> bytes:
    """Pydantic's errors in the shape of FastAPI's 422 (loc under "body")."""
    return orjson.dumps({"detail": [{"loc": ["body", *item.get("loc", ())], "msg": item.get("msg", ""),
                                     "type": item.get("type", "")} for item in error.errors(include_url=False)]})


def _is_json(headers) -> bool:
    for name, value in headers:
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or media.endswith(b"+json")
    return True   # FastAPI reads a body without a content type as JSON too


def fast_json_route(model: type[BaseModel], answer, settings: ServeSettings):
    """An ASGI handler: the raw JSON body validated by `model`, `answer(request) -> dict` awaited,
    the dict encoded with orjson. BadInput and validation errors become the same 4xx as FastAPI's.
    Guarded like every other route (API key, body size)."""

    async def handle(scope, receive, send):
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None     # the client went away
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        try:
            request = model.model_validate_json(b"".join(chunks))
        except ValidationError as error:
            return await _send_json(send, 422, _validation_detail(error))
        try:
            body = orjson.dumps(await answer(request))
        except BadInput as error:
            return await _send_json(send, error.status, _problem_body(error.field, str(error)))
        await _send_json(send, 200, body)

    guarded = Guard(handle, settings)

    async def route(scope, receive, send):
        if not _is_json(scope.get("headers", ())):
            return False    # FastAPI answers other media types as it always did
        await guarded(scope, receive, send)

    return route


# ---- the application ------------------------------------------------------------------------------

# no `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run time,
# and the request bodies are classes made per server (its limits are in their schema)
def servable_run(run_dir: str | Path) -> tuple[RunDir, dict]:
    """The run directory and its run info, if `hmtrec serve` can serve it (finished, sequence or
    ranking); otherwise a one-line error."""
    run = RunDir(run_dir)
    info = run.require_done("`hmtrec serve`")
    if info["kind"] not in ("sequence", "ranking"):
        raise HmtrecError(f"{run.path} holds a {info['kind']!r} run; `hmtrec serve` serves sequence and ranking runs")
    return run, info


def freeze_loaded(app: FastAPI) -> FastAPI:
    """For a process that only serves `app`: everything loaded so far (model, tables, modules) lives
    as long as the server, so it is moved out of the collector's generations and a full collection
    no longer walks it in the middle of answering (the long tail at 32 clients; docs/serving.md).
    Not done by create_app: a process that makes several apps
    (tests, notebooks) keeps collecting them normally."""
    gc.collect()
    gc.freeze()
    return app


def create_app(run_dir: str | Path, settings: ServeSettings | None = None) -> FastAPI:
    """The service for one finished run directory (sequence: /recommend, ranking: /rank)."""
    settings = settings or ServeSettings()
    run, info = servable_run(run_dir)
    kind = info["kind"]
    _set_threads(settings.threads)
    started = time.time()
    state: dict[str, Any] = {}
    if kind == "sequence":
        state.update(_load_sequence(run, settings))
    else:
        state.update(_load_ranking(run))

    app = HmtrecApp(title="hmtrec", version=str(info.get("versions", {}).get("hmtrec", "")),
                    description=f"Serving the {kind} run {run.path.name}.")
    app.state.hmtrec = state

    app.add_middleware(Guard, settings=settings)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        detail = [{"loc": list(item.get("loc", ())), "msg": item.get("msg", ""), "type": item.get("type", "")}
                  for item in error.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(BadInput)
    async def bad_input(request: Request, error: BadInput):
        return _problem(error.status, error.field, str(error))

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        return Health(status="ok", kind=kind, backend=settings.backend, uptime_seconds=time.time() - started,
                      pid=os.getpid())

    @app.get("/model")
    async def model_info() -> dict:
        described = {"kind": kind, "run": run.path.name, "models": info.get("models", []),
                     "versions": info.get("versions", {}), "config_hash": info.get("config_hash"),
                     "backend": settings.backend,
                     "limits": {"max_k": settings.max_k, "max_history": settings.max_history,
                                "max_rows": settings.max_rows, "max_body_bytes": settings.max_body_bytes},
                     "unknown": settings.unknown}
        described.update(state["describe"]())
        if "batcher" in state:
            described["batches"] = {"batches": state["batcher"].batches, "requests": state["batcher"].scored}
        return described

    # The request bodies carry this server's limits and a working example in the schema.
    example = state.get("example_history", ["i1", "i2"])

    class Recommend(RecommendRequest):
        model_config = ConfigDict(extra="forbid", title="RecommendRequest",
                                  json_schema_extra={"examples": [{"history": example, "k": 10}]})
        history: list[str] = Field(..., min_length=1, max_length=settings.max_history,
                                   description="item ids (or action tokens), oldest first")
        k: int = Field(10, ge=1, le=settings.max_k, description="how many items to return")

    class Rank(RankRequest):
        model_config = ConfigDict(extra="forbid", title="RankRequest")
        rows: list[dict[str, str | float | int | bool | None]] = Field(
            ..., min_length=1, max_length=settings.max_rows,
            description="feature rows: column -> value, as in the training table")

    async def answer_recommend(request: RecommendRequest) -> dict:
        """The body of a RecommendResponse (built as a dict: encoded without re-validation)."""
        if kind != "sequence":
            raise BadInput(f"this server holds a {kind} run; /recommend needs a sequence run", "", 404)
        if request.k > settings.max_k:
            raise BadInput(f"k is {request.k}; this server returns at most {settings.max_k}", "k")
        if len(request.history) > settings.max_history:
            raise BadInput(f"{len(request.history)} ids; this server takes at most {settings.max_history}", "history")
        if request.candidate_fraction is not None and request.top_nodes is not None:
            raise BadInput("give candidate_fraction or top_nodes, not both", "top_nodes")
        artefact = state["artefact"]
        if request.model is not None and request.model not in state["models"]:
            raise BadInput(f"no model {request.model!r}; models: {state['models']}", "model")
        label = request.model or artefact.main
        levels = artefact.taxonomy.level_names
        if request.candidate_level is not None and request.candidate_level not in levels[:-1]:
            raise BadInput(f"{request.candidate_level!r} is not a coarse level; levels: {levels[:-1]}",
                           "candidate_level")
        if request.top_nodes is not None:
            level = request.candidate_level or levels[-2]
            if request.top_nodes > artefact.taxonomy.n_nodes(level):
                raise BadInput(f"top_nodes is {request.top_nodes}; level {level!r} has "
                               f"{artefact.taxonomy.n_nodes(level)} nodes", "top_nodes")
        known, unknown = state["split_known"](request.history)
        mode = request.unknown or settings.unknown
        if unknown and mode == "error":
            shown = ", ".join(repr(u) for u in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise BadInput(f"unknown item id(s): {shown} ({len(unknown)} of {len(request.history)}); send "
                           f"unknown='ignore' to skip them", "history")
        if not known:
            raise BadInput("the history has no known item: nothing to recommend from", "history")
        options = (label, request.exclude_seen, request.candidate_fraction, request.top_nodes,
                   request.candidate_level)
        try:
            result = await state["batcher"].submit(options, known, request.k)
        except HmtrecError as error:
            raise BadInput(str(error), "") from None
        return {"model": result["model"], "level": result["level"], "items": result["recommendations"],
                "levels": result["levels"], "unknown": unknown, "truncated": result["truncated"],
                "scored": result["scored"]}

    @app.post("/recommend", response_model=RecommendResponse)
    async def recommend(request: Recommend) -> Response:
        # reached only for bodies the fast route hands on (another media type); same answers
        return Response(orjson.dumps(await answer_recommend(request)), media_type="application/json")

    app.fast_routes = {("POST", "/recommend"): fast_json_route(Recommend, answer_recommend, settings)}

    @app.post("/rank", response_model=RankResponse)
    async def rank(request: Rank) -> RankResponse:
        if kind != "ranking":
            raise BadInput(f"this server holds a {kind} run; /rank needs a ranking run", "", 404)
        if len(request.rows) > settings.max_rows:
            raise BadInput(f"{len(request.rows)} rows; this server takes at most {settings.max_rows}", "rows")
        return await asyncio.to_thread(state["rank"], request)

    return app


def _load_sequence(run: RunDir, settings: ServeSettings) -> dict:
    from hmtrec.serve.artefact import SequenceArtefact, load_sequence_run
    from hmtrec.serve.scoring import HeadScorer

    artefact: SequenceArtefact = load_sequence_run(run.path)
    if artefact.needs_fit:
        from hmtrec.data.loading import load_fitting_split

        artefact.fit_missing(load_fitting_split(artefact.config.data, artefact.config.train.final_fit))
    if settings.backend == "onnx":
        from hmtrec.serve.onnx import OnnxScorer

        artefact._scorers[artefact.main] = OnnxScorer.load(run.path, artefact, threads=settings.threads)
    for label in artefact.models:   # build every scorer (leaf vectors, blocks) before the first request
        scorer = artefact.scorer(label)
        if settings.trace and settings.backend == "torch" and isinstance(scorer, HeadScorer):
            scorer.trace()
        if isinstance(scorer, HeadScorer):
            scorer.prepare_candidates()
    index = {str(label): i for i, label in enumerate(artefact.taxonomy.node_labels[-1])}

    def split_known(history: list[str]) -> tuple[list[str], list[str]]:
        known = [item for item in history if item in index]
        return known, [item for item in history if item not in index]

    def score(options: tuple, histories: list[list[str]], k: int) -> list[dict]:
        label, exclude, fraction, top, level = options
        return artefact.recommend_many(histories, k, label=label, exclude_history=exclude,
                                       candidate_fraction=fraction, top_nodes=top, candidate_level=level)

    def describe() -> dict:
        taxonomy = artefact.taxonomy
        return {"main": artefact.main, "levels": {name: taxonomy.n_nodes(name) for name in taxonomy.level_names},
                "n_items": taxonomy.n_leaves, "max_len": artefact.config.eval_max_len,
                "candidates": {label: artefact.scorer(label).supports_candidates for label in artefact.models},
                "query_stage": {label: "onnx" if settings.backend == "onnx" and label == artefact.main else
                                "traced" if getattr(artefact.scorer(label), "traced", None) is not None else "eager"
                                for label in artefact.models}}

    return {"artefact": artefact, "models": list(artefact.models), "split_known": split_known,
            "example_history": [str(label) for label in artefact.taxonomy.node_labels[-1][:3]],
            "batcher": Batcher(score, settings), "describe": describe}


def _load_ranking(run: RunDir) -> dict:
    import numpy as np
    import pandas as pd

    from hmtrec.calibrate import apply_calibration, load_calibration
    from hmtrec.serve.ranker import Ranker
    from hmtrec.rundir import read_json

    ranker = Ranker.load(run.path)
    calibration = load_calibration(run.path)
    heads = [task.name for task in ranker.encoder.tasks]
    utility_file = run.path / "utility.json"
    utility = read_json(utility_file) if utility_file.exists() else None

    def rank(request: RankRequest) -> RankResponse:
        frame = pd.DataFrame(request.rows)
        try:
            scores = ranker.predict_frame(frame, file="request")
            used = calibration is not None and request.calibrated
            if used:
                scores = apply_calibration(scores, calibration, source="request")
        except DataError as error:
            field = f"rows.{error.row - 1}.{error.column}" if error.row and error.column else \
                (f"rows.{error.column}" if error.column else "rows")
            raise BadInput(str(error), field) from None
        except HmtrecError as error:
            raise BadInput(str(error), "rows") from None
        rows = [{head: (None if not np.isfinite(v) else float(v)) for head, v in zip(heads, values)}
                for values in scores[heads].to_numpy(dtype=np.float64)]
        weights, transforms = request.weights, {}
        if weights is None and utility is not None and utility.get("best"):
            weights, transforms = utility["best"][0]["weights"], utility.get("transforms", {})
        values = None
        if weights is not None:
            unknown = sorted(set(weights) - set(heads))
            if unknown:
                raise BadInput(f"no head(s) {unknown}; heads: {heads}", "weights")
            from hmtrec.calibrate.utility import Transform

            total = np.zeros(len(frame))
            for head, weight in weights.items():
                p = scores[head].to_numpy(dtype=np.float64)
                total += weight * Transform(**transforms.get(head, {})).apply(p)
            values = [float(v) if np.isfinite(v) else None for v in total]
        return RankResponse(heads=heads, rows=rows, utility=values, calibrated=used)

    def describe() -> dict:
        return {"heads": heads, "calibrated_heads": sorted(calibration.heads) if calibration is not None else [],
                "utility": utility is not None,
                "features": ranker.encoder.schema.model_dump(mode="json")}

    return {"rank": rank, "describe": describe}


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without an API key."""
    if host not in LOCAL_HOSTS and not api_key:
        raise HmtrecError(f"--host {host}: listening beyond this machine needs an API key (--api-key or "
                          f"HMTREC_API_KEY); clients then send it in the {API_KEY_HEADER} header")
