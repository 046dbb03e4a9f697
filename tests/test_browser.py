"""The notebook surface in a real browser: JupyterLab driven by Playwright in Debian's Chromium.

One JupyterLab server (free port, token) serves a temporary copy of the tour. The tests run in order
on one page, as a reader would: run the tour and see the lineage graph, the comparison chart and the
search widget drawn (plotly SVG with the expected traces, no "Error displaying widget") while the
Model store sidebar follows the tour's store; reload the page; compare the saved outputs with the committed
ones as ``pytest --nbval`` would (``make test`` runs the tour only here); reopen the saved notebook on a fresh
kernel (and convert it to HTML with nbconvert, no kernel at all); insert cells from the command
palette; close a notebook whose serving display is still updating. Every wait is on an explicit condition with a
generous timeout — except after that close, where the absence of errors can only be awaited for a while.

Screenshots go to ``$MM_SCREENSHOTS`` (default ``build/browser-screens``); the path is printed.
Chromium: ``$MM_JUPYTER_CHROMIUM`` or ``/usr/bin/chromium`` (``scripts/install.sh`` installs it).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from lab_server import TOKEN, jupyter
from notebook_outputs import differences

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]  # one lab, one page, in order

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("MM_JUPYTER_CHROMIUM", "/usr/bin/chromium")
#: Without the background-networking flags Chromium keeps dialling out, which a closed network refuses.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENS = Path(os.environ.get("MM_SCREENSHOTS") or ROOT / "build" / "browser-screens")
TOUR = "notebooks/00_tour.ipynb"
WAIT_MS = 180_000  # generous: a shared two-core machine may run other tests meanwhile
RUN_MS = 420_000  # the whole tour (it takes well under a minute alone)
PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"

APP = "window.jupyterapp"
NOTEBOOK = f"{APP}.shell.currentWidget"
KERNEL_IDLE = (f"() => {{ const nb = {NOTEBOOK}; const k = nb && nb.sessionContext && nb.sessionContext.session"
               " && nb.sessionContext.session.kernel; return !!k && k.status === 'idle'; }")
ALL_RUN = f"""() => {{
    const nb = {NOTEBOOK}; const k = nb.sessionContext.session && nb.sessionContext.session.kernel;
    const cells = nb.content.widgets.filter(c => c.model.type === 'code');
    return !!k && k.status === 'idle' && cells.every(c => c.model.executionCount !== null
        && c.model.executionState !== 'running');
}}"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A JupyterLab server on a free port with a token, its root a temporary copy of the tour."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run `make install` (scripts/install.sh installs Debian's chromium)")
    base = tmp_path_factory.mktemp("lab")
    root = base / "root"
    (root / "notebooks").mkdir(parents=True)
    shutil.copy(ROOT / TOUR, root / TOUR)
    settings = base / "settings" / "@jupyterlab"
    for plugin, values in (("apputils-extension/notification", '{"fetchNews": "false", "checkForUpdates": false}'),
                           ("docmanager-extension/plugin", '{"autosave": false}')):  # no news pop-up;
        file = settings / f"{plugin}.jupyterlab-settings"  # the notebook on disk changes only when saved
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(values)
    (base / "tmp").mkdir()
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(base / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(base / "ws"), "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
           "JUPYTER_CONFIG_DIR": str(base / "config"), "TMPDIR": str(base / "tmp")}
    with jupyter("lab", root, base / "lab.log", ("--LabApp.expose_app_in_browser=True",), env=env,
                 timeout=WAIT_MS / 1000) as url:
        yield {"url": url, "token": TOKEN, "root": root, "tmp": base / "tmp"}


@pytest.fixture(scope="module")
def page(lab: dict[str, Any]) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    SCREENS.mkdir(parents=True, exist_ok=True)
    print(f"browser screenshots: {SCREENS}")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.set_default_timeout(WAIT_MS)
        errors: list[str] = lab.setdefault("page_errors", [])  # uncaught exceptions and console errors
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        page.on("console", lambda m: errors.append(f"console.error: {m.text}") if m.type == "error" else None)
        store_queries: list[str] = lab.setdefault("store_queries", [])  # what the sidebar asks the server
        page.on("request", lambda r: store_queries.append(r.url) if "/mm-jupyter/" in r.url else None)
        try:
            yield page
        finally:
            browser.close()


#: Console errors that are expected: ipywidgets' manager logs this when a saved notebook's widget view
#: names a model that died with its kernel (a fresh kernel); the extension then shows the output's static
#: picture, which the tests check (no "Error displaying widget", the leaderboard drawn).
KNOWN_ERRORS = ("console.error: Error: widget model not found",)


@pytest.fixture(autouse=True)
def no_new_page_errors(lab: dict[str, Any]) -> Iterator[None]:
    """Every test fails on page or console errors raised while it ran (but the known ones above)."""
    before = len(lab.setdefault("page_errors", []))
    yield
    new = [e for e in lab["page_errors"][before:] if not e.startswith(KNOWN_ERRORS)]
    assert not new, "\n".join(new)


def _open_tour(page: Any, lab: dict[str, Any]) -> None:
    page.goto(f"{lab['url']}/lab/tree/{TOUR}?token={lab['token']}")
    page.wait_for_function(f"() => {APP} && {NOTEBOOK} && {NOTEBOOK}.context && {NOTEBOOK}.context.isReady")
    page.wait_for_function(KERNEL_IDLE)


def _command(page: Any, command: str) -> None:
    page.evaluate(f"{APP}.commands.execute({json.dumps(command)})")


def _output(page: Any, source: str, which: int = 0) -> Any:
    """Output ``which`` of the code cell whose source contains ``source``, scrolled into view."""
    index = page.evaluate(f"src => {NOTEBOOK}.content.model.sharedModel.cells"
                          ".findIndex(c => c.getSource().includes(src))", source)
    assert index >= 0, source
    page.evaluate(f"i => {NOTEBOOK}.content.scrollToItem(i, 'start')", index)
    cell = page.locator(f".jp-Notebook .jp-Cell[data-windowed-list-index='{index}']")
    # a hidden output is one a renderer is being swapped out of (e.g. a dead widget's view)
    return cell.locator(".jp-OutputArea-output:not(.lm-mod-hidden)").nth(which)


def _traces(output: Any) -> list[dict[str, Any]]:
    """Name, type and drawn points of every trace of the plotly graph in ``output`` (waits for it)."""
    output.locator(".main-svg").first.wait_for()
    return output.evaluate(
        "el => (el.classList.contains('js-plotly-plot') ? el : el.querySelector('.js-plotly-plot'))._fullData"
        ".map(t => ({name: t.name, type: t.type, xaxis: t.xaxis, points: (t.x || []).length}))")


def _shot(page: Any, name: str, element: Any = None) -> None:
    (element or page).screenshot(path=str(SCREENS / f"{name}.png"))


def _assert_no_widget_errors(page: Any) -> None:
    page.wait_for_function("() => !document.body.innerText.includes('Error displaying widget')")
    assert not page.locator("text=Error displaying widget").count()


def _assert_charts_drawn(page: Any, prefix: str) -> None:
    """The lineage graph and the comparison chart: plotly SVGs with one trace per approach (and panel)."""
    lineage = _output(page, "%modelset lineage cells")
    lineage.scroll_into_view_if_needed()
    lineage.hover()  # a saved plotly output shows its PNG snapshot until the pointer enters it
    traces = _traces(lineage)
    assert [t["name"] for t in traces] == ["baseline", "update", "provenance"]
    assert [t["points"] for t in traces] == [1, 1, 1] and {t["type"] for t in traces} == {"scatter"}
    assert lineage.locator(".annotation").count() >= 2 or lineage.locator("path.arrowhead").count()
    _shot(page, f"{prefix}-lineage", lineage)
    chart = _output(page, "%modelset compare cells")
    chart.scroll_into_view_if_needed()
    chart.hover()
    traces = _traces(chart)
    panels = {t["xaxis"] for t in traces}
    assert panels == {"x", "x2", "x3"}, panels  # storage, time to save, time to recover
    assert sorted({t["name"] for t in traces}) == ["baseline", "provenance", "update"]
    assert {t["type"] for t in traces} == {"bar"} and len(traces) == 9
    assert chart.locator(".barlayer .point").count() == 9  # every version of every panel has a bar
    for title in ("Storage", "Time to save", "Time to recover", "bytes stored (log scale)", "seconds"):
        assert chart.locator("svg text", has_text=title).count(), title
    assert chart.locator(".updatemenu-button", has_text="linear axes").count() == 1  # the log/linear toggle
    _shot(page, f"{prefix}-comparison", chart)


def _search_output(page: Any) -> Any:
    return _output(page, "%modelsearch candidates data")


def _assert_leaderboard(search: Any, static: bool) -> None:
    """12 candidates, best first, the selected one on top: the live widget or its static picture."""
    search.scroll_into_view_if_needed()
    rows = search.locator("table").first.locator("tbody tr")
    rows.nth(11).wait_for()
    assert rows.count() == 12
    assert "selected" in rows.first.inner_text()
    assert "search: done" in search.inner_text()
    if static:
        assert not search.locator(".jupyter-widgets").count(), "the static picture, not a widget"
    else:
        assert search.locator(".widget-html").count(), "the live widget"


def test_tour_runs_and_its_pictures_render(page: Any, lab: dict[str, Any]) -> None:
    _open_tour(page, lab)
    _command(page, "mm-jupyter:show-store")
    store = page.locator("#mm-jupyter-store")
    store.locator(".mm-store-path").wait_for()
    # before the tour runs: the notebook folder's default store, which does not exist yet
    page.wait_for_function("() => document.querySelector('#mm-jupyter-store .mm-store-path').textContent"
                           ".endsWith('notebooks/.mm_store')")
    assert "No store here yet" in store.inner_text()
    t0 = time.monotonic()
    _command(page, "notebook:run-all-cells")
    page.wait_for_function(ALL_RUN, timeout=RUN_MS, polling=500)
    print(f"tour ran in {time.monotonic() - t0:.1f} s in the browser")
    assert not page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                            has_text="Error").count()
    _shot(page, "1-tour-ran")
    _assert_charts_drawn(page, "1")
    search = _search_output(page)
    _assert_leaderboard(search, static=False)
    _shot(page, "1-search", search)
    _assert_no_widget_errors(page)

    # the sidebar followed the tour's %config'd store and its saves, without a click
    page.wait_for_function("() => document.querySelectorAll('#mm-jupyter-store .mm-store-link').length === 3")
    assert store.locator(".mm-store-link").all_inner_texts() == ["cells@1", "cells@2", "cells@3"]
    path = store.locator(".mm-store-path").inner_text()
    assert path == f"Store: {lab['root'] / 'notebooks' / 'tour_store'}", path  # the tour's own folder
    # the sidebar named that store by the id its kernel registered, never by its location
    kernel_queries = [q for q in lab["store_queries"] if "store=" in q]
    assert kernel_queries and all("store=mmstore-" in q for q in kernel_queries), kernel_queries
    assert not any("tour_store" in q for q in lab["store_queries"]), lab["store_queries"]
    sizes = store.locator("tbody tr td:last-child").all_inner_texts()
    assert sizes[0] == "10.0 MB" and sizes[1].endswith(" kB"), sizes  # the notebook's units
    store.locator(".mm-store-link", has_text="cells@2").click()
    graph = store.locator(".mm-store-graph")
    _assert_selected(store)
    panel_width = store.bounding_box()["width"]
    assert graph.locator(".main-svg").first.bounding_box()["width"] <= panel_width  # fits its panel
    table = store.locator(".mm-store-sets table").bounding_box()
    assert table["x"] + table["width"] <= store.bounding_box()["x"] + panel_width + 1  # no clipped columns
    _shot(page, "1-sidebar")
    # nothing only read the notebook folder's store: it was never created
    assert not (lab["root"] / "notebooks" / ".mm_store").exists()


