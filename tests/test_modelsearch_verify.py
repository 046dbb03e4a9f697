"""A block split is proven, not assumed (issue 20): every split is checked on a probe batch against the
model's own features, a wrong one is never used (the next method, else a SearchError naming the block
where outputs diverge), and verdicts are cached per architecture without a cache hit ever hiding a
wrong split. Plus the Hugging Face patterns the check forced: ALBERT's shared layers, rotary decoders,
T5's relative bias, DINOv2's classifier input."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import mm_jupyter as mm
from mm_jupyter.errors import SearchError
from mm_jupyter.modelsearch.blocks import Block
from mm_jupyter.modelsearch.hashing import block_id
from mm_jupyter.modelsearch.splitting import split_model
from mm_jupyter.modelsearch.verify import (
    check_split,
    clear_verdicts,
    general_position,
    structure_key,
    verified_split,
)

tf = pytest.importorskip("transformers")


def _tokens(n: int = 6, length: int = 12, pad: int = 0, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(5, 100, (n, length), generator=torch.Generator().manual_seed(seed))
    for i in range(n):
        ids[i, length - (i % 4) * 2:] = pad
    return ids


def _albert(embedding: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return tf.AlbertModel(tf.AlbertConfig(vocab_size=100, embedding_size=embedding, hidden_size=16,
                                          num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                                          max_position_embeddings=32)).eval()


# ---------------------------------------------------------------- the issue's failures


@pytest.mark.parametrize("embedding", [16, 8])
def test_albert_runs_its_shared_layer_group_once_per_depth(embedding: int) -> None:
    model = _albert(embedding)
    x = _tokens()
    split = split_model(model, x)
    group = model.encoder.albert_layer_groups[0]
    assert [b.module for b in split.blocks[1:-1]] == [group] * 3  # the same block, run at every depth
    assert len({block_id(b) for b in split.blocks[1:-1]}) == 1
    with torch.no_grad():
        ref = model(x, attention_mask=(x != 0).long()).last_hidden_state[:, 0]
    torch.testing.assert_close(split.features(x), ref, atol=1e-5, rtol=1e-5)


def test_the_issues_albert_split_is_refused_and_named() -> None:
    """The split the issue found (embeddings, the shared group once, CLS) is wrong without an error
    when embedding_size == hidden_size, and fails on shapes when it is not: the check names both."""
    x = _tokens()
    same = _albert(16)
    good = split_model(same, x)
    bad = dataclasses.replace(good, blocks=[Block(same.embeddings, "hf-layer"), good.blocks[2], good.blocks[-1]])
    with general_position(same):
        why = check_split(same, bad, x)
    assert why is not None and "differ from the model's own" in why
    assert "block 1 (AlbertLayerGroup) runs 1 time(s) in the blocks, 3 in the model" in why
    skipped = dataclasses.replace(good, blocks=[Block(same.embeddings, "hf-layer")] + good.blocks[1:])
    with general_position(same):
        why = check_split(same, skipped, x)
    assert why is not None and why.startswith("block 0 (AlbertEmbeddings) differs from what the model feeds block 1")
    factorized = _albert(8)
    good = split_model(factorized, x)
    bad = dataclasses.replace(good, blocks=[Block(factorized.embeddings, "hf-layer"), good.blocks[2], good.blocks[-1]])
    why = check_split(factorized, bad, x)
    assert why is not None and why.startswith("block 1 (AlbertLayerGroup) raised RuntimeError")


def test_llama_decoder_layers_get_rotary_embeddings_from_the_model() -> None:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0)
    model = tf.LlamaModel(cfg).eval()
    x = _tokens()
    split = split_model(model, x)
    assert split.blocks[1].inputs == ("attention_mask=attention_mask.causal", "position_ids",
                                      "position_embeddings=rope0")
    keep = (x != 0).long()
    with torch.no_grad():
        hidden = model(x, attention_mask=keep).last_hidden_state
    last = (torch.arange(x.shape[1]) * keep).argmax(-1)
    torch.testing.assert_close(split.features(x), hidden[torch.arange(len(x)), last], atol=1e-5, rtol=1e-5)
    # without its rotary inputs the layer cannot run: the issue's failure, now a refused split
    bare = dataclasses.replace(split, blocks=[split.blocks[0], Block(model.layers[0], "hf-layer"), *split.blocks[2:]])
    why = check_split(model, bare, x)
    assert why is not None and why.startswith("block 1 (LlamaDecoderLayer) raised TypeError")


def test_t5_encoder_layers_get_the_first_layers_relative_bias() -> None:
    torch.manual_seed(0)
    model = tf.T5EncoderModel(tf.T5Config(vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=3, num_heads=2,
                                          pad_token_id=0)).eval()
    x = _tokens()
    split = split_model(model, x)
    source = model.encoder.block[0].layer[0].SelfAttention
    assert all(b.module.source is source for b in split.blocks[2:-1])  # the block owns the bias table
    with torch.no_grad():
        ref = model(x, attention_mask=(x != 0).long()).last_hidden_state[:, 0]
    torch.testing.assert_close(split.features(x), ref, atol=1e-5, rtol=1e-5)


def test_dinov2_classifier_fits_cls_and_mean_patch_features() -> None:
    torch.manual_seed(0)
    cfg = tf.Dinov2Config(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          mlp_ratio=2, num_labels=3)
    model = tf.Dinov2ForImageClassification(cfg).eval()
    x = torch.randn(3, 3, 16, 16)
    split = split_model(model, x)
    assert split.head is model.classifier
    feats = split.features(x)
    assert feats.shape == (3, 32)
    with torch.no_grad():
        torch.testing.assert_close(split.head(feats), model(x).logits, atol=1e-5, rtol=1e-5)
    cls_only = dataclasses.replace(split, blocks=[*split.blocks[:-1], Block(nn.Sequential(model.dinov2.layernorm,
                                                                                         _Cls()))])
    why = check_split(model, cls_only, x)
    assert why is not None and "head raised" in why  # 16 features where the classifier takes 32


class _Cls(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h[:, 0]


# ---------------------------------------------------------------- never used when wrong


class _WrongDeclared(nn.Module):
    """Declares two blocks but its forward runs three layers: the declaration is wrong; the forward
    is traceable, so the traced split is used instead."""

    def __init__(self, traceable: bool = True) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.traceable = traceable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.traceable and x.sum() > 1e9:  # data-dependent: not traceable
            return x
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))

    def mm_blocks(self) -> tuple[list[nn.Module], nn.Module | None]:
        return [nn.Sequential(self.a, nn.Tanh()), self.c], None


def test_a_wrong_declared_split_falls_back_to_the_traced_one() -> None:
    torch.manual_seed(0)
    model = _WrongDeclared().eval()
    x = torch.randn(8, 6)
    assert split_model(model).kind == "declared"  # unverified: as declared
    split = split_model(model, x)
    assert split.kind == "traced" and split.head is model.c
    with torch.no_grad():
        torch.testing.assert_close(split.head(split.features(x)), model(x))


def test_no_method_that_holds_is_a_search_error_naming_the_block() -> None:
    torch.manual_seed(0)
    model = _WrongDeclared(traceable=False).eval()
    with pytest.raises(SearchError, match=r"cannot split _WrongDeclared into blocks that reproduce its own "
                                          r"features: declared: block 0 \(Sequential\) differs from what the model "
                                          r"feeds block 1 \(Linear\).*traced: cannot split") as err:
        split_model(model, torch.randn(8, 6))
    assert "\n" not in str(err.value)
    with pytest.raises(SearchError, match=r"candidate 'w': cannot split _WrongDeclared"):
        mm.search({"w": model, "v": _WrongDeclared(traceable=False)}, (torch.randn(40, 6), torch.arange(40) % 2))


class _ZeroBranch(nn.Module):
    """A residual branch initialised to zero; its declared blocks skip it. Right for these weights,
    wrong for any trained ones: general position catches it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.branch = nn.Linear(6, 6)
        nn.init.zeros_(self.branch.weight)
        nn.init.zeros_(self.branch.bias)
        self.c = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.c(h + self.branch(h))

    def mm_blocks(self) -> tuple[list[nn.Module], nn.Module | None]:
        return [self.a, self.c], None


