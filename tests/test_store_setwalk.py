"""The one walk per model of a save (``SetWalk``) against the two walks it replaced (``StatePlan`` for
the tensors, ``SameArchitecture`` for the tree; verbatim copies in setwalk_reference.py): every kind
of difference gives the same verdict — the same tensors or the general path, the same StoreError
from the state, the same ArchitectureError message — and a save of the pair fails (or not) with the
message the old order gave. Rows marked ``STRICTER`` are holes of the old walks that the new one
closes (a module where the first model has a None child slot was silently dropped)."""
from __future__ import annotations

import copy
import re
from collections import OrderedDict
from typing import Any, Callable

import pytest
import setwalk_reference as ref
import torch
from torch import nn

import mm_jupyter as mm
from mm_jupyter.errors import ArchitectureError, StoreError
from mm_jupyter.store.statewalk import SetWalk
from mm_jupyter.store.tensors import _checked_row, extract_states, torch_dtype


class Block(nn.Module):
    """A module with every kind of thing the walks look at."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.lin2 = nn.Linear(4, 3)
        self.lin2.weight = self.lin.weight  # a tied parameter
        self.norm = nn.BatchNorm1d(3)
        self.act = nn.ReLU()
        self.register_buffer("mask", torch.ones(3), persistent=False)
        self.register_buffer("scale", torch.full((3,), 2.0))
        self.register_module("gap", None)
        self.k = 1
        self.eps = 1e-5
        self.flag = True
        self.label = "b"
        self.dims = (4, 3)
        self.nan = float("nan")
        self.opts = {"mode": "a"}
        self.cache = torch.zeros(2)  # a plain tensor attribute: stored per model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.lin(x))) * self.scale * self.mask


class SubReLU(nn.ReLU):
    pass


class SubLinear(nn.Linear):
    pass


def base() -> nn.Sequential:
    torch.manual_seed(0)
    shared = nn.Linear(3, 3)
    return nn.Sequential(Block(), shared, nn.ReLU(), shared)  # one module at two places


def _rename(mod: nn.Module, old: str, new: str) -> None:
    mod._modules = OrderedDict((new if k == old else k, v) for k, v in mod._modules.items())


def _set_param(mod: nn.Module, name: str, value: torch.Tensor) -> None:
    mod._parameters[name] = nn.Parameter(value)


def _set_weight(m: nn.Sequential, value: torch.Tensor) -> None:
    """Block's weight, tied as in the first model."""
    m[0].lin.weight = m[0].lin2.weight = nn.Parameter(value)


