"""What a serving request can fail with: every one a ``ServeError``, so one ``except mm.ServeError``
catches them all; the subclasses let the HTTP layer pick a status code. The classes live in
``mm_jupyter.errors``; this module keeps their old import path."""
from __future__ import annotations

from ..errors import BadInputError, QueueFullError, ServeError, ServerClosedError, UnknownModelError

__all__ = ["BadInputError", "QueueFullError", "ServeError", "ServerClosedError", "UnknownModelError"]
