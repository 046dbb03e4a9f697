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

Errors are JSON ``{"error": message}``: 400 body is not JSON, nested deeper than ``MAX_JSON_DEPTH`` or
lacks ``model``/``x``, 401 missing or wrong token, 404 unknown model, 408 body not received within
``body_timeout_s``, 413 body too large, 422 input not numeric, not finite or of the wrong shape, 500 an
unexpected failure (one log line, no traceback in the answer), 503 queue full (with ``Retry-After``),
server closed or too many connections. A bad request never stops the server.

Slow or idle clients cannot starve it: a connection must deliver its request headers within
``header_timeout_s`` of opening (or of its previous answer: keep-alive), its body within
``body_timeout_s``, and at most ``max_connections`` are open at once — beyond that a new connection is
closed at once (uvicorn's ``limit_concurrency`` answers 503 to requests over the limit as well). Header
size is bounded by h11 (``h11_max_incomplete_event_size``). A client that disconnects before its answer
is logged in one line (logger ``mm_jupyter.serving``).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import socket
import threading
import time
from typing import TYPE_CHECKING

from ..errors import BadInputError, QueueFullError, ServeError, ServerClosedError, UnknownModelError
from ..store.limits import depth

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from .types import Answering

#: Largest request body accepted (bytes).
MAX_BODY = 4 * 2**20
#: Deepest JSON nesting of a request (a batch of N-d inputs is a few levels deep).
MAX_JSON_DEPTH = 32
#: Connections open at once, seconds to deliver the request headers and the body (defaults).
MAX_CONNECTIONS = 256
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
#: Largest request line + headers (bytes), enforced by h11.
MAX_HEADER_BYTES = 16 * 1024
log = logging.getLogger("mm_jupyter.serving")
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


def _client_name(request: "Request") -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else "a client"


def parse_json(body: bytes) -> tuple[object, str | None]:
    """(payload, None), or (None, why) when the body is not JSON or nests deeper than MAX_JSON_DEPTH."""

    try:
        payload = json.loads(body)
    except RecursionError:
        return None, f"body nests deeper than {MAX_JSON_DEPTH} levels"
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"body is not valid JSON: {e}"
    if depth(payload, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        return None, f"body nests deeper than {MAX_JSON_DEPTH} levels"
    return payload, None


def build_app(server: "Answering", token: str, body_timeout_s: float = BODY_TIMEOUT_S) -> "Starlette":
    """The ASGI app answering for ``server``; every route checks ``token``."""
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def predict(request: "Request") -> JSONResponse:
        if not _authorised(request, token):
            return _error(401, "missing or wrong token (Authorization: Bearer <token>)")
        try:
            body = await asyncio.wait_for(_body(request), body_timeout_s)
        except asyncio.TimeoutError:
            return _error(408, f"request body not received within {body_timeout_s:g} s", Connection="close")
        except ClientDisconnect:
            log.info("mm_jupyter serving: %s disconnected while sending its request", _client_name(request))
            return _error(400, "client disconnected")
        if body is None:
            return _error(413, f"request body larger than {MAX_BODY} bytes")
        payload, why = parse_json(body)
        if why is not None:
            return _error(400, why)
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
        if await request.is_disconnected():
            log.info("mm_jupyter serving: %s disconnected before its answer (model %r)", _client_name(request), model)
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

    async def failed(request: "Request", error: Exception) -> JSONResponse:
        log.error("mm_jupyter serving: %s %s failed: %s: %s", request.method, request.url.path,
                  type(error).__name__, error)
        return _error(500, f"internal error ({type(error).__name__}); the server keeps serving")

    return Starlette(routes=[Route("/predict", predict, methods=["POST"]),
                             Route("/metrics", metrics, methods=["GET"]),
                             Route("/health", health, methods=["GET"])],
                     exception_handlers={Exception: failed})


def guarded_protocol(max_connections: int, header_timeout_s: float) -> type:
    """uvicorn's h11 protocol with a connection limit and a deadline for each request's headers
    (uvicorn has neither: its keep-alive timer starts only after a first answer and any byte stops it)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Guarded(H11Protocol):
        _deadline: "asyncio.TimerHandle | None" = None

        def connection_made(self, transport: "asyncio.Transport") -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("mm_jupyter serving: %d connections open; closing a new one from %s",
                            len(self.connections) - 1, self.client)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.info("mm_jupyter serving: %s sent no complete request within %g s; closed", self.client,
                         header_timeout_s)
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()  # the headers are in: the body has its own deadline (in the app)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # keep-alive: the next request's headers have a deadline too

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return Guarded


class HTTPEndpoint:
    """uvicorn serving ``build_app(server, token)`` on ``host:port`` (0: a free port) in a daemon
    thread; ``url`` and ``token`` say how to reach it, ``close()`` stops it."""

    def __init__(self, server: "Answering", host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 start_timeout: float = 10.0, *, max_connections: int = MAX_CONNECTIONS,
                 header_timeout_s: float = HEADER_TIMEOUT_S, body_timeout_s: float = BODY_TIMEOUT_S) -> None:
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
        config = uvicorn.Config(build_app(server, self.token, body_timeout_s), log_level="warning", access_log=False,
                                lifespan="off", http=guarded_protocol(max_connections, header_timeout_s),
                                limit_concurrency=max_connections + 1, timeout_keep_alive=int(max(1, header_timeout_s)),
                                h11_max_incomplete_event_size=MAX_HEADER_BYTES)
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
