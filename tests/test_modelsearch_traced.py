"""Blocks of arbitrary models found by tracing: composed blocks reproduce the model, cuts are safe
(one batched tensor crosses, nothing mutates it later), block ids cover the traced code, identical
pieces are shared, and a search over ResNet-like custom classes equals shift."""
from __future__ import annotations

import copy
import math

import pytest
import search_models
import torch
import torch.nn.functional as F
from torch import nn

import mm_jupyter as mm
from mm_jupyter.bench.synthetic import parameterised, reinitialise, sample_data
from mm_jupyter.errors import SearchError
from mm_jupyter.modelsearch.blocks import output_sizes
from mm_jupyter.modelsearch.hashing import block_ids
from mm_jupyter.modelsearch.splitting import split_model


def _check_composes(model: nn.Module, x: torch.Tensor) -> None:
    """Features then head reproduce the model; the engine's one-item probe accepts every block."""
    model.eval()
    split = split_model(model)
    assert split.kind == "traced"
    with torch.no_grad():
        ref = model(x)
        feats = split.features(x)
        out = split.head(feats) if split.head is not None else feats.reshape(ref.shape)
    torch.testing.assert_close(out, ref)
    assert len(output_sizes(split, x)) == len(split.blocks)


def test_resnet_like_class_with_module_list() -> None:
    torch.manual_seed(0)
    model = search_models.TinyResNet(width=6, depth=4)
    split = split_model(model)
    assert split.head is model.fc
    mods = [b.module for b in split.blocks]
    assert mods[0] is model.stem[0]  # a lone module call stays that module (same id as in a Sequential)
    assert isinstance(mods[1], nn.Sequential) and mods[1][0] is model.stem[1] and mods[1][1] is model.stem[2]
    assert len(split.blocks) == 2 + 4  # stem conv, stem bn+relu, one block per residual block
    assert all(isinstance(m, torch.fx.GraphModule) for m in mods[2:])
    _check_composes(model, torch.randn(3, 3, 8, 8))


class _Seq2Seq(nn.Module):
    """Tuple outputs (LSTM), a sequence-first transformer (batch axis moved and moved back), a CLS
    token expanded per item, a plain tensor attribute and a registered buffer used in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.register_buffer("scale", torch.tensor(0.5))
        self.offset = torch.linspace(-1, 1, 16)  # not registered: becomes a traced constant
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0)  # batch_first=False
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) * self.scale + self.offset
        h, _ = self.lstm(h)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1)
        h = self.encoder(h.transpose(0, 1)).transpose(0, 1)
        return self.out(self.norm(h)[:, 0])


def test_tuples_moved_batch_axis_constants_and_buffers() -> None:
    torch.manual_seed(0)
    model = _Seq2Seq()
    split = split_model(model)
    assert split.head is model.out
    ids = torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(1))
    _check_composes(model, ids)
    for b in split.blocks:  # no block starts with the sequence axis first
        code = getattr(b.module, "code", "")
        assert "transpose" not in code or code.count("transpose") == 2


class _MnistNet(nn.Module):
    """The PyTorch MNIST example: functional pooling, ``view(-1, 320)``, dropout by ``self.training``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, 5)
        self.conv2 = nn.Conv2d(10, 20, 5)
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = F.dropout(F.relu(self.fc1(x.view(-1, 320))), training=self.training)
        return F.log_softmax(self.fc2(x), dim=1)


class _LstmClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(self.embed(ids))
        return self.fc(h[-1])  # the hidden state has the batch on axis 1; its last layer puts it first


class _TransformerClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 16)
        self.pos = nn.Parameter(torch.randn(1, 12, 16))
        layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.pos[:, : ids.size(1)]  # no batch axis: a constant per size
        return self.fc(self.encoder(h).mean(dim=1))


@pytest.mark.parametrize("model, x, blocks", [
    (_MnistNet, torch.randn(3, 1, 28, 28), 3),
    (_LstmClassifier, torch.randint(0, 30, (3, 7)), 2),
    (_TransformerClassifier, torch.randint(0, 30, (3, 12)), 2),
])
def test_models_as_tutorials_write_them(model: type, x: torch.Tensor, blocks: int) -> None:
    torch.manual_seed(0)
    m = model().eval()
    split = split_model(m)
    assert len(split.blocks) == blocks and split.head is not None
    _check_composes(m, x)


