"""Architectures are recorded without pickle and rebuilt in a fresh process: importable factories
with kwargs, decorated factories, no-argument classes, Hugging Face configs, and classes defined
in notebook cells or scripts (recorded as source)."""
from __future__ import annotations

import functools
import json
import sys
import textwrap

import pytest
import store_models as sm
import torch

import mm_jupyter as mm


def check_report(report: dict, ref: str, models) -> None:
    got = report[ref]
    assert "error" not in got, (ref, got.get("error"))
    want = sm.model_digests(models)
    assert got["module"] == want, ref
    assert got["state_dicts"] == want, ref
    mods = list(models.values()) if isinstance(models, dict) else list(models)
    assert got["ties"] == [sm.ties(m) for m in mods], ref


@pytest.mark.slow
def test_importable_factories_and_classes(store, store_path):
    sets = {}

    def save(models, name, **kw):
        ref = store.save_set(models, name, **kw)
        sets[str(ref)] = models
        return store.row(ref).manifest["architecture"]

    mk = lambda f, n=3, **kw: [sm.fill_(f(**kw), i) for i in range(n)]  # noqa: E731

    arch = save(mk(sm.mlp, width=5, depth=3), "by-ref",
                architecture=mm.Architecture.factory("store_models:mlp", width=5, depth=3))
    assert arch == {"kind": "factory", "ref": "store_models:mlp", "kwargs": {"width": 5, "depth": 3}}
    arch = save(mk(sm.mlp, width=7), "by-callable", architecture=mm.Architecture.factory(sm.mlp, width=7))
    assert arch["ref"] == "store_models:mlp" and arch["kwargs"] == {"width": 7}
    arch = save(mk(sm.tagged_mlp, width=6), "decorated")  # no architecture= needed
    assert arch == {"kind": "factory", "ref": "store_models:tagged_mlp", "kwargs": {"width": 6, "inputs": 4}}
    arch = save(mk(sm.MLP), "class")  # a plain class: its structure, no constructor call, no source
    assert arch["kind"] == "structure" and arch["structure"]["classes"][0] == "store_models:MLP"
    assert arch["structure"]["source"] is None
    arch = save(mk(sm.TiedNet), "tied-class")
    assert arch["structure"]["classes"][0] == "store_models:TiedNet"
    arch = save({"x": sm.fill_(sm.NeedsArgs(3), 1)}, "class-kwargs",
                architecture=mm.Architecture.factory(sm.NeedsArgs, width=3))
    assert arch == {"kind": "factory", "ref": "store_models:NeedsArgs", "kwargs": {"width": 3}}
    arch = save(mk(sm.param_bag, spec=[["w", "float16", [2, 3], "param"], ["n", "int64", [], "buffer"]]),
                "bag", architecture=mm.Architecture.factory("store_models:param_bag",
                                                            spec=[["w", "float16", [2, 3], "param"],
                                                                  ["n", "int64", [], "buffer"]]))
    assert arch["kwargs"]["spec"][1] == ["n", "int64", [], "buffer"]
    report = sm.fresh_report(store_path, list(sets))
    for ref, models in sets.items():
        check_report(report, ref, models)


def test_architecture_records_are_checked():
    with pytest.raises(mm.ArchitectureError, match="not importable"):
        mm.Architecture.factory(lambda: sm.MLP())
    with pytest.raises(mm.ArchitectureError, match="not registered"):
        mm.Architecture.factory(sm.plain_factory, width=3)
    with pytest.raises(mm.ArchitectureError, match="not registered"):
        mm.Architecture.factory("store_models:plain_factory", width=3)
    with pytest.raises(mm.ArchitectureError, match="cannot import"):
        mm.Architecture.factory("store_models:nope")
    with pytest.raises(mm.ArchitectureError, match="module:qualname"):
        mm.Architecture.factory("store_models.MLP")
    with pytest.raises(mm.ArchitectureError, match="JSON"):
        mm.Architecture.factory(sm.mlp, width=torch.tensor(3))
    with pytest.raises(mm.ArchitectureError, match="refused"):
        mm.Architecture.factory("builtins:dict")
    with pytest.raises(mm.ArchitectureError, match="refused"):
        mm.Architecture("factory", "builtins:dict").build()
    with pytest.raises(mm.ArchitectureError):
        mm.Architecture.from_json({"kind": "pickle", "ref": "x"})


