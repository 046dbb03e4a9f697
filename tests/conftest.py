"""Shared fixtures and the suite's scheduling (generic: other suites add theirs here).

Markers (registered in pyproject.toml) say what a test needs beyond the package: ``services`` (a throwaway
PostgreSQL, S3 emulator, Jupyter server or Ray cluster), ``notebook`` (it runs a notebook on a kernel;
nbval's cells get it here), ``browser`` (Chromium), ``bench`` (a paper benchmark at its quick size) and
``slow`` (a long unit test). ``make test-fast`` runs what has none of them; ``make test`` runs everything.

``make test`` distributes with ``--dist loadgroup``: a test is a unit of its own unless it carries
``xdist_group`` — a notebook's cells (one kernel, in order), a module whose expensive module-scoped fixture
must be built once, the tests sharing the session's Ray cluster. Groups are queued first (they are the long
units), so no worker is left running one alone at the end.
"""
from __future__ import annotations

import gc
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # helper modules (e.g. store_models) import as top-level modules
    sys.path.insert(0, str(TESTS))

#: CPU slots of the session's Ray cluster: two 1-thread workers (tests/test_modelsearch_distributed.py), or the
#: Ray benchmark's two executors side by side (1 + 2 one-thread workers, tests/test_bench_distributed.py).
RAY_SLOTS = 3


#: Notebooks that read a paper benchmark's quick run from MM_JUPYTER_BENCH_RESULTS share its test module's group:
#: one worker runs the module (which writes the results) and then the notebook (which reads them), never both at once.
SHARED_GROUPS = {
    "03_paper_multi_model_management": "bench-modelsets",
    "06_paper_alsatian_evaluation": "bench-alsatian",
}
#: torch's plain (non-SIMD) CPU kernels for lax notebooks' kernels: their references hold floats written on the
#: machine's own kernel path, so every run proves their checks hold on another one (with their stated tolerance).
LAX_KERNEL_ENV = {"ATEN_CPU_CAPABILITY": "default"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--lax-notebook", action="append", default=[], metavar="PATH",
        help="a notebook run under --nbval whose outputs are compared only where a cell asks (as --nbval-lax "
             "does, for this notebook alone); its kernel runs on torch's plain CPU kernels")