NO_CHANGE: Callable[[nn.Sequential], Any] = lambda m: None  # noqa: E731
# (what differs, how the second model is changed, old verdict == new verdict?)
CASES: list[tuple[str, Callable[[nn.Sequential], Any], bool | str]] = [
    ("nothing", NO_CHANGE, True),
    ("type of a stateless module", lambda m: m.__setitem__(2, SubReLU()), True),
    ("type of a module with state", lambda m: setattr(m[0], "lin", SubLinear(4, 3)), True),
    ("child names, stateless child", lambda m: _rename(m[0], "act", "act2"), True),
    ("child names, child with state", lambda m: _rename(m[0], "lin", "lin2"), True),
    ("child order", lambda m: setattr(m[0], "_modules", OrderedDict(reversed(list(m[0]._modules.items())))), True),
    ("attribute added", lambda m: setattr(m[0], "extra", 3), True),
    ("attribute removed", lambda m: delattr(m[0], "label"), True),
    ("int 1 vs float 1.0", lambda m: setattr(m[0], "k", 1.0), True),
    ("int 1 vs True", lambda m: setattr(m[0], "k", True), True),
    ("True vs int 1", lambda m: setattr(m[0], "flag", 1), True),
    ("float vs equal float", lambda m: setattr(m[0], "eps", float("1e-5")), True),
    ("float vs other float", lambda m: setattr(m[0], "eps", 1e-6), True),
    ("NaN vs another NaN", lambda m: setattr(m[0], "nan", float("nan")), True),
    ("NaN vs a number", lambda m: setattr(m[0], "nan", 0.0), True),
    ("tuple item int vs float", lambda m: setattr(m[0], "dims", (4.0, 3)), True),
    ("tuple vs list", lambda m: setattr(m[0], "dims", [4, 3]), True),
    ("str value", lambda m: setattr(m[0], "label", "c"), True),
    ("other attribute (dict) value", lambda m: setattr(m[0], "opts", {"mode": "b"}), True),
    ("other attribute (dict) equal", lambda m: setattr(m[0], "opts", {"mode": "a"}), True),
    ("tensor attribute shape", lambda m: setattr(m[0], "cache", torch.zeros(3)), True),
    ("tensor attribute values", lambda m: setattr(m[0], "cache", torch.ones(2)), True),
    ("simple attribute of a nested module", lambda m: setattr(m[0].lin, "in_features", 5), True),
    ("ReLU inplace", lambda m: setattr(m[2], "inplace", True), True),
    # the same kinds on modules whose attributes are all scalars (the per-node fingerprint decides there)
    ("plain module: False vs 0", lambda m: setattr(m[2], "inplace", 0), True),
    ("plain module: int vs float", lambda m: setattr(m[0].lin, "in_features", 4.0), True),
    ("plain module: int vs True", lambda m: setattr(m[0].lin, "in_features", True), True),
    ("plain module: equal float, another object", lambda m: setattr(m[0].norm, "eps", float("1e-5")), True),
    ("plain module: NaN vs a number", lambda m: setattr(m[0].norm, "momentum", float("nan")), True),
    ("plain module: float vs None", lambda m: setattr(m[0].norm, "momentum", None), True),
    ("plain module: attribute added", lambda m: setattr(m[0].lin, "extra", 1), True),
    ("plain module: attribute removed", lambda m: delattr(m[2], "inplace"), True),
    ("plain module: attributes in another order", lambda m: m[2].__dict__.update(inplace=m[2].__dict__.pop("inplace")),
     True),
    ("plain module: child renamed", lambda m: _rename(m, "2", "x"), True),
    ("plain module: child added to a leaf", lambda m: m[2].add_module("x", nn.ReLU()), True),
    ("plain module: child slot None added to a leaf", lambda m: m[2].register_module("x", None), True),
    ("state-dict hook", lambda m: m[0].lin._register_state_dict_hook(lambda *a: None),
     "module 0.lin (Linear) has hooks registered (_state_dict_hooks)"),  # STRICTER: hooks are code
    ("state-dict pre-hook", lambda m: m[0].norm.register_state_dict_pre_hook(lambda *a: None),
     "module 0.norm (BatchNorm1d) has hooks registered (_state_dict_pre_hooks)"),  # STRICTER
    ("forward hook (saved and lost by the old walks)", lambda m: m[0].lin.register_forward_hook(lambda *a: None),
     "module 0.lin (Linear) has hooks registered (_forward_hooks)"),  # STRICTER
    ("training flag (not compared by either)", lambda m: m[0].eval(), True),
    ("non-persistent buffer made persistent", lambda m: m[0]._non_persistent_buffers_set.discard("mask"), True),
    ("persistent buffer made non-persistent", lambda m: m[0]._non_persistent_buffers_set.add("scale"), True),
    ("buffer removed", lambda m: m[0]._buffers.pop("scale"), True),
    ("buffer slot None", lambda m: m[0]._buffers.__setitem__("scale", None), True),
    ("parameter slot None", lambda m: setattr(m[0].lin, "bias", None), True),
    ("dtype", lambda m: _set_weight(m, torch.zeros(3, 4, dtype=torch.float64)), True),
    ("shape", lambda m: _set_weight(m, torch.zeros(3, 5)), True),
    ("non-contiguous tensor", lambda m: _set_weight(m, torch.zeros(4, 3).t()), True),
    ("negative-bit view", lambda m: _set_weight(m, torch.zeros(3, 4)._neg_view()), True),
    ("buffer of other dtype", lambda m: m[0]._buffers.__setitem__("scale", torch.ones(3, dtype=torch.int64)), True),
    ("child module replaced by None", lambda m: setattr(m[0], "act", None), True),
    ("root child replaced by None", lambda m: m._modules.__setitem__("2", None), True),
    # STRICTER (the expected part of the new message): holes of the old walks, each of which saved a set
    # whose recovery differs. A module where the first model has a None child slot was not looked at;
    # sharing was not compared, and a recovered model has the first model's (two tensors kept apart
    # where the record ties them: one of them is lost).
    ("stateless module in the first model's None slot", lambda m: setattr(m[0], "gap", nn.ReLU()),
     "module 0.gap is a ReLU, model 'a' has None"),
    ("module with state in the first model's None slot", lambda m: setattr(m[0], "gap", nn.Linear(1, 1)),
     "module 0.gap is a Linear, model 'a' has None"),
    ("shared module replaced by an equal copy", lambda m: m.__setitem__(3, copy.deepcopy(m[1])),
     "module 3 is not module 1, which model 'a' shares at both places"),
    ("two modules made one", lambda m: setattr(m[0], "act", m[2]),
     "module 2 is module 0.act; model 'a' has two modules there"),
    ("tied parameter untied (an equal copy)",
     lambda m: setattr(m[0].lin2, "weight", nn.Parameter(m[0].lin.weight.detach().clone())),
     "parameter 0.lin2.weight is not parameter 0.lin.weight, which model 'a' ties to it"),
    ("parameters tied that the first model keeps apart", lambda m: setattr(m[0].lin2, "bias", m[0].lin.bias),
     "parameter 0.lin2.bias is parameter 0.lin.bias; model 'a' keeps them apart"),
    ("non-persistent buffer set to None", lambda m: m[0]._buffers.__setitem__("mask", None),
     "buffer 0.mask is None, model 'a' has a tensor"),
]


