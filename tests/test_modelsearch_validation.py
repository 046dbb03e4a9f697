"""Bad search input (issue 10): one clear SearchError line naming the problem, raised before any
real work, never a raw torch/transformers/Python error; failures inside blocks name the candidate
and the block."""
from __future__ import annotations

import numpy as np
import pytest
import search_models
import torch
from torch import nn

import mm_jupyter as mm
from mm_jupyter.errors import SearchError
from mm_jupyter.modelsearch.verify import PROBE_ITEMS, clear_verdicts


class Counting(nn.Module):
    """A small MLP that counts the items its first layer has processed (a hook on the layer, so
    block views that call the layer count too)."""

    def __init__(self, inputs: int = 16) -> None:
        super().__init__()
        self.items = 0
        self.a = nn.Linear(inputs, 8)
        self.b = nn.Linear(8, 8)
        self.a.register_forward_hook(self._count)

    def _count(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        self.items += len(args[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _data(n: int = 80, width: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, width, generator=g), torch.arange(n) % 4


def _error(match: str, *args, **kwargs) -> SearchError:
    with pytest.raises(SearchError, match=match) as err:
        mm.search(*args, **kwargs)
    assert "\n" not in str(err.value) and err.value.__cause__ is None
    return err.value


def test_wrong_input_width_names_the_candidate_and_block() -> None:
    cands = [search_models.mlp() for _ in range(3)]
    msg = str(_error(r"candidate '0' cannot take the data", cands, _data(width=10)))
    assert "shape (1, 10)" in msg and "block 0 (Sequential)" in msg and "mat1 and mat2" in msg


def test_mixed_architectures_name_the_one_that_does_not_fit() -> None:
    images = (torch.randn(40, 3, 8, 8), torch.arange(40) % 2)
    _error(r"candidate 'mlp' cannot take the data .*block 0 \(Sequential\)",
           {"cnn": search_models.TinyResNet(), "mlp": search_models.mlp()}, images)
    _error(r"candidate 'cnn' cannot take the data .*block 0 \(Conv2d\) raised RuntimeError",
           {"mlp": search_models.mlp(), "cnn": search_models.TinyResNet()}, _data())


@pytest.mark.parametrize("kwargs, match", [
    ({"device": "tpu"}, r"unknown device 'tpu'"),
    ({"device": 3}, r"device must be a string"),
    ({"device": "meta"}, r"device 'meta' is not available"),
    ({"batch_size": 0}, r"batch_size must be an integer >= 1, not 0"),
    ({"batch_size": 2.5}, r"batch_size must be an integer"),
    ({"eta": 1}, r"eta \(the halving factor\) must be an integer >= 2, not 1"),
    ({"eta": 2.0}, r"eta .* must be an integer"),
    ({"k": 0}, r"k must be an integer >= 1, not 0"),
    ({"k": True}, r"k must be an integer"),
    ({"k": 5}, r"k=5 is larger than the number of candidates \(4\)"),
    ({"cache_budget": -5}, r"cache_budget must be a number of bytes >= 1 \(or None\), not -5"),
    ({"cache_budget": "64MB"}, r"cache_budget must be a number of bytes"),
    ({"cache_budget": float("nan")}, r"cache_budget must be a number of bytes"),
    ({"cache_budget": float("inf")}, r"cache_budget must be a number of bytes"),
    ({"test_fraction": 1.5}, r"test_fraction must be a number between 0 and 1"),
    ({"seed": "0"}, r"seed must be an integer"),
    ({"halving": "yes"}, r"halving must be True, False or None"),
    ({"progress": "bar"}, r"progress must be a callable"),
    ({"approach": "fast"}, r"unknown approach 'fast'"),
    ({"proxy": "svm"}, r"unknown proxy 'svm'"),
])
def test_bad_parameters_fail_before_any_forward(kwargs: dict, match: str) -> None:
    cands = [Counting() for _ in range(4)]
    _error(match, cands, _data(), **kwargs)
    assert all(m.items == 0 for m in cands)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda() -> None:
    _error(r"device 'cuda:1' requested but CUDA is not available", [Counting()], _data(), device="cuda:1")


@pytest.mark.parametrize("candidates, match", [
    ([], r"no candidates to search"),
    ({}, r"no candidates to search"),
    (Counting(), r"wrap a single model as \[model\]"),
    ("resnet", r"candidates must be a list or dict of models, not str"),
    ([Counting(), None], r"candidate '1' is a NoneType, not an nn.Module"),
])
def test_bad_candidates(candidates, match: str) -> None:
    _error(match, candidates, _data())


@pytest.mark.parametrize("data, match", [
    ((torch.randn(80, 16), torch.arange(79) % 4), r"data has 80 inputs but 79 labels"),
    ("pictures", r"data must be \(X, y\) tensors or a torch Dataset, not str"),
    ((None, torch.arange(4)), r"data X must be a tensor, a NumPy array or a list of numbers, not NoneType"),
    ((["a", "b", "c"], [0, 1, 0]), r"data X cannot be made a tensor"),
    ((np.array([{"a": 1}] * 4), [0, 1, 0, 1]), r"data X cannot be made a tensor"),
    ((torch.randn(80, 16), torch.rand(80)), r"labels must be a 1-d integer tensor"),
    ((torch.randn(80, 16), torch.arange(80) - 1), r"labels must be class indices >= 0, found -1"),
    ((torch.full((80, 16), float("nan")), torch.arange(80) % 4), r"data X holds NaN or infinite values"),
    ((torch.tensor(1.0), torch.tensor([1])), r"leading item axis"),
    ((torch.randn(0, 16), torch.zeros(0, dtype=torch.long)), r"data is empty"),
])
def test_bad_data(data, match: str) -> None:
    cands = [Counting() for _ in range(2)]
    _error(match, cands, data)
    assert all(m.items == 0 for m in cands)


def test_numpy_and_list_data_are_accepted() -> None:
    x, y = _data()
    a = mm.search([Counting(), Counting()], (x.numpy(), y.tolist()), k=1, batch_size=32)
    b = mm.search([Counting(), Counting()], (x, y), k=1, batch_size=32)
    assert len(a.ranking) == len(b.ranking) == 2


class _Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.mix = nn.Linear(8, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mix(self.embed(ids)).mean(1)


@pytest.mark.parametrize("approach", ["alsatian", "shift"])
def test_a_block_failing_mid_search_names_candidate_and_block(approach: str) -> None:
    """Item 0 fits (the early check passes); a later item holds a token id out of range."""
    ids = torch.randint(0, 20, (60, 5), generator=torch.Generator().manual_seed(0))
    ids[37, 2] = 25
    _error(r"candidate '1': block 0 \(Embedding\) raised IndexError: index out of range",
           [nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 2)), _Tokens()], (ids, torch.arange(60) % 2),
           approach=approach, batch_size=16)


def test_probe_runs_before_the_search() -> None:
    """The data is checked against every candidate before any extraction: the split is verified on
    the first items (the model's own forward and the composed blocks), then one item gives the
    block sizes; a second search finds the verdict and the sizes cached (the same architecture,
    blocks and item) and runs nothing before the search."""
    clear_verdicts()
    cands = {"ok": Counting(), "narrow": Counting(inputs=12)}
    _error(r"candidate 'narrow' cannot take the data", cands, _data())
    assert cands["ok"].items == 2 * PROBE_ITEMS + 1 and cands["narrow"].items == 0
    cands["ok"].items = 0
    _error(r"candidate 'narrow' cannot take the data", cands, _data())
    assert cands["ok"].items == 0 and cands["narrow"].items == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_bad_value_anywhere_in_a_large_batch_is_found(dtype: torch.dtype, bad: float) -> None:
    """The finiteness check reads extremes, not a mask: one NaN or infinity at any position (first,
    last, vector-lane edges, a strided view) is still refused, and finite data passes."""
    from mm_jupyter.modelsearch.api import _finite

    x = torch.randn(40, 3, 11, 13).to(dtype)
    assert _finite(x) and _finite(x[:, 1]) and _finite(x[:0])
    for at in (0, 1, 7, 8, 15, 16, 31, 32, 63, 64, 1000, x.numel() - 1):
        y = x.clone()
        y.view(-1)[at] = bad
        assert not _finite(y), at
        assert not _finite(y.transpose(0, 3)), at
    z = torch.zeros(5, 4, dtype=torch.complex64)
    z[2, 3] = complex(0.0, bad)
    assert not _finite(z) and _finite(torch.zeros(5, 4, dtype=torch.complex64))