def _lax_notebooks(config: pytest.Config) -> set[Path]:
    return {Path(p).resolve() for p in config.getoption("lax_notebook", None) or ()}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """nbval's cells: ``notebook`` and one group per notebook (lax ones made lax); grouped tests first,
    otherwise in collection order (the sort is stable, and every worker computes the same order)."""
    lax = _lax_notebooks(config)
    for item in items:
        if type(item).__name__ == "IPyNbCell":  # nbval's item class: a cell of a notebook run under nbval
            path = Path(str(item.fspath)).resolve()
            item.add_marker(pytest.mark.notebook)
            item.add_marker(pytest.mark.xdist_group(SHARED_GROUPS.get(path.stem, f"nbval-{path.stem}")))
            if path in lax:
                _make_lax(item)
        mark = item.get_closest_marker("xdist_group")
        if mark is not None and getattr(config.option, "loadgroup", False):  # set on xdist's workers
            _join_group(item, str(mark.args[0] if mark.args else mark.kwargs.get("name", "default")))
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what collection imported (torch, transformers, the package, the tests' modules) out of the
    garbage collector's full scans: they live as long as the worker, and a full scan of them costs every
    test that triggers one (and every benchmark step that collects before it times)."""
    gc.collect()
    gc.freeze()


def _make_lax(cell: Any) -> None:
    """Compare a cell's outputs only where the cell asks (``# NBVAL_CHECK_OUTPUT`` or its tag), as nbval's
    ``--nbval-lax`` does: nbval decided ``check`` at collection, from the run's global mode."""
    from nbval.plugin import find_comment_markers, find_metadata_tags

    asked = dict(find_metadata_tags(cell.cell.metadata)) | dict(find_comment_markers(cell.cell.source))
    cell.options["check"] = bool(asked.get("check", False))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """A lax notebook's kernel starts (in its first cell's setup) with ``LAX_KERNEL_ENV``; this process's own
    torch is not affected (the variables are restored before any test code runs)."""
    if type(item).__name__ != "IPyNbCell" or Path(str(item.fspath)).resolve() not in _lax_notebooks(item.config):
        return (yield)
    saved = {key: os.environ.get(key) for key in LAX_KERNEL_ENV}
    os.environ.update(LAX_KERNEL_ENV)
    try:
        return (yield)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _join_group(item: pytest.Item, group: str) -> None:
    """Give ``item`` the ``@group`` suffix by which xdist's scheduler keeps a group on one worker. xdist
    (3.8) writes it to ``item._nodeid``, which pytest 9 no longer reads (a node's id lives in ``_id``), so
    without this every grouped test would be scheduled on its own."""
    if not hasattr(item, "_id") or "@" in item.nodeid.rsplit("::", 1)[-1].rsplit("]", 1)[-1]:
        return  # an older pytest (xdist's own suffix works) or already suffixed
    from _pytest.nodeid import coerce_node_id

    item._id = coerce_node_id(f"{item.nodeid}@{group}")


@pytest.fixture(scope="session", autouse=True)
def _private_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The session's own config folder (the kept-features secret, ``store.features.writer_key``): tests
    never write to the user's home, and processes they start (kernels, servers, Ray) inherit it."""
    from mm_jupyter.store.features import CONFIG_ENV

    saved = os.environ.get(CONFIG_ENV)
    os.environ[CONFIG_ENV] = str(tmp_path_factory.mktemp("config"))
    yield
    if saved is None:
        os.environ.pop(CONFIG_ENV, None)
    else:
        os.environ[CONFIG_ENV] = saved


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[int]:
    """One private local Ray for the session (starting one takes seconds), with ``RAY_SLOTS`` CPU slots;
    tests start and close their own executors (actors) on it. Its workers import the test helper modules
    (factories of stored candidates) from PYTHONPATH. Tests using it carry ``xdist_group("ray")``, so one
    xdist worker holds the only cluster. Yields the number of CPU slots."""
    pytest.importorskip("ray")  # an extra; `make install` installs it, so the suite runs these tests
    import ray

    from mm_jupyter.modelsearch.distributed import start_local_ray
    from mm_jupyter.store import testing

    for key, value in testing.S3_ENV.items():  # moto's test credentials, for team stores' S3 objects
        os.environ.setdefault(key, value)
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), saved) if p)
    try:
        started = start_local_ray(RAY_SLOTS, object_store_memory=256 * 2**20)
        assert started, "Ray was already running in this test process: the session's cluster must be the only one"
        try:
            yield RAY_SLOTS
        finally:
            ray.shutdown()
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Stop the session's Ray cluster once the tests that use it are done (its group runs on one worker, in a
    row): its idle daemons would otherwise take CPU from every other test until the session ends. Only at a
    module's end (module fixtures such as executors are closed by then); a later user starts it again."""
    result = yield
    if "ray_cluster" not in getattr(item, "fixturenames", ()):
        return result
    same_module = nextitem is not None and getattr(nextitem, "module", None) is getattr(item, "module", None)
    if nextitem is None or not (same_module or "ray_cluster" in getattr(nextitem, "fixturenames", ())):
        for fixturedef in item._fixtureinfo.name2fixturedefs.get("ray_cluster", ()):
            fixturedef.finish(item._request)
    return result


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """A not-yet-created store folder inside the test's tmp_path."""
    return tmp_path / "store"


@pytest.fixture
def store(store_path: Path):
    """A fresh, empty store (closed after the test)."""
    import mm_jupyter as mm

    s = mm.Store(store_path)
    yield s
    s.close()
