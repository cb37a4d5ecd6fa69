"""`hmtrec serve`: the HTTP API through an HTTP client (happy paths and every class of bad input),
micro-batching, the bind guard, and property-based fuzzing of the OpenAPI schema with no 5xx."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings

import hmtrec
from hmtrec.errors import HmtrecError
from hmtrec.serve.app import ServeSettings, check_bind, create_app

from test_api import SEQUENCE
from test_ranking_pipeline import write_config as write_ranking_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sequence_run(tmp_path_factory):
    return hmtrec.train(SEQUENCE, tmp_path_factory.mktemp("serve") / "seq")


@pytest.fixture(scope="module")
def ranking_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-rank")
    config = write_ranking_config(folder, "shared_bottom", bottom_hidden=[8])
    return hmtrec.train(config, folder / "run", overrides={"train.epochs": 1, "train.max_steps_per_epoch": 5})


@pytest.fixture(scope="module")
def client(sequence_run):
    return TestClient(create_app(sequence_run.path, ServeSettings(max_k=50, max_history=30, max_body_bytes=4096)))


@pytest.fixture(scope="module")
def items(sequence_run):
    return [str(label) for label in sequence_run.artefact().taxonomy.node_labels[-1][:20]]


def assert_same_ranking(got: list[dict], want: list[dict]) -> None:
    """Equal probabilities at every rank, and the same item at every rank whose score is not tied
    (the order of items of equal score is free; the last rank may tie with an item not listed)."""
    got_p, want_p = [r["probability"] for r in got], [r["probability"] for r in want]
    assert got_p == pytest.approx(want_p, abs=1e-6)
    tied = {len(want_p) - 1} | {i for i in range(len(want_p)) for j in (i - 1, i + 1)
                                if 0 <= j < len(want_p) and abs(want_p[i] - want_p[j]) <= 1e-6}
    assert [r["id"] for i, r in enumerate(got) if i not in tied] == [r["id"] for i, r in enumerate(want) if i not in tied]


def field_of(response):
    return [".".join(str(part) for part in error["loc"]) for error in response.json()["detail"]]


def test_recommend_matches_the_python_api(client, sequence_run, items):
    history = items[:5]
    response = client.post("/recommend", json={"history": history, "k": 7})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = sequence_run.recommend([history], k=7)[0]
    assert [item["id"] for item in body["items"]] == [r["id"] for r in expected["recommendations"]]
    assert body["levels"] == expected["levels"] and body["unknown"] == [] and body["scored"]["mode"] == "full"
    candidates = client.post("/recommend", json={"history": history, "k": 5, "candidate_fraction": 0.1,
                                                 "exclude_seen": True}).json()
    assert candidates["scored"]["mode"] == "candidates" and candidates["scored"]["fraction"] >= 0.1
    assert not {item["id"] for item in candidates["items"]} & set(history)
    top = client.post("/recommend", json={"history": history, "top_nodes": 1, "k": 50}).json()
    assert len({item["ancestors"]["L2"] for item in top["items"]}) == 1
    assert client.post("/recommend", json={"history": history, "model": "pop"}).json()["model"] == "pop"


def test_health_and_model(client, sequence_run):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["pid"] == os.getpid()
    model = client.get("/model").json()
    taxonomy = sequence_run.artefact().taxonomy
    assert model["kind"] == "sequence" and model["n_items"] == taxonomy.n_leaves
    assert model["models"] == ["hiersrec", "pop"] and model["limits"]["max_k"] == 50
    assert model["levels"] == {name: taxonomy.n_nodes(name) for name in ("L1", "L2", "item")}
    assert model["query_stage"] == {"hiersrec": "traced", "pop": "eager"}   # --trace is the default
    assert "/recommend" in client.get("/openapi.json").json()["paths"]


def test_unknown_ids_are_reported_per_request(client, items):
    strict = client.post("/recommend", json={"history": ["nope", items[0]]})
    assert strict.status_code == 422 and field_of(strict) == ["body.history"]
    assert "'nope'" in strict.json()["detail"][0]["msg"]
    lenient = client.post("/recommend", json={"history": ["nope", items[0], "zzz"], "unknown": "ignore"})
    assert lenient.status_code == 200 and lenient.json()["unknown"] == ["nope", "zzz"]
    nothing = client.post("/recommend", json={"history": ["nope"], "unknown": "ignore"})
    assert nothing.status_code == 422 and field_of(nothing) == ["body.history"]


@pytest.mark.parametrize("body, field", [
    ({}, "body.history"),
    ({"history": []}, "body.history"),
    ({"history": "i1 i2"}, "body.history"),
    ({"history": [""]}, "body.history"),
    ({"history": ["i1"], "k": 0}, "body.k"),
    ({"history": ["i1"], "k": 51}, "body.k"),
    ({"history": ["i1"], "k": "ten"}, "body.k"),
    ({"history": ["i1"] * 31}, "body.history"),
    ({"history": ["i1"], "candidate_fraction": 0}, "body.candidate_fraction"),
    ({"history": ["i1"], "candidate_fraction": 1.5}, "body.candidate_fraction"),
    ({"history": ["i1"], "candidate_fraction": 0.1, "top_nodes": 2}, "body.top_nodes"),
    ({"history": ["i1"], "top_nodes": 31}, "body.top_nodes"),
    ({"history": ["i1"], "candidate_level": "item"}, "body.candidate_level"),
    ({"history": ["i1"], "model": "sasrec"}, "body.model"),
    ({"history": ["i1"], "unknown": "maybe"}, "body.unknown"),
    ({"history": ["i1"], "colour": "red"}, "body.colour"),
])
def test_every_bad_input_is_a_4xx_naming_the_field(client, items, body, field):
    body = {**body, "history": [items[0] if h == "i1" else h for h in body["history"]]} \
        if isinstance(body.get("history"), list) else body
    response = client.post("/recommend", json=body)
    assert response.status_code == 422, response.text
    assert field in field_of(response), response.text


def test_malformed_and_oversized_bodies(client, items):
    assert client.post("/recommend", content=b"{not json", headers={"content-type": "application/json"}
                       ).status_code == 422
    assert client.post("/recommend", content=b"\xff\xfe", headers={"content-type": "application/json"}
                       ).status_code == 422
    big = json.dumps({"history": [items[0]] * 2000}).encode()
    assert client.post("/recommend", content=big, headers={"content-type": "application/json"}).status_code == 413
    assert client.post("/rank", json={"rows": [{"a": 1}]}).status_code == 404   # a sequence server


def test_an_api_key_guards_everything_but_health(sequence_run, items):
    guarded = TestClient(create_app(sequence_run.path, ServeSettings(api_key="s3cret")))
    assert guarded.get("/health").status_code == 200
    assert guarded.get("/model").status_code == 401
    assert guarded.post("/recommend", json={"history": items[:2]}, headers={"X-API-Key": "wrong"}).status_code == 401
    assert guarded.post("/recommend", json={"history": items[:2]}, headers={"X-API-Key": "s3cret"}).status_code == 200
    check_bind("127.0.0.1", None)
    with pytest.raises(HmtrecError, match="needs an API key"):
        check_bind("0.0.0.0", None)


@pytest.mark.parametrize("score_in_loop", [False, True])
def test_concurrent_requests_are_micro_batched(sequence_run, items, score_in_loop):
    app = create_app(sequence_run.path, ServeSettings(batch_wait_ms=20, batch_size=16, score_in_loop=score_in_loop))

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            histories = [items[i:i + 3] for i in range(16)]
            responses = await asyncio.gather(*(client.post("/recommend", json={"history": h, "k": 3 + i % 4})
                                               for i, h in enumerate(histories)))
            return histories, responses

    histories, responses = asyncio.run(burst())
    batcher = app.state.hmtrec["batcher"]
    assert batcher.scored == 16 and batcher.batches < 16     # several requests per pass through the model
    for i, (history, response) in enumerate(zip(histories, responses)):
        expected = sequence_run.recommend([history], k=3 + i % 4)[0]
        assert [item["id"] for item in response.json()["items"]] == [r["id"] for r in expected["recommendations"]]


@pytest.mark.parametrize("score_in_loop", [False, True])
def test_a_batch_of_concurrent_requests_answers_as_many_single_ones(sequence_run, items, score_in_loop):
    """Mixed options in one burst: each request is batched with the others that share its options,
    and every answer equals the one it gets alone (ids, probabilities, levels, scored share), with
    batches scored on the scoring thread or on the event loop."""
    app = create_app(sequence_run.path, ServeSettings(batch_size=8, score_in_loop=score_in_loop))
    options = ({}, {"candidate_fraction": 0.2}, {"top_nodes": 2, "exclude_seen": True})
    bodies = [{"history": items[i % 15:i % 15 + 1 + i % 5], "k": 2 + i % 6, **options[i % 3]} for i in range(24)]

    async def burst():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            together = await asyncio.gather(*(client.post("/recommend", json=body) for body in bodies))
            alone = [await client.post("/recommend", json=body) for body in bodies]
            return together, alone

    together, alone = asyncio.run(burst())
    batcher = app.state.hmtrec["batcher"]
    assert batcher.batches < 2 * len(bodies)          # the burst took fewer passes than its requests
    for body, a, b in zip(bodies, together, alone):
        assert a.status_code == b.status_code == 200, (body, a.text)
        a, b = a.json(), b.json()
        assert len(a["items"]) == body["k"]
        assert_same_ranking(a["items"], b["items"])
        assert a["levels"].keys() == b["levels"].keys() and a["scored"] == pytest.approx(b["scored"])


@pytest.mark.parametrize("path", ["dense", "union", "kernel"])
def test_every_candidate_path_ranks_as_the_candidate_definition(sequence_run, items, path):
    """Candidates scored as full-product columns, as the chosen nodes' rows (without Numba: nodes
    chosen in NumPy too) or by the compiled kernels rank exactly as the definition: the full item
    scores with every item outside the chosen nodes removed."""
    import numpy as np

    artefact = sequence_run.artefact()
    scorer = artefact.scorer()
    rng = np.random.default_rng(5)
    histories = [[items[i] for i in rng.integers(0, len(items), size=n)] for n in rng.integers(1, 12, size=9)]
    scorer.candidate_path, scorer.kernels = path, path != "union"
    try:
        for options in ({"candidate_fraction": 0.15}, {"top_nodes": 2}, {"top_nodes": 1, "candidate_level": "L1"}):
            served = artefact.recommend_many(histories, 15, **options)
            scorer.candidate_path, reference_scorer = "auto", artefact._scorers.pop(artefact.main)
            artefact._scorers[artefact.main] = type("Full", (), {"score": lambda self, batch: reference_scorer.score(batch),
                                                                 "supports_candidates": False})()
            try:   # the masked full scores (the path of models without the split scorer)
                expected = artefact.recommend_many(histories, 15, **options)
            finally:
                artefact._scorers[artefact.main] = reference_scorer
                scorer.candidate_path = path
            for got, want in zip(served, expected):
                assert_same_ranking(got["recommendations"], want["recommendations"])
                assert got["scored"]["fraction"] == pytest.approx(want["scored"]["fraction"])
    finally:
        scorer.candidate_path, scorer.kernels = "auto", True


def test_the_lean_route_and_fastapi_agree_on_bad_bodies(client, items):
    """POST /recommend with a JSON body takes the lean route; another media type reaches FastAPI's
    route. Both refuse bad input with a 4xx naming the field."""
    assert field_of(client.post("/recommend", json={"history": items[:2], "k": "many"})) == ["body.k"]
    other = client.post("/recommend", content=b"history=1", headers={"content-type": "text/plain"})
    assert 400 <= other.status_code < 500
    assert client.post("/recommend", content=b"[1, 2]", headers={"content-type": "application/json"}
                       ).status_code == 422


def test_rank_returns_calibrated_heads_and_utility(ranking_run):
    import pandas as pd

    client = TestClient(create_app(ranking_run.path, ServeSettings(max_rows=50)))
    rows = pd.read_csv(ranking_run.config.data.test).drop(columns=["click", "like"]).iloc[:5]
    records = json.loads(rows.to_json(orient="records"))
    response = client.post("/rank", json={"rows": records, "weights": {"click": 1.0, "like": 0.5}})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = ranking_run.predict(rows)
    assert body["heads"] == ["click", "like"] and not body["calibrated"]
    for row, (_, want) in zip(body["rows"], expected.iterrows()):
        assert row["click"] == pytest.approx(want["click"], rel=1e-5)
    assert body["utility"][0] == pytest.approx(expected["click"][0] + 0.5 * expected["like"][0], rel=1e-5)
    bad = client.post("/rank", json={"rows": [{**records[0], "quality": "high"}]})
    assert bad.status_code == 422 and "quality" in field_of(bad)[0]
    assert field_of(client.post("/rank", json={"rows": records, "weights": {"buy": 1}})) == ["body.weights"]
    assert field_of(client.post("/rank", json={"rows": records * 11})) == ["body.rows"]
    assert field_of(client.post("/rank", json={"rows": []})) == ["body.rows"]
    assert client.post("/recommend", json={"history": ["1"]}).status_code == 404


def test_random_requests_with_real_ids_never_fail_the_server(client, items):
    """Schema fuzzing rarely reaches the scoring path (random ids are unknown): these requests mix real
    ids with bad ones and every option, bounded in count."""
    from hypothesis import given, strategies as st

    # mostly valid values (so the scoring path is reached with every combination), sometimes not
    ids = st.sampled_from(items + ["nope", "", "x" * 300, "\u0000", "i 1"])
    maybe = lambda valid, invalid: st.none() | valid | valid | invalid  # noqa: E731
    body = st.fixed_dictionaries({"history": st.lists(st.sampled_from(items), min_size=1, max_size=12)
                                  | st.lists(ids, max_size=35)}, optional={
        "k": st.integers(1, 50) | st.integers(-3, 60) | st.sampled_from(["5", 2.5, None]),
        "candidate_fraction": maybe(st.floats(0.01, 1), st.floats(allow_nan=True, allow_infinity=True)),
        "top_nodes": maybe(st.integers(1, 30), st.integers(-2, 40)),
        "candidate_level": maybe(st.sampled_from(["L1", "L2"]), st.sampled_from(["item", "zz"])),
        "exclude_seen": st.booleans(),
        "unknown": maybe(st.sampled_from(["error", "ignore"]), st.just("?")),
        "model": maybe(st.sampled_from(["hiersrec", "pop"]), st.just("../x"))})
    seen = {"ok": 0}

    @given(body)
    @settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    def check(request):
        response = client.post("/recommend", content=json.dumps(request),
                               headers={"content-type": "application/json"})
        assert response.status_code < 500, (request, response.text)
        if response.status_code == 200:
            seen["ok"] += 1
            assert len(response.json()["items"]) <= int(request.get("k", 10))
        else:
            assert response.json()["detail"][0]["loc"][0] == "body"

    check()
    assert seen["ok"] > 20     # the scoring path was reached


@pytest.fixture(scope="module")
def sequence_schema(sequence_run):
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(
        sequence_run.path, ServeSettings(max_k=50, max_history=30, max_body_bytes=8192)))


@pytest.fixture(scope="module")
def ranking_schema(ranking_run):
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(ranking_run.path, ServeSettings(max_rows=20)))


FUZZ = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@schemathesis.pytest.from_fixture("sequence_schema").parametrize()
@FUZZ
def test_fuzzing_the_sequence_schema_finds_no_server_error(case):
    from schemathesis.checks import not_a_server_error

    case.call_and_validate(checks=[not_a_server_error])


@schemathesis.pytest.from_fixture("ranking_schema").parametrize()
@FUZZ
def test_fuzzing_the_ranking_schema_finds_no_server_error(case):
    from schemathesis.checks import not_a_server_error

    case.call_and_validate(checks=[not_a_server_error])


def test_serve_listens_on_loopback_only_by_default(sequence_run, items):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HMTREC_PROGRESS": "0", "PYTHONPATH": str(REPO)}
    from typer.testing import CliRunner

    from hmtrec.cli import app

    refused = CliRunner().invoke(app, ["serve", str(sequence_run.path), "--host", "0.0.0.0"])
    assert isinstance(refused.exception, HmtrecError) and "needs an API key" in str(refused.exception)
    server = subprocess.Popen([sys.executable, "-m", "hmtrec.cli", "serve", str(sequence_run.path), "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        assert health.json()["status"] == "ok"
        answer = httpx.post(f"http://127.0.0.1:{port}/recommend", json={"history": items[:3]}, timeout=10)
        assert answer.status_code == 200 and len(answer.json()["items"]) == 10
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_worker_processes_share_the_port_evenly_and_answer_alike(sequence_run, items):
    """`--workers 2`: each new connection goes to the worker holding the fewest (8 open connections:
    4 each, where uvicorn's accept race put most on one), both answer as the Python API, and a
    worker killed with SIGKILL is started again while the other keeps serving."""
    import signal

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HMTREC_PROGRESS": "0", "PYTHONPATH": str(REPO)}
    body = {"history": items[:4], "k": 5}
    expected = TestClient(create_app(sequence_run.path)).post("/recommend", json=body).json()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "hmtrec.cli", "serve", str(sequence_run.path), "--port",
                               str(port), "--workers", "2", "--threads", "1"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def open_connections(n: int) -> list[httpx.Client]:
        clients, deadline = [], time.monotonic() + 120
        while len(clients) < n:
            client = httpx.Client(base_url=url, timeout=30)
            try:
                client.get("/health")
                clients.append(client)
            except httpx.TransportError:
                client.close()
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline
                time.sleep(0.2)
        return clients

    try:
        clients = open_connections(8)               # kept open: each holds its worker's connection
        pids = [client.get("/health").json()["pid"] for client in clients]
        assert sorted(pids.count(pid) for pid in set(pids)) == [4, 4]
        for client in clients:
            answer = client.post("/recommend", json=body)
            assert answer.status_code == 200
            assert [item["id"] for item in answer.json()["items"]] == [item["id"] for item in expected["items"]]
        victim = pids[0]
        os.kill(victim, signal.SIGKILL)
        survivors = [client for client, pid in zip(clients, pids) if pid != victim]
        assert survivors[0].post("/recommend", json=body).status_code == 200   # the other worker serves on
        for client in clients:
            client.close()
        deadline, seen = time.monotonic() + 120, set()
        while len(seen - {victim}) < 2:             # the restarted worker takes new connections again
            assert time.monotonic() < deadline and server.poll() is None
            fresh = open_connections(2)
            seen |= {client.get("/health").json()["pid"] for client in fresh}
            for client in fresh:
                client.close()
            time.sleep(0.2)
        assert victim not in seen
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert server.returncode == 0


def test_a_serving_process_freezes_what_it_loaded(sequence_run):
    import gc

    from hmtrec.serve.app import freeze_loaded

    app = create_app(sequence_run.path)
    assert gc.get_freeze_count() == 0          # create_app alone leaves the collector as it was
    try:
        assert freeze_loaded(app) is app and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()



def test_the_traced_query_stage_answers_as_the_eager_one(sequence_run, monkeypatch):
    """The server's TorchScript trace of the query stage gives the eager model's coarse logits and
    item query on batches of other shapes than the traced one; a trace that differs is not used."""
    import numpy as np
    import torch

    from hmtrec.serve import scoring
    from hmtrec.serve.scoring import HeadScorer, pad_histories

    artefact = sequence_run.artefact()
    model, max_len = artefact.scorer().model, artefact.config.eval_max_len
    scorer = HeadScorer(model, artefact.taxonomy, max_len)
    assert scorer.trace() and scorer.traced is not None
    rng = np.random.default_rng(3)
    for rows, longest in ((1, 2), (5, max_len), (11, 4)):
        histories = pad_histories([rng.integers(0, artefact.taxonomy.n_leaves, size=rng.integers(1, longest + 1))
                                   for _ in range(rows)], max_len)
        with torch.inference_mode():
            logits, query = scorer.query(histories)
            *eager_logits, eager_query = scorer.stage(histories)
        assert list(logits) == scorer.coarse_levels
        for level, expected in zip(scorer.coarse_levels, eager_logits):
            assert torch.allclose(logits[level], expected, atol=1e-5)
        assert torch.allclose(query, eager_query, atol=1e-5)
    monkeypatch.setattr(scoring, "TRACE_TOLERANCE", -1.0)     # no trace can match: the eager stage stays
    untraced = HeadScorer(model, artefact.taxonomy, max_len)
    assert not untraced.trace() and untraced.traced is None


def test_batches_are_scored_on_the_loop_only_when_every_core_has_a_worker(monkeypatch):
    from hmtrec.serve import app as serve_app

    monkeypatch.setattr(serve_app, "usable_cores", lambda: 2)
    assert [serve_app.score_in_loop_for(workers) for workers in (1, 2, 3)] == [False, True, True]
