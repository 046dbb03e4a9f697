"""scripts/gpu_check.sh, run as on a lent GPU but on the CPU at a tiny size (``--device cpu --dry-run``): it
finds its dependencies (or says how it would install them from a folder of wheels, never from the network),
runs the device tests, Fig. 10 with all three approaches, and writes the results file the report reads.
(tests/test_gpu.py itself runs in this suite; here the script runs one of them, to prove the step.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mm_jupyter.bench import reproduction as R

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run_on_the_cpu_runs_every_step(tmp_path: Path) -> None:
    done = run("--device", "cpu", "--dry-run", "--out", str(tmp_path), "--tests-k", "features")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "DRY RUN" in out and "--no-index --find-links" in out  # the install it would do: wheels, no index
    assert "torch>=2.1" in out and "transformers>=4.40" in out  # from pyproject.toml: dependencies + gpu extra
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["experiment"] == "gpu_check" and doc["dry_run"] is True and doc["ok"] is True
    assert doc["environment"]["device"] == "cpu"
    assert doc["tests"]["rc"] == 0 and doc["tests"]["counts"].get("passed") == 1
    assert "transfer" not in doc  # a CPU has nothing to transfer to
    rows = {r["approach"]: r for r in doc["fig10"]["rows"]}
    assert set(rows) == {"base", "shift", "alsatian"} and rows["alsatian"]["ranking_matches_shift"] is True
    search = json.loads(Path(doc["fig10"]["file"]).read_text())
    assert search["experiment"] == "search" and search["config"]["device_used"] == "cpu"
    # the report reads what the check wrote: the Fig. 10 claims now have a measurement (at this tiny size)
    rows_r = {r.claim.id: r for r in R.evaluate(R.Results.read(tmp_path))}
    assert rows_r["alsatian.fig10.toplayers_shift"].ours is not None
    assert rows_r["alsatian.sec41.transfer"].status == R.NOT_RUN


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check would run")
    done = run("--device", "cuda", "--out", str(tmp_path), timeout=120)
    assert done.returncode != 0
    assert "error: device 'cuda' asked for, but torch" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def test_unknown_options_are_refused() -> None:
    done = run("--fast", timeout=30)
    assert done.returncode == 2 and "unknown option --fast" in done.stderr