def _pair(change: Callable[[nn.Sequential], Any]) -> tuple[nn.Sequential, nn.Sequential]:
    first = base()
    other = copy.deepcopy(first)
    change(other)
    return first, other


def _expect(layout: Any) -> list[tuple[torch.dtype, torch.Size]]:
    return [(torch_dtype(s.dtype), torch.Size(s.shape)) for s in layout.specs]


def _state_error(other: nn.Module, layout: Any) -> str | None:
    try:
        _checked_row(other, "b", "a", layout)
    except StoreError as e:
        return str(e)
    return None


def old_verdict(first: nn.Module, other: nn.Module, structure: bool) -> tuple[Any, str | None, str | None]:
    """(tensors or None, state error, structure error) of the two old walks."""
    layout, _ = extract_states([first], ["a"])
    plan = ref.StatePlan.of(first)
    if plan is not None and plan.keys != layout.keys:
        plan = None
    if plan is not None:
        plan.expecting(_expect(layout))
    row = plan.tensors(other) if plan is not None else None
    state = _state_error(other, layout) if row is None else None
    arch = None
    if structure:
        try:
            ref.SameArchitecture(first, "a").check(other, "b")
        except ArchitectureError as e:
            arch = str(e)
    return row, state, arch


def new_verdict(first: nn.Module, other: nn.Module, structure: bool) -> tuple[Any, str | None, str | None]:
    layout, _ = extract_states([first], ["a"])
    walk = SetWalk(first, "a", structure=structure, keys=layout.keys, expect=_expect(layout))
    row = walk.walk(other, "b")
    state = _state_error(other, layout) if row is None else None
    return row, state, walk.difference