SIDEBAR_PLOT = "#mm-jupyter-store .mm-store-graph .js-plotly-plot"


def _assert_selected(store: Any) -> None:
    """cells@2 is ringed in the lineage graph, its row marked, its details listed."""
    # the panel redraws the graph on a click: wait for the drawing that has the ring
    store.page.wait_for_function(f"""() => {{ const p = document.querySelector({json.dumps(SIDEBAR_PLOT)});
        return !!p && !!p._fullData && p._fullData.some(t => t.name === 'selected'); }}""")
    traces = store.page.evaluate(f"""() => document.querySelector({json.dumps(SIDEBAR_PLOT)})._fullData
        .map(t => ({{name: t.name, x: Array.from(t.x || [])}}))""")
    assert [t["name"] for t in traces] == ["baseline", "update", "provenance", "selected"]
    assert traces[-1]["x"] == [2]
    assert store.locator("tr.mm-store-selected").all_inner_texts()[0].startswith("cells@2")
    details = store.locator(".mm-store-details").inner_text()
    for text in ("cells@2", "update (asked: auto)", "500", "kB (bytes this version added)",
                 "vs v1: 5 models changed"):
        assert text in details, (text, details)


def test_pictures_survive_a_reload(page: Any, lab: dict[str, Any]) -> None:
    _command(page, "docmanager:save")
    page.wait_for_function(f"() => !{NOTEBOOK}.context.model.dirty")
    _assert_saved_outputs(lab)
    page.reload()
    page.wait_for_function(f"() => {APP} && {NOTEBOOK} && {NOTEBOOK}.context && {NOTEBOOK}.context.isReady")
    page.wait_for_function(KERNEL_IDLE)
    _assert_charts_drawn(page, "2-reload")
    search = _search_output(page)
    _assert_leaderboard(search, static=False)  # the kernel still holds the widget: it is live again
    _shot(page, "2-reload-search", search)
    _assert_no_widget_errors(page)
    _assert_sidebar_on_the_tour(page, lab, remembered=False)  # the live kernel still reports its store
    _shot(page, "2-reload-sidebar")


