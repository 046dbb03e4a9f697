"""Importable models and helpers for the store tests.

Fresh subprocesses import this module (tests/ is put on their PYTHONPATH), so every architecture
defined here can be rebuilt there from the store's record alone. ``python -c 'import store_models;
store_models.cli()' STORE REF...`` prints a JSON report of what a fresh process recovers.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import zygote
from torch import nn

import mm_jupyter as mm

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# -- digests ------------------------------------------------------------------------------------


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes of ``t`` in row-major order (NaN payloads included)."""
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 over dtype, shape and raw bytes: equal digests mean bit-identical tensors."""
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(tensor_bytes(t))
    return h.hexdigest()


def sd_digests(sd: Mapping[str, torch.Tensor]) -> dict[str, str]:
    return {k: tensor_digest(v) for k, v in sd.items()}


def model_digests(models: Sequence[nn.Module] | Mapping[str, nn.Module]) -> list[dict[str, str]]:
    mods = list(models.values()) if isinstance(models, Mapping) else list(models)
    return [sd_digests(m.state_dict()) for m in mods]


def ties(module: nn.Module) -> list[list[str]]:
    """Groups (len > 1) of parameter names that are one Parameter object."""
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def output_digest(module: nn.Module) -> str | None:
    """Digest of ``module(module.example_input())`` with one intra-op thread (bit-reproducible)."""
    if not hasattr(module, "example_input"):
        return None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            was = module.training
            module.eval()
            out = module(module.example_input())
            module.train(was)
        return tensor_digest(out)
    finally:
        torch.set_num_threads(threads)


# -- deterministic content ----------------------------------------------------------------------


def random_like(t: torch.Tensor, gen: torch.Generator, name: str = "") -> torch.Tensor:
    """Random values of ``t``'s dtype and shape (positive for running variances)."""
    shape = tuple(t.shape)
    if t.dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if t.dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=gen).to(torch.uint8)
    if not t.dtype.is_floating_point and not t.dtype.is_complex:
        return torch.randint(-1000, 1000, shape, generator=gen).to(t.dtype)
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    if "running_var" in name:
        x = x.abs() + 0.1
    return x.to(t.dtype)


def fill_(model: nn.Module, seed: int, only: Iterable[str] | None = None) -> nn.Module:
    """Overwrite every state-dict tensor (or those in ``only``) with seeded random content."""
    only = set(only) if only is not None else None
    with torch.no_grad():
        for k, (name, t) in enumerate(model.state_dict(keep_vars=True).items()):
            if only is not None and name not in only:
                continue
            gen = torch.Generator().manual_seed(seed * 1000 + k)
            t.copy_(random_like(t, gen, name))
    return model


# -- architectures --------------------------------------------------------------------------------


