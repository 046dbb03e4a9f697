"""Models and helpers for the hostile-store tests (importable by their fresh processes)."""
from __future__ import annotations

import copy
import json
import sqlite3
from pathlib import Path
from typing import Any, Callable

from torch import nn
from transformers import BertConfig, PreTrainedModel

import mm_jupyter as mm


class HFHubProbe(PreTrainedModel):
    """A Hugging Face model that notes whether the hub was offline while it was built."""

    config_class = BertConfig

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        import huggingface_hub.constants as hub

        self.offline_when_built = hub.is_offline_mode()
        self.fc = nn.Linear(2, 2)
        self.post_init()


def forged(store: mm.Store, name: str, arch: mm.Architecture, models: list[nn.Module] | None = None) -> mm.SetRef:
    """Save ``models`` under architecture record ``arch`` without the save-time check (an attacker
    writes whatever record they like)."""
    from mm_jupyter.store import store as store_module

    real = store_module._probe
    store_module._probe = lambda *a: (None, None)  # the save-time rebuild check
    try:
        return store.save_set(models or [nn.Identity()], name, architecture=arch)
    finally:
        store_module._probe = real


def rewrite_manifest(root: Path, ref: str, edit: Callable[[dict[str, Any]], Any] | None = None,
                     text: str | None = None) -> str:
    """Replace the manifest of version ``ref`` of the store at ``root``: ``edit`` changes a copy of
    it (returning nothing, or a JSON text to store verbatim), or ``text`` is stored as it is. The
    catalog row and the ref follow, as a store written by hand would have them."""
    store = mm.Store(root)
    try:
        doc = copy.deepcopy(store.catalog.manifest(store.row(ref).manifest_oid))
    finally:
        store.close()
    if text is None:
        assert edit is not None
        out = edit(doc)
        text = out if isinstance(out, str) else json.dumps(doc, separators=(",", ":"), sort_keys=True)
    return install_manifest(root, ref, text)


def install_manifest(root: Path, ref: str, text: str) -> str:
    """Store ``text`` as a manifest object and point version ``ref``'s catalog row and ref at it."""
    from mm_jupyter.store import manifest as manifests, refs
    from mm_jupyter.store.objects import FolderObjects

    name, version = ref.split("@")
    oid = FolderObjects(root).put(manifests.MAGIC + text.encode()).oid
    db = sqlite3.connect(root / "catalog.sqlite")
    try:
        db.execute("UPDATE sets SET manifest=? WHERE name=? AND version=?", (oid, name, int(version)))
        db.commit()
    finally:
        db.close()
    refs.write(root, "sets", name, int(version), oid)
    return oid


def identity_record(attrs: list[list[Any]], classes: list[str] | None = None) -> dict[str, Any]:
    """A structural record of one parameter-free module with attributes ``attrs``."""
    return {"classes": classes or ["torch.nn.modules.linear:Identity"], "source": None,
            "root": {"c": 0, "t": False, "p": [], "b": [], "m": [], "a": attrs}}


RECOVER = r"""
import json, os, sys
import mm_jupyter as mm
out = {}
for key, root, name in json.loads(sys.argv[1]):
    try:
        store = mm.Store(root)
        ms = store.recover_set(name)
        m = ms[0]
        out[key] = {"ok": type(m).__name__}
    except mm.MMError as e:
        out[key] = {"error": f"{type(e).__name__}: {e}"}
    except BaseException as e:  # what must never happen
        out[key] = {"raw": f"{type(e).__name__}: {e}"}
out["_modules"] = sorted(m for m in ("matplotlib.pyplot", "fuzz_canary", "this", "antigravity") if m in sys.modules)
print(json.dumps(out))
"""


def recover_fresh(root: Path, names: list[str], sentinel: Path, setup: str = "") -> dict[str, Any]:
    """Recover ``names`` from the store at ``root`` in a fresh, untrusting process (``setup``: code
    it runs first, e.g. imports the user would have made)."""
    return recover_fresh_many({name: (root, name) for name in names}, sentinel, setup)


def recover_fresh_many(cases: dict[str, tuple[Path, str]], sentinel: Path, setup: str = "") -> dict[str, Any]:
    """Recover each case's (store, set name) in one fresh, untrusting process, one after another: a
    process start per case would cost seconds each, and every case must fail on its own anyway."""
    import store_models as sm

    env_code = f"import os\nos.environ['MM_FUZZ_SENTINEL'] = {str(sentinel)!r}\n{setup}\n"
    spec = json.dumps([[key, str(root), name] for key, (root, name) in cases.items()])
    proc = sm.run_python(env_code + RECOVER, spec, timeout=600)
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out