def _same_rows(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


@pytest.mark.parametrize("structure", [True, False], ids=["structural record", "factory record"])
@pytest.mark.parametrize("what, change, same", CASES, ids=[c[0] for c in CASES])
def test_one_walk_gives_the_old_verdicts(what: str, change: Callable[[nn.Sequential], Any], same: bool | str,
                                         structure: bool) -> None:
    first, other = _pair(change)
    old = old_verdict(first, other, structure)
    new = new_verdict(first, other, structure)
    if same is True:
        assert _same_rows(old[0], new[0]), what
        assert old[1:] == new[1:], what
    else:  # the hole: the old walks accepted the model
        assert old[1] is None and old[2] is None
        assert old[0] is not None or "state-dict" in what  # (a state-dict hook sent the old walk to state_dict())
        if "None slot" in what:  # and their tensors skipped the slot's state: now state_dict() gives them
            assert new[0] is None
            assert (new[1] is not None and "has extra key '0.gap.weight'" in new[1]) == what.startswith("module")
        if structure:
            assert new[2] is not None and str(same) in new[2], new[2]
        else:  # a factory record does not compare the tree
            assert new[2] is None
    if new[0] is not None:  # the fast path returns exactly what state_dict() holds, key by key
        sd = other.state_dict(keep_vars=True)
        keys = extract_states([first], ["a"])[0].keys
        assert sorted(sd) == sorted(keys)
        assert all(sd[k] is t for k, t in zip(keys, new[0]))


@pytest.mark.parametrize("what, change, same", CASES, ids=[c[0] for c in CASES])
def test_a_save_fails_with_the_old_message(tmp_path: Any, what: str, change: Callable[[nn.Sequential], Any],
                                           same: bool | str) -> None:
    """The whole save: the state's StoreError first (it comes from reading the tensors), else the
    tree's ArchitectureError, else the pair is stored and recovered equal."""
    first, other = _pair(change)
    _, state, arch = (old_verdict if same is True else new_verdict)(first, other, True)
    store = mm.Store(tmp_path / "s")
    expected = state or arch
    if expected is not None:
        with pytest.raises(StoreError) as info:
            store.save_set({"a": first, "b": other}, "pair")
        assert str(info.value) == expected
        assert isinstance(info.value, ArchitectureError) == (state is None)
        assert store.sets().empty  # nothing stored
    else:
        store.save_set({"a": first, "b": other}, "pair")
        ms = store.recover_set("pair")
        for i, m in enumerate((first, other)):
            got = ms.state_dict(i)
            want = m.state_dict()
            assert list(got) == list(want) + ["0.cache#0"]  # the plain tensor attribute, stored per model
            assert all(torch.equal(got[k], want[k].contiguous()) for k in want)
            assert torch.equal(got["0.cache#0"], m[0].cache)


def test_first_difference_in_model_order_is_reported(tmp_path: Any) -> None:
    """Several models differ: the error names the first one in the set's order, as before."""
    models = [base() for _ in range(5)]
    models[3][0].k = 2
    models[2][0].label = "z"
    with pytest.raises(ArchitectureError, match="model '2' attribute 0.label is 'z'"):
        mm.Store(tmp_path / "s").save_set(models, "five")


def test_state_difference_comes_before_a_tree_difference(tmp_path: Any) -> None:
    """As before, a difference in the state (any model) is reported before one in the tree."""
    models = [base() for _ in range(4)]
    models[1][0].k = 2
    _set_param(models[3][0].lin, "weight", torch.zeros(3, 5))
    with pytest.raises(StoreError, match="model '3' key '0.lin.weight'") as info:
        mm.Store(tmp_path / "s").save_set(models, "four")
    assert not isinstance(info.value, ArchitectureError)


def test_unplain_class_still_checks_the_tree_in_the_same_walk(tmp_path: Any) -> None:
    """A class with its own state_dict takes the general path for tensors; its tree is still checked."""

    class Custom(nn.Linear):
        def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            return super().state_dict(*args, **kwargs)

    torch.manual_seed(0)
    first = nn.Sequential(Custom(2, 2), nn.ReLU())
    other = copy.deepcopy(first)
    other[1].inplace = True
    layout, _ = extract_states([first], ["a"])
    walk = SetWalk(first, "a", structure=True, keys=layout.keys, expect=_expect(layout))
    assert not walk.collect
    assert walk.walk(copy.deepcopy(first), "b") is None and walk.difference is None
    assert walk.walk(other, "c") is None
    assert walk.difference is not None and "model 'c' attribute 1.inplace is True" in walk.difference


def test_one_model_that_differs_in_a_large_set_is_named(tmp_path: Any) -> None:
    """200 models: the walk's rows are state_dict()'s tensors; one model that differs anywhere in
    the set (first after the record, middle, last) is named."""
    one = base()
    models = [copy.deepcopy(one) for _ in range(200)]
    with torch.no_grad():
        for m in models:
            m[0].lin.weight.normal_()
    names = [str(i) for i in range(200)]
    layout, _ = extract_states(models[:1], names[:1])
    walk = SetWalk(models[0], "0", structure=True, keys=layout.keys, expect=_expect(layout))
    for m, name in zip(models[1:], names[1:]):
        row = walk.walk(m, name)
        sd = m.state_dict(keep_vars=True)
        assert row is not None and all(sd[k] is t for k, t in zip(layout.keys, row))
    assert walk.difference is None
    for at in (1, 100, 199):
        changed = copy.copy(models)
        changed[at] = copy.deepcopy(models[at])
        changed[at][0].act.inplace = True
        with pytest.raises(ArchitectureError, match=f"model '{at}' attribute 0.act.inplace is True"):
            mm.Store(tmp_path / f"s{at}").save_set(changed, "many")


def test_a_record_that_becomes_structural_late_is_still_checked(tmp_path: Any) -> None:
    """A Hugging Face record that does not rebuild its models (LevitModel edits its config) falls back
    to a structural record after the tensors were read without the tree check: the tree is walked
    then, and a difference is named as before."""
    transformers = pytest.importorskip("transformers")
    import zoo_patterns as zp

    models = [transformers.LevitModel(zp.levit_config()) for _ in range(3)]
    models[2].encoder.extra = 1
    with pytest.raises(ArchitectureError, match="model '2' module encoder has attributes \\['extra'\\] that model "
                                                "'0' lacks"):
        mm.Store(tmp_path / "s").save_set(models, "levit")
    models[2].encoder.__dict__.pop("extra")
    ref_ = mm.Store(tmp_path / "s").save_set(models, "levit")
    assert mm.Store(tmp_path / "s").recover_set(ref_).architecture.kind == "structure"


def _tied() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3), nn.Linear(3, 3))
    m[2].weight = m[0].weight
    return m


