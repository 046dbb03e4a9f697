"""The IPython magics, driven through a real InteractiveShell: saving, recovering, inspecting and
searching from cells, the store-path rules, provenance cells retrained in a fresh process, and clear
errors (UsageError for bad arguments, MMError for failures) that store nothing."""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from IPython.core.error import UsageError
from IPython.testing import globalipapp
from store_models import run_python

import mm_jupyter as mm
from mm_jupyter.jupyter.magics import ModelMagics, parse_size


def _shell() -> Any:
    """The process-wide test InteractiveShell (IPython's own test application)."""
    import IPython

    globalipapp.start_ipython()
    return IPython.get_ipython()


@pytest.fixture
def ip(tmp_path: Path) -> Any:
    shell = _shell()
    shell.run_line_magic("load_ext", "mm_jupyter")
    shell.run_line_magic("config", f"ModelMagics.store = {str(tmp_path / 'store')!r}")
    shell.run_cell("import torch\nfrom torch import nn\nimport mm_jupyter as mm")
    yield shell
    shell.run_line_magic("config", "ModelMagics.store = None")


TINY = """
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(3, 2)
    def forward(self, x):
        return self.l(x)
"""


def test_load_ext_registers_magics_without_importing_torch() -> None:
    code = ("import sys\nfrom IPython.testing.globalipapp import start_ipython\nip = start_ipython()\n"
            "ip.run_line_magic('load_ext', 'mm_jupyter')\n"
            "assert 'modelset' in ip.magics_manager.magics['cell'], 'cell magic'\n"
            "assert 'modelset' in ip.magics_manager.magics['line'], 'line magic'\n"
            "assert 'modelsearch' in ip.magics_manager.magics['line'], 'search magic'\n"
            "assert 'torch' not in sys.modules, 'torch imported by load_ext'\n"
            "ip.run_line_magic('load_ext', 'mm_jupyter')\n"
            "assert sum(type(c).__name__ == 'ModelMagics' for c in ip.configurables) == 1\n")
    run_python(code, real=True)  # a new interpreter: the zygote has torch imported


def test_usage_is_the_docstring_with_the_right_prefixes(ip: Any) -> None:
    doc = ip.find_line_magic("modelset").__doc__
    for part in ("%%modelset save", "%modelset recover", "%modelset diff", "%modelset lineage",
                 "%modelset compare", "%modelset find", "best_on", "--approach", "--datasets"):
        assert part in doc
    usages = re.findall(r"^  (%+\w+(?: \w+)?)", doc, re.MULTILINE)
    assert usages == ["%%modelset save", "%modelset recover", "%modelset list", "%modelset show", "%modelset diff",
                      "%modelset lineage", "%modelset compare", "%modelset find",
                      "%modelset searches"]  # a cell magic has %%, a line magic one %
    search = ip.find_line_magic("modelsearch").__doc__
    assert "--budget" in search and re.findall(r"^  (%+\w+)", search, re.MULTILINE) == ["%modelsearch"]


def test_commands_that_only_read_create_nothing(ip: Any, tmp_path: Path) -> None:
    missing = tmp_path / "store"  # the fixture's %config store: not created yet
    empty = ip.run_line_magic("modelset", "list")
    assert repr(empty) == (f"no model sets: no store yet at {str(missing)!r}; save one with %%modelset save NAME")
    assert "<i>" in empty._repr_html_()
    for line in ("show x", "recover x", "diff x@1 x@2", "lineage x", "compare", "compare x"):
        with pytest.raises(mm.RefError, match="there is no model store at"):
            ip.run_line_magic("modelset", line)
    ip.run_cell("xy = (torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))")
    with pytest.raises(mm.RefError, match="there is no model store at"):
        ip.run_line_magic("modelsearch", "store:x xy")
    assert not missing.exists()
    mm.Store(missing).close()  # an existing store without sets says so too
    assert repr(ip.run_line_magic("modelset", "list")).startswith(f"no model sets: the store {str(missing)!r}")