# -- Hugging Face --------------------------------------------------------------------------------


@pytest.mark.slow
def test_hugging_face_models_rebuild_from_config(store, store_path):
    transformers = pytest.importorskip("transformers")
    from transformers import BertConfig, BertForMaskedLM, BertModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    bert_cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                          vocab_size=100)
    vit_cfg = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=37)
    sets = {
        "bert": [BertModel(bert_cfg) for _ in range(3)],
        "bert-mlm": [BertForMaskedLM(bert_cfg) for _ in range(2)],  # decoder tied to the embeddings
        "vit": [ViTModel(vit_cfg) for _ in range(2)],
    }
    assert sm.ties(sets["bert-mlm"][0]), "expected tied weights in BertForMaskedLM"
    refs = {}
    for name, models in sets.items():
        ref = store.save_set(models, name)
        arch = store.row(ref).manifest["architecture"]
        assert arch["kind"] == "hf" and arch["ref"].startswith("transformers.") and arch["config"]
        refs[name] = str(ref)
    ids = torch.tensor([[1, 5, 7, 2], [3, 3, 9, 0]])
    pixels = torch.linspace(-1, 1, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8)
    for name, models in sets.items():
        ms = store.recover_set(refs[name])
        for i, orig in enumerate(models):
            m = ms[i]
            assert type(m) is type(orig)
            assert sm.sd_digests(m.state_dict()) == sm.sd_digests(orig.state_dict())
            assert sm.ties(m) == sm.ties(orig)
            orig.eval()
            with torch.no_grad():
                inp = {"pixel_values": pixels} if name == "vit" else {"input_ids": ids}
                a, b = orig(**inp), m(**inp)
            key = "logits" if name == "bert-mlm" else "last_hidden_state"
            assert sm.tensor_bytes(a[key]) == sm.tensor_bytes(b[key])
    m = store.recover_set(refs["bert-mlm"])[1]
    assert m.cls.predictions.decoder.weight is m.bert.embeddings.word_embeddings.weight
    report = sm.fresh_report(store_path, refs.values())
    for name, models in sets.items():
        check_report(report, refs[name], models)
    assert transformers.__version__


# -- classes defined in a notebook cell / a script -------------------------------------------------

CELLS = [
    """
import torch
from torch import nn
import mm_jupyter as mm
WIDTH = 6
SCALE = 0.5
NAMES = ("in", "out")

def act(x):
    return torch.tanh(x) * SCALE
""",
    """
class Block(nn.Module):
    def __init__(self, width=WIDTH):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        return act(self.lin(x))

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, WIDTH)
        self.block = Block()
        self.out = nn.Linear(WIDTH, len(NAMES))

    def forward(self, x):
        return self.out(self.block(act(self.fc(x))))
""",
    """
store = mm.Store(STORE_PATH)
torch.manual_seed(0)
models = [Net() for _ in range(3)]
for i, m in enumerate(models):
    m.block.steps.fill_(i + 10)
ref = store.save_set(models, "nb")
""",
    # the user edits the class and the constant in a later cell and saves again
    """
WIDTH = 5

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, WIDTH)
        self.out = nn.Linear(WIDTH, 1)

    def forward(self, x):
        return self.out(act(self.fc(x)))

models2 = {"first": Net(), "second": Net()}
ref2 = store.save_set(models2, "nb2")
""",
]

BAD_CELL = """
OFFSET = torch.ones(5)

class Uses(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)

    def forward(self, x):
        return self.fc(x) + OFFSET

store.save_set([Uses()], "bad")
"""