@pytest.mark.parametrize("change, expected", [
    (lambda m: None, None),
    (lambda m: setattr(m[2], "weight", nn.Parameter(m[0].weight.detach().clone())),
     "parameter 2.weight is not parameter 0.weight, which model 'a' ties to it"),
    (lambda m: setattr(m[3], "bias", m[0].bias), "parameter 3.bias is parameter 0.bias; model 'a' keeps them apart"),
    (lambda m: m.__setitem__(3, m[2]), "module 3 is module 2; model 'a' has two modules there"),
], ids=["same ties", "untied", "tied apart", "module shared"])
def test_ties_checked_on_the_tensors_the_walk_read(change: Callable[[nn.Sequential], Any],
                                                    expected: str | None) -> None:
    """Where every tensor slot is in the state dict, the tie check uses the tensors the walk read."""
    first = _tied()
    other = copy.deepcopy(first)
    change(other)
    layout, _ = extract_states([first], ["a"])
    walk = SetWalk(first, "a", structure=True, keys=layout.keys, expect=_expect(layout))
    assert walk._slots_are_state
    walk.walk(other, "b")
    assert (walk.difference is None) if expected is None else (expected in str(walk.difference))


@pytest.mark.parametrize("where", ["root", "child"])
@pytest.mark.parametrize("kind", ["forward", "forward_pre", "full_backward"])
def test_hooks_on_a_later_model_are_refused_as_on_the_first(tmp_path: Any, where: str, kind: str) -> None:
    """Hooks are code, which no record holds: the first model's are refused where its record is made, and a
    later model's the same way (they were saved silently and gone on recovery)."""
    models = [base() for _ in range(3)]
    target = models[2] if where == "root" else models[2][0].lin
    register = getattr(target, f"register_{kind}_hook")
    register(lambda *args: None)
    path = "(root)" if where == "root" else "0.lin"
    with pytest.raises(ArchitectureError, match=rf"model '2' module {re.escape(path)} .* has hooks registered"):
        mm.Store(tmp_path / "s").save_set(models, "hooked")
    first = [base() for _ in range(2)]
    getattr(first[0] if where == "root" else first[0][0].lin, f"register_{kind}_hook")(lambda *args: None)
    with pytest.raises(ArchitectureError, match="has hooks registered"):
        mm.Store(tmp_path / "t").save_set(first, "hooked")
    mm.Store(tmp_path / "u").save_set([base() for _ in range(3)], "plain")  # none: saved
