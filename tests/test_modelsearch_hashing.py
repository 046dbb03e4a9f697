"""Block ids: position- and prefix-independent, sensitive to every byte, dtype, shape and hyperparameter."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mm_jupyter.bench.synthetic import generation_plan, parameterised, synthetic_candidates
from mm_jupyter.errors import SearchError
from mm_jupyter.modelsearch.blocks import Block
from mm_jupyter.modelsearch.hashing import block_id, block_ids
from mm_jupyter.modelsearch.splitting import split_model


def _ids(model: nn.Module) -> list[str]:
    return block_ids(split_model(model).blocks)


def test_same_block_at_two_positions_and_models_has_one_id() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 4)
    m1 = nn.Sequential(layer, nn.ReLU(), nn.Linear(4, 2))
    m2 = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), copy.deepcopy(layer), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
    ids1, ids2 = _ids(m1), _ids(m2)
    assert ids1[0] == ids2[1]  # Sequential(Linear, ReLU) at position 0 and position 1 (a copy)
    assert block_id(Block(layer)) == block_id(Block(copy.deepcopy(layer)))
    assert len(set(ids2)) == 3


def test_key_prefix_does_not_change_the_id() -> None:
    torch.manual_seed(0)
    layer = nn.Conv2d(2, 3, 3)
    parent_a = nn.Module()
    parent_a.deep = nn.Module()
    parent_a.deep.conv = layer
    parent_b = nn.Sequential(nn.Identity(), copy.deepcopy(layer))
    assert "deep.conv.weight" in parent_a.state_dict() and "1.weight" in parent_b.state_dict()
    assert block_id(Block(parent_a.deep.conv)) == block_id(Block(parent_b[1]))


def test_hf_layer_copied_into_another_model_keeps_its_id() -> None:
    tf = pytest.importorskip("transformers")
    cfg = tf.ResNetConfig(layer_type="basic", depths=[1, 2], hidden_sizes=[8, 8], embedding_size=8)
    torch.manual_seed(0)
    a = tf.ResNetModel(cfg)
    torch.manual_seed(1)
    b = tf.ResNetModel(cfg)
    b.encoder.stages[1].layers[1] = copy.deepcopy(a.encoder.stages[1].layers[1])
    b.encoder.stages[0].layers[0] = copy.deepcopy(a.encoder.stages[1].layers[1])  # another position
    ia, ib = _ids(a), _ids(b)
    assert ia[3] == ib[3] == ib[1]
    assert ia[:3] != ib[:3] and ia[-1] == ib[-1]  # pooling block: no parameters, same structure


def _flip_one_byte(t: torch.Tensor, index: int = 5) -> None:
    with torch.no_grad():
        raw = t.view(-1).view(torch.uint8)
        raw[index] ^= 1


def test_one_flipped_parameter_byte_changes_the_id() -> None:
    torch.manual_seed(0)
    block = Block(nn.Sequential(nn.Linear(64, 64), nn.ReLU()))
    before = block_id(block)
    _flip_one_byte(block.module[0].weight, 4097)
    assert block_id(block) != before
    _flip_one_byte(block.module[0].weight, 4097)
    assert block_id(block) == before


def test_dtype_shape_and_class_change_the_id() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    base = block_id(Block(lin))
    assert block_id(Block(copy.deepcopy(lin).double())) != base
    assert block_id(Block(copy.deepcopy(lin).to(torch.bfloat16))) != base

    flat = nn.Linear(4, 4)
    with torch.no_grad():
        flat.weight.copy_(lin.weight)
        flat.bias.copy_(lin.bias)
    assert block_id(Block(flat)) == base
    flat.weight = nn.Parameter(lin.weight.detach().reshape(2, 8).clone())  # same bytes, other shape
    assert block_id(Block(flat)) != base

    class MyLinear(nn.Linear):
        pass

    sub = MyLinear(4, 4)
    sub.load_state_dict(lin.state_dict())
    assert block_id(Block(sub)) != base


def test_hyperparameters_change_the_id() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    strided = nn.Conv2d(3, 4, 3, stride=2)
    strided.load_state_dict(conv.state_dict())
    assert block_id(Block(conv)) != block_id(Block(strided))

    relu = nn.Sequential(conv, nn.ReLU())
    gelu = nn.Sequential(conv, nn.GELU())
    assert block_id(Block(relu)) != block_id(Block(gelu))
    drop1, drop2 = nn.Sequential(conv, nn.Dropout(0.1)), nn.Sequential(conv, nn.Dropout(0.2))
    assert block_id(Block(drop1)) != block_id(Block(drop2))

    class Scaled(nn.Module):  # a hyperparameter only visible as an attribute (not in extra_repr)
        def __init__(self, scale: float) -> None:
            super().__init__()
            self.scale = scale
            self.lin = nn.Linear(2, 2)

    a, b = Scaled(1.0), Scaled(2.0)
    b.load_state_dict(a.state_dict())
    assert block_id(Block(a)) != block_id(Block(b))
    assert block_id(Block(conv)) != block_id(Block(conv, "hf-layer"))


def test_training_flag_does_not_change_the_id() -> None:
    block = Block(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1)))
    before = block_id(block)
    block.module.eval()
    assert block_id(block) == before


def test_buffers_change_the_id() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    before = block_id(Block(bn))
    with torch.no_grad():
        bn.running_mean[2] += 0.5
    assert block_id(Block(bn)) != before

    class WithNonPersistent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("pos", torch.arange(4), persistent=False)

    m = WithNonPersistent()
    before = block_id(Block(m))
    m.pos[1] = 7
    assert block_id(Block(m)) != before


def test_unusual_tensors() -> None:
    torch.manual_seed(0)
    m = nn.Module()
    m.register_buffer("scalar", torch.tensor(3.0))
    m.register_buffer("flags", torch.tensor([True, False]))
    m.register_buffer("strided", torch.arange(12.0).reshape(3, 4).t())  # not contiguous
    assert len(block_id(Block(m))) == 64
    big = nn.Linear(1024, 1024)  # 4 MiB: hashed through one memoryview
    assert block_id(Block(big)) != block_id(Block(nn.Linear(1024, 1024)))
    with pytest.raises(SearchError, match="meta"):
        block_id(Block(nn.Linear(2, 2, device="meta")))
    with pytest.raises(SearchError):
        block_id(nn.Linear(2, 2))  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", ["mlp", "resnet18", "bert"])
def test_synthetic_candidates_share_exactly_the_expected_blocks(arch: str) -> None:
    pytest.importorskip("transformers")
    n, seed = 8, 5
    models = synthetic_candidates(arch, n, "top-25", seed=seed)
    splits = [split_model(m) for m in models]
    ids = [block_ids(s.blocks) for s in splits]
    params = parameterised(splits[0])
    plan = generation_plan(n, len(params), "top-25", seed=seed)
    assert len(plan) == n - 1
    for i, step in enumerate(plan, start=1):
        first_new = params[-step.reinit]
        assert ids[i][:first_new] == ids[step.source][:first_new]
        for j in params[-step.reinit:]:
            assert ids[i][j] != ids[step.source][j]
        for j in range(first_new, len(ids[i])):
            if j not in params:  # parameter-free tail (ResNet pooling, BERT CLS): unchanged
                assert ids[i][j] == ids[step.source][j]


def test_id_is_the_plain_field_by_field_hash() -> None:
    """The gathered hashing gives exactly the id of hashing each length-prefixed field on its own
    (ids kept in stores must not move): recomputed here the plain way for a small block."""
    import hashlib

    torch.manual_seed(0)
    block = Block(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    h = hashlib.sha256()

    def put(raw: bytes) -> None:
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)

    put(b"mm-block-id/1")
    put(block.call.encode())
    for name, module in block.module.named_modules():
        cls = type(module)
        for field in ("module", name, f"{cls.__module__}:{cls.__qualname__}", module.extra_repr()):
            put(field.encode())
        attrs = [f"{k}={v!r}" for k, v in sorted(vars(module).items()) if not k.startswith("_") and k not in (
            "training", "gradient_checkpointing", "layer_idx") and isinstance(v, (bool, int, float, str, type(None),
                                                                               tuple))]
        put(";".join(attrs).encode())
    tensors = [("param", n, t) for n, t in block.module.named_parameters()]
    tensors += [("buffer", n, t) for n, t in block.module.named_buffers()]
    for kind, name, t in tensors:
        for field in (kind, name, str(t.dtype), ",".join(map(str, t.shape))):
            put(field.encode())
        put(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    assert block_id(block) == h.hexdigest()


def test_a_remembered_block_plan_never_serves_a_changed_block() -> None:
    """``block_id`` remembers what it reads besides tensor bytes per block module; every in-place
    change of the same objects must give the id a fresh computation gives."""
    from mm_jupyter.modelsearch.hashing import _digest

    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    block = Block(module)
    changes = [
        lambda m: m[0].weight.data.add_(1.0),  # weights changed in place
        lambda m: setattr(m[0], "stride", (2, 2)),  # an attribute extra_repr shows
        lambda m: setattr(m[2], "inplace", True),  # a public scalar attribute
        lambda m: m[1].running_mean.fill_(3.0),  # a buffer's values
        lambda m: setattr(m[0], "weight", nn.Parameter(torch.randn(4, 3, 3, 3, dtype=torch.float64))),  # dtype
        lambda m: m.__setitem__(2, nn.GELU()),  # a swapped submodule
        # not contiguous:
        lambda m: setattr(m[0].weight, "data", torch.randn(3, 4, 3, 3, dtype=torch.float64).transpose(0, 1)),
        lambda m: m.register_buffer("extra", torch.ones(2)),  # a new tensor
    ]
    seen = {block_id(block)}
    for i, change in enumerate(changes):
        assert block_id(block) == block_id(block) == _digest(block, True)
        change(module)
        got = block_id(block)
        assert got == _digest(block, True), f"change {i} got a stale id"
        assert got not in seen, f"change {i} did not change the id"
        seen.add(got)
    other = Block(module, call="hf-layer")  # the same module called differently
    assert block_id(other) == _digest(other, True) != block_id(block)


class _Unit(nn.Module):
    """A step the Sequential rule keeps whole (a block that is a module of the model itself)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def test_block_ids_from_the_models_scope_never_serve_a_changed_model() -> None:
    """A split rebuilt from a cached verdict carries the model's identity scope, and ``block_id``
    remembers its plans there instead of walking every block again. After every change of the same
    objects (values, attributes, swapped submodules, replaced parameters, a submodule swapped out and
    back in) each block's id must equal a fresh computation's."""
    from mm_jupyter.modelsearch.hashing import _digest
    from mm_jupyter.modelsearch.verify import clear_verdicts

    clear_verdicts()
    torch.manual_seed(0)
    model = nn.Sequential(_Unit(3, 4), _Unit(4, 4), _Unit(4, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))
    x = torch.randn(4, 3, 8, 8)
    spare, original = nn.GELU(), model[1].act
    changes = [
        lambda m: m[0].conv.weight.data.add_(1.0),  # values: the signature holds, the bytes are hashed again
        lambda m: setattr(m[1].conv.weight, "data", torch.randn(4, 4, 3, 3)),  # new storage, same Parameter
        lambda m: setattr(m[0].conv, "weight", nn.Parameter(torch.randn(4, 3, 3, 3))),  # a new Parameter
        lambda m: setattr(m[1].act, "inplace", True),  # a public scalar attribute
        lambda m: setattr(m[1], "act", spare),  # a swapped submodule ...
        lambda m: setattr(m[1], "act", original),  # ... swapped back: the old plans must not return
        lambda m: m[1].bn.running_var.fill_(2.0),  # statistics: not structure, but bytes
        lambda m: m[0].register_buffer("extra", torch.ones(2)),  # a new tensor
    ]
    seen: list[tuple[str, ...]] = []
    for i, change in enumerate([lambda m: None, *changes]):
        change(model)
        split_model(model, x)  # a changed structure is verified afresh (no scope) ...
        split = split_model(model, x)  # ... and then comes from the cached verdict
        assert split.scope is not None, f"change {i}: the rebuilt split has no scope"
        inside = [b for b in split.blocks if id(b.module) in split.scope.tree]
        assert len(inside) >= 2  # the Units: blocks that are modules of the model
        for _ in range(2):  # the second time from the memo
            got = tuple(block_id(b, split.scope) for b in split.blocks)
            assert got == tuple(_digest(b, True) for b in split.blocks), f"change {i} got a stale id"
        assert split.scope.memo, "the plans were not remembered in the scope"
        seen.append(got)
    assert seen[6] == seen[4]  # swapped back: the same ids as before the swap (computed afresh above)
    assert len(set(seen)) == len(seen) - 1, "a change did not change an id"