class _Gate(nn.Module):
    """Data-dependent control flow: cannot be traced, so it is kept whole (run as it is)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.lin(x)
        return -self.lin(x)


class _WithGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.gate = _Gate()
        self.b = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.b(self.gate(F.gelu(self.a(x))))))


def test_untraceable_submodule_is_kept_whole() -> None:
    torch.manual_seed(0)
    model = _WithGate()
    split = split_model(model)
    assert [b.module for b in split.blocks][1] is model.gate
    for sign in (1.0, -1.0):
        _check_composes(model, sign * torch.ones(3, 4))


def test_untraceable_model_names_the_line_and_the_declared_form() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.mean() > 0:
                return self.a(x)
            return x

    with pytest.raises(SearchError) as err:
        split_model(Branchy())
    msg = str(err.value)
    assert "Branchy" in msg and "test_modelsearch_traced.py" in msg and "x.mean() > 0" in msg
    assert "control flow" in msg and "mm_blocks()" in msg and "Blocks" in msg and "\n" not in msg


def test_a_model_returning_a_tuple_is_refused() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.a(x), x

    with pytest.raises(SearchError, match="Two.*tensor"):
        split_model(Two())


class _Mutating(nn.Module):
    """``h`` is the only value live after ``l1``, but the next piece changes it in place: cutting
    there would let one candidate's block corrupt an intermediate that others share."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(6, 6)
        self.l2 = nn.Linear(6, 6)
        self.l3 = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.l1(x)
        a = self.l2(h)
        h.sin_()
        return self.l3(a + h)


def test_no_cut_before_an_in_place_change_of_the_crossing_value() -> None:
    torch.manual_seed(0)
    model = _Mutating()
    split = split_model(model)
    assert len(split.blocks) == 1 and split.head is model.l3  # l1 and l2 stay in one block
    first = split.blocks[0].module
    assert "sin_" in first.code and "m1" in first.code
    _check_composes(model, torch.randn(5, 6))


def test_mutating_family_searches_like_base() -> None:
    """Candidates share l1 and differ in l2: with a cut after l1, a shared cached intermediate
    would be changed by the first candidate's block before the next one reads it."""
    torch.manual_seed(0)
    base = _Mutating().eval()
    cands = {"base": base}
    for i in range(3):
        m = copy.deepcopy(base)
        m.l2.reset_parameters()
        m.l3.reset_parameters()
        cands[f"c{i}"] = m
    x = torch.randn(80, 6, generator=torch.Generator().manual_seed(2))
    y = (x[:, 0] > 0).long()
    a = mm.search(cands, (x, y), k=1, approach="alsatian", halving=False, batch_size=16)
    b = mm.search(cands, (x, y), k=1, approach="base", batch_size=16)
    assert list(a.ranking["score"]) == list(b.ranking["score"]) and list(a.ranking["loss"]) == list(b.ranking["loss"])


# ---------------------------------------------------------------- ids


class _Scaled(nn.Module):
    def __init__(self, factor: float, act: str = "relu") -> None:
        super().__init__()
        self.factor, self.act = factor, act
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x) * self.factor + x
        h = F.relu(h) if self.act == "relu" else F.gelu(h)
        return self.b(h) + h


def test_traced_ids_cover_the_code() -> None:
    """Same tensors and submodules, different glue code (a constant, an activation): different ids;
    the same piece in two models (deep copies): the same id."""
    torch.manual_seed(0)
    base = _Scaled(0.5)
    variants = [copy.deepcopy(base) for _ in range(3)]
    variants[1].factor = 0.25
    variants[2].act = "gelu"
    ids = [block_ids(split_model(m).blocks) for m in [base] + variants]
    assert ids[0] == ids[1]
    assert ids[0][0] != ids[2][0] and ids[0][0] != ids[3][0] and ids[2][0] != ids[3][0]


