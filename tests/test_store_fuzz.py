"""A fuzzer for hostile stores (Hypothesis): valid manifests and architecture records, mutated as an
attacker would — names of dangerous callables and modules, the classes' own method names as
attributes, huge shapes and counts, deep nesting, remote-code Hugging Face configs — are recovered
without ``trust_code`` in a worker process with a memory limit (tests/fuzz_worker.py), which
watches for side effects. Every example must end with no side effect, no crash, no hang, and every
failure an ``MMError``.

The quick profile runs in ``make test`` (a fixed, derandomised set of examples); the long one runs
``MM_FUZZ_EXAMPLES`` examples (e.g. ``MM_FUZZ_EXAMPLES=20000``), randomised.
"""
from __future__ import annotations

import copy
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
import store_models as sm
import torch
import zoo_models as zoo
import zoo_patterns as zp
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import mm_jupyter as mm

pytestmark = pytest.mark.xdist_group("store-fuzz")  # its module-scoped fixture is built once

QUICK_EXAMPLES = 60
EXAMPLES = int(os.environ.get("MM_FUZZ_EXAMPLES", QUICK_EXAMPLES))
LONG = "MM_FUZZ_EXAMPLES" in os.environ
#: Seconds one example may take in the worker (open, recover, build, forward, verify, rebuild).
EXAMPLE_TIMEOUT = 120.0

#: References a record may name, none of which it may import or call: process, file, network and
#: global-state functions, attribute paths through modules, modules with import-time effects, a
#: canary module that writes the sentinel when imported, and legitimate classes in wrong places.
DANGEROUS_REFS = [
    "os:system", "posix:system", "builtins:exec", "builtins:eval", "builtins:__import__", "builtins:open",
    "builtins:getattr", "subprocess:Popen", "subprocess:run", "torch:load", "torch:save", "torch:seed",
    "torch:manual_seed", "torch:set_default_dtype", "torch:set_num_threads", "torch:os.system",
    "torch:builtins.exec", "torch.nn.functional:torch.load", "torch.nn.functional:np.load",
    "torch.nn.functional:torch.hub.load", "torch.nn.functional:torch.seed", "torch.hub:load",
    "torch.hub:download_url_to_file", "numpy:load", "numpy.lib.npyio:load", "pickle:loads", "shutil:rmtree",
    "importlib:import_module", "matplotlib.pyplot:Figure", "this:s", "antigravity:geohash", "webbrowser:open",
    "code:interact", "ctypes:CDLL", "sys:exit", "os:_exit", "os:abort", "signal:raise_signal",
    "torch.testing._internal.common_utils:TestCase", "torch._dynamo:reset", "transformers:AutoModel",
    "transformers.models.auto.modeling_auto:AutoModel", "torch.nn:Linear", "torch.nn.modules.module:Module",
    "torch:Tensor", "torch:Tensor.numpy", "torch._C:_nn", "mm_jupyter.store.provenance:load_file",
    "mm_jupyter.store.trust:allow_modules", "mm_jupyter.store.trust:allow_functions", "fuzz_canary:Boom",
    "fuzz_canary:boom", "fuzz_canary.sub:Boom", "__main__:Net", "mm_jupyter_source_0123456789ab:Evil",
    "torch.nn.modules.linear:Linear", "torch.nn.modules.activation:ReLU", "zoo_models:ListNet", "zoo_models:swish",
    "torch.nn.functional:relu", "torch._C._nn:gelu", "operator:attrgetter", "operator:methodcaller",
    "functools:partial", "enum:Enum", "http:HTTPStatus", "transformers.models.bert.configuration_bert:BertConfig",
    "transformers.models.bert.modeling_bert:BertModel", "", ":", "a:b:c", "torch:", ":relu",
]
#: Attribute names that nn.Module or the recorded classes call or rely on.
DANGEROUS_ATTRS = sorted({
    "forward", "state_dict", "_compiled_call_impl", "extra_repr", "__class__", "__dict__", "__call__",
    "__getattr__", "__setattr__", "__reduce_ex__", "__deepcopy__", "__setstate__", "__repr__", "_call_impl",
    "_parameters", "_buffers", "_modules", "training", "_forward_hooks", "_forward_pre_hooks",
    "_state_dict_hooks", "register_buffer", "named_modules", "load_state_dict", "_load_from_state_dict",
    "_apply", "eval", "train", "to", "_version", "dump_patches", "call_super_init", "_flat_weights",
    "_flat_weights_names", "activation", "act", "config", "_get_name", "__init__", "__new__",
    *(n for n in dir(nn.LSTM) if not n.startswith("__")),
    *(n for n in dir(nn.TransformerEncoderLayer) if not n.startswith("__")),
})
HUGE = [2**31, 2**40, 2**47, 2**48, 2**62, 2**64, 10**30, -1, -(2**63)]


