"""``bench modelsets --store postgresql+s3``: the same model sets saved into a local store and into a
team store (PostgreSQL catalog + S3 objects), side by side in one run.

The services are the ones the tests start (``store/testing.py``): a throwaway PostgreSQL server from
the Debian packages and moto's S3 *emulator* on localhost, so the S3 numbers show the client's
request pattern and the store's overhead over a local network, not the latency or bandwidth of a
real object store. Per approach and step: TTS, TTR (``recover_set(ref).load()``, median of
``repeat``) and what recovering ONE model in a fresh process-like store handle reads: bytes fetched
from S3 (ranged GETs) and bytes verified, against the bytes of the whole set.
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .modelsets import _recover, _silent, _timed, save_kwargs

if TYPE_CHECKING:
    from .modelsets import Workload

#: approaches compared on both stores: mmlib-base writes three objects per model (15,000 requests
#: for 5,000 models) and provenance retrains on recovery; neither says more about the backends
TEAM_APPROACHES = ("baseline", "update")
TEAM_STORES = ("local", "postgresql+s3")


def run_store(label: str, path: str, objects: str | None, approach: str, workload: "Workload", repeat: int,
              say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every step of ``workload`` saved with ``approach`` into the (empty) store at ``path``."""
    from ..store import Store

    store = Store(path, objects=objects)
    rows = []
    try:
        for step in workload.steps:
            kwargs = save_kwargs(approach, step)
            tts, ref = _timed(lambda: store.save_set(step.models, workload.arch, **kwargs))
            ttrs = []
            for _ in range(max(1, repeat)):
                took, ms = _timed(lambda: _recover(store, ref))
                ms.close()
                ttrs.append(took)
            fresh = Store(path, objects=objects)  # a new handle: no cached manifest or chunk
            try:
                one = fresh.recover_set(ref)
                before_f, before_v = fresh.objects.bytes_fetched, fresh.objects.bytes_verified
                one.state_dict(len(one) // 2)
                fetched = fresh.objects.bytes_fetched - before_f
                verified = fresh.objects.bytes_verified - before_v
                one.close()
            finally:
                fresh.close()
            stats = store.stats(ref)
            rows.append({"store": label, "approach": approach, "stored_as": stats["approach"], "step": step.index,
                         "models": workload.n, "bytes": int(stats["bytes"]), "tts_s": tts,
                         "ttr_s": statistics.median(ttrs), "one_model_fetched": fetched,
                         "one_model_verified": verified})
            say(f"{label:>14} {approach:>9} step {step.index}: TTS {tts:.3f} s  TTR {rows[-1]['ttr_s']:.3f} s  "
                f"one model: {fetched:,} B fetched, {verified:,} B verified")
    finally:
        store.close()
    return rows


def add_team_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per team row: its TTS and TTR over the local store's for the same approach and step."""
    local = {(r["approach"], r["step"]): r for r in rows if r["store"] == "local"}
    for r in rows:
        base = local.get((r["approach"], r["step"]))
        r["tts_vs_local"] = r["tts_s"] / base["tts_s"] if base and base["tts_s"] else None
        r["ttr_vs_local"] = r["ttr_s"] / base["ttr_s"] if base and base["ttr_s"] else None
    return rows


def run_team(workload: "Workload", approaches: Sequence[str] = TEAM_APPROACHES, repeat: int = 1,
             progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The workload on a local folder store and on PostgreSQL + S3 (services started here)."""
    from ..store import testing

    say = progress or _silent
    rows: list[dict[str, Any]] = []
    folder = Path(tempfile.mkdtemp(prefix="mm-bench-team-"))
    try:
        with testing.postgres_server() as pg, testing.s3_server() as s3:
            for approach in approaches:
                rows += run_store("local", str(folder / approach), None, approach, workload, repeat, say)
                rows += run_store("postgresql+s3", pg.database(), s3.bucket_url(), approach, workload, repeat, say)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return add_team_ratios(rows)
