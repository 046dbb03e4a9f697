"""The GPU check (``scripts/gpu_check.sh`` -> ``python -m mm_jupyter.bench gpu``): the CUDA tests, Sec. 4.1's
transfer-vs-recompute measurement and Fig. 10 (ResNet-18, top-layers, 2,000 items, 224 px, all three
approaches) on the device, written to one results file (``gpu_check.json``) that the report reads.

``--dry-run`` runs the same steps at a tiny size (4 candidates, 128 items, reduced widths), so the path is
tested on any machine (``--device cpu --dry-run`` in the tests); the transfer measurement needs a device
and is skipped on the CPU.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

from ..errors import BenchError
from .results import ROOT, save

REPO = ROOT.parent
DEFAULT_OUT = Path("bench_results") / "gpu"


class Size(NamedTuple):
    models: int
    items: int
    reduced: bool
    repeat: int
    image_size: int | None  # None: the architecture's own (224 px for ResNet-18)


#: Fig. 10 on the device: the paper's setting (ResNet-18 at full width and 224 px), and the dry run's tiny one
FIG10 = {"paper": Size(35, 2000, False, 2, None), "dry": Size(4, 128, True, 1, 32)}
Progress = Callable[[str], None]


def requirements() -> list[str]:
    """What the check needs installed: the package's dependencies and its ``gpu`` extra (pyproject.toml)."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10 without tomli: the two arrays are plain lists of strings
        def array(name: str) -> list[str]:
            found = re.search(rf"^{name} = \[(.*?)\]", text, re.S | re.M)
            return re.findall(r'"([^"]+)"', found.group(1)) if found else []
        return array("dependencies") + array("gpu")
    project = tomllib.loads(text)["project"]
    return list(project["dependencies"]) + list(project["optional-dependencies"]["gpu"])


def environment(device: str) -> dict[str, Any]:
    """The search benchmark's environment record (``device`` usable), with the CUDA build and the device's
    name."""
    import platform

    import torch

    from .search import environment as search_environment

    base = search_environment(device)
    return {**base, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "device": device,
            "device_name": base["gpu"] or platform.processor() or "CPU"}


def run_tests(device: str, select: str | None = None, timeout: float = 240) -> dict[str, Any]:
    """tests/test_gpu.py on ``device`` in a subprocess (only the tests matching ``select``, a pytest ``-k``
    expression, when given): its exit status, counts and the output's tail."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_gpu.py")]
    cmd += ["-k", select] if select else []
    env = {**os.environ, "MM_JUPYTER_TEST_DEVICE": device, "PYTHONPATH": str(REPO)}
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        partial = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc, out = 124, f"timed out after {timeout:.0f} s\n{partial}"
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|error|errors|skipped)", out)}
    return {"rc": rc, "counts": counts, "seconds": time.perf_counter() - t0, "tail": out[-3000:]}


def transfer_vs_block(device: str, paper: bool, repeats: int = 20) -> dict[str, Any]:
    """Sec. 4.1: running one ViT-L/32 encoder block on a batch of 32 vs moving that block's input batch from
    host memory to the device (median ms of ``repeats``, after a warm-up)."""
    import statistics

    import torch

    from ..modelsearch.splitting import split_model
    from .alsatian import table1_model

    model, x = table1_model("ViT-L/32", "paper" if paper else "quick")
    split = split_model(model)
    h = x[:1].repeat(32, *([1] * (x.dim() - 1)))
    with torch.inference_mode():  # the embeddings' output: the input of the first encoder block
        h = split.blocks[0](h, {})
    layer = split.blocks[1]
    layer.module.to(device)
    host, dev_in = h.contiguous(), h.to(device)

    def timed(fn: Callable[[], Any]) -> float:
        fn()
        torch.cuda.synchronize()
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            runs.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(runs)

    with torch.inference_mode():
        block_ms = timed(lambda: layer(dev_in, {}))
        transfer_ms = timed(lambda: host.to(device))
    layer.module.to("cpu")
    return {"block_ms": block_ms, "transfer_ms": transfer_ms,
            "what": f"ViT-L/32{'' if paper else ' (reduced)'} encoder block, batch of 32, {host.numel() * 4:,} B"}


def run_gpu_check(device: str = "cuda", *, dry_run: bool = False, out: str | os.PathLike[str] = DEFAULT_OUT,
                  tests: bool = True, select: str | None = None,
                  progress: Progress = lambda m: None) -> dict[str, Any]:
    """Every step of the check; returns the results document (also written to ``out/gpu_check.json``)."""
    import torch

    from .search import run_search_bench

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"device {device!r} asked for, but torch {torch.__version__} sees no CUDA device "
                         f"(built for CUDA {torch.version.cuda}); install a CUDA build of torch")
    env = environment(device)
    doc: dict[str, Any] = {"experiment": "gpu_check", "dry_run": dry_run, "environment": env,
                           "device_name": env["device_name"], "seconds": {}}
    progress(f"environment: {doc['environment']}")
    if tests:
        t = run_tests(device, select)
        doc["tests"] = t
        progress(f"tests/test_gpu.py on {device}: rc {t['rc']}, {t['counts']} in {t['seconds']:.0f} s")
    if device.startswith("cuda"):
        t0 = time.perf_counter()
        doc["transfer"] = transfer_vs_block(device, paper=not dry_run)
        doc["seconds"]["transfer"] = time.perf_counter() - t0
        progress(f"transfer vs block: {doc['transfer']}")
    size = FIG10["dry" if dry_run else "paper"]
    t0 = time.perf_counter()
    bench = run_search_bench(arch="resnet18", models=size.models, distribution="top-layers", items=size.items,
                             reduced=size.reduced, image_size=size.image_size, device=device, repeat=size.repeat,
                             threads=None, out=Path(out), progress=progress)
    doc["seconds"]["fig10"] = time.perf_counter() - t0
    doc["fig10"] = {"file": bench.files[0], "config": bench.config,
                    "rows": [{k: r.get(k) for k in ("approach", "seconds", "vs_base", "vs_shift", "t_inference",
                                                   "t_prepare model", "block_inferences", "ranking_matches_shift")}
                             for r in bench.rows]}
    doc["ok"] = (doc.get("tests", {}).get("rc", 0) == 0 and (not tests or doc["tests"]["counts"].get("passed", 0) > 0)
                 and all(r.get("ranking_matches_shift", True) for r in bench.rows))
    save(Path(out) / "gpu_check.json", doc, {"device": device, "dry_run": dry_run})
    return doc
