"""The HTTP endpoint of a ``Server``: a small Starlette (ASGI) app run by uvicorn in a background thread.

Why an ASGI server in the serving process, not a handler in the Jupyter server extension: HTTP clients
then reach the very ``Server`` the notebook started — one queue, one cache, one set of metrics, one
version — so the live widget shows their traffic and ``%modelserve`` controls it; inference stays out
of the Jupyter server process, which has to stay responsive for every open notebook and never imports
torch; and the endpoint works the same outside Jupyter (a script, a service).

Every route needs the endpoint's token, as ``Authorization: Bearer <token>`` (or ``token <token>``,
Jupyter's spelling) or ``?token=<token>``; it binds 127.0.0.1 unless told otherwise.

* ``POST /predict`` with ``{"model": "17", "x": [[...], ...]}`` (``x``: one item or a batch of rows;
  a JSON integer ``model`` is an index into the served models) answers
  ``{"model", "version", "y", "cached", "latency_ms"}``;
* ``GET /metrics``: ``Server.metrics()``; ``GET /health``: version, models, input shape.

Errors are JSON ``{"error": message}``: 400 body is not JSON or lacks ``model``/``x``, 401 missing or
wrong token, 404 unknown model, 413 body too large, 422 input not numeric, not finite or of the wrong
shape, 503 queue full (with ``Retry-After``) or server closed. A bad request never stops the server.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import socket
import threading
import time
from typing import TYPE_CHECKING

from ..errors import ServeError
from .errors import BadInputError, QueueFullError, ServerClosedError, UnknownModelError

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from .server import Server

#: Largest request body accepted (bytes).
MAX_BODY = 4 * 2**20
_STATUS = ((UnknownModelError, 404), (BadInputError, 422), (QueueFullError, 503), (ServerClosedError, 503))


def status_of(error: ServeError) -> int:
    """The HTTP status of a serving error."""
    return next((code for cls, code in _STATUS if isinstance(error, cls)), 400)


def _error(status: int, message: str, **headers: str) -> "JSONResponse":
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def _authorised(request: "Request", token: str) -> bool:
    given = request.query_params.get("token", "")
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() in ("bearer", "token"):
        given = value.strip()
    return hmac.compare_digest(given.encode(), token.encode())


async def _body(request: "Request") -> bytes | None:
    """The body, or None when it exceeds MAX_BODY (read no further than that)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(server: "Server", token: str) -> "Starlette":
    """The ASGI app answering for ``server``; every route checks ``token``."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def predict(request: "Request") -> JSONResponse:
        if not _authorised(request, token):
            return _error(401, "missing or wrong token (Authorization: Bearer <token>)")
        body = await _body(request)
        if body is None:
            return _error(413, f"request body larger than {MAX_BODY} bytes")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            return _error(400, f"body is not valid JSON: {e}")
        if not isinstance(payload, dict) or "model" not in payload or "x" not in payload:
            return _error(400, 'body must be a JSON object {"model": name, "x": numbers}')
        model = payload["model"]
        if isinstance(model, bool) or not isinstance(model, (str, int)):
            return _error(400, '"model" must be a model name (string) or index (integer)')
        try:
            prediction = await asyncio.wrap_future(server.submit(model, payload["x"]))
        except ServeError as e:
            extra = {"Retry-After": "1"} if isinstance(e, QueueFullError) else {}
            return _error(status_of(e), str(e), **extra)
        return JSONResponse({"model": prediction.model, "version": str(prediction.version),
                             "y": prediction.output.tolist(), "cached": prediction.cached,
                             "latency_ms": prediction.latency_s * 1e3})

    async def metrics(request: "Request") -> JSONResponse:
        if not _authorised(request, token):
            return _error(401, "missing or wrong token (Authorization: Bearer <token>)")
        return JSONResponse(server.metrics())

    async def health(request: "Request") -> JSONResponse:
        if not _authorised(request, token):
            return _error(401, "missing or wrong token (Authorization: Bearer <token>)")
        return JSONResponse({"status": "closed" if server.closed else "ok", "version": str(server.version),
                             "models": len(server.models), "input_shape": list(server.input_shape)})

    return Starlette(routes=[Route("/predict", predict, methods=["POST"]),
                             Route("/metrics", metrics, methods=["GET"]),
                             Route("/health", health, methods=["GET"])])


class HTTPEndpoint:
    """uvicorn serving ``build_app(server, token)`` on ``host:port`` (0: a free port) in a daemon
    thread; ``url`` and ``token`` say how to reach it, ``close()`` stops it."""

    def __init__(self, server: "Server", host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 start_timeout: float = 10.0) -> None:
        import uvicorn

        self.token = token or secrets.token_urlsafe(24)
        self.host = host
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise ServeError(f"cannot listen on {host}:{port}: {e}") from None
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(build_app(server, self.token), log_level="warning", access_log=False,
                                lifespan="off")
        self._uvicorn = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name=f"mm-serve http :{self.port}")
        self._thread.start()
        deadline = time.monotonic() + start_timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._uvicorn.should_exit = True
                raise ServeError(f"the HTTP endpoint on {host}:{self.port} did not start")
            time.sleep(0.01)
        self._sock = sock

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self, timeout: float = 5.0) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __repr__(self) -> str:
        return f"HTTPEndpoint({self.url}, token required)"
