"""Plain models need no decorator: any nn.Module is saved with a structural record and recovered in a
fresh process bit-exactly, computing the same outputs; what a record may import or run is gated."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import store_models as sm
import torch
import zoo_models as zoo
from torch import nn

import mm_jupyter as mm
from mm_jupyter.store import store as store_module

SEEDS = (0, 1)

FRESH = r"""
import json, sys
import torch
import mm_jupyter as mm
import store_models as sm, zoo_models as zoo
store = mm.Store(sys.argv[1], trust_code=sys.argv[2] == "trust")
out = {}
for name in sys.argv[3:]:
    try:
        ms = store.recover_set(name)
        models = [ms[i] for i in range(len(ms))]
        out[name] = {"state": [sm.sd_digests(m.state_dict()) for m in models],
                     "outputs": [zoo.outputs(m, name) for m in models],
                     "types": [type(m).__qualname__ for m in models], "ties": [sm.ties(m) for m in models],
                     "training": [m.training for m in models], "kind": ms.architecture.kind}
    except mm.MMError as e:
        out[name] = {"error": f"{type(e).__name__}: {e}"}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_zoo_roundtrips_in_a_fresh_process(tmp_path: Path):
    assert len(zoo.ZOO) >= 25
    store = mm.Store(tmp_path / "zoo")
    want = {}
    for name in zoo.ZOO:
        models = [zoo.build(name, seed) for seed in SEEDS]
        before = sm.model_digests(models)
        ref = store.save_set(models, name)
        assert sm.model_digests(models) == before, f"saving changed {name}"
        kind = store.row(ref).manifest["architecture"]["kind"]
        assert kind == ("hf" if name.startswith("hf-") and name != "hf-wrapped-bert" else "structure"), name
        want[name] = {"state": before, "outputs": [zoo.outputs(m, name) for m in models],
                      "types": [type(m).__qualname__ for m in models], "ties": [sm.ties(m) for m in models]}
    # no zoo entry records code: a fresh, untrusting process recovers all of them
    got = json.loads(sm.run_python(FRESH, str(tmp_path / "zoo"), "no-trust", *zoo.ZOO, timeout=600).stdout)
    for name, w in want.items():
        g = got[name]
        assert "error" not in g, (name, g.get("error"))
        assert g["state"] == w["state"], f"{name}: state differs"
        assert g["outputs"] == w["outputs"], f"{name}: outputs differ"
        assert g["types"] == w["types"] and g["ties"] == w["ties"], name
        assert g["training"] == [False] * len(SEEDS), name
    store.close()


def test_structural_record_is_plain_json_and_rebuilds_without_constructors(tmp_path: Path, monkeypatch):
    store = mm.Store(tmp_path / "s")
    models = [zoo.build("modulelist-ctor-args", s) for s in SEEDS]
    ref = store.save_set(models, "nets")
    arch = store.row(ref).manifest["architecture"]
    assert json.loads(json.dumps(arch)) == arch
    assert arch["structure"]["classes"][0] == "zoo_models:ListNet" and arch["structure"]["source"] is None
    # rebuilding never calls a recorded class's __init__ (it could do anything)
    monkeypatch.setattr(zoo.ListNet, "__init__", lambda self, *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    ms = store.recover_set(ref)
    assert [sm.sd_digests(ms[i].state_dict()) for i in range(2)] == sm.model_digests(models)
    store.close()


def test_materialised_models_are_independent_and_keep_attributes(tmp_path: Path):
    store = mm.Store(tmp_path / "s")
    models = [zoo.build("lstm", s) for s in SEEDS]
    ms = store.recover_set(store.save_set(models, "lstm"))
    a, b, a2 = ms[0], ms[1], ms[0]
    assert a is not a2 and a.weight_ih_l0 is not a2.weight_ih_l0
    assert a._flat_weights[0] is a.weight_ih_l0  # the RNN's flat weights point at its own parameters
    assert a._flat_weight_refs[0]() is a.weight_ih_l0
    with torch.no_grad():
        a.weight_ih_l0.zero_()
    assert sm.sd_digests(a2.state_dict()) == sm.model_digests(models)[0]
    assert sm.sd_digests(b.state_dict()) == sm.model_digests(models)[1]
    a2.register_forward_hook(lambda *args: None)  # hooks of one copy never reach another
    assert not ms[0]._forward_hooks
    assert (a.num_layers, a.hidden_size, a.batch_first) == (2, 8, False)
    store.close()


class OpenFile(nn.Module):
    def __init__(self, f) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.log = f


class Lambda(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(2, 2))
        self.inner.act = lambda x: x


class Arbitrary(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.cfg = object()


def test_unrecordable_attributes_name_path_and_type_and_store_nothing(tmp_path: Path):
    store = mm.Store(tmp_path / "s")
    with open(tmp_path / "log.txt", "w") as f:
        cases = [([OpenFile(f)], r"attribute log is a _io\.TextIOWrapper"),
                 ([Lambda()], r"attribute inner\.act is the function .*lambda"),
                 ([Arbitrary()], r"attribute cfg is a builtins\.object"),
                 ([zoo.WithSwish()], r"zoo_models:swish.*allow-list.*allow_functions\('zoo_models'\)")]
        for models, pattern in cases:
            with pytest.raises(mm.ArchitectureError, match=pattern):
                store.save_set(models, "bad")
    assert store.sets().empty
    assert not any(p.is_file() for p in (tmp_path / "s" / "objects").rglob("*"))
    store.close()


def test_models_of_one_set_must_share_attributes_and_parameter_free_modules(tmp_path: Path):
    store = mm.Store(tmp_path / "s")
    a = nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(0.01))
    b = nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(0.3))  # same state dict keys and shapes
    with pytest.raises(mm.ArchitectureError, match=r"model '1' attribute 1\.negative_slope is 0\.3"):
        store.save_set([a, b], "slopes")
    c = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    with pytest.raises(mm.ArchitectureError, match=r"module 1 is a Tanh, not a LeakyReLU"):
        store.save_set({"x": a, "y": c}, "acts")
    assert store.sets().empty
    store.close()


