"""Store locations as users write them: a folder or a database URL, and how one is shown.

A leaf module, so that every backend can name a location in its messages without importing the
module that opens backends (``backends.py``).
"""
from __future__ import annotations

import os
import re
import urllib.parse

#: a location that starts with a URL scheme (``postgresql://``, ``s3://``, ``file://``)
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_database(location: object) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def display(location: str | os.PathLike[str]) -> str:
    """A store location for messages, logs and responses: a URL's password masked (a folder as it is)."""
    text = os.fspath(location)
    if not URL_SCHEME.match(text):
        return text
    try:
        parts = urllib.parse.urlsplit(text)
        password = parts.password
    except ValueError:  # not parseable: show no part of what follows the scheme's user info
        return text.split("://", 1)[0] + "://***"
    if password is None:
        return text
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


__all__ = ["URL_SCHEME", "display", "is_database"]