def test_a_declared_split_has_no_scope() -> None:
    """``mm_blocks`` is the model's own code: it may change the model after the key's walk, so its
    block ids walk their blocks themselves."""

    class Declared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)

        def mm_blocks(self) -> tuple[list[nn.Module], nn.Module]:
            return [self.a, self.b], self.head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.b(self.a(x)))

    model = Declared()
    x = torch.randn(4, 6)
    split_model(model, x)
    assert split_model(model, x).scope is None


def test_identity_digest_is_the_sha256_of_the_raw_bytes() -> None:
    """``identity.digest`` hashes a tensor's bytes in place; the digest (part of verdict keys) is the
    plain sha256 of the copied bytes for every layout and dtype."""
    import hashlib

    from mm_jupyter.modelsearch.identity import digest

    for t in (torch.randn(3, 4), torch.tensor(2.0), torch.zeros(0), torch.ones(5, dtype=torch.bool),
              torch.randn(4, 3).t(), torch.randn(2, 2).to(torch.bfloat16), torch.randn(3, dtype=torch.complex64)):
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert digest(t) == hashlib.sha256(raw).digest()


def test_tensor_bytes_are_the_raw_bytes_of_every_kind_of_tensor() -> None:
    """The numpy fast path hands hashlib exactly the bytes of the tensor laid out contiguously, the
    same as the checked path's ``view(torch.uint8)``, for every dtype, shape and view it may meet
    (ids kept in stores must not move), and whatever numpy refuses takes the checked path."""
    import hashlib

    from mm_jupyter.modelsearch.hashing import _tensor_bytes

    torch.manual_seed(0)
    base = torch.randn(4, 6)
    cases = {
        "float32": base, "float16": base.half(), "float64": base.double(), "bfloat16": base.bfloat16(),
        "bool": base > 0, "int8": (base * 10).to(torch.int8), "uint8": (base.abs() * 10).to(torch.uint8),
        "int64": (base * 100).long(), "complex64": torch.complex(base, -base),
        "scalar": torch.tensor(3.5), "empty": torch.empty(0, 3), "transposed": base.t(),
        "sliced": base[1:, 2:], "offset row": base[2], "size-1 odd stride": base[:, :1].t(),
        "conj bit": torch.complex(base, base).conj(), "neg bit": torch._neg_view(base),
        "parameter": nn.Parameter(base.clone()), "expanded": torch.randn(1, 3).expand(4, 3),
    }
    for label, t in cases.items():
        flat = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
        expected = flat.view(torch.uint8).numpy().tobytes()
        assert hashlib.sha256(_tensor_bytes(label, t)).digest() == hashlib.sha256(expected).digest(), label
    assert cases["conj bit"].is_conj() and cases["neg bit"].is_neg()


def test_a_remembered_id_is_served_only_for_the_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second id of an unchanged block comes from its plan's XXH3 check without a sha256; any
    change of the bytes, also one no version counter sees (a numpy view, ``.data``), computes the id
    afresh, and bytes changed back give the first id again."""
    import hashlib

    from mm_jupyter.modelsearch import hashing

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5))
    block = Block(module)
    first = block_id(block)
    calls = []
    real = hashlib.sha256

    def counting(*args: object) -> object:
        calls.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(hashing.hashlib, "sha256", counting)
    assert block_id(block) == first and not calls, "an unchanged block was hashed again"
    weight = module[0].weight
    version, old = weight._version, float(weight.detach()[2, 3])
    weight.detach().numpy()[2, 3] += 1.0  # no version counter moves
    assert weight._version == version
    changed = block_id(block)
    assert calls and changed != first and changed == hashing._digest(block, True)
    module[1].bias.data[0] = 7.0  # through .data
    assert block_id(block) == hashing._digest(block, True) != changed
    weight.detach().numpy()[2, 3] = old
    module[1].bias.data[0] = 0.0
    assert block_id(block) == first
