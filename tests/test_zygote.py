"""tests/zygote.py stands in for ``python -c``: the same output, status, paths and freshness."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import store_models as sm
import zygote

PROBE = r"""
import json, os, sys
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path": sys.path, "env": os.environ.get("MM_ZYGOTE_PROBE"),
                  "main": __name__, "project": sorted(m for m in sys.modules if m.startswith("mm_jupyter")),
                  "tests": sorted(m for m in sys.modules if m in ("store_models", "conftest", "test_zygote"))}))
"""


def both(code: str, *args: str) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    env = {**sm.subprocess_env(), "MM_ZYGOTE_PROBE": "x y"}
    real = subprocess.run([sys.executable, "-c", code, *args], cwd=sm.ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    forked = zygote.run(code, *args, cwd=sm.ROOT, env=env, timeout=120)
    return real, forked


@pytest.mark.skipif(not zygote.enabled(), reason="no fork server on this platform: real interpreters are used")
def test_a_fork_of_the_zygote_looks_like_python_dash_c_and_holds_nothing_of_the_tests() -> None:
    real, forked = both(PROBE, "a", "--b")
    assert real.returncode == forked.returncode == 0, forked.stderr
    a, b = json.loads(real.stdout), json.loads(forked.stdout)
    assert a == b  # argv, cwd, sys.path (PYTHONPATH first), environment, __main__
    assert b["argv"] == ["-c", "a", "--b"] and b["main"] == "__main__" and b["env"] == "x y"
    assert b["project"] == [] and b["tests"] == []  # fresh: nothing of the project or the tests imported
    assert "mm_jupyter" in sys.modules  # (while this process has it)


@pytest.mark.parametrize("code, status", [
    ("import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)", 3),
    ("raise ValueError('boom')", 1),
    ("import sys; sys.exit('a message')", 1),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", -9),
    ("import threading, time\nt = threading.Thread(target=lambda: (time.sleep(0.2), print('joined')))\nt.start()", 0),
    ("import atexit; atexit.register(lambda: print('at exit'))", 0),
])
def test_status_output_and_tracebacks_are_those_of_a_real_interpreter(code: str, status: int) -> None:
    real, forked = both(code)
    assert real.returncode == forked.returncode == status
    assert forked.stdout == real.stdout
    assert forked.stderr.splitlines()[-1:] == real.stderr.splitlines()[-1:]  # the exception / message line


def test_a_child_past_its_timeout_is_killed() -> None:
    with pytest.raises(subprocess.TimeoutExpired):
        zygote.run("import time; print('started', flush=True); time.sleep(60)", cwd=sm.ROOT, env=sm.subprocess_env(),
                   timeout=3)


def test_run_python_recovers_in_the_zygote(tmp_path) -> None:
    import torch

    import mm_jupyter as mm

    store = mm.Store(tmp_path / "s")
    models = {str(i): torch.nn.Linear(3, 2) for i in range(3)}
    store.save_set(models, "m")
    store.close()
    report = sm.fresh_report(tmp_path / "s", ["m"])
    assert report["m"]["by_name"] == [sm.sd_digests(m.state_dict()) for m in models.values()]


def test_a_started_child_streams_its_output_and_can_be_killed() -> None:
    code = "import sys, time\nsys.stdout.write('ready\\nlater\\n')\nsys.stdout.flush()\ntime.sleep(60)"
    child = zygote.start(code, cwd=sm.ROOT, env=sm.subprocess_env())
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    child.kill()
    assert child.wait(timeout=30) == -9
    assert child.stdout.read() == "later\n"  # written before the kill (maybe already in the reader's buffer): kept


def test_started_children_run_at_once_and_report_like_popen() -> None:
    code = ("import sys\nprint(sys.argv[1] * 70000)\nprint('err', sys.argv[1], file=sys.stderr)\n"
            "sys.exit(int(sys.argv[2]))")
    children = [zygote.start(code, str(k), str(k), cwd=sm.ROOT, env=sm.subprocess_env()) for k in range(3)]
    for k, child in enumerate(children):
        out, err = child.communicate(timeout=60)  # 70 kB: more than a pipe holds, read while the child writes
        assert (out, err, child.returncode) == (str(k) * 70000 + "\n", f"err {k}\n", k)


def test_communicate_past_its_timeout_raises_as_popen_does() -> None:
    child = zygote.start("import time; time.sleep(60)", cwd=sm.ROOT, env=sm.subprocess_env())
    with pytest.raises(subprocess.TimeoutExpired):
        child.communicate(timeout=2)
    child.kill()
    assert child.wait(timeout=30) == -9
