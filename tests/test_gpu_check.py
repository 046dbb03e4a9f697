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


@pytest.mark.slow
def test_dry_run_on_the_cpu_runs_every_step(tmp_path: Path) -> None:
    done = run("--device", "cpu", "--dry-run", "--out", str(tmp_path), "--tests-k", "features")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "DRY RUN" in out and "--no-index --find-links" in out  # the install it would do: wheels, no index
    assert "torch>=2.4" in out and "transformers>=4.40" in out  # from pyproject.toml: dependencies + gpu extra
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


@pytest.mark.slow
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


def _wheel(folder: Path, name: str = "mm_gpu_dummy", version: str = "0.1") -> Path:
    """A minimal pure-Python wheel (one module), made by hand so the test needs no build tools."""
    import base64
    import hashlib
    import zipfile

    files = {f"{name}.py": b"VALUE = 42\n",
             f"{name}-{version}.dist-info/METADATA":
                 f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                  b"Tag: py3-none-any\n"}
    record = "".join(f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(b).digest()).rstrip(b'=').decode()},"
                     f"{len(b)}\n" for p, b in files.items()) + f"{name}-{version}.dist-info/RECORD,,\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, b in files.items():
            z.writestr(p, b)
        z.writestr(f"{name}-{version}.dist-info/RECORD", record)
    return path


@pytest.mark.slow
def test_missing_dependencies_install_from_the_wheel_folder_only(tmp_path: Path) -> None:
    """A Python without torch: the script makes a venv and installs from the folder of wheels, with no index
    (the requirement here is a one-module wheel); as torch is still missing it stops with a clear line."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels)
    req = tmp_path / "req.txt"
    req.write_text("mm_gpu_dummy\n")
    venv = tmp_path / "venv"
    env = {**os.environ, "PYTHON": str(bare / "bin" / "python"), "PYTHONPATH": str(ROOT),
           "MM_JUPYTER_GPU_VENV": str(venv), "MM_JUPYTER_GPU_REQUIREMENTS": str(req),
           "PIP_INDEX_URL": "http://127.0.0.1:9/none"}  # any attempt to use an index would fail loudly
    done = subprocess.run(["bash", str(SCRIPT), "--wheels", str(wheels), "--out", str(tmp_path / "out")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"installing from {wheels} (no index) into {venv}" in done.stdout
    assert "still misses a package the check needs" in done.stderr
    got = subprocess.run([str(venv / "bin" / "python"), "-c", "import mm_gpu_dummy; print(mm_gpu_dummy.VALUE)"],
                         capture_output=True, text=True, timeout=60)
    assert got.stdout.strip() == "42"  # installed from the folder


def test_no_wheel_folder_says_how_to_make_one(tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    env = {**os.environ, "PYTHON": str(bare / "bin" / "python"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["bash", str(SCRIPT), "--wheels", str(tmp_path / "none")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no wheel folder" in done.stderr and "pip download --dest wheels" in done.stderr