@pytest.fixture
def shell(tmp_path, monkeypatch):
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    main = sys.modules["__main__"]
    cfg = Config()
    cfg.HistoryManager.enabled = False
    before = InteractiveShell._instance  # the process-wide test shell other suites' fixtures use, if started
    InteractiveShell.clear_instance()
    sh = InteractiveShell.instance(config=cfg)
    yield sh
    InteractiveShell.clear_instance()
    if before is not None:  # put it back: the same worker process may run those suites next
        for cls in type(before)._walk_mro():
            cls._instance = before
    sys.modules["__main__"] = main


@pytest.mark.slow
def test_class_defined_in_a_notebook_cell(shell, store_path):
    shell.user_ns["STORE_PATH"] = str(store_path)
    for cell in CELLS:
        result = shell.run_cell(cell)
        assert result.error_before_exec is None, result.error_before_exec
        assert result.error_in_exec is None, result.error_in_exec
    ns = shell.user_ns
    arch = ns["store"].row(ns["ref"]).manifest["architecture"]
    assert arch["kind"] == "structure" and arch["ref"] == "Net"
    src = arch["structure"]["source"]
    assert src["names"] == ["Net", "Block"]
    assert "class Block" in src["code"] and "def act" in src["code"] and "WIDTH = 6" in src["code"]
    arch2 = ns["store"].row(ns["ref2"]).manifest["architecture"]
    src2 = arch2["structure"]["source"]["code"]
    assert "WIDTH = 5" in src2 and "Block" not in src2
    # a cell using a global that cannot be recorded fails cleanly and stores nothing
    before = len(ns["store"].sets())
    result = shell.run_cell(BAD_CELL)
    assert isinstance(result.error_in_exec, mm.ArchitectureError), result.error_in_exec
    assert "OFFSET" in str(result.error_in_exec)
    assert len(ns["store"].sets()) == before
    # the session that defined the classes recovers them without being asked for trust: the current
    # Net is its own class (identical source), the older one source this process recorded itself
    x = torch.linspace(-1, 1, 8).reshape(2, 4)
    with torch.no_grad():
        want = [sm.tensor_bytes(m.eval()(x)) for m in ns["models"]]
        assert type(ns["store"].recover_set("nb2")[0]) is ns["Net"]
        assert [sm.tensor_bytes(m(x)) for m in ns["store"].recover_set("nb")] == want
    # a fresh process rebuilds both versions from their sources once the store is trusted ...
    report = sm.fresh_report(store_path, ["nb@1", "nb2@1"], trust=True)
    check_report(report, "nb@1", ns["models"])
    check_report(report, "nb2@1", ns["models2"])
    assert report["nb2@1"]["names"] == ["first", "second"]
    # ... and refuses to run the recorded code without trust, while tensors stay readable
    report = sm.fresh_report(store_path, ["nb2@1"])
    assert report["nb2@1"]["error"].startswith("TrustError: set 'nb2@1' would run code recorded in the store")
    # and so does this process, after the notebook's definitions are gone
    assert shell.run_cell("del Net, Block, act, WIDTH, SCALE").error_in_exec is None
    ms = mm.Store(store_path).recover_set("nb")
    with torch.no_grad():
        assert [sm.tensor_bytes(ms[i](x)) for i in range(3)] == want


SCRIPT = """
import sys
import torch
from torch import nn
import mm_jupyter as mm

HIDDEN = 3

class ScriptNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, HIDDEN)
        self.register_buffer("on", torch.tensor([True, False]))

torch.manual_seed(1)
store = mm.Store(sys.argv[1])
models = [ScriptNet() for _ in range(2)]
print(store.save_set(models, "script"))
import json, store_models
print(json.dumps(store_models.model_digests(models)))
"""