def _assert_sidebar_on_the_tour(page: Any, lab: dict[str, Any], remembered: bool) -> None:
    """The Model store panel shows the tour's store (``remembered``: as the one the notebook last used) and
    marks a version clicked in its list."""
    _command(page, "mm-jupyter:show-store")
    store = page.locator("#mm-jupyter-store")
    want = f"Store: {lab['root'] / 'notebooks' / 'tour_store'}"
    want += " (last used by this notebook)" if remembered else ""
    page.wait_for_function("want => document.querySelector('#mm-jupyter-store .mm-store-path').textContent === want",
                           arg=want)
    page.wait_for_function("() => document.querySelectorAll('#mm-jupyter-store .mm-store-link').length === 3")
    store.locator(".mm-store-link", has_text="cells@2").click()
    _assert_selected(store)


def test_the_tour_outputs_equal_the_committed_ones(lab: dict[str, Any]) -> None:
    """nbval's strict check of the tour, on this run (saved by the test before): ``make test`` runs the tour
    once, here, instead of again under ``pytest --nbval`` (see notebook_outputs.py)."""
    problems = differences(ROOT / TOUR, lab["root"] / TOUR, ROOT / "notebooks" / "nbval_sanitize.cfg")
    assert not problems, "\n".join(problems)


def test_a_kernel_restart_leaves_the_static_picture(page: Any, lab: dict[str, Any]) -> None:
    page.evaluate(f"{NOTEBOOK}.sessionContext.restartKernel()")
    page.wait_for_function(KERNEL_IDLE)
    search = _search_output(page)
    # the dead widget's view is replaced by its static picture: wait until that swap has happened
    page.wait_for_function(
        """src => { const i = %s.content.model.sharedModel.cells.findIndex(c => c.getSource().includes(src));
                    const cell = document.querySelector(`.jp-Notebook .jp-Cell[data-windowed-list-index='${i}']`);
                    const out = cell && cell.querySelector('.jp-OutputArea-output:not(.lm-mod-hidden)');
                    return !!out && !out.querySelector('.jupyter-widgets')
                           && out.querySelectorAll('table tbody tr').length >= 12; }""" % NOTEBOOK,
        arg="%modelsearch candidates data")
    _assert_leaderboard(search, static=True)  # the widget died with the kernel; its picture stays
    _assert_no_widget_errors(page)
    # the restarted kernel has not loaded mm_jupyter: the panel stays on the store the tour used
    _assert_sidebar_on_the_tour(page, lab, remembered=True)
    _shot(page, "2-restart-sidebar")


