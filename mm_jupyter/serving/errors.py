"""What a serving request can fail with: every one a ``ServeError`` (``mm_jupyter.errors``), so one
``except mm.ServeError`` catches them all; the subclasses let the HTTP layer pick a status code."""
from __future__ import annotations

from ..errors import ServeError


class BadInputError(ServeError):
    """The input is not numeric, not finite, or does not have the model's input shape."""


class UnknownModelError(ServeError):
    """The served version has no model of that name."""


class QueueFullError(ServeError):
    """Back-pressure: the request queue is full, the request was rejected (never dropped silently)."""


class ServerClosedError(ServeError):
    """The server was closed before the request could be answered."""


__all__ = ["BadInputError", "QueueFullError", "ServeError", "ServerClosedError", "UnknownModelError"]
