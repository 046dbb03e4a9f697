"""Fresh interpreters for the tests without paying ``import torch`` (~2 s of CPU) each time.

A test that proves something "in a fresh process" (bit-exact recovery, nothing run without trust)
needs an interpreter that holds nothing of the test's process: not the project, not the test's
classes, not a cache. A fork of a *zygote* — an interpreter started fresh that imported torch, numpy
and safetensors and nothing of this project — is such a process, and starts in milliseconds.
The zygote is multiprocessing's fork server (a fresh interpreter, preloading those modules); each
run forks a child that sets up what ``python -c CODE ARGS`` would have (``__main__``, ``sys.argv``,
``sys.path`` from ``PYTHONPATH``, the environment, the working directory, stdout/stderr to files)
and refuses to run if any module of the project or of the tests is already imported.
``MM_TEST_NO_ZYGOTE=1`` runs real ``subprocess`` interpreters instead (same results, slower).
"""
from __future__ import annotations

import builtins
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from pathlib import Path
from typing import Any

PRELOAD = ["torch", "numpy", "safetensors", "safetensors.torch"]  # never the project: children import it
FORBIDDEN = ("mm_jupyter", "store_models", "hostile_models", "conftest")  # nothing of the project or the tests

_lock = threading.Lock()
_ctx: Any = None
_default_path: list[str] | None = None


def enabled() -> bool:
    return os.environ.get("MM_TEST_NO_ZYGOTE") != "1" and "forkserver" in multiprocessing.get_all_start_methods()


def _context() -> tuple[Any, list[str]]:
    """The fork server's context and the ``sys.path`` a plain ``python -c`` has without PYTHONPATH."""
    global _ctx, _default_path
    with _lock:
        if _ctx is None:
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            probe = subprocess.run([sys.executable, "-c", "import sys, json; print(json.dumps(sys.path[1:]))"],
                                   env=env, capture_output=True, text=True, check=True, cwd="/")
            _default_path = json.loads(probe.stdout)
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(PRELOAD)
            _ctx = ctx
        assert _default_path is not None
        return _ctx, _default_path


class _Fd:
    """A file descriptor handed to the child through the fork server (pickled as multiprocessing's
    DupFd while a process starts; an int in the child)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, tuple[Any]]:
        from multiprocessing import reduction

        return (_detach, (reduction.DupFd(self.fd),))


def _detach(dup: Any) -> int:
    return int(dup.detach())


def _child(code: str, args: list[str], cwd: str, env: dict[str, str], out: str | int, err: str | int,
           default_path: list[str]) -> None:
    """Runs in the forked child: become ``python -c code *args`` writing to ``out``/``err`` (a file
    path or an inherited pipe), then exit with its status."""
    for fd, where in ((1, out), (2, err)):
        f = where if isinstance(where, int) else os.open(where, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False, buffering=1)
    rc = 1
    try:
        stale = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
        if stale:
            raise RuntimeError(f"the zygote is not fresh: it imported {stale}")
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        # once each, as site's removeduppaths leaves it (PYTHONPATH may name tests/ or the root again)
        extra = list(dict.fromkeys(os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p))
        sys.path[:] = ["", *extra, *(p for p in default_path if p not in extra)]  # as site skips known .pth paths
        sys.argv[:] = ["-c", *args]
        main = types.ModuleType("__main__")
        main.__dict__["__builtins__"] = builtins
        sys.modules["__main__"] = main
        try:
            exec(compile(code, "<string>", "exec"), main.__dict__)
            rc = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                rc = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                rc = 1
        threading._shutdown()  # type: ignore[attr-defined]  # as interpreter exit: join non-daemon threads
        import atexit

        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001 - reported as python -c reports it: traceback on stderr, status 1
        traceback.print_exc()
        rc = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed stream: nothing more to write
                pass
        os._exit(rc)


def run(code: str, *args: str, cwd: str | os.PathLike[str], env: dict[str, str],
        timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """What ``subprocess.run([python, "-c", code, *args], cwd=cwd, env=env, capture_output=True,
    text=True, timeout=timeout)`` returns, run in a fork of the zygote."""
    argv = [sys.executable, "-c", code, *args]
    if not enabled():
        return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    ctx, default_path = _context()
    with tempfile.TemporaryDirectory(prefix="mm_zygote_") as tmp:
        out, err = str(Path(tmp) / "out"), str(Path(tmp) / "err")
        proc = ctx.Process(target=_child, args=(code, list(args), str(cwd), dict(env), out, err, default_path))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(argv, timeout or 0, _read(out), _read(err))
        return subprocess.CompletedProcess(argv, proc.exitcode, _read(out), _read(err))


class Child:
    """The part of ``subprocess.Popen`` (text pipes for stdout and stderr) the tests use, for a fork
    of the zygote."""

    def __init__(self, proc: Any, args: list[str], out: int, err: int) -> None:
        self._proc = proc
        self.args = args
        self.pid: int = proc.pid
        self.stdout = open(out, encoding="utf-8", errors="backslashreplace")
        self.stderr = open(err, encoding="utf-8", errors="backslashreplace")
        self.returncode: int | None = None

    def poll(self) -> int | None:
        self.returncode = self._proc.exitcode
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        self._proc.kill()

    def terminate(self) -> None:
        self._proc.terminate()

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Both outputs to their end (read side by side, so a full pipe cannot block the child), then the status."""
        got: dict[str, str] = {}
        readers = [threading.Thread(target=lambda k=k, f=f: got.__setitem__(k, f.read()), daemon=True)
                   for k, f in (("out", self.stdout), ("err", self.stderr))]
        deadline = None if timeout is None else time.monotonic() + timeout
        for r in readers:
            r.start()
        for r in readers:
            r.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if any(r.is_alive() for r in readers):  # the child still writes (or hangs): as Popen, a timeout
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return got["out"], got["err"]


def start(code: str, *args: str, cwd: str | os.PathLike[str], env: dict[str, str]) -> "Child | subprocess.Popen[str]":
    """What ``subprocess.Popen([python, "-c", code, *args], cwd=cwd, env=env, stdout=PIPE,
    stderr=PIPE, text=True)`` starts, as a fork of the zygote."""
    argv = [sys.executable, "-c", code, *args]
    if not enabled():
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ctx, default_path = _context()
    (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe()
    try:
        proc = ctx.Process(target=_child, args=(code, list(args), str(cwd), dict(env), _Fd(out_w), _Fd(err_w),
                                                default_path))
        proc.start()
    except BaseException:
        for fd in (out_r, err_r):
            os.close(fd)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
    return Child(proc, argv, out_r, err_r)


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="backslashreplace")
    except FileNotFoundError:
        return ""