def _saved_tour(lab: dict[str, Any]) -> Any:
    import nbformat

    return nbformat.read(lab["root"] / TOUR, as_version=4)


def _outputs_of(nb: Any, source: str) -> list[dict[str, Any]]:
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and source in c.source]
    return cell.outputs


def _assert_saved_outputs(lab: dict[str, Any]) -> None:
    """The saved tour: figures as plotly JSON plus pictures, the search widget with its final static
    picture and leaderboard text, no widget state."""
    nb = _saved_tour(lab)
    assert "widgets" not in nb.metadata
    (lineage,) = _outputs_of(nb, "%modelset lineage cells")
    assert PLOTLY_MIME in lineage.data and lineage.data["text/html"].startswith('<img src="data:image/png;base64,')
    assert lineage.data["image/png"]  # the snapshot JupyterLab's plotly renderer took of the drawn graph
    search = [o for o in _outputs_of(nb, "%modelsearch candidates data") if WIDGET_MIME in o.get("data", {})]
    assert len(search) == 1, search
    assert "<table" in search[0].data["text/html"] and "<b>search</b>: done" in search[0].data["text/html"]
    assert "selected" in search[0].data["text/plain"]  # the leaderboard as text


def test_saved_notebook_on_a_fresh_kernel(page: Any, lab: dict[str, Any]) -> None:
    # a new kernel: the old one is shut down, the page reopens the notebook and starts another
    page.evaluate(f"{NOTEBOOK}.sessionContext.session.shutdown()")
    page.wait_for_function(f"() => !{NOTEBOOK}.sessionContext.session")
    page.reload()
    page.wait_for_function(f"() => {APP} && {NOTEBOOK} && {NOTEBOOK}.context && {NOTEBOOK}.context.isReady")
    page.wait_for_function(KERNEL_IDLE)
    search = _search_output(page)
    search.locator("table").first.wait_for()
    _assert_leaderboard(search, static=True)
    _shot(page, "3-fresh-search", search)
    _assert_charts_drawn(page, "3-fresh")
    _assert_no_widget_errors(page)