@pytest.mark.slow
def test_allow_functions_extends_the_allow_list(tmp_path: Path, monkeypatch):
    from mm_jupyter.store import trust

    monkeypatch.setattr(trust, "ALLOWED_FUNCTION_MODULES", set(trust.ALLOWED_FUNCTION_MODULES))
    store = mm.Store(tmp_path / "s")
    models = [zoo.WithSwish() for _ in range(2)]
    mm.allow_functions("zoo_models")
    ref = store.save_set(models, "swish")
    assert store.recover_set(ref)[1].act is zoo.swish
    code = ("import sys, mm_jupyter as mm\n"
            "if 'import' in sys.argv: import zoo_models\n"
            "if 'allow' in sys.argv: mm.allow_functions('zoo_models')\n"
            "print(type(mm.Store(sys.argv[1]).recover_set('swish')[0].act).__name__)")
    # a fresh process that never imported zoo_models is not made to import it by a record
    refused = sm.run_python(code, str(tmp_path / "s"), check=False)
    assert refused.returncode == 1 and "refused before importing it" in refused.stderr
    refused = sm.run_python(code, str(tmp_path / "s"), "import", check=False)
    assert refused.returncode == 1 and "is not on the allow-list" in refused.stderr
    assert sm.run_python(code, str(tmp_path / "s"), "allow").stdout.strip() == "function"
    store.close()


# -- crafted stores: nothing runs -----------------------------------------------------------------
def _forged(store: mm.Store, name: str, arch: mm.Architecture, monkeypatch) -> None:
    """A store as an attacker would write it: consistent objects and catalog, a malicious record."""
    with monkeypatch.context() as m:
        m.setattr(store_module, "_probe", lambda *a: (None, None))  # the save-time rebuild check
        store.save_set([nn.Linear(2, 2)], name, architecture=arch)


def _structure(classes: list[str], attrs: list, source=None) -> dict:
    return {"classes": classes, "source": source,
            "root": {"c": 0, "t": False, "p": [], "b": [], "m": [], "a": attrs}}