def test_identical_pieces_share_ids_across_depths_and_candidates() -> None:
    torch.manual_seed(0)
    a = search_models.TinyResNet(width=4, depth=5)
    a.layers[3] = copy.deepcopy(a.layers[2])  # the same residual block at two depths
    b = copy.deepcopy(a)
    b.layers[4].conv2.reset_parameters()
    ia, ib = block_ids(split_model(a).blocks), block_ids(split_model(b).blocks)
    assert len(ia) == 7  # stem conv, stem bn + relu, five residual blocks (the last one with the pooling)
    assert ia[:6] == ib[:6] and ia[6] != ib[6]
    assert ia[4] == ia[5] and len(set(ia)) == 6


# ---------------------------------------------------------------- search (issue 9, Deliver 5)


def _derive(base: nn.Module, redraw: int, seed: int) -> nn.Module:
    model = copy.deepcopy(base)
    split = split_model(model)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for i in parameterised(split)[-redraw:]:
            reinitialise(split.blocks[i].module)
        reinitialise(split.head)
    return model.eval()


def _resnet_family() -> dict[str, nn.Module]:
    """Eight ResNet-like candidates from two bases of different constructor arguments; each derived
    candidate redraws its last 1-3 blocks, so candidates share prefixes of different lengths."""
    torch.manual_seed(0)
    bases = {"a": search_models.TinyResNet(width=6, depth=3).eval(),
             "b": search_models.TinyResNet(width=8, depth=4).eval()}
    cands: dict[str, nn.Module] = {}
    for key, base in bases.items():
        cands[key] = base
        for i, redraw in enumerate((1, 2, 3)):
            cands[f"{key}{i}"] = _derive(base, redraw, seed=10 * i + len(key))
    return cands


def test_search_over_resnet_like_classes_equals_shift() -> None:
    cands = _resnet_family()
    data = sample_data("resnet18", 160, classes=4, image_size=8, seed=3)
    shared = mm.search(cands, data, k=1, approach="alsatian", batch_size=32)
    whole = mm.search(cands, data, k=1, approach="shift", batch_size=32)
    assert list(shared.ranking["model"]) == list(whole.ranking["model"])
    assert list(shared.ranking["score"]) == list(whole.ranking["score"])
    st = shared.stats
    assert st["block_inferences"] == st["unique_edges"]
    assert st["unique_edges"] < whole.stats["unique_edges"]  # the shared prefixes ran once
    assert st["items_per_depth"][0] < whole.stats["items_per_depth"][0]
    assert math.isfinite(shared.ranking["score"].iloc[0])


@pytest.mark.slow
def test_stored_traced_candidates(tmp_path) -> None:
    """Traced candidates go into the store block by block; the skeleton rebuilt from the recorded
    architecture is traced the same way (same block ids), and a search over the stored set equals
    the search over the models in memory."""
    torch.manual_seed(0)
    base = search_models.tiny_resnet(width=4, depth=3).eval()
    cands = {"base": base, "d1": _derive(base, 1, 1), "d2": _derive(base, 2, 2),
             "plain": search_models.TinyResNet().eval()}  # no-argument constructor: the class itself
    store = mm.Store(tmp_path / "s")
    mm.add_candidates(store, cands, "resnets")
    stored = mm.load_candidates(store, "resnets")
    x = sample_data("resnet18", 96, classes=4, image_size=8, seed=5)
    for entry in stored.entries:
        original = cands[entry["name"]]
        assert [b["id"] for b in entry["blocks"]] == block_ids(split_model(original).blocks)
        rebuilt = stored.model(entry["name"])
        assert block_ids(split_model(rebuilt).blocks) == [b["id"] for b in entry["blocks"]]
        with torch.no_grad():
            assert torch.equal(rebuilt(x[0][:4]), original(x[0][:4]))
    from_store = mm.search(stored, x, k=1, approach="alsatian", batch_size=32)
    in_memory = mm.search(cands, x, k=1, approach="alsatian", batch_size=32)
    assert list(from_store.ranking["model"]) == list(in_memory.ranking["model"])
    assert list(from_store.ranking["score"]) == list(in_memory.ranking["score"])
    assert from_store.stats["block_inferences"] == from_store.stats["unique_edges"]
    store.close()