def _touch(sentinel: str) -> str:
    return f"touch {sentinel}"


def _sets() -> dict[str, tuple[Any, ...]]:
    """name -> (models, save kwargs, input spec for the worker)."""
    from transformers import BertConfig, BertModel

    def seeded(make: Any, n: int = 2) -> list[nn.Module]:
        out = []
        for seed in range(n):
            torch.manual_seed(seed)
            out.append(sm.fill_(make(), seed).eval())
        return out

    bert = lambda: BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,  # noqa: E731
                                        intermediate_size=20, vocab_size=50, max_position_embeddings=16))
    return {
        "listnet": (seeded(lambda: zoo.ListNet(width=6, depth=2)), {}, ["float", [2, 4]]),
        "noneslots": (seeded(zoo.NoneSlots), {}, ["float", [2, 4]]),
        "lstm": (seeded(lambda: nn.LSTM(4, 6)), {}, ["float", [3, 2, 4]]),
        "tied": (seeded(zoo.Tied), {}, ["int", [2, 5], 11]),
        "encoder": (seeded(lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)), {},
                    ["float", [2, 5, 8]]),
        "factory": (seeded(lambda: nn.Linear(4, 2)),
                    {"architecture": mm.Architecture.factory(nn.Linear, in_features=4, out_features=2)},
                    ["float", [2, 4]]),
        "bert": (seeded(bert), {}, ["int", [2, 6], 50]),
        "wrapped": (seeded(zoo.HFWrapper, 1), {}, ["int", [2, 6], 50]),
        "mmlib": (seeded(lambda: nn.Sequential(nn.Linear(4, 3), nn.Tanh())), {"approach": "mmlib-base"},
                  ["float", [2, 4]]),
        # enum members, a cache of tensors filled by an eval forward, tensors in plain attributes
        "enum": ([zp.build("enum-vit", s) for s in range(2)], {}, ["float", [2, 3, 8, 8]]),
        "cache": ([zp.build("cache-levit", s) for s in range(2)], {}, ["float", [2, 3, 12, 12]]),
        "tensors": ([zp.build("tensor-attributes", s) for s in range(2)], {}, ["float", [2, 4]]),
    }


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One valid store holding every kind of record and version the fuzzer mutates, and the
    manifests of its versions."""
    root = tmp_path_factory.mktemp("fuzz") / "template"
    store = mm.Store(root)
    refs = {}
    inputs = {}
    for name, (models, kw, spec) in _sets().items():
        refs[name] = store.save_set(models, name, **kw)
        inputs[name] = spec
    models = _sets()["listnet"][0]
    with torch.no_grad():
        models[1].head.bias.add_(1.0)
    refs["listnet-update"] = store.save_set(models, "listnet", approach="update", base=refs["listnet"])
    inputs["listnet-update"] = inputs["listnet"]
    manifests = {}
    for key, ref in refs.items():
        row = store.row(ref)
        manifests[key] = (str(ref), copy.deepcopy(store.catalog.manifest(row.manifest_oid)))
    assert store.verify() == []
    store.close()
    return {"root": str(root), "manifests": manifests, "inputs": inputs}


class Worker:
    """tests/fuzz_worker.py in a subprocess; restarted after a crash or a hang."""

    def __init__(self, scratch: Path, sentinel: Path) -> None:
        self.scratch, self.sentinel = scratch, sentinel
        self.proc: subprocess.Popen[str] | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()

    def _start(self) -> None:
        env = sm.subprocess_env()
        env["MM_FUZZ_SENTINEL"] = str(self.sentinel)
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("fuzz_worker.py")), str(self.scratch)], cwd=sm.ROOT,
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines = queue.Queue()
        out = self.proc.stdout
        assert out is not None

        def pump() -> None:
            for line in out:
                self.lines.put(line)
            self.lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        ready = self.lines.get(timeout=300)
        assert ready is not None and json.loads(ready) == {"ready": True}, self._stderr()

    def _stderr(self) -> str:
        if self.proc is None or self.proc.stderr is None:
            return ""
        try:
            return self.proc.stderr.read()[-3000:]
        except ValueError:
            return ""

    def run(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        try:
            line = self.lines.get(timeout=EXAMPLE_TIMEOUT)
        except queue.Empty:
            self.close()
            return {"crash": f"no answer within {EXAMPLE_TIMEOUT} s (a hang)"}
        if line is None:
            code = self.proc.wait()
            err = self._stderr()
            self.proc = None
            return {"crash": f"the worker died (exit code {code}):\n{err}"}
        out: dict[str, Any] = json.loads(line)
        return out

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    root = tmp_path_factory.mktemp("fuzz-worker")
    w = Worker(root / "scratch", root / "SENTINEL")
    yield w
    w.close()
    shutil.rmtree(root, ignore_errors=True)


# -- mutations ---------------------------------------------------------------------------------------
DEEP = "@@DEEP@@"


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    _get(doc, path[:-1])[path[-1]] = value
    return doc


def values(sentinel: str) -> st.SearchStrategy[Any]:
    refs = st.sampled_from(DANGEROUS_REFS)
    leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                       st.text(max_size=12), refs, st.sampled_from(HUGE))
    plain = st.recursive(leaves, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                       max_size=3), max_leaves=8)
    shapes = st.lists(st.sampled_from([0, 1, 3, *HUGE]), min_size=0, max_size=4)
    cmd = _touch(sentinel)
    tagged = st.one_of(
        refs.map(lambda r: {"$fn": r}), refs.map(lambda r: {"$class": r}), refs.map(lambda r: {"$enum": [r, "X"]}),
        refs.map(lambda r: {"$hfconfig": [r, {"command": cmd}, {}]}),
        st.just({"$hfconfig": ["transformers.models.bert.configuration_bert:BertConfig",
                               {"auto_map": {"AutoModel": "evil/repo--modeling.Evil"}, "trust_remote_code": True},
                               {}]}),
        st.just({"$hfconfig": ["transformers.models.bert.configuration_bert:BertConfig", {}, {"__class__": 1}]}),
        st.just({"$hfconfig": ["transformers.models.bert.configuration_bert:BertConfig", {},
                               {"_attn_implementation_internal": "kernels-community/flash-attn"}]}),
        shapes.map(lambda s: {"$tensor": ["float32", s, "AAAA"]}), shapes.map(lambda s: {"$size": s}),
        st.just({"$ref": "nope"}), st.just({"$module": "nope"}), st.just({"$weakref": {"$fn": "torch:relu"}}),
        st.just({"$dict": [[[], 1]]}), st.just({"$set": [[1]]}), st.just({"$device": "cuda:99"}),
        st.just({"$dtype": "object"}), st.just({"$float": "1e999"}), st.just({"$tuple": DEEP}),
        st.just({"$fn": "@Evil"}), st.just({"$nope": 1}),
        shapes.map(lambda s: {"$state": ["x#0", "float32", s]}), st.just({"$state": ["fc.weight", "float32", [4]]}),
        st.just({"$state": "x"}), st.just({"$enum": ["zoo_patterns:Format", "__class__"]}),
        st.just({"$enum": ["zoo_patterns:Format", "_missing_"]}), st.just({"$enum": ["enum:Enum", "X"]}),
    )
    return st.one_of(tagged, plain, st.just(DEEP), shapes)


def architectures(sentinel: str) -> st.SearchStrategy[dict[str, Any]]:
    """Whole architecture records naming dangerous callables, remote code and bombs."""
    refs = st.sampled_from(DANGEROUS_REFS)
    cmd = _touch(sentinel)
    kwargs = st.sampled_from([{"command": cmd}, {"args": cmd, "shell": True}, {"f": "/etc/passwd"},
                              {"in_features": 2**20, "out_features": 2**20}, {"source": f"open({sentinel!r}, 'w')"}])
    bert = "transformers.models.bert.modeling_bert:BertModel"
    configs = st.sampled_from([
        {"backbone": "evil/repo", "use_timm_backbone": False}, {"auto_map": {"AutoModel": "evil/repo--m.Evil"}},
        {"trust_remote_code": True}, {"num_hidden_layers": 10**6, "hidden_size": 16, "num_attention_heads": 2},
        {"vocab_size": 10**12, "hidden_size": 2**20}, {"max_position_embeddings": 10**11},
        {"attn_implementation": "kernels-community/flash-attn"}, {"hidden_size": -4}, {"__class__": "x"},
    ])
    source = f"import os\nos.system({cmd!r})\nclass Evil:\n    pass\n"
    return st.one_of(
        st.builds(lambda r, k: {"kind": "factory", "ref": r, "kwargs": k}, refs, kwargs),
        st.builds(lambda r, c: {"kind": "hf", "ref": r, "kwargs": {}, "config": c}, st.just(bert) | refs, configs),
        st.just({"kind": "source", "ref": "Evil", "kwargs": {}, "source": source}),
        st.builds(lambda r: {"kind": "structure", "ref": "x", "kwargs": {}, "structure": {
            "classes": [r], "source": None, "root": {"c": 0, "t": False, "p": [], "b": [], "m": [], "a": []}}}, refs),
        st.just({"kind": "structure", "ref": "x", "kwargs": {}, "structure": {
            "classes": ["@Evil"], "source": {"code": source, "names": ["Evil"]},
            "root": {"c": 0, "t": False, "p": [], "b": [], "m": [], "a": []}}}),
        st.just({"kind": "pickle", "ref": "builtins:eval"}),
    )


@st.composite
def hostile(draw: st.DrawFn, templates: dict[str, Any], sentinel: str) -> tuple[str, dict[str, Any], str]:
    """(template set, worker message, what was done) for one mutated manifest."""
    key = draw(st.sampled_from(sorted(templates["manifests"])))
    ref, manifest = templates["manifests"][key]
    doc = copy.deepcopy(manifest)
    done = []
    for _ in range(draw(st.integers(1, 3))):
        if not isinstance(doc, dict):  # an earlier step replaced the whole manifest
            break
        op = draw(st.sampled_from(["replace-in-record", "replace-anywhere", "attribute", "rename", "reference",
                                   "architecture", "shape", "count", "deep"]))
        arch_paths = [p for p in _paths(doc) if p[:2] == ("set", "architecture")]
        if op == "replace-in-record" and arch_paths:
            path = draw(st.sampled_from(arch_paths))
            doc = _set(doc, path, draw(values(sentinel)))
        elif op == "replace-anywhere":
            path = draw(st.sampled_from(list(_paths(doc))))
            doc = _set(doc, path, draw(values(sentinel)))
        elif op in ("attribute", "rename"):
            nodes = [p for p in arch_paths if isinstance(_get(doc, p), dict) and "a" in _get(doc, p)]
            if not nodes:
                continue
            node = _get(doc, draw(st.sampled_from(nodes)))
            name = draw(st.sampled_from(DANGEROUS_ATTRS))
            if op == "rename" and isinstance(node["a"], list) and node["a"]:
                entry = node["a"][draw(st.integers(0, len(node["a"]) - 1))]
                if isinstance(entry, list) and entry:
                    entry[0] = name
            elif isinstance(node["a"], list):
                node["a"].append([name, draw(values(sentinel))])
        elif op == "reference":
            strings = [p for p in _paths(doc) if isinstance(_get(doc, p), str) and ":" in _get(doc, p)]
            if strings:
                doc = _set(doc, draw(st.sampled_from(strings)), draw(st.sampled_from(DANGEROUS_REFS)))
        elif op == "architecture" and isinstance(doc.get("set"), dict):
            doc["set"]["architecture"] = draw(architectures(sentinel))
        elif op == "shape":
            lists = [p for p in _paths(doc) if isinstance(_get(doc, p), list)
                     and all(isinstance(x, int) for x in _get(doc, p)) and _get(doc, p)]
            if lists:
                doc = _set(doc, draw(st.sampled_from(lists)), draw(st.lists(st.sampled_from(HUGE), min_size=1,
                                                                           max_size=3)))
        elif op == "count":
            ints = [p for p in _paths(doc) if type(_get(doc, p)) is int]
            if ints:
                doc = _set(doc, draw(st.sampled_from(ints)), draw(st.sampled_from(HUGE)))
        elif op == "deep":
            path = draw(st.sampled_from(list(_paths(doc))))
            doc = _set(doc, path, DEEP)
        done.append(op)
    text = json.dumps(doc, separators=(",", ":"), sort_keys=True)
    depth = draw(st.sampled_from([200, 1_000, 100_000]))
    text = text.replace(json.dumps(DEEP), "[" * depth + "]" * depth)
    msg = {"template": templates["root"], "set": ref, "manifest": text, "input": templates["inputs"][key]}
    return key, msg, ", ".join(done)


@pytest.mark.slow
def test_the_worker_recovers_the_untouched_templates(templates: dict[str, Any], worker: Worker) -> None:
    """The harness sees real recoveries: every template set recovers, builds and runs without trust."""
    for key, (ref, manifest) in templates["manifests"].items():
        text = json.dumps(manifest, separators=(",", ":"), sort_keys=True)
        out = worker.run({"template": templates["root"], "set": ref, "manifest": text,
                          "input": templates["inputs"][key]})
        assert "crash" not in out and out["raw"] == {} and out["findings"] == [], (key, out)
        assert out["errors"] == {}, (key, out["errors"])


@pytest.mark.slow
def test_a_side_effect_is_seen(templates: dict[str, Any], worker: Worker) -> None:
    """The harness would notice code running: a trusted-looking source record is refused, and a
    record naming the canary module shows up if the gate let it import (here it does not)."""
    ref, manifest = templates["manifests"]["listnet"]
    doc = copy.deepcopy(manifest)
    doc["set"]["architecture"]["structure"]["classes"][0] = "fuzz_canary:Boom"
    out = worker.run({"template": templates["root"], "set": ref, "manifest": json.dumps(doc),
                      "input": templates["inputs"]["listnet"]})
    assert out["findings"] == [] and "refused before importing it" in out["errors"]["build"], out
    # the watch itself works: importing the canary in the worker's own process would be reported
    import fuzz_worker

    assert "fuzz_canary" in fuzz_worker.CANARIES


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not LONG, print_blob=True,
          suppress_health_check=list(HealthCheck))
@pytest.mark.slow
@given(data=st.data())
def test_hostile_stores_never_run_code_crash_or_raise_raw_errors(templates: dict[str, Any], worker: Worker,
                                                                  data: st.DataObject) -> None:
    key, msg, done = data.draw(hostile(templates, str(worker.sentinel)), label="mutation")
    out = worker.run(msg)
    where = f"set {key} after {done}"
    assert "crash" not in out, f"{where}: {out['crash']}"
    assert out["findings"] == [], f"{where}: side effects {out['findings']}"
    assert out["raw"] == {}, f"{where}: raw errors {json.dumps(out['raw'], indent=1)[:4000]}"