class MLP(nn.Module):
    """A plain importable no-argument class."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def example_input(self) -> torch.Tensor:
        return torch.linspace(-1, 1, 12).reshape(2, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x.to(self.fc1.weight.dtype)))
        return self.fc2(x.to(self.fc2.weight.dtype))


class BNNet(nn.Module):
    """BatchNorm: float running stats and an int64 ``num_batches_tracked``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.bn1d = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 2)

    def example_input(self) -> torch.Tensor:
        return torch.linspace(-2, 2, 2 * 2 * 5 * 5).reshape(2, 2, 5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc(self.bn1d(x))


class TiedNet(nn.Module):
    """Two layers sharing one weight (and an embedding tied to a decoder)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 5)
        self.b.weight = self.a.weight
        self.emb = nn.Embedding(7, 5)
        self.dec = nn.Linear(5, 7, bias=False)
        self.dec.weight = self.emb.weight

    def example_input(self) -> torch.Tensor:
        return torch.tensor([[0, 3, 6], [1, 2, 5]])

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.dec(self.b(torch.tanh(self.a(self.emb(idx)))))


class ZeroDimNet(nn.Module):
    """0-d parameters and buffers of several dtypes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.register_buffer("shift", torch.tensor(0.25, dtype=torch.float64))
        self.register_buffer("step", torch.tensor(3, dtype=torch.int64))
        self.register_buffer("flag", torch.tensor(True))

    def example_input(self) -> torch.Tensor:
        return torch.linspace(-1, 1, 6).reshape(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale + self.shift.float() * self.step * self.flag


class NonContigNet(nn.Module):
    """Parameters and buffers that are non-contiguous views (transposed, strided slices)."""

    def __init__(self) -> None:
        super().__init__()
        self.wt = nn.Parameter(torch.zeros(5, 3).t())  # (3, 5), strides (1, 3)
        self.ws = nn.Parameter(torch.zeros(4, 8)[:, ::2])  # (4, 4), strides (8, 2)
        self.register_buffer("bt", torch.zeros(2, 3, 4).permute(2, 0, 1))

    def example_input(self) -> torch.Tensor:
        return torch.linspace(-1, 1, 10).reshape(2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.wt.t()) @ self.ws[:3] + self.bt.sum()


class FlagsNet(nn.Module):
    """Bool and integer buffers next to float parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("mask", torch.ones(4, dtype=torch.bool))
        self.register_buffer("counts", torch.zeros(3, 2, dtype=torch.int32))
        self.register_buffer("codes", torch.zeros(5, dtype=torch.uint8))
        self.register_buffer("ids", torch.zeros(2, 2, dtype=torch.int64))
        self.register_buffer("small", torch.zeros(3, dtype=torch.int16))
        self.register_buffer("tiny", torch.zeros(3, dtype=torch.int8))

    def example_input(self) -> torch.Tensor:
        return torch.linspace(-1, 1, 8).reshape(2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.mask + self.counts.sum() + self.codes.float().mean()


class SpecialNet(nn.Module):
    """Float tensors holding NaN (with payloads), infinities, -0.0 and subnormals."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("h", torch.zeros(6, dtype=torch.float16))
        self.register_buffer("b", torch.zeros(6, dtype=torch.bfloat16))
        self.register_buffer("d", torch.zeros(6, dtype=torch.float64))

    def example_input(self) -> torch.Tensor:
        return torch.linspace(-1, 1, 8).reshape(2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def poison_(model: SpecialNet, seed: int) -> SpecialNet:
    """Put NaNs with distinct payloads (quiet and signalling, both signs), +-inf, -0.0 and
    subnormals into every float tensor of ``model``."""
    seed %= 16  # payload variation that stays inside every format's NaN space
    with torch.no_grad():
        w = model.fc.weight.data.view(-1).view(torch.int32)
        w[0] = 0x7FC00000 + seed  # quiet NaN with payload
        w[1] = 0x7F800001 + seed  # signalling NaN
        w[2] = -0x00400000 - 1 - seed  # negative NaN (0xFFBFFFFF - seed)
        model.fc.weight.data.view(-1)[3] = float("inf")
        model.fc.weight.data.view(-1)[4] = float("-inf")
        model.fc.weight.data.view(-1)[5] = -0.0
        w[6] = 1 + seed  # subnormal
        model.fc.bias.data[0] = float("nan")
        model.h.view(torch.int16)[:4] = torch.tensor([0x7E01 + seed, 0x7C01, -0x0001, 0x0001 + seed],
                                                      dtype=torch.int16)
        model.b.view(torch.int16)[:4] = torch.tensor([0x7FC1 + seed, 0x7F81, -0x003F, 0x0003],
                                                      dtype=torch.int16)
        model.d.view(torch.int64)[:3] = torch.tensor([0x7FF8000000000001 + seed, 0x7FF0000000000001, 1],
                                                      dtype=torch.int64)
    return model


@mm.architecture
def param_bag(spec: list) -> nn.Module:
    """A module built from a JSON spec: ``[[name, dtype, shape, "param"|"buffer"], ...]``.

    Names may be dotted (``"a.b"``): the tensor then lives in a nested submodule.
    """
    root = nn.Module()
    for name, dtype, shape, kind in spec:
        *path, leaf = name.split(".")
        owner = root
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        t = torch.zeros(tuple(shape), dtype=getattr(torch, dtype))
        if kind == "param":
            owner.register_parameter(leaf, nn.Parameter(t, requires_grad=t.is_floating_point()))
        else:
            owner.register_buffer(leaf, t)
    return root


@mm.architecture
def mlp(width: int = 8, depth: int = 2, inputs: int = 4) -> nn.Module:
    """An importable factory with keyword arguments."""
    layers: list[nn.Module] = []
    d = inputs
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, 1))
    return nn.Sequential(*layers)


def _halve_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0] * 0.5,)