@pytest.mark.slow
def test_crafted_records_are_refused_and_run_nothing(tmp_path: Path, monkeypatch):
    sentinel = tmp_path / "pwned"
    cmd = f"touch {sentinel}"
    store = mm.Store(tmp_path / "s")
    forged = {
        "os-system-factory": (mm.Architecture("factory", "os:system", {"command": cmd}), "refused"),
        "subprocess-factory": (mm.Architecture("factory", "subprocess:run", {"args": cmd, "shell": True}), "refused"),
        "unregistered-factory": (mm.Architecture("factory", "store_models:plain_factory", {"width": 2}),
                                 "not registered"),
        "os-system-hf": (mm.Architecture("hf", "os:system", {}, {"command": cmd}), "refused"),
        "os-system-class": (mm.Architecture("structure", "x", {}, None, None, _structure(["os:system"], [])),
                            "refused"),
        "os-system-function": (mm.Architecture("structure", "x", {}, None, None, _structure(
            ["torch.nn.modules.linear:Identity"], [["hook", {"$fn": "os:system"}]])), "not on the allow-list"),
        "torch-load-function": (mm.Architecture("structure", "x", {}, None, None, _structure(
            ["torch.nn.modules.linear:Identity"], [["hook", {"$fn": "torch:load"}]])), "refused"),
        "hf-config-os": (mm.Architecture("structure", "x", {}, None, None, _structure(
            ["torch.nn.modules.linear:Identity"], [["cfg", {"$hfconfig": ["os:system", {"command": cmd}]}]])),
            "refused"),
        "source-class": (mm.Architecture("source", "Evil", {}, None,
                                         f"import os\nclass Evil:\n    os.system({cmd!r})\n"), "TrustError"),
        "structure-source": (mm.Architecture("structure", "x", {}, None, None, _structure(
            ["@Evil"], [], {"code": f"import os\nos.system({cmd!r})\nclass Evil: pass\n", "names": ["Evil"]})),
            "TrustError"),
    }
    for name, (arch, _) in forged.items():
        _forged(store, name, arch, monkeypatch)
    names = list(forged)
    got = json.loads(sm.run_python(FRESH, str(tmp_path / "s"), "no-trust", *names).stdout)
    for name, (_, why) in forged.items():
        assert "error" in got[name] and why in got[name]["error"], (name, got[name])
    # trusting the store lets recorded *source* run, never unregistered or non-module references
    trusted = [n for n, (_, why) in forged.items() if why != "TrustError"]
    got = json.loads(sm.run_python(FRESH, str(tmp_path / "s"), "trust", *trusted).stdout)
    for name in trusted:
        assert "error" in got[name] and forged[name][1] in got[name]["error"], (name, got[name])
    assert not sentinel.exists()
    # and the same records are refused when saved directly
    with pytest.raises(mm.ArchitectureError, match="refused"):
        store.save_set([nn.Linear(2, 2)], "direct", architecture=forged["os-system-factory"][0])
    assert not sentinel.exists()
    store.close()


@pytest.mark.slow
def test_provenance_code_needs_trust_before_anything_runs(tmp_path: Path):
    """A provenance version whose training function and dataset loader are not registered: recovery
    in a fresh process lists them and runs nothing (not even the loader) until the store is trusted."""
    sentinel = tmp_path / "ran.log"
    script = r"""
import json, sys
import torch
import mm_jupyter as mm
import store_models as sm
from pathlib import Path
store = mm.Store(sys.argv[1])
torch.manual_seed(0)
base = {str(i): torch.nn.Linear(3, 1) for i in range(3)}
store.save_set(base, "p", approach="baseline")
prov = mm.Provenance(train="store_models:logged_train", config={"steps": 2},
                     datasets={"1": mm.DatasetRef("store_models:logged_data", seed=5)}, seed=0)
trained = prov.run(base)
new = dict(base, **trained)
store.save_set(new, "p", approach="provenance", provenance=prov)
print(json.dumps(sm.model_digests(new)))
"""
    env_code = f"import os; os.environ['MM_TEST_SENTINEL'] = {str(sentinel)!r}\n"
    saved = json.loads(sm.run_python(env_code + script, str(tmp_path / "s")).stdout.splitlines()[-1])
    sentinel.unlink()
    recover = env_code + FRESH.replace("zoo.outputs(m, name)", "None")
    got = json.loads(sm.run_python(recover, str(tmp_path / "s"), "no-trust", "p").stdout)["p"]
    assert got["error"].startswith("TrustError: set 'p@2' would run code recorded in the store")
    assert "training function store_models:logged_train" in got["error"]
    assert "dataset loader store_models:logged_data" in got["error"] and "'seed': 5" in got["error"]
    assert not sentinel.exists(), "recovery ran code before it was allowed"
    got = json.loads(sm.run_python(recover, str(tmp_path / "s"), "trust", "p").stdout)["p"]
    assert got["state"] == saved
    assert sentinel.read_text().split() == ["data", "train"]


