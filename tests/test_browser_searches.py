"""The Model store sidebar's kept-searches view in a real browser (JupyterLab + Debian's Chromium).

JupyterLab is pointed at this checkout's committed build (``mm_jupyter/labextension``, through
``JUPYTER_PATH``), so the test fails when the committed bundle lacks the view or draws it wrong, whatever
copy the environment has installed. A notebook is open whose folder's store holds one set and no
searches: the view says what to do; two searches are kept (as ``result.save`` keeps them) and a click on
the panel's refresh button lists them newest first (dataset, day, winner, top 5); after a page reload
they are still there.
Screenshots go to ``$MM_SCREENSHOTS`` (default ``build/browser-screens``): ``searches-1-empty``,
``searches-2-listed``, ``searches-3-reloaded``.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from lab_server import TOKEN, jupyter

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser-searches")]

ROOT = Path(__file__).resolve().parents[1]
PREBUILT = ROOT / "mm_jupyter" / "labextension"
CHROMIUM = os.environ.get("MM_JUPYTER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENS = Path(os.environ.get("MM_SCREENSHOTS") or ROOT / "build" / "browser-screens")
WAIT_MS = 180_000
APP = "window.jupyterapp"
PANEL = "#mm-jupyter-store"
NOTEBOOK = "lake.ipynb"  # the sidebar shows the store of the active notebook's folder: <root>/.mm_store
CURRENT = f"{APP}.shell.currentWidget"
KERNEL_IDLE = (f"() => {{ const nb = {CURRENT}; const k = nb && nb.sessionContext && nb.sessionContext.session"
               " && nb.sessionContext.session.kernel; return !!k && k.status === 'idle'; }")


def _keep(store_path: Path, dataset: str, winner: str, others: list[str]) -> None:
    import mm_jupyter as mm

    store = mm.Store(store_path)
    try:
        ranking = [(winner, 0.91, 0.2, 2)] + [(m, 0.8 - i / 20, 0.4, 1) for i, m in enumerate(others)]
        store.keep_search(dataset, "alsatian", 1, ranking, {"inference": 2.0, "proxy": 0.5})
    finally:
        store.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run `make install` (scripts/install.sh installs Debian's chromium)")
    import torch

    import mm_jupyter as mm

    base = tmp_path_factory.mktemp("lab-searches")
    root = base / "root"
    root.mkdir()
    store = mm.Store(root / ".mm_store")  # the server root's default store: the sidebar's without a notebook
    store.save_set([torch.nn.Linear(3, 2)], "demo")
    store.close()
    import nbformat

    kernel = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")], metadata=kernel),
                   root / NOTEBOOK)
    data = base / "data"  # this checkout's build, found before the installed copy
    (data / "labextensions").mkdir(parents=True)
    (data / "labextensions" / "mm-jupyter").symlink_to(PREBUILT, target_is_directory=True)
    settings = base / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    settings.parent.mkdir(parents=True)
    settings.write_text('{"fetchNews": "false", "checkForUpdates": false}')
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(base / "settings"), "JUPYTERLAB_WORKSPACES_DIR":
           str(base / "ws"), "JUPYTER_RUNTIME_DIR": str(base / "runtime"), "JUPYTER_CONFIG_DIR": str(base / "config"),
           "JUPYTER_PATH": os.pathsep.join([str(data), os.environ.get("JUPYTER_PATH", "")]).rstrip(os.pathsep)}
    with jupyter("lab", root, base / "lab.log", ("--LabApp.expose_app_in_browser=True",), env=env,
                 timeout=WAIT_MS / 1000) as url:
        yield {"url": url, "root": root}


@pytest.fixture(scope="module")
def page(lab: dict[str, Any]) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    SCREENS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1300, "height": 800})
        page.set_default_timeout(WAIT_MS)
        errors: list[str] = lab.setdefault("errors", [])
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        page.on("console", lambda m: errors.append(f"console.error: {m.text}") if m.type == "error" else None)
        try:
            yield page
        finally:
            browser.close()


def _open(page: Any, lab: dict[str, Any], reload: bool = False) -> Any:
    if reload:
        page.reload()
    else:
        page.goto(f"{lab['url']}/lab/tree/{NOTEBOOK}?token={TOKEN}")
    page.wait_for_function(f"() => {APP} && {CURRENT} && {CURRENT}.context && {CURRENT}.context.isReady")
    page.wait_for_function(KERNEL_IDLE)
    page.evaluate(f"{APP}.commands.execute('mm-jupyter:show-store')")
    panel = page.locator(PANEL)
    want = f"Store: {lab['root'].resolve() / '.mm_store'}"
    page.wait_for_function(f"w => document.querySelector('{PANEL} .mm-store-path').textContent === w", arg=want)
    panel.locator(".mm-store-searches .mm-store-heading").wait_for()
    return panel


def test_the_lab_loads_this_checkouts_build(page: Any, lab: dict[str, Any]) -> None:
    page.goto(f"{lab['url']}/lab?token={TOKEN}")
    page.wait_for_function(f"() => !!{APP}")
    config = json.loads(page.locator("#jupyter-config-data").text_content())
    (entry,) = [e for e in config["federated_extensions"] if e["name"] == "mm-jupyter"]
    committed = json.loads((PREBUILT / "package.json").read_text())["jupyterlab"]["_build"]["load"]
    assert entry["load"] == committed, (entry, committed)


def test_empty_then_kept_searches_then_a_reload(page: Any, lab: dict[str, Any]) -> None:
    panel = _open(page, lab)
    empty = panel.locator(".mm-store-searches-empty")
    empty.wait_for()
    text = empty.inner_text()
    assert "No kept searches yet" in text and "result.save(store, dataset=" in text and "--keep" in text
    assert panel.locator(".mm-store-link").all_inner_texts() == ["demo@1"]  # the sets list is unchanged
    page.screenshot(path=str(SCREENS / "searches-1-empty.png"))

    store = lab["root"] / ".mm_store"
    _keep(store, "cifar-subset", "resnet-7", ["vit-2", "resnet-3", "bert-1", "mlp-9", "mlp-4"])
    _keep(store, "digits", "mlp-4", ["mlp-9", "resnet-7"])
    panel.locator(".jp-Toolbar button").first.click()  # the panel's refresh button
    rows = panel.locator("tr.mm-store-search")
    page.wait_for_function(f"() => document.querySelectorAll('{PANEL} tr.mm-store-search').length === 2")
    _assert_listed(panel, rows)
    page.screenshot(path=str(SCREENS / "searches-2-listed.png"))
    panel.screenshot(path=str(SCREENS / "searches-2-panel.png"))

    panel = _open(page, lab, reload=True)
    page.wait_for_function(f"() => document.querySelectorAll('{PANEL} tr.mm-store-search').length === 2")
    _assert_listed(panel, panel.locator("tr.mm-store-search"))
    page.screenshot(path=str(SCREENS / "searches-3-reloaded.png"))
    assert not lab["errors"], lab["errors"]


def _assert_listed(panel: Any, rows: Any) -> None:
    """Newest first: dataset, a day, the winner; the top 5 on the line below; the table fits the panel."""
    first = rows.nth(0).locator("td").all_inner_texts()
    second = rows.nth(1).locator("td").all_inner_texts()
    assert (first[0], first[2]) == ("digits", "mlp-4") and (second[0], second[2]) == ("cifar-subset", "resnet-7")
    assert re.search(r"\d", first[1]) and len(first[1]) <= 12, first  # a day, not a whole timestamp
    tops = panel.locator("tr.mm-store-top td").all_inner_texts()
    assert tops == ["top 5: mlp-4 · mlp-9 · resnet-7", "top 5: resnet-7 · vit-2 · resnet-3 · bert-1 · mlp-9"]
    assert "search #2 on digits: alsatian, 3 candidates, k=1" in (rows.nth(0).get_attribute("title") or "")
    table_locator = panel.locator(".mm-store-searches table")
    # after a reload the panel draws its list more than once (the rows exist a moment before they are laid
    # out, and a redraw replaces the table): measure a table that is laid out, waiting for one up to 10 s
    box = table = None
    deadline = time.monotonic() + 10
    while (box is None or table is None) and time.monotonic() < deadline:
        table_locator.wait_for(state="visible")
        box, table = panel.bounding_box(), table_locator.bounding_box()
    assert box is not None and table is not None, "the panel and its table are shown"
    assert table["x"] + table["width"] <= box["x"] + box["width"] + 1  # no clipped columns
