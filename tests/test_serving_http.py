"""The HTTP endpoint: token-protected, concurrent clients get their own answers, malformed requests
get a clear 4xx JSON error and the server keeps serving."""
from __future__ import annotations

import threading

import httpx
import pytest
import torch

import mm_jupyter as mm
from mm_jupyter.serving.runner import ATOL, RTOL
from mm_jupyter.usecases.models import ffnn, seeded_models

N = 32


@pytest.fixture
def served(store):
    store.save_set(seeded_models(ffnn, N, hidden=48), "cells")
    server = mm.serve(store, "cells@latest", max_wait_ms=2)
    endpoint = server.http()
    yield store, server, endpoint
    server.close()


def _client(endpoint, token: str | None = "auth") -> httpx.Client:
    headers = {"Authorization": f"Bearer {endpoint.token}"} if token == "auth" else {}
    return httpx.Client(base_url=endpoint.url, headers=headers, timeout=30)


def test_concurrent_clients_get_their_own_answers(served):
    store, server, endpoint = served
    ms = store.recover_set("cells")
    gen = torch.Generator().manual_seed(4)
    xs = torch.randn(8, 24, 5, generator=gen)          # client c, request j
    got: dict[tuple[int, int], dict] = {}
    errors: list[BaseException] = []

    def client(c: int) -> None:
        try:
            with _client(endpoint) as http:
                for j in range(24):
                    model = (7 * c + j) % N
                    r = http.post("/predict", json={"model": str(model), "x": xs[c, j].tolist()})
                    assert r.status_code == 200, r.text
                    got[c, j] = r.json()
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    assert len(got) == 8 * 24
    for (c, j), answer in got.items():
        model = (7 * c + j) % N
        assert answer["model"] == str(model) and answer["version"] == "cells@1"
        ref = ms[model](xs[c, j : j + 1])[0]
        assert torch.allclose(torch.tensor(answer["y"]), ref, rtol=RTOL, atol=ATOL), (c, j)
    assert server.metrics()["answered"] == 8 * 24


def test_malformed_requests_get_clear_4xx_and_the_server_keeps_serving(served):
    _, server, endpoint = served
    good = {"model": "3", "x": [0.1, 0.2, 0.3, 0.4, 0.5]}
    with _client(endpoint) as http:
        cases = [
            ({"json": {"model": "3", "x": [1.0, 2.0]}}, 422, "shape [2]"),
            ({"json": {"model": "3", "x": [[1.0] * 5] * 2 + [[1.0] * 4]}}, 422, "numeric"),
            ({"json": {"model": "nope", "x": [0.0] * 5}}, 404, "no model named 'nope'"),
            ({"json": {"model": N + 5, "x": [0.0] * 5}}, 404, "out of range"),
            ({"json": {"model": "3", "x": ["a", "b", "c", "d", "e"]}}, 422, "numbers"),
            ({"json": {"model": "3", "x": "12345"}}, 422, "numbers"),
            ({"json": {"model": "3", "x": [True] * 5}}, 422, "numbers"),
            ({"content": b'{"model": "3", "x": [NaN, 0, 0, 0, 0]}'}, 422, "NaN or infinity"),
            ({"content": b"not json at all"}, 400, "not valid JSON"),
            ({"json": [1, 2, 3]}, 400, "JSON object"),
            ({"json": {"x": [0.0] * 5}}, 400, "JSON object"),
            ({"json": {"model": None, "x": [0.0] * 5}}, 400, '"model"'),
            ({"content": b"x" * (4 * 2**20 + 1)}, 413, "larger than"),
        ]
        for kwargs, status, message in cases:
            r = http.post("/predict", **kwargs)
            assert r.status_code == status, (kwargs.get("json"), r.text)
            assert message in r.json()["error"]
            assert http.post("/predict", json=good).status_code == 200, "still serving"
        assert http.get("/predict").status_code == 405
        health = http.get("/health").json()
        assert health == {"status": "ok", "version": "cells@1", "models": N, "input_shape": [5]}
        metrics = http.get("/metrics").json()
        assert metrics["answered"] >= len(cases) and metrics["version"] == "cells@1"
    for token in (None, "wrong"):
        headers = {} if token is None else {"Authorization": "Bearer wrong"}
        r = httpx.post(f"{endpoint.url}/predict", json=good, headers=headers)
        assert r.status_code == 401 and "token" in r.json()["error"]
        assert httpx.get(f"{endpoint.url}/metrics", headers=headers).status_code == 401
    r = httpx.post(f"{endpoint.url}/predict?token={endpoint.token}", json=good)
    r2 = httpx.post(f"{endpoint.url}/predict", json=good, headers={"Authorization": f"token {endpoint.token}"})
    assert r.status_code == r2.status_code == 200 and r.json()["cached"] and r.json()["y"] == r2.json()["y"]
    assert server.http() is endpoint


def test_back_pressure_over_http_and_closing(store):
    store.save_set(seeded_models(ffnn, 4, hidden=8), "cells")
    server = mm.serve(store, "cells", max_queue=1, max_batch=64, max_wait_ms=1500, cache_size=0)
    endpoint = server.http()
    try:
        queued = server.submit(0, torch.zeros(5))        # waits for a fuller batch, holding the one slot
        r = httpx.post(f"{endpoint.url}/predict", json={"model": "1", "x": [0.0] * 5},
                       headers={"Authorization": f"Bearer {endpoint.token}"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "queue full" in r.json()["error"]
        assert queued.result(10).model == "0"
    finally:
        server.close()
    with pytest.raises(httpx.TransportError):
        httpx.post(f"{endpoint.url}/predict", json={"model": "1", "x": [0.0] * 5}, timeout=2)
    with pytest.raises(mm.ServeError, match="closed"):
        server.http()
