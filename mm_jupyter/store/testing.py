"""Throwaway services for the tests and the benchmark: a real PostgreSQL server and an S3 endpoint.

* PostgreSQL from the Debian packages (``scripts/install.sh`` installs them): ``initdb`` + ``pg_ctl``
  in a fresh temporary folder, on a free port, listening on 127.0.0.1 and a socket in that folder.
  PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` user the package
  created (``runuser``). ``durable=False`` turns fsync off: faster, for tests that kill clients,
  never the server.
* S3 from moto's server mode (``moto[server]``) in a subprocess on a free port: an *emulator* of
  the S3 API (in memory), not S3 itself.

Nothing here is used by the store; it exists so tests and ``bench modelsets --store
postgresql+s3`` start the same services the same way.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import ServiceError as ServiceError

#: credentials moto accepts (any would do); set for this process and given to subprocesses
S3_ENV = {"AWS_ACCESS_KEY_ID": "mm-test", "AWS_SECRET_ACCESS_KEY": "mm-test", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def postgres_bin() -> Path:
    """The folder with ``initdb`` and ``pg_ctl``: on PATH, else Debian's newest /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not versions:
        raise ServiceError("PostgreSQL is not installed (no initdb): run scripts/install.sh, or "
                           "apt-get install postgresql")
    return Path(versions[-1]).parent


@dataclass
class PostgresServer:
    """A running server; ``database()`` creates a fresh database and returns its URL."""

    port: int
    socket_dir: Path
    user: str = "mm"
    _made: list[str] = field(default_factory=list)

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{db}"

    def database(self, name: str | None = None) -> str:
        import psycopg

        name = name or f"mm_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self._made.append(name)
        return self.url(name)


def _as_server_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextmanager
def postgres_server(durable: bool = True) -> Iterator[PostgresServer]:
    """initdb + pg_ctl in a temporary folder; stopped and removed on exit."""
    bindir = postgres_bin()
    folder = Path(tempfile.mkdtemp(prefix="mm-pg-"))
    data = folder / "data"
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    port = free_port()
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=200"
    if not durable:
        options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"

    def run(cmd: list[str]) -> None:
        subprocess.run(_as_server_user(cmd), check=True, capture_output=True, text=True, timeout=120)

    try:
        run([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "mm", "-E", "UTF8", "--no-sync"])
        run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-o", options, "-w", "start"])
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, FileNotFoundError) as e:
        log = (folder / "log").read_text() if (folder / "log").exists() else ""
        shutil.rmtree(folder, ignore_errors=True)
        detail = getattr(e, "stderr", "") or ""
        raise ServiceError(f"cannot start PostgreSQL from {bindir}: {e}\n{detail}\n{log}") from None
    try:
        yield PostgresServer(port, folder)
    finally:
        subprocess.run(_as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class S3Server:
    """A running moto server; ``bucket_url()`` names a fresh prefix in a fresh bucket."""

    endpoint: str

    def bucket_url(self, bucket: str | None = None, prefix: str = "store") -> str:
        bucket = bucket or f"mm-{uuid.uuid4().hex[:12]}"
        return f"s3://{bucket}/{prefix}?endpoint_url={self.endpoint}"


@contextmanager
def s3_server() -> Iterator[S3Server]:
    """moto's S3 emulator in a subprocess (its own interpreter: no GIL shared with the client).
    Sets moto's throwaway credentials in this process's environment when none are set. Its log
    (one line per request) goes to a temporary file: a pipe nobody reads would fill up and stop
    the server in the middle of a test."""
    for key, value in S3_ENV.items():
        os.environ.setdefault(key, value)
    port = free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    err = log.read().decode(errors="replace")
                    raise ServiceError(f"moto's S3 server did not start: {err[-2000:]}") from None
                time.sleep(0.1)
        yield S3Server(endpoint)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