@pytest.mark.slow
def test_class_defined_in_a_script(tmp_path, store_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    import subprocess

    proc = subprocess.run([sys.executable, str(script), str(store_path)], cwd=sm.ROOT, env=sm.subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref, digests = proc.stdout.splitlines()
    assert ref == "script@1"
    store = mm.Store(store_path)
    arch = store.row("script@1").manifest["architecture"]
    assert arch["kind"] == "structure" and "HIDDEN = 3" in arch["structure"]["source"]["code"]
    with pytest.raises(mm.TrustError, match="class ScriptNet"):  # another process's code
        store.recover_set("script@1")[0]
    ms = store.recover_set("script@1", trust_code=True)
    assert type(ms[0]).__name__ == "ScriptNet"
    assert [sm.sd_digests(ms[i].state_dict()) for i in range(2)] == json.loads(digests)
    assert ms.state_dict(1)["on"].tolist() == [True, False]
    assert json.dumps(arch)  # plain JSON, no pickle
    store.close()


class _FillsOnBothDevices(torch.nn.Module):
    """A constructor that fills parameters (skipped on meta) and a tensor it puts on the CPU on
    purpose (never skipped: it holds values)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        torch.nn.init.normal_(self.lin.weight)
        torch.nn.init.kaiming_uniform_(self.lin.weight)
        self.lin.bias.data.uniform_(-1, 1)
        self.register_buffer("table", torch.empty(5, 2, device="cpu").fill_(7.0))


def test_a_meta_probe_skips_value_fills_only():
    """The save-time probe builds on the meta device without running initialisers (a meta tensor
    has no values): the same modules, keys, shapes and dtypes as a plain meta build, and a tensor
    the constructor makes on the CPU is still filled."""
    import transformers

    from mm_jupyter.store import architectures
    from mm_jupyter.store.architectures import Architecture

    def layout(m: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype, str]]:
        return {k: (tuple(v.shape), v.dtype, v.device.type) for k, v in m.state_dict().items()}

    cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16)
    for model in (transformers.GPT2Model(cfg), _FillsOnBothDevices()):
        arch = Architecture.infer(model) if isinstance(model, transformers.PreTrainedModel) else None
        build = (lambda a=arch: a.build_meta(trusted=True)) if arch is not None else None
        if build is None:
            with torch.device("meta"), architectures._meta_fills():
                probe = _FillsOnBothDevices()
            assert torch.equal(probe.table, torch.full((5, 2), 7.0))  # a real tensor keeps its fill
        else:
            probe = build()
        with torch.device("meta"):
            plain = type(model)(model.config) if arch is not None else _FillsOnBothDevices()
        assert layout(probe) == layout(plain)
        assert [n for n, _ in probe.named_modules()] == [n for n, _ in plain.named_modules()]
    # the fills really are skipped: a mode beneath the probe's sees every other call, never a fill
    from torch.overrides import TorchFunctionMode

    seen: list[object] = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with torch.device("meta"), Spy(), architectures._meta_fills():
        torch.empty(3).normal_()
        torch.nn.init.kaiming_uniform_(torch.empty(3, 4))
        torch.empty(3).add_(1)
    assert torch.Tensor.normal_ not in seen and torch.nn.init.kaiming_uniform_ not in seen
    assert torch.Tensor.add_ in seen


def test_the_probe_verdict_is_reused_only_for_the_same_factory_object(store, monkeypatch):
    """The save-time meta rebuild is skipped when the same record, layout and factory object were
    probed before; a factory redefined under the same name (a notebook cell run again) is probed
    afresh, so a record that no longer rebuilds the models is refused, never waved through."""
    from mm_jupyter.store import store as store_module

    models = [sm.mlp(width=6) for _ in range(2)]
    builds = []
    real_build = mm.Architecture.build_meta
    monkeypatch.setattr(mm.Architecture, "build_meta", lambda self, **kw: builds.append(1) or real_build(self, **kw))
    store_module._VERDICTS.clear()
    store.save_set(models, "p")
    store.save_set(models, "p")
    assert len(builds) == 1  # the second save reused the verdict

    def mlp(width: int = 8, depth: int = 2, inputs: int = 4) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(inputs, width + 1), torch.nn.Linear(width + 1, 1))

    from mm_jupyter.store import trust

    mlp.__module__, mlp.__qualname__ = sm.mlp.__module__, sm.mlp.__qualname__
    monkeypatch.setitem(trust._REGISTERED, "store_models:mlp", trust._REGISTERED["store_models:mlp"])  # restored after
    monkeypatch.setattr(sm, "mlp", mm.architecture(mlp))
    with pytest.raises(mm.StoreError, match="does not rebuild"):
        store.save_set(models, "p")
    assert len(builds) == 2
    assert store.recover_set("p").state_dict(1).keys() == models[1].state_dict().keys()


def test_a_factory_model_changed_after_it_was_built_is_refused_not_recovered_otherwise(store):
    """What the state cannot show — an activation swapped, a scalar attribute set, a module or hook
    added after the factory ran — would be lost by a factory record: the save names the change (for
    an inferred and an explicit record, for the first model and for a later one) instead of storing
    a set that recovers as other models. Unchanged models, and ones whose factory registers hooks,
    save and recover as before; a structural record keeps the change."""
    record = mm.Architecture.factory("store_models:tagged_mlp", width=6, inputs=4)
    x = torch.linspace(-1, 1, 8).reshape(2, 4)

    def built() -> torch.nn.Module:
        return sm.tagged_mlp(width=6, inputs=4)

    swapped = built()
    swapped[1] = torch.nn.Tanh()  # same state dict, another function
    flagged = built()
    flagged[1].inplace = True  # a scalar attribute set after the factory ran
    hooked = built()
    hooked.register_forward_hook(lambda m, a, out: out * 2)
    for models, name, why in (
            ([swapped], "swapped", r"module 1 is a Tanh, not a ReLU"),
            ([built(), swapped], "later", r"model '1' module 1 is a Tanh, not a ReLU"),
            ([flagged], "flagged", r"attribute 1.inplace is True, model 'built by the record' has False"),
            ([built(), flagged], "later-flag", r"model '1' attribute 1.inplace is True, model '0' has False"),
            ([hooked], "hooked", r"module \(root\) has hooks \{'_forward_hooks': 1\}, model 'built by the record' "
                                 r"has \{\}")):
        for architecture in (None, record):
            with pytest.raises((mm.StoreError, mm.ArchitectureError), match=why):
                store.save_set(models, name, architecture=architecture)
    with pytest.raises(mm.StoreError, match=r"'0' changed after it was built\? architecture=mm.Architecture"):
        store.save_set([swapped], "swapped")
    assert store.sets().empty  # nothing was stored by a refused save

    ok = [built(), built()]
    assert store.recover_set(store.save_set(ok, "ok")).architecture.kind == "factory"
    store.save_set([sm.fill_(sm.hooked_mlp(), 1)], "hooks-by-factory")  # its hooks come with the factory
    coded = [sm.fill_(sm.with_code(), s) for s in (1, 2)]  # a closure and a partial made per call
    got = store.recover_set(store.save_set(coded, "with-code"))
    with torch.no_grad():
        assert torch.equal(got[1](x), coded[1].eval()(x))
    for at, f in ((1, sm.scaling(3.0)),  # the same code holding another value
                  (1, lambda x: x * 2.0),  # other code
                  (2, functools.partial(torch.clamp, min=1.0))):  # another argument
        changed = sm.with_code()
        changed[at].f = f
        with pytest.raises(mm.StoreError, match=f"attribute {at}.f differs"):
            store.save_set([changed], "with-code")
    normed = [sm.fill_(sm.weight_normed(), s) for s in (1, 2)]  # a class per parametrized module
    got = store.recover_set(store.save_set(normed, "weight-normed"))
    with torch.no_grad():
        assert torch.equal(got[1](x[:, :3]), normed[1].eval()(x[:, :3]))
    kept = store.recover_set(store.save_set([swapped], "kept", architecture=mm.Architecture.structural(swapped)))
    assert kept.architecture.kind == "structure"
    as_built = built()
    as_built.load_state_dict(swapped.state_dict())
    with torch.no_grad():
        assert torch.equal(kept[0](x), swapped(x)) and not torch.equal(as_built(x), swapped(x))