@mm.architecture
def hooked_mlp(width: int = 4) -> nn.Module:
    """A factory whose modules carry a forward pre-hook (code a structural record cannot hold)."""
    model = nn.Sequential(nn.Linear(width, width), nn.Tanh())
    model.register_forward_pre_hook(_halve_input)
    return model


def plain_factory(width: int = 8) -> nn.Module:
    """An importable function *not* registered with ``@mm.architecture``: stores may not call it."""
    return nn.Linear(width, width)


def _note(what: str) -> None:
    path = os.environ.get("MM_TEST_SENTINEL")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(what + "\n")


def logged_data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An unregistered dataset loader that notes each call in $MM_TEST_SENTINEL."""
    _note("data")
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(seed))
    return x, x.sum(1, keepdim=True)


def logged_train(model: nn.Module, data: Any, config: dict) -> None:
    """An unregistered training function that notes each call in $MM_TEST_SENTINEL."""
    _note("train")
    x, y = data
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(config["steps"]):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


@mm.architecture
def tagged_mlp(width: int = 8, inputs: int = 4) -> nn.Module:
    """A factory decorated with ``mm.architecture``: its modules remember how they were built."""
    return mlp(width=width, depth=1, inputs=inputs)


class Apply(nn.Module):
    """Applies the function it holds (code in an attribute: a factory record's to make)."""

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)