@pytest.mark.slow
def test_notebook_class_with_arguments_in_the_magic(tmp_path: Path):
    """``%%modelset save`` takes plain models and notebook classes with constructor arguments."""
    from IPython.testing import globalipapp

    ip = globalipapp.get_ipython()
    ip.run_line_magic("load_ext", "mm_jupyter")
    path = tmp_path / "nb"
    cells = [
        "import torch\nfrom torch import nn\nSCALE = 3.0\n"
        "def double(x):\n    return 2 * x\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, width, depth=2):\n"
        "        super().__init__()\n"
        "        self.layers = nn.ModuleList([nn.Linear(width, width) for _ in range(depth)])\n"
        "    def forward(self, x):\n"
        "        for l in self.layers:\n            x = double(l(x)) * SCALE\n        return x\n",
        f"%%modelset save nets --store {path}\ntorch.manual_seed(0)\n[Net(width=5, depth=3) for _ in range(3)]",
        f"%%modelset save lstms --store {path}\n[nn.LSTM(6, 8, num_layers=2) for _ in range(2)]",
        f"%%modelset save plain --store {path}\n[nn.Linear(4, 2) for _ in range(3)]",
        f"ms = %modelset recover nets --store {path}\ny = ms[2](torch.ones(1, 5))",
    ]
    for cell in cells:
        result = ip.run_cell(cell)
        assert result.success, result.error_in_exec or result.error_before_exec
    assert type(ip.user_ns["ms"][0]) is ip.user_ns["Net"]  # the session's own class, no trust prompt
    code = ("import sys, torch, mm_jupyter as mm\n"
            "ms = mm.Store(sys.argv[1], trust_code=sys.argv[2] == 'trust').recover_set('nets')\n"
            "print(ms[2](torch.ones(1, 5)).tolist())")
    refused = sm.run_python(code, str(path), "no", check=False)
    assert "TrustError" in refused.stderr and "class Net(nn.Module):" in refused.stderr
    assert "def double(x):" in refused.stderr
    assert json.loads(sm.run_python(code, str(path), "trust").stdout) == ip.user_ns["y"].tolist()
    # the magic takes the flag too
    assert ip.run_cell(f"%modelset recover nets --store {path} --trust-code -o again").success
    assert sm.sd_digests(ip.user_ns["again"][1].state_dict()) == sm.sd_digests(ip.user_ns["ms"][1].state_dict())


def test_hooks_need_a_factory_and_survive_through_it(tmp_path: Path):
    store = mm.Store(tmp_path / "s")
    plain = nn.Sequential(nn.Linear(4, 4))
    plain.register_forward_pre_hook(sm._halve_input)
    with pytest.raises(mm.ArchitectureError, match=r"module \(root\) \(Sequential\) has hooks registered"):
        store.save_set([plain], "hooked")
    models = [sm.fill_(sm.hooked_mlp(), s) for s in SEEDS]
    ms = store.recover_set(store.save_set(models, "hooked"))
    x = torch.linspace(-1, 1, 8).reshape(2, 4)
    for i, m in enumerate(models):
        got = ms[i]  # a template with hooks is copied the general way (deepcopy), hooks included
        assert list(got._forward_pre_hooks.values()) == [sm._halve_input]
        with torch.no_grad():
            assert torch.equal(got(x), m.eval()(x))
    store.close()


def test_materialize_benchmark_runs():
    from mm_jupyter.bench.__main__ import main

    assert main(["materialize", "--models", "20", "--repeat", "1"]) == 0


@pytest.mark.slow
def test_stored_candidates_of_script_classes_need_trust_in_another_process(tmp_path: Path):
    save = r"""
import sys, torch
from torch import nn
import mm_jupyter as mm

class Tower(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.body = nn.ModuleList([nn.Linear(6, width), nn.Linear(width, width)])
        self.head = nn.Linear(width, 3)
    def forward(self, x):
        for layer in self.body:
            x = torch.relu(layer(x))
        return self.head(x)

torch.manual_seed(0)
mm.add_candidates(mm.Store(sys.argv[1]), {f"t{i}": Tower(8) for i in range(3)}, "towers")
"""
    search = r"""
import sys, torch, mm_jupyter as mm
store = mm.Store(sys.argv[1])
cands = mm.load_candidates(store, "towers", trust_code=sys.argv[2] == "trust")
g = torch.Generator().manual_seed(0)
x, y = torch.randn(96, 6, generator=g), torch.randint(0, 3, (96,), generator=g)
try:
    print(list(mm.search(cands, (x, y), k=1).ranking["model"]))
except mm.TrustError as e:
    print("TrustError", str(e).splitlines()[1].strip())
"""
    script = tmp_path / "save_towers.py"  # a script, so the class has source to record
    script.write_text(save)
    sm.run_python("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
                  str(script), str(tmp_path / "s"))
    refused = sm.run_python(search, str(tmp_path / "s"), "no").stdout.strip().splitlines()[-1]
    assert refused == "TrustError definitions of Tower:"
    ranking = json.loads(sm.run_python(search, str(tmp_path / "s"), "trust").stdout.strip().splitlines()[-1]
                         .replace("'", '"'))
    assert sorted(ranking) == ["t0", "t1", "t2"]


def test_a_structural_record_keeps_the_first_model_s_frozen_parameters(tmp_path: Path):
    """As ``ModelSet.model`` documents: ``requires_grad`` is the record's, for a structural record the
    first saved model's (a layer frozen for transfer learning stays frozen); training flags are not
    kept (recovered models are in eval mode)."""
    models = [nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)) for _ in range(2)]
    for m in models:
        m[0].requires_grad_(False)
        m.train()
    store = mm.Store(tmp_path / "s")
    ms = store.recover_set(store.save_set(models, "frozen"))
    for got in (ms[0], ms.load()[1]):
        assert [p.requires_grad for p in got.parameters()] == [False, False, True, True]
        assert not got.training
    store.close()
