"""The HTTP endpoint: token-protected, concurrent clients get their own answers, malformed requests
get a clear 4xx JSON error and the server keeps serving."""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

import httpx
import pytest
import torch
from serve_models import held

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
        except BaseException as e:  # noqa: BLE001 - reported below, in the test's thread
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
        with held(server):
            queued = server.submit(0, torch.zeros(5))        # the worker is busy: this holds the one slot
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


# -- slow, idle and hostile clients ------------------------------------------------------------------
def _raw(endpoint, data: bytes = b"") -> "socket.socket":
    sock = socket.create_connection((endpoint.host, endpoint.port), timeout=10)
    if data:
        sock.sendall(data)
    return sock


def _closed_by_server(sock: "socket.socket", within: float) -> bool:
    sock.settimeout(within)
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return True
    except (TimeoutError, socket.timeout):
        return False
    except OSError:  # reset by the server
        return True


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def guarded(store):
    from mm_jupyter.serving.http import HTTPEndpoint

    store.save_set(seeded_models(ffnn, 4, hidden=8), "cells")
    server = mm.serve(store, "cells", max_wait_ms=2)
    endpoint = HTTPEndpoint(server, max_connections=40, header_timeout_s=1.0, body_timeout_s=1.0)
    yield server, endpoint
    endpoint.close()
    server.close()


def test_idle_and_half_sent_connections_are_closed_and_cannot_starve_the_server(guarded):
    server, endpoint = guarded
    good = {"model": "1", "x": [0.0] * 5}
    fds = _open_fds()
    idle = [_raw(endpoint) for _ in range(30)]  # connect, send nothing
    slow = [_raw(endpoint, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: appl") for _ in range(30)]
    # 60 > max_connections: the ones over the limit are closed at once, the others at their header deadline
    assert sum(_closed_by_server(s, 0.5) for s in idle + slow) >= 20
    assert all(_closed_by_server(s, 10) for s in idle + slow), "a connection without a full request stayed open"
    for s in idle + slow:
        s.close()
    r = httpx.post(f"{endpoint.url}/predict", json=good, headers={"Authorization": f"Bearer {endpoint.token}"})
    assert r.status_code == 200, r.text
    assert _open_fds() <= fds + 5, "file handles leaked"
    # a keep-alive connection that starts a second request and stalls is closed too
    with _raw(endpoint) as sock:
        body = json.dumps(good).encode()
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + endpoint.token.encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\n\r\n" + body + b"POST /predict HTTP/1.1\r\nHo")
        assert _closed_by_server(sock, 10)


def test_a_body_that_never_arrives_gets_a_json_408(guarded):
    _, endpoint = guarded
    with _raw(endpoint, b"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + endpoint.token.encode()
              + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\": ") as sock:
        sock.settimeout(10)
        reply = b""
        while b"}" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply[:200]
    assert "not received within 1 s" in json.loads(body)["error"]


def test_deep_json_is_a_json_400_and_errors_never_show_a_traceback(guarded):
    server, endpoint = guarded
    with httpx.Client(base_url=endpoint.url, headers={"Authorization": f"Bearer {endpoint.token}"}) as http:
        for depth in (40, 1_000, 100_000):
            r = http.post("/predict", content=b'{"model": "1", "x": ' + b"[" * depth + b"]" * depth + b"}")
            assert r.status_code == 400 and "nests deeper than 32 levels" in r.json()["error"], r.text[:200]
        r = http.post("/predict", json={"model": "1", "x": [[[[[[0.0] * 5]]]]]})  # deep enough, wrong shape
        assert r.status_code == 422
        assert http.post("/predict", json={"model": "1", "x": [0.0] * 5}).status_code == 200


def test_a_client_that_disconnects_is_logged_in_one_line(store, caplog):
    from mm_jupyter.serving.http import HTTPEndpoint

    store.save_set(seeded_models(ffnn, 4, hidden=8), "cells")
    server = mm.serve(store, "cells", cache_size=0)
    endpoint = HTTPEndpoint(server)
    caplog.set_level(logging.INFO, logger="mm_jupyter.serving")
    try:
        body = json.dumps({"model": "2", "x": [0.0] * 5}).encode()
        with held(server):  # the worker is busy: the answer comes after the client is gone
            with _raw(endpoint, b"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                      + endpoint.token.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                      + b"\r\n\r\n" + body):
                pass  # closed before the answer
            deadline = time.monotonic() + 20
            while not len(server.queue):
                assert time.monotonic() < deadline, "the request never reached the queue"
                time.sleep(0.01)  # polling for the endpoint thread's submission
        deadline = time.monotonic() + 20
        while not any("disconnected before its answer" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
            time.sleep(0.05)  # polling the log for the server thread's line, not a wait for an outcome
        lines = [r for r in caplog.records if "disconnected" in r.getMessage()]
        assert len(lines) == 1 and "\n" not in lines[0].getMessage() and not lines[0].exc_info
        assert server.metrics()["answered"] >= 1  # the server answered and kept going
    finally:
        endpoint.close()
        server.close()
