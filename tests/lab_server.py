"""A Jupyter server (``jupyter server`` or ``jupyter lab``) for tests: free port, token, waits until
it answers, stops it afterwards. Shared by the server-extension and browser tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TOKEN = "mm-test-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def jupyter(app: str, root: Path, log: Path, args: tuple[str, ...] = (), env: dict[str, str] | None = None,
            base_url: str = "/", timeout: float = 180, store: str | None = None) -> Iterator[str]:
    """Run ``python -m jupyter APP`` serving ``root``; yields its URL (with ``base_url``, no trailing
    slash) once ``/api/status`` answers. ``$MM_JUPYTER_STORE`` is not passed on (``store``: the
    server's own configured store instead)."""
    env = {k: v for k, v in (env or os.environ).items() if k != "MM_JUPYTER_STORE"}
    if store is not None:
        env["MM_JUPYTER_STORE"] = store
    port = free_port()
    url = f"http://127.0.0.1:{port}{base_url.rstrip('/')}"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter", app, f"--ServerApp.root_dir={root}", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={port}", "--ServerApp.port_retries=0", "--ServerApp.open_browser=False",
             f"--IdentityProvider.token={TOKEN}", f"--ServerApp.base_url={base_url}", "--allow-root", *args],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=root,
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                assert proc.poll() is None, log.read_text()
                try:
                    with urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=5) as resp:
                        if resp.status == 200:
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)  # the start-up poll's interval, not a wait for an outcome
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