def test_general_position_refuses_a_split_that_only_zero_weights_make_right() -> None:
    torch.manual_seed(0)
    model = _ZeroBranch().eval()
    x = torch.randn(8, 6)
    declared = split_model(model)
    assert check_split(model, declared, x) is None  # with these weights the blocks agree...
    before = {k: v.clone() for k, v in model.state_dict().items()}
    split = verified_split(model, x)
    assert split.kind == "traced"  # ...but not in general: the declared split is never used
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights restored exactly


# ---------------------------------------------------------------- the cache and its key


def _key(model: nn.Module, x: torch.Tensor | None = None) -> str | None:
    return structure_key(model, torch.ones(2, 6) if x is None else x)


class _Net(nn.Module):
    def __init__(self, slope: float = 0.1, share: bool = False, tie: bool = False) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = self.a if share else nn.Linear(6, 6)
        if tie and not share:
            self.b.weight = self.a.weight
        self.act = nn.LeakyReLU(slope)
        self.norm = nn.BatchNorm1d(6)
        self.register_buffer("order", torch.arange(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.b(self.act(self.a(x))))[:, self.order]


def test_the_key_holds_everything_but_parameter_values() -> None:
    torch.manual_seed(0)
    base = _Net()
    other = _Net()  # other weights
    with torch.no_grad():
        other.norm.running_mean.uniform_(-1, 1)  # other statistics
    assert _key(base) is not None and _key(base) == _key(other)
    assert _key(base) != _key(_Net(slope=0.2))  # a hyperparameter no state dict shows
    assert _key(base) != _key(_Net(share=True))  # one module run twice, not two modules
    assert _key(base) != _key(_Net(tie=True))  # a tied weight
    flipped = _Net()
    flipped.order = torch.arange(6).flip(0)
    assert _key(base) != _key(flipped)  # an integer buffer's values
    assert _key(base) != _key(base, torch.zeros(2, 6))  # another probe
    hooked = _Net()
    hooked.a.register_forward_hook(lambda m, args, out: out * 2)
    assert _key(base) != _key(hooked)

    first = _redefined()
    assert type(first).__qualname__ == type(_redefined()).__qualname__
    assert _key(first) == _key(first) != _key(_redefined())


class _Config:
    """A mutable settings object held by a module (as Hugging Face modules hold their config)."""

    def __init__(self) -> None:
        self.width = 6
        self.names = ["a", "b"]


def _uncached_key(model: nn.Module, x: torch.Tensor) -> str | None:
    from mm_jupyter.modelsearch import verify

    verify._STREAMS.clear()
    return structure_key(model, x)


def test_the_remembered_key_of_a_changed_model_object_is_never_served() -> None:
    """The key's model part is kept per model object; every in-place change the key reads must give
    the key a fresh description gives, on the *same* object the cache remembered."""
    torch.manual_seed(0)
    x = torch.ones(2, 6)
    model = _Net()
    model.config = _Config()
    model.sizes = [1, 2]
    model.act.config = model.config  # shared: the key describes it once, then refers to it
    changes = [
        lambda m: setattr(m.act, "negative_slope", 0.2),  # a scalar the forward reads
        lambda m: setattr(m.act, "negative_slope", 0.2 + 0.0),  # an equal float: still the same key
        lambda m: m.sizes.append(3),  # a list changed in place
        lambda m: m.sizes.__setitem__(0, True),  # 1 -> True: equal under ==, another key
        lambda m: setattr(m.config, "width", 7),  # an attribute of a held object
        lambda m: m.config.names.__setitem__(1, "c"),  # nested in place
        lambda m: setattr(m.act, "config", _Config()),  # sharing broken: two equal objects, not one
        lambda m: setattr(m, "b", nn.Linear(6, 6)),  # a swapped submodule (same structure)
        lambda m: setattr(m, "b", nn.Linear(6, 6, bias=False)),  # a swapped submodule (other structure)
        lambda m: setattr(m.a.weight, "data", torch.randn(6, 6, dtype=torch.float64)),  # weights' dtype
        lambda m: m.order.copy_(torch.arange(6).flip(0)),  # a buffer's values, in place
        lambda m: setattr(m, "b", m.a),  # a module shared, not two
        lambda m: m.a.register_forward_hook(lambda mod, args, out: out),  # a hook: never remembered
        lambda m: setattr(m, "extra", _Opaque(1)),  # not describable: no key at all
    ]
    seen = {structure_key(model, x)}
    for i, change in enumerate(changes):
        assert structure_key(model, x) == structure_key(model, x)  # remembered now
        change(model)
        got = structure_key(model, x)
        assert got == _uncached_key(model, x), f"change {i} got a stale key"
        if i not in (1, 7, len(changes) - 1):  # an equal float, an equal module: the same key
            assert got not in seen, f"change {i} did not change the key"
        seen.add(got)
    assert structure_key(model, x) is None


def test_a_dead_model_object_id_reused_is_not_mistaken() -> None:
    """A new model at a freed model's address must not take its remembered key."""
    import gc

    x = torch.ones(2, 6)
    keys = set()
    for slope in (0.1, 0.2, 0.3, 0.4):
        m = _Net(slope=slope)
        k = structure_key(m, x)
        assert k == _uncached_key(m, x) and k not in keys
        keys.add(k)
        del m
        gc.collect()


def test_the_key_tells_plain_attribute_values_apart_by_type_and_sign() -> None:
    """Plain attributes are described by one repr: values equal in Python but not in meaning (1, 1.0,
    True; 0.0, -0.0), a changed tuple, a string holding another value's text, a swapped submodule and
    a changed parameter shape all give other keys; the same model described twice the same key."""
    base = _Net()
    assert _key(base) == _key(base)
    keys = set()
    for value in (1, 1.0, True, 0.0, -0.0, "1", (1,), (1, 2), None, b"1", "(1,)"):
        model = _Net()
        model.act.flag = value
        keys.add(_key(model))
    assert len(keys) == 11 and _key(base) not in keys
    model = _Net()
    before = _key(model)
    model.act.negative_slope = 0.2  # changed in place on the same object
    assert _key(model) != before
    model = _Net()
    model.act = nn.ReLU()  # a swapped submodule
    assert _key(model) != before
    model = _Net()
    model.a.weight = nn.Parameter(torch.zeros(6, 7))  # another parameter shape
    assert _key(model) != before
    model = _Net()
    model.a.bias = None
    assert _key(model) != before


def _redefined() -> nn.Module:
    """A class of the same name defined anew on every call (a notebook cell run again)."""

    class Cell(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 6)

    return Cell()


class _Opaque:
    __slots__ = ("value",)

    def __init__(self, value: int) -> None:
        self.value = value


def test_what_the_key_cannot_describe_is_verified_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from mm_jupyter.modelsearch import verify

    model = _Net()
    model.extra = _Opaque(3)  # an object without a __dict__: the key cannot see what it holds
    assert _key(model) is None
    checked = []
    real = verify.check_split
    monkeypatch.setattr(verify, "check_split", lambda *a: checked.append(1) or real(*a))
    x = torch.randn(8, 6)
    verified_split(model, x)
    verified_split(model, x)
    assert len(checked) == 2


class _Gated(nn.Module):
    """Declares both layers; its forward skips the second when ``skip`` is set (a plain attribute)."""

    def __init__(self, skip: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.skip = skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return h if self.skip else self.b(h)

    def mm_blocks(self) -> tuple[list[nn.Module], nn.Module | None]:
        return [nn.Sequential(self.a, nn.Tanh()), self.b], None


def test_a_cache_hit_never_hides_a_wrong_split() -> None:
    """Two models with the same modules and tensors whose forward differs by an attribute: the second
    does not get the first one's verdict; its declared split is wrong and is not used."""
    clear_verdicts()
    x = torch.randn(8, 6)
    assert split_model(_Gated(skip=False), x).kind == "declared"
    gated = _Gated(skip=True)
    split = split_model(gated, x)
    assert split.kind == "traced"
    with torch.no_grad():
        torch.testing.assert_close(split.features(x), gated(x))


def test_a_cached_failure_is_raised_again_without_checking(monkeypatch: pytest.MonkeyPatch) -> None:
    from mm_jupyter.modelsearch import verify

    clear_verdicts()
    x = torch.randn(8, 6)
    with pytest.raises(SearchError):
        split_model(_WrongDeclared(traceable=False), x)
    monkeypatch.setattr(verify, "check_split", lambda *a: pytest.fail("checked again"))
    with pytest.raises(SearchError, match="cannot split _WrongDeclared"):
        split_model(_WrongDeclared(traceable=False), x)


# ---------------------------------------------------------------- stored candidates


def test_stored_albert_candidates_keep_one_shared_block_and_verify_their_skeleton(tmp_path) -> None:
    from mm_jupyter.modelsearch.stored import add_candidates, load_candidates

    base = _albert(8, seed=0)
    cands = {"base": base}
    for i in (1, 2):
        other = copy.deepcopy(base)
        torch.manual_seed(10 + i)
        nn.init.normal_(other.encoder.albert_layer_groups[0].albert_layers[0].ffn_output.weight, std=0.2)
        cands[f"d{i}"] = other.eval()
    store = mm.Store(tmp_path / "s")
    ref = add_candidates(store, cands, "alberts")
    entries = load_candidates(store, "alberts").entries
    groups = {b["id"] for e in entries for b in e["blocks"][1:-1]}
    assert len(groups) == 3 and all(len({b["id"] for b in e["blocks"][1:-1]}) == 1 for e in entries)
    assert all("structure" in b for e in entries for b in e["blocks"])
    x = _tokens(30, seed=1)
    y = torch.arange(30) % 2
    stored = load_candidates(store, "alberts")
    whole = mm.search(stored, (x, y), k=1, approach="shift", batch_size=10, halving=False)
    direct = mm.search(cands, (x, y), k=1, approach="shift", batch_size=10, halving=False)
    assert list(whole.ranking["score"]) == list(direct.ranking["score"])
    # each candidate's shared group is read once, not once per depth
    per_candidate = [sum(b["bytes"] for b in {b["id"]: b for b in e["blocks"]}.values()) for e in entries]
    assert whole.stats["bytes_loaded"] == sum(per_candidate)
    # a manifest whose recorded block structure the rebuilt skeleton does not have is refused
    row = store.catalog.find_candidates("alberts", ref.version)
    assert row is not None
    tampered = load_candidates(store, "alberts")
    tampered.entries[0]["blocks"][1]["structure"] = "0" * 64
    with pytest.raises(SearchError, match="no longer splits like it did when stored"):
        mm.search(tampered, (x, y), k=1, approach="shift", batch_size=10)


def test_a_cache_an_eval_forward_fills_is_neither_stale_in_the_check_nor_polluted_by_tracing() -> None:
    """LeViT keeps its gathered attention biases in a dict after an eval forward: tracing must not
    leave a symbolic entry there, and the check must compute them from the perturbed parameters
    on both sides (else a stale cache makes a right split look wrong)."""
    from mm_jupyter.bench import _timm_patterns as timm_patterns

    torch.manual_seed(0)
    model = timm_patterns.CachedLeViT().eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model(x)
    cache = model.attn.attention_bias_cache
    assert list(cache) == ["cpu"]
    split = split_model(model, x)
    assert split.kind == "traced"
    assert model.attn.attention_bias_cache is cache and list(cache) == ["cpu"]
    assert isinstance(cache["cpu"], torch.Tensor) and type(cache["cpu"]) is torch.Tensor
    with torch.no_grad():
        torch.testing.assert_close(split.head(split.features(x)), model(x))


def test_a_split_rebuilt_from_a_cached_verdict_is_remembered_until_the_model_changes() -> None:
    """A Hugging Face split rebuilt from a cached verdict (no model code) is remembered in the
    model's identity scope: the next search gets the same blocks and wrappers (so their block ids
    are remembered too) in a split of its own. A changed model gets a new split, whose ids and
    features are those of a fresh computation."""
    from mm_jupyter.modelsearch.hashing import _digest
    from mm_jupyter.modelsearch.verify import clear_verdicts

    clear_verdicts()
    torch.manual_seed(0)
    config = tf.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    model = tf.ResNetForImageClassification(config).eval()
    x = torch.randn(4, 3, 32, 32)
    split_model(model, x)  # verified
    first, second = split_model(model, x), split_model(model, x)
    assert first is not second and first.scope is second.scope is not None
    assert all(a.module is b.module for a, b in zip(first.blocks, second.blocks))
    ids = [block_id(b, second.scope) for b in second.blocks]
    assert ids == [_digest(b, True) for b in second.blocks]
    model.classifier[1] = nn.Linear(16, 3)  # a new head
    split_model(model, x)
    third = split_model(model, x)
    assert third.scope is not first.scope
    assert third.blocks[-1].module is not first.blocks[-1].module or third.head is not first.head
    assert [block_id(b, third.scope) for b in third.blocks] == [_digest(b, True) for b in third.blocks]
    with torch.no_grad():
        h = x
        for b in third.blocks:
            h = b.module(h)
        assert torch.equal(third.head(h), model(x).logits)
