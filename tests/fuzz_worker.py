"""The store fuzzer's worker: recovers hostile stores in a process with a memory limit and reports
what happened. Run as ``python tests/fuzz_worker.py SCRATCH`` by tests/test_store_fuzz.py.

Each input line is a JSON object ``{"template": folder, "set": "name@version", "manifest": text,
"input": spec}``: the worker copies the template store to SCRATCH, makes ``manifest`` (JSON text,
possibly hostile) the manifest of that version — a new object, the catalog row and the ref point at
it, as someone writing a store by hand would — and then, without ``trust_code``, opens the store,
recovers the set, builds a model, reads its state dict, prints it, runs it on an input, verifies
the store and rebuilds its catalog. It answers one JSON line: the steps that raised something other
than an ``MMError``, and every side effect it saw — audit events (processes, network, writes or
deletions outside SCRATCH, code compiled from recorded source, imports of canary modules), the
sentinel file, and changes to global state (torch settings, environment, recursion limit).
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

MEMORY_LIMIT = 3 * 2**30
CANARIES = ("fuzz_canary", "this", "antigravity", "webbrowser", "matplotlib.pyplot", "code", "pdb", "smtplib",
            "ftplib", "http.server", "pty", "tkinter", "turtle", "idlelib")
_PROCESS = ("os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
            "os.kill", "os.killpg", "pty.spawn", "os.startfile", "ctypes.dlopen")
_NETWORK = ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.bind", "http.client.connect",
            "urllib.Request", "webbrowser.open")
_PATHS = ("os.remove", "os.rename", "os.rmdir", "shutil.rmtree", "os.truncate", "os.chmod", "os.symlink", "os.link",
          "shutil.copyfile", "shutil.move")


class Watch:
    """An audit hook that records side effects while ``active``."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = str(scratch.resolve())
        self.active = False
        self.events: list[str] = []
        sys.addaudithook(self.hook)

    def _outside(self, path: Any) -> bool:
        if isinstance(path, int):
            return False
        try:
            text = os.fsdecode(path)
        except TypeError:
            return True
        return not os.path.abspath(text).startswith(self.scratch)

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active:
            return
        if event.startswith(_PROCESS) or event.startswith(_NETWORK):
            self.events.append(f"{event} {str(args)[:200]}")
        elif event in _PATHS and args and self._outside(args[0]):
            self.events.append(f"{event} {str(args)[:200]}")
        elif event == "open" and len(args) >= 3:
            path, mode, flags = args[0], args[1], args[2]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writes and path is not None and self._outside(path):
                self.events.append(f"open for writing {str(path)[:200]}")
        elif event == "exec" and args and "recorded source" in getattr(args[0], "co_filename", ""):
            self.events.append(f"exec of recorded source {args[0].co_filename}")
        elif event == "import" and args and args[0] in CANARIES:
            self.events.append(f"import {args[0]}")


def global_state() -> dict[str, Any]:
    import torch

    hub = sys.modules.get("huggingface_hub.constants")
    return {"dtype": str(torch.get_default_dtype()), "threads": torch.get_num_threads(),
            "deterministic": torch.are_deterministic_algorithms_enabled(), "grad": torch.is_grad_enabled(),
            "recursion": sys.getrecursionlimit(), "environ": dict(os.environ),
            "hub_offline": getattr(hub, "HF_HUB_OFFLINE", None), "canaries": sorted(c for c in CANARIES
                                                                                if c in sys.modules)}


def make_input(spec: list[Any]) -> Any:
    import torch

    kind, shape = spec[0], tuple(spec[1])
    n = 1
    for d in shape:
        n *= d
    if kind == "int":
        return (torch.arange(n).reshape(shape) * 7 + 3) % (spec[2] - 1) + 1
    return torch.linspace(-2, 2, n).reshape(shape)


def run(msg: dict[str, Any], scratch: Path, watch: Watch, sentinel: Path) -> dict[str, Any]:
    import torch
    from hostile_models import install_manifest

    import mm_jupyter as mm

    raw: dict[str, str] = {}
    errors: dict[str, str] = {}

    def step(name: str, fn: Any, counts: bool = True) -> Any:
        try:
            return fn()
        except mm.MMError as e:
            errors[name] = f"{type(e).__name__}: {e}"[:400]
        except Exception as e:  # noqa: BLE001 - what the fuzzer looks for
            if counts:
                raw[name] = f"{type(e).__name__}: {e}"[:300] + "\n" + traceback.format_exc()[-1500:]
            else:
                errors[name] = f"{type(e).__name__}: {e}"[:300]
        return None

    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(msg["template"], scratch)
    install_manifest(scratch, msg["set"], msg["manifest"])
    before = global_state()
    watch.events.clear()
    watch.active = True
    try:
        store = step("open", lambda: mm.Store(scratch))
        if store is not None:
            ms = step("recover", lambda: store.recover_set(msg["set"]))
            if ms is not None:
                model = step("build", lambda: ms[0])
                step("state_dicts", lambda: ms.state_dicts())
                if model is not None:  # the model's own code on restored data: may fail, must not escape
                    step("state_dict", lambda: model.state_dict(), counts=False)
                    step("repr", lambda: repr(model), counts=False)

                    def forward() -> Any:
                        with torch.no_grad():
                            x = make_input(msg["input"])
                            return model(x)

                    step("forward", forward, counts=False)
                ms.close()
            step("verify", lambda: store.verify())
            store.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{scratch / 'catalog.sqlite'}{suffix}").unlink(missing_ok=True)
        step("rebuild", lambda: mm.Store.rebuild_catalog(scratch))
    finally:
        watch.active = False
    findings = list(watch.events)
    after = global_state()
    for key in before:
        if before[key] != after[key]:
            findings.append(f"global state {key} changed")
    if sentinel.exists():
        findings.append(f"sentinel written: {sentinel.read_text()[:100]}")
        sentinel.unlink()
    for name, text in errors.items():
        if "allocate memory" in text or "MemoryError" in text:
            findings.append(f"{name}: an allocation was attempted before its size was checked: {text[:200]}")
    return {"raw": raw, "findings": findings, "errors": errors}


def main() -> None:
    scratch = Path(sys.argv[1])
    sentinel = Path(os.environ["MM_FUZZ_SENTINEL"])
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    import hostile_models  # noqa: F401 - writes the hostile manifests (imports transformers first)
    import torch  # noqa: F401 - loaded before the hook watches anything
    import transformers  # noqa: F401 - and huggingface_hub with it (its offline switch is watched)
    import zoo_models  # noqa: F401 - the user's own modules, as a user recovering these sets has imported them
    import zoo_patterns  # noqa: F401

    import mm_jupyter as mm  # noqa: F401

    watch = Watch(scratch)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        msg = json.loads(line)
        print(json.dumps(run(msg, scratch, watch, sentinel)), flush=True)


if __name__ == "__main__":
    main()