@pytest.mark.services
def test_list_of_an_empty_team_store_names_its_masked_url(ip: Any) -> None:
    """An empty PostgreSQL + S3 store names its URL with the password masked (it once said 'None':
    a database store has no folder)."""
    from mm_jupyter.store import testing
    from mm_jupyter.store.backends import display

    with testing.postgres_server(durable=False) as pg, testing.s3_server() as s3:
        # the test server trusts local connections: a password in the URL is sent only if asked for
        url = pg.database().replace(f"://{pg.user}@", f"://{pg.user}:S3cretPW@", 1)
        objects = s3.bucket_url()
        mm.Store(url, objects=objects).close()  # the store exists, with no sets
        ip.run_line_magic("config", f"ModelMagics.objects = {objects!r}")
        ip.run_line_magic("config", f"ModelMagics.store = {url!r}")
        try:
            shown = repr(ip.run_line_magic("modelset", "list"))
        finally:
            ip.run_line_magic("config", "ModelMagics.objects = None")
    assert shown == f"no model sets: the store {display(url)!r}; save one with %%modelset save NAME"
    assert ":***@" in shown and "S3cretPW" not in shown and "None" not in shown


def test_kernel_store_tells_the_sidebar_which_store(ip: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mm_jupyter.jupyter.locations import location_id, lookup
    from mm_jupyter.jupyter.magics import kernel_store

    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))

    def reported() -> str:  # the kernel answers an id; the server maps it back through the runtime folder
        info = kernel_store()._repr_json_()
        assert info["store"] == location_id(info["display"]) and lookup(info["store"]) == info["display"]
        return info["display"]

    info = kernel_store()
    assert info._repr_json_() == {"store": location_id(str(tmp_path / "store")), "exists": False,
                                  "display": str(tmp_path / "store")}
    ip.run_line_magic("config", "ModelMagics.store = None")
    monkeypatch.delenv("MM_JUPYTER_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert reported() == str((tmp_path / ".mm_store").resolve())
    monkeypatch.setenv("MM_JUPYTER_STORE", "elsewhere")
    assert reported() == str((tmp_path / "elsewhere").resolve())
    # a database store: the sidebar's query carries the id, never the password
    monkeypatch.setenv("MM_JUPYTER_STORE", "postgresql://mm:S3cretPW@db.example:5432/store")
    info = kernel_store()._repr_json_()
    assert "S3cretPW" not in json.dumps({k: v for k, v in info.items() if k != "exists"})
    assert info["display"] == "postgresql://mm:***@db.example:5432/store"
    assert lookup(info["store"]) == "postgresql://mm:S3cretPW@db.example:5432/store"
    assert (tmp_path / "runtime" / "mm_jupyter_stores").stat().st_mode & 0o077 == 0  # owner only


@pytest.mark.slow
def test_save_last_expression_recover_show_diff(ip: Any, tmp_path: Path) -> None:
    ip.run_cell(TINY)
    saved = ip.run_cell_magic("modelset", "save tiny",
                              "torch.manual_seed(0)\nms_in = {f'm{i}': Tiny() for i in range(4)}\nms_in")
    assert repr(saved) == "saved tiny@1: baseline, 4 models, 1.5 kB"  # parameters and the manifest object
    ip.run_cell("ms_in['m1'].l.bias.data += 1\nms_in['m9'] = Tiny()")
    saved = ip.run_cell_magic("modelset", "save tiny --approach update --models ms_in", "x = 1")
    assert str(saved.ref) == "tiny@2" and saved.approach == "update" and saved.base == "tiny@1"
    ms = ip.run_line_magic("modelset", "recover tiny@2 -o got")
    assert ip.user_ns["got"] is ms and ms.names == ["m0", "m1", "m2", "m3", "m9"]
    src = ip.user_ns["ms_in"]
    for name in ms.names:
        for key, t in ms.state_dict(name).items():
            assert torch.equal(t, src[name].state_dict()[key])
    ms.close()
    diff = ip.run_line_magic("modelset", "diff tiny@1 tiny@2")
    assert diff.added == ("m9",) and diff.dropped == () and diff.changed == {"m1": ("l.bias",)}
    assert repr(diff).splitlines()[0] == "tiny@1 -> tiny@2: 1 changed, 1 added, 0 dropped, 3 unchanged"
    info = ip.run_line_magic("modelset", "show tiny@2")
    text = repr(info)
    assert "tiny@2: update" in text and "models: 5 (m0, m1, m2, m3, m9)" in text
    assert "architecture: module tree of Tiny (notebook source: Tiny)" in text
    assert repr(info) == repr(ip.run_line_magic("modelset", "show tiny@2"))  # deterministic
    listing = ip.run_line_magic("modelset", "list")
    assert list(listing["version"]) == [1, 2] and list(listing["approach"]) == ["baseline", "update"]
    # the class defined in a cell is recorded as source: a fresh process rebuilds the module once
    # the store is trusted (without trust it refuses to run the recorded class)
    store = tmp_path / "store"
    refused = run_python("import sys, mm_jupyter as mm\nmm.Store(sys.argv[1]).recover_set('tiny@2')['m1']",
                         str(store), check=False)
    assert refused.returncode == 1 and "TrustError: set 'tiny@2' would run code" in refused.stderr
    out = run_python("import sys, mm_jupyter as mm\n"
                     "m = mm.Store(sys.argv[1], trust_code=True).recover_set('tiny@2')['m1']\n"
                     "print(type(m).__name__, m.l.bias.tolist())", str(store)).stdout.split(maxsplit=1)
    assert out[0] == "Tiny"
    assert json.loads(out[1]) == pytest.approx(src["m1"].l.bias.tolist())


def test_saving_again_follows_the_lineage_and_says_why(ip: Any) -> None:
    """Retrain, save, look at the lineage: without --approach a stored name is saved with auto, the
    save line says what was chosen and why, and every version follows the previous one."""
    ip.run_cell("torch.manual_seed(0)\nfleet = [nn.Linear(4, 2) for _ in range(10)]")
    first = ip.run_cell_magic("modelset", "save fleet", "fleet")
    assert re.fullmatch(r"saved fleet@1: baseline, 10 models, [\d.]+ kB", repr(first)), repr(first)
    ip.run_cell("with torch.no_grad():\n    fleet[3].bias += 1")
    again = ip.run_cell_magic("modelset", "save fleet", "fleet")
    assert again.approach == "update" and again.requested == "auto" and again.base == "fleet@1"
    assert re.fullmatch(r"saved fleet@2: update \(auto: 1 of 10 models changed against fleet@1, 2\.0% of the "
                        r"parameter bytes \(at most 50%\): a delta saves space\), 10 models, [\d.]+ (k)?B, "
                        r"parent fleet@1", repr(again)), repr(again)
    third = ip.run_cell_magic("modelset", "save fleet --approach baseline", "fleet")
    assert repr(third).startswith("saved fleet@3: baseline, 10 models, ") and repr(third).endswith(", parent fleet@2")
    graph = ip.run_line_magic("modelset", "lineage fleet")
    assert graph.lineage.edges == [(1, 2), (2, 3)]
    assert graph.summary.startswith("fleet: 3 version(s), 2 edge(s), ")
    assert "v3 [baseline] <- v2" in repr(graph)


def test_bad_arguments_raise_usage_error_and_store_nothing(ip: Any, tmp_path: Path) -> None:
    ip.run_cell(TINY)
    for line in ["", "nope", "recover", "diff a", "save", "save a", "show", "save a --approach provenance --models x"]:
        with pytest.raises(UsageError):
            ip.run_line_magic("modelset", line)
    with pytest.raises(UsageError, match="takes no cell body"):
        ip.run_cell_magic("modelset", "list", "x = 1")
    with pytest.raises(UsageError, match="last expression"):
        ip.run_cell_magic("modelset", "save a", "y = [Tiny()]")
    with pytest.raises(UsageError, match="no variable named 'nothere'"):
        ip.run_cell_magic("modelset", "save a --models nothere", "1")
    with pytest.raises(UsageError, match="invalid choice"):
        ip.run_cell_magic("modelset", "save a --approach zip", "[Tiny()]")
    with pytest.raises(UsageError, match="only applies to --approach provenance"):
        ip.run_cell_magic("modelset", "save a --datasets d", "[Tiny()]")
    with pytest.raises(UsageError, match="expected a list or dict"):
        ip.run_cell_magic("modelset", "save a", "'not models'")
    with pytest.raises(UsageError, match="unknown %modelset command"):
        ip.run_line_magic("modelset", "recovr a")
    with pytest.raises(UsageError, match="No closing quotation"):
        ip.run_line_magic("modelset", "show 'a")
    # a failure inside the store is an MMError (one clear line), and nothing was stored
    with pytest.raises(mm.StoreError, match="l.weight"):
        ip.run_cell_magic("modelset", "save mixed", "[Tiny(), nn.Sequential(nn.Linear(3, 3))]")
    with pytest.raises(mm.RefError):
        ip.run_line_magic("modelset", "recover mixed")
    assert mm.Store(tmp_path / "store").sets().empty


def test_runtime_errors_render_as_one_line(ip: Any, capsys: pytest.CaptureFixture[str]) -> None:
    result = ip.run_cell("%modelset recover nosuchset")
    assert isinstance(result.error_in_exec, mm.RefError)
    shown = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert shown == [f"RefError: {result.error_in_exec}"]


def test_store_path_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shell = _shell()
    shell.run_line_magic("load_ext", "mm_jupyter")
    magics = next(c for c in shell.configurables if isinstance(c, ModelMagics))
    shell.run_line_magic("config", "ModelMagics.store = None")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MM_JUPYTER_STORE", raising=False)
    assert Path(magics._store(None).root) == tmp_path / ".mm_store"
    monkeypatch.setenv("MM_JUPYTER_STORE", str(tmp_path / "env"))
    assert Path(magics._store(None).root) == tmp_path / "env"
    shell.run_line_magic("config", f"ModelMagics.store = {str(tmp_path / 'cfg')!r}")
    assert magics.store == str(tmp_path / "cfg")
    assert Path(magics._store(None).root) == tmp_path / "cfg"
    assert Path(magics._store(str(tmp_path / "flag")).root) == tmp_path / "flag"
    shell.run_cell("from mm_jupyter.usecases.models import ffnn\nstore_models_list = [ffnn(hidden=4)]")
    shell.run_line_magic("modelset", f"save viaflag --store {tmp_path / 'flag'} --models store_models_list")
    assert list(mm.Store(tmp_path / "flag").sets()["name"]) == ["viaflag"]
    assert mm.Store(tmp_path / "cfg").sets().empty
    shell.run_line_magic("config", "ModelMagics.store = None")


PROVENANCE_CELL = """opt = torch.optim.SGD(model.parameters(), lr=LR)
x, y = data
for _ in range(config["epochs"]):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
"""


@pytest.mark.slow
def test_provenance_cell_is_the_recorded_training_code(ip: Any, tmp_path: Path) -> None:
    ip.run_cell("from mm_jupyter.usecases.training import initial_models\n"
                "from mm_jupyter.usecases.battery import cell_ref\nLR = 0.01")
    ip.run_cell_magic("modelset", "save cells", "initial_models(6, hidden=8)")
    ip.run_cell("datasets = {'1': cell_ref(1, version=1), '4': cell_ref(4, version=1)}")
    saved = ip.run_cell_magic("modelset", "save cells --approach provenance --datasets datasets "
                              "--config '{\"epochs\": 3}' --models trained", PROVENANCE_CELL)
    assert str(saved.ref) == "cells@2" and saved.approach == "provenance"
    trained = ip.user_ns["trained"]
    store = mm.Store(tmp_path / "store")
    diff = store.diff("cells@1", "cells@2")
    assert sorted(diff.changed) == ["1", "4"] and diff.unchanged == 4
    from mm_jupyter.store.approaches.provenance import record

    source = record(store, store.row("cells@2"))["train"]["source"]
    assert "LR = 0.01" in source and "def train_cell(model, data, config):" in source
    # a fresh interpreter retrains from the recorded cell (once trusted) and gets the same bits
    code = ("import sys, torch, mm_jupyter as mm\n"
            "ms = mm.Store(sys.argv[1], trust_code=True).recover_set('cells@2')\n"
            "print(';'.join(n + ':' + ','.join(str(float(t.double().sum())) for t in ms.state_dict(n).values())"
            " for n in ms.names))")
    fresh = run_python(code, str(tmp_path / "store")).stdout.strip().split(";")
    here = [n + ":" + ",".join(str(float(t.double().sum())) for t in trained[n].state_dict().values())
            for n in trained]
    assert fresh == here
    # a cell's last expression is returned: a module it returns replaces the trained one
    ip.run_cell("datasets2 = {'2': cell_ref(2, version=1)}")
    ip.run_cell_magic("modelset", "save cells --approach provenance --datasets datasets2 --models t2",
                      "import copy\nreplacement = copy.deepcopy(model)\n"
                      "torch.nn.init.zeros_(replacement[0].weight)\nreplacement")
    assert float(ip.user_ns["t2"]["2"][0].weight.detach().abs().sum()) == 0.0


def test_provenance_cell_errors(ip: Any, tmp_path: Path) -> None:
    ip.run_cell("from mm_jupyter.usecases.training import initial_models\n"
                "from mm_jupyter.usecases.battery import cell_ref\nunrecordable = torch.ones(3)")
    ip.run_cell_magic("modelset", "save base", "initial_models(3, hidden=8)")
    ip.run_cell("ds = {'1': cell_ref(1, version=1)}\nbad_ds = {'77': cell_ref(1, version=1)}")
    with pytest.raises(UsageError, match="needs --datasets"):
        ip.run_cell_magic("modelset", "save base --approach provenance", "pass")
    with pytest.raises(UsageError, match="plain Python"):
        ip.run_cell_magic("modelset", "save base --approach provenance --datasets ds", "%time pass")
    with pytest.raises(mm.StoreError, match="unrecordable"):
        ip.run_cell_magic("modelset", "save base --approach provenance --datasets ds", "model.x = unrecordable")
    with pytest.raises(mm.StoreError, match="77"):
        ip.run_cell_magic("modelset", "save base --approach provenance --datasets bad_ds", "pass")
    with pytest.raises(UsageError, match="--config"):
        ip.run_cell_magic("modelset", "save base --approach provenance --datasets ds --config '{oops'", "pass")
    assert list(mm.Store(tmp_path / "store").sets()["version"]) == [1]


def test_parse_size() -> None:
    assert parse_size("1000") == 1000
    assert parse_size("64MB") == 64_000_000
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("2 kib") == 2048
    for bad in ["", "MB", "-5", "10 parsecs", "0"]:
        with pytest.raises(UsageError):
            parse_size(bad)


SEARCH_SETUP = """
import search_models
torch.manual_seed(0)
base = search_models.mlp()
cands = {"base": base}
import copy
for i in range(1, 6):
    m = copy.deepcopy(base)
    torch.nn.init.normal_(m[4].weight)
    if i % 2:
        torch.nn.init.normal_(m[2].weight)
    cands[f"c{i}"] = m
gen = torch.Generator().manual_seed(1)
xy = (torch.randn(300, 16, generator=gen), torch.randint(0, 4, (300,), generator=gen))
"""


def test_modelsearch_variable_and_store(ip: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import IPython.display

    shown: list[Any] = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs, **kw: shown.extend(objs))
    ip.run_cell(SEARCH_SETUP)
    result = ip.run_line_magic("modelsearch", "cands xy -k 2 -o res --budget 1MB")
    assert ip.user_ns["res"] is result and len(result.top) == 2
    expected = mm.search(ip.user_ns["cands"], ip.user_ns["xy"], k=2, approach="shift")
    assert list(result.ranking["model"]) == list(expected.ranking["model"])
    from mm_jupyter.jupyter.widgets import SearchProgress

    assert len(shown) == 1 and isinstance(shown[0], SearchProgress)
    mm.add_candidates(ip.find_magic("modelset").__self__._store(None), ip.user_ns["cands"], "mlps")
    stored = ip.run_line_magic("modelsearch", "store:mlps xy -k 2 --no-widget --approach alsatian")
    assert list(stored.ranking["model"]) == list(result.ranking["model"])
    assert len(shown) == 1
    with pytest.raises(UsageError, match="no variable named 'nope'"):
        ip.run_line_magic("modelsearch", "nope xy")
    with pytest.raises(UsageError, match="--budget"):
        ip.run_line_magic("modelsearch", "cands xy --budget lots")
    with pytest.raises(UsageError):
        ip.run_line_magic("modelsearch", "cands xy --proxy magic")
    with pytest.raises(mm.SearchError, match="larger than the number of candidates"):
        ip.run_line_magic("modelsearch", "cands xy -k 50 --no-widget")


def test_find_answers_from_the_catalog_and_keep_saves_the_search(ip: Any, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from mm_jupyter.jupyter.display import NoMatch, NoSearches
    from mm_jupyter.modelsearch import api

    assert isinstance(ip.run_line_magic("modelset", "searches"), NoSearches)  # no store yet: nothing created
    assert not (tmp_path / "store").exists()
    ip.run_cell(SEARCH_SETUP)
    store = ip.find_magic("modelset").__self__._store(None)
    mm.add_candidates(store, ip.user_ns["cands"], "mlps")
    result = ip.run_line_magic("modelsearch", "store:mlps xy -k 1 --no-widget --keep cifar-subset")
    kept = ip.run_line_magic("modelset", "searches")
    assert list(kept["dataset"]) == ["cifar-subset"] and list(kept["winner"]) == [result.best]

    def no_search(*_a: Any, **_k: Any) -> None:
        raise AssertionError("find ran a search")

    monkeypatch.setattr(api, "search", no_search)
    found = ip.run_line_magic("modelset", "find \"params < 20e6 and best_on == 'cifar-subset'\"")
    assert list(found["name"]) == [result.best] and list(found["set"]) == ["mlps"]
    unquoted = ip.run_line_magic("modelset", "find params > 0 and kind == 'candidates'")
    assert len(unquoted) == len(ip.user_ns["cands"])
    none = ip.run_line_magic("modelset", "find params < 1")
    assert isinstance(none, NoMatch) and "params < 1" in repr(none)
    for bad, what in [("find nosuchcolumn > 3", "nosuchcolumn"), ("find params <", "cannot evaluate"),
                      ("find params", "not a condition"), ("find x = params", "not a condition"),
                      ("find", "arguments are required")]:
        with pytest.raises(UsageError, match=what):
            ip.run_line_magic("modelset", bad)
    shown = ip.run_cell("%modelset find 'params >'")
    assert isinstance(shown.error_in_exec, UsageError)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("UsageError: %modelset find: cannot evaluate")
    with pytest.raises(UsageError, match="--keep"):
        ip.run_line_magic("modelsearch", "cands xy --no-widget --keep ' x'")
    assert len(store.searches()) == 1


def test_modelsearch_reuse_layers_and_feature_budget(ip: Any) -> None:
    """--reuse keeps features in the magics' store (a repeated search computes none), --layers N ranks
    (model, layer) arms as mm.search does, and the options are checked before anything runs."""
    ip.run_cell(SEARCH_SETUP)
    store = ip.find_magic("modelset").__self__._store(None)
    cands, xy = ip.user_ns["cands"], ip.user_ns["xy"]
    first = ip.run_line_magic("modelsearch", "cands xy -k 1 --no-widget --reuse --feature-budget 64MB")
    assert first.stats["features_computed"] > 0 and first.stats["features_reused"] == 0
    again = ip.run_line_magic("modelsearch", "cands xy -k 1 --no-widget --reuse")
    assert again.stats["features_computed"] == 0 and again.stats["features_reused"] > 0
    expected = mm.search(cands, xy, k=1, store=store, reuse=True)
    assert list(again.ranking["model"]) == list(first.ranking["model"]) == list(expected.ranking["model"])
    arms = ip.run_line_magic("modelsearch", "cands xy -k 1 --no-widget --layers 2")
    direct = mm.search(cands, xy, k=1, layers=2)
    assert set(arms.ranking["layer"]) == {-1, -2}
    assert list(zip(arms.ranking["model"], arms.ranking["layer"])) == \
        list(zip(direct.ranking["model"], direct.ranking["layer"]))
    assert arms.best_arm == direct.best_arm
    for bad, what in [("--layers 0", "--layers must be at least 1"),
                      ("--feature-budget 1MB", "--feature-budget needs --reuse"),
                      ("--reuse --feature-budget lots", "--feature-budget 'lots' is not a size")]:
        with pytest.raises(UsageError, match=what):
            ip.run_line_magic("modelsearch", f"cands xy --no-widget {bad}")


def test_modelsearch_interrupt_stops_cleanly(ip: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import IPython.display

    import mm_jupyter.jupyter.widgets as widgets

    shown: list[Any] = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs, **kw: shown.extend(objs))
    ip.run_cell(SEARCH_SETUP)

    class Interrupting(widgets.SearchProgress):
        def __call__(self, event: dict[str, Any]) -> None:
            super().__call__(event)
            if event.get("event") == "rung_start" and event.get("rung") == 1:
                raise KeyboardInterrupt

    monkeypatch.setattr(widgets, "SearchProgress", Interrupting)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    before = {p.name for p in Path(tmp_path).iterdir()}
    with pytest.raises(KeyboardInterrupt):
        ip.run_line_magic("modelsearch", "cands xy -k 1 --budget 2kB")
    assert shown[0].state == "interrupted"
    assert {p.name for p in Path(tmp_path).iterdir()} == before  # no spill folder left behind
    # the shell and the store still work afterwards
    assert ip.run_line_magic("modelsearch", "cands xy -k 1 --no-widget").best


def test_lineage_and_compare_widgets(ip: Any, tmp_path: Path) -> None:
    from mm_jupyter.jupyter.widgets import ComparisonChart, LineageGraph

    ip.run_cell("from mm_jupyter.usecases.models import ffnn\nfs = [ffnn(hidden=8) for _ in range(5)]")
    ip.run_line_magic("modelset", "save fs --models fs")
    ip.run_cell("torch.nn.init.zeros_(fs[2][0].weight)")
    ip.run_line_magic("modelset", "save fs --approach update --models fs")
    graph = ip.run_line_magic("modelset", "lineage fs")
    assert isinstance(graph, LineageGraph)
    assert [v.version for v in graph.lineage.versions] == [1, 2]
    chart = ip.run_line_magic("modelset", "compare fs")
    assert isinstance(chart, ComparisonChart)
    assert list(chart.frame["approach"]) == ["baseline", "update"]
    assert chart.frame["ttr_s"].notna().all()
    no_ttr = ip.run_line_magic("modelset", "compare --no-ttr")
    assert no_ttr.frame["ttr_s"].isna().all()
    rows = [{"arch": "ffnn48", "step": 0, "approach": a, "bytes": b, "tts_s": 0.1, "ttr_s": 0.2}
            for a, b in (("baseline", 1000), ("limit", 900))]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"rows": rows}))
    from_file = ip.run_line_magic("modelset", f"compare --file {path}")
    assert sorted(from_file.frame["approach"]) == ["baseline", "limit"]
    with pytest.raises(UsageError, match="not both"):
        ip.run_line_magic("modelset", f"compare fs --file {path}")
    with pytest.raises(mm.RefError):
        ip.run_line_magic("modelset", "lineage nosuch")