def scaling(scale: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: x * scale  # a closure made per call


@mm.architecture
def with_code(scale: float = 2.0) -> nn.Module:
    """A factory whose modules hold code made per call (a closure and a partial) and the device it ran on."""
    import functools

    model = nn.Sequential(nn.Linear(4, 4), Apply(scaling(scale)), Apply(functools.partial(torch.clamp, min=0.0)))
    model.device = torch.empty(0).device  # (the meta device where the save rebuilds it)
    return model


@mm.architecture
def weight_normed(width: int = 4) -> nn.Module:
    """A factory whose first layer is parametrized (``torch.nn.utils.parametrize`` gives every such
    module a class of its own)."""
    from torch.nn.utils.parametrizations import weight_norm

    return nn.Sequential(weight_norm(nn.Linear(3, width)), nn.ReLU())


class NeedsArgs(nn.Module):
    """A class whose constructor needs an argument (cannot be inferred)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)


class CrashNet(nn.Module):
    """Used by the crash and concurrency children: ~130 KB per model, plus a 0-d int64 seed."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(128, 128)
        self.l2 = nn.Linear(128, 128)
        self.register_buffer("seed", torch.tensor(0, dtype=torch.int64))


def crash_models(family: int, seed: int, n: int = 3) -> dict[str, nn.Module]:
    """Deterministic set content, self-describing through each model's ``seed`` buffer: tensors of
    key ``seed % 4`` come from ``seed``, the rest from ``family`` (so successive versions of a
    family differ in few tensors and ``update`` stores small deltas)."""
    torch.manual_seed(0)
    out = {}
    for i in range(n):
        m = CrashNet()
        keys = [k for k in m.state_dict() if k != "seed"]
        fill_(m, family * 100 + i)
        fill_(m, seed * 100 + i, only=[keys[seed % len(keys)]])
        m.seed.fill_(seed)
        out[f"m{i}"] = m
    return out


def check_crash_set(ms: Any, family: int, n: int = 3) -> int:
    """Recover every model of a crash/concurrency set (of ``n`` models), regenerate its content
    from the stored seed and compare bytes. Returns the seed."""
    sds = ms.state_dicts()
    seed = int(sds[0]["seed"])
    want = crash_models(family, seed, n)
    assert ms.names == list(want), f"{ms.ref} is incomplete: {ms.names}"
    for sd, (name, m) in zip(sds, want.items()):
        got = sd_digests(sd)
        exp = sd_digests(m.state_dict())
        assert got == exp, f"{ms.ref} model {name}: recovered bytes differ"
    return seed


# -- kinds of models for the round-trip tests ----------------------------------------------------

KINDS = ["mlp", "bn", "half", "bf16", "mixed", "tied", "zerodim", "noncontig", "flags", "special"]


def make(kind: str, seed: int) -> nn.Module:
    """One model of ``kind`` with seeded content."""
    torch.manual_seed(seed)
    if kind == "mlp":
        return fill_(MLP(), seed)
    if kind == "bn":
        return fill_(BNNet(), seed)
    if kind == "half":
        return fill_(MLP(), seed).half()
    if kind == "bf16":
        return fill_(MLP(), seed).to(torch.bfloat16)
    if kind == "mixed":
        m = fill_(MLP(), seed)
        m.fc1.half()  # float16 layer next to a float32 one
        return m
    if kind == "tied":
        return fill_(TiedNet(), seed)
    if kind == "zerodim":
        return fill_(ZeroDimNet(), seed)
    if kind == "noncontig":
        return fill_(NonContigNet(), seed)
    if kind == "flags":
        return fill_(FlagsNet(), seed)
    if kind == "special":
        return poison_(fill_(SpecialNet(), seed), seed)
    raise ValueError(kind)


# -- fresh-process recovery --------------------------------------------------------------------


def report(store_path: str, refs: Sequence[str], trust: bool = False) -> dict[str, Any]:
    """What a process that never saw the models recovers for each ref (errors are reported)."""
    store = mm.Store(store_path, trust_code=trust)
    out: dict[str, Any] = {}
    for ref in refs:
        try:
            ms = store.recover_set(ref)
            n = len(ms)
            one = [sd_digests(ms.state_dict(i)) for i in range(n)]
            modules = [store.recover_set(ref)[i] for i in range(n)]
            keys = list(ms.layout.keys)
            stacked = {k: [tensor_digest(x) for x in ms.stacked(k)] for k in keys}
            all_ = [sd_digests(sd) for sd in ms.state_dicts()]
            out[ref] = {
                "len": n,
                "names": ms.names,
                "state_dict": one,
                "module": [sd_digests(m.state_dict()) for m in modules],
                "state_dicts": all_,
                "stacked": stacked,
                "ties": [ties(m) for m in modules],
                "outputs": [output_digest(m) for m in modules],
                "by_name": [sd_digests(ms.state_dict(nm)) for nm in ms.names],
            }
        except Exception as e:  # noqa: BLE001 - reported, so the parent names the failing set
            out[ref] = {"error": f"{type(e).__name__}: {e}"}
    store.close()
    return out


def cli(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    trust = argv[0] == "--trust"
    argv = argv[1:] if trust else argv
    json.dump(report(argv[0], argv[1:], trust), sys.stdout)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    parts = [str(TESTS), str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.pop("MM_JUPYTER_STORE", None)
    return env


def run_python(code: str, *args: str, timeout: float = 300, check: bool = True,
               real: bool = False) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (cwd: the repository root, tests/ importable): a fork of a
    zygote that imported torch and nothing of the project (tests/zygote.py), or with ``real`` a new
    interpreter (for checks of what an import pulls in)."""
    if real:
        proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=subprocess_env(),
                              capture_output=True, text=True, timeout=timeout)
    else:
        proc = zygote.run(code, *args, cwd=ROOT, env=subprocess_env(), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def fresh_report(store_path: str | os.PathLike[str], refs: Iterable[str], trust: bool = False) -> dict[str, Any]:
    """``report`` run in a fresh interpreter (``trust``: the store is opened with trust_code=True)."""
    refs = [str(r) for r in refs]
    flag = ["--trust"] if trust else []
    proc = run_python("import store_models; store_models.cli()", *flag, str(store_path), *refs)
    return json.loads(proc.stdout)