def test_nbconvert_html_shows_the_pictures(lab: dict[str, Any], tmp_path: Path) -> None:
    """The saved tour as static HTML (no kernel, no JavaScript needed): every picture is there."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(_saved_tour(lab))
    (tmp_path / "tour.html").write_text(body)
    pictures = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,', body)
    assert pictures == ["Lineage of 'cells': 3 version(s)",  # the lineage graph and the comparison chart
                        "ComparisonChart: 1 use case(s) (cells), approaches baseline, update, provenance, 3 step(s)"]
    assert "pruned in rung" in body and "<b>search</b>: done" in body  # the search widget's static leaderboard
    assert "Error displaying widget" not in body


def test_palette_commands_insert_their_cells(page: Any) -> None:
    sources = f"() => {NOTEBOOK}.content.model.sharedModel.cells.map(c => c.getSource())"
    before = page.evaluate(sources)
    for label, source in (("Insert model-set save cell", "%%modelset save NAME --approach baseline\nmodels"),
                          ("Insert model search cell", "%modelsearch CANDIDATES DATA -k 1 -o result")):
        page.locator(".jp-Notebook").first.click()  # the notebook is the active widget
        page.keyboard.press("Control+Shift+C")
        palette = page.locator("#command-palette")
        palette.locator("input").fill(label)
        palette.locator(".lm-CommandPalette-item", has_text=label).first.wait_for()
        _shot(page, f"4-palette-{label.split()[1]}")
        page.keyboard.press("Enter")
        page.wait_for_function(f"() => ({sources})().includes({json.dumps(source)})")
    after = page.evaluate(sources)
    assert len(after) == len(before) + 2


SERVE = "notebooks/serve.ipynb"
SERVE_CELLS = [
    "import mm_jupyter as mm, torch\nfrom mm_jupyter.usecases.models import ffnn, seeded_models\n"
    "store = mm.Store('serve_store')\nstore.save_set(seeded_models(ffnn, 20, hidden=8), 'fleet')\n"
    "%load_ext mm_jupyter\n%config ModelMagics.store = 'serve_store'",
    "%modelserve start fleet@latest -o server",
    "pool = torch.randn(64, 5)\n%modelserve load --rate 400 --requests 400 --inputs pool",
    "%modelserve start fleet@latest --batching model -o server",  # replaces (stops) the first server
    "%modelserve load --rate 400 --requests 800 --inputs pool",
]


def test_closing_a_notebook_with_live_serving_displays_raises_nothing(page: Any, lab: dict[str, Any]) -> None:
    """Two serving displays, one stopped (its final figure) and one still live, then the notebook closes
    while the live one keeps updating: no page or console error (the autouse fixture checks)."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(c) for c in SERVE_CELLS]
    nbformat.write(nb, lab["root"] / SERVE)
    page.goto(f"{lab['url']}/lab/tree/{SERVE}?reset&token={lab['token']}")  # only this notebook open
    page.wait_for_function(f"() => {APP} && {NOTEBOOK} && {NOTEBOOK}.context && {NOTEBOOK}.context.isReady"
                           f" && {NOTEBOOK}.context.path.endsWith('serve.ipynb')")
    page.wait_for_function(KERNEL_IDLE)
    _command(page, "notebook:run-all-cells")
    page.wait_for_function(ALL_RUN, timeout=RUN_MS, polling=500)
    stopped = _output(page, "%modelserve start fleet@latest -o server")
    traces = _traces(stopped)  # the stopped server's display: its final plotly figure
    assert [t["name"] for t in traces] == ["throughput", "p50", "p95", "p99", "model calls"]
    assert stopped.locator(".updatemenu-button", has_text="log axes").count() == 1
    _shot(page, "5-serving-stopped", stopped)
    live = _output(page, "--batching model")
    live.locator("svg").first.wait_for()  # the running server's display: live SVG frames
    # the load ended before the cell did; its line appears with the display's next frame (late on a busy machine)
    live.filter(has_text="last load at 400/s: 800 answered").wait_for()
    assert live.locator("svg").count() == 3
    _shot(page, "5-serving-displays")
    page.evaluate(f"{NOTEBOOK}.context.model.dirty = false")
    _command(page, "application:close")
    page.wait_for_function(f"() => {{ const w = {NOTEBOOK}; "
                           f"return !w || !w.context || !w.context.path.endsWith('serve.ipynb'); }}")
    page.wait_for_timeout(3000)  # the kernel keeps sending display updates for a closed notebook meanwhile
    _shot(page, "5-serving-closed")
