"""Property test: any state dict (dtypes, 0-d and zero-size shapes, arbitrary bit patterns incl.
NaN payloads) survives every approach bit-exactly, here and in a fresh process."""
from __future__ import annotations

import numpy as np
import pytest
import store_models as sm
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import mm_jupyter as mm

DTYPES = ["float32", "float64", "float16", "bfloat16", "int64", "int32", "uint8", "bool"]
APPROACHES = ["baseline", "update", "mmlib-base", "auto"]

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
entries = st.tuples(st.sampled_from(DTYPES), shapes, st.sampled_from(["param", "buffer"]), st.booleans())


@st.composite
def specs(draw) -> list:
    raw = draw(st.lists(entries, min_size=0, max_size=6))  # no tensors at all is valid too
    out = []
    for j, (dtype, shape, kind, nested) in enumerate(raw):
        name = f"sub{j % 2}.t{j}" if nested else f"t{j}"
        out.append([name, dtype, list(shape), kind])
    return out


def content(model: torch.nn.Module, seed: int, nan: bool) -> torch.nn.Module:
    """Arbitrary bytes for float tensors (every bit pattern, so NaN payloads too), 0/1 for bool."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for t in model.state_dict(keep_vars=True).values():
            if t.numel() == 0:
                continue
            if t.dtype == torch.bool:
                t.copy_(torch.from_numpy(rng.integers(0, 2, t.shape, dtype=np.uint8).astype(bool)))
                continue
            raw = torch.from_numpy(np.frombuffer(rng.bytes(t.numel() * t.element_size()), dtype=np.uint8).copy())
            t.copy_(raw.view(t.dtype).view(t.shape))
            if nan and t.dtype.is_floating_point:
                t.view(-1)[0] = float("nan")
    return model


@pytest.mark.slow
def test_generated_state_dicts_round_trip(tmp_path):
    root = tmp_path / "store"
    store = mm.Store(root)
    expected: dict[str, list[dict[str, str]]] = {}
    counter = iter(range(10**6))

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(spec=specs(), n=st.integers(1, 4), seed=st.integers(0, 2**32 - 1), nan=st.booleans(),
           change=st.integers(0, 5), who=st.integers(1, 15))
    def one(spec, n, seed, nan, change, who):
        arch = mm.Architecture.factory("store_models:param_bag", spec=spec)
        models = [content(sm.param_bag(spec), seed + i, nan) for i in range(n)]
        want = sm.model_digests(models)
        for approach in APPROACHES:
            name = f"h{next(counter)}-{approach}"
            ref = store.save_set(models, name, approach=approach, architecture=arch)
            ms = store.recover_set(ref)
            assert len(ms) == n
            assert [sm.sd_digests(ms.state_dict(i)) for i in range(n)] == want
            assert [sm.sd_digests(sd) for sd in ms.state_dicts()] == want
            assert sm.sd_digests(ms[n - 1].state_dict()) == want[-1]
            expected[str(ref)] = want
            if approach == "update":
                # a derived version: one key changes in the models picked by the bits of `who`
                changed = [content(sm.param_bag(spec), seed + i, nan) for i in range(n)]
                keys = list(changed[0].state_dict())
                for i, m in enumerate(changed):
                    if keys and who >> i & 1:
                        key = keys[change % len(keys)]
                        other = content(sm.param_bag(spec), seed ^ (0x5A5A + i), not nan)
                        with torch.no_grad():
                            m.state_dict(keep_vars=True)[key].copy_(other.state_dict()[key])
                want2 = sm.model_digests(changed)
                ref2 = store.save_set(changed, name, approach="update", architecture=arch)
                assert ref2.version == 2
                ms2 = store.recover_set(ref2)
                assert [sm.sd_digests(sd) for sd in ms2.state_dicts()] == want2
                assert [sm.sd_digests(ms2.state_dict(i)) for i in range(n)] == want2
                expected[str(ref2)] = want2

    one()
    report = sm.fresh_report(root, list(expected))
    for ref, want in expected.items():
        got = report[ref]
        assert "error" not in got, (ref, got.get("error"))
        assert got["state_dict"] == want, ref
        assert got["state_dicts"] == want, ref
        assert got["module"] == want, ref
    store.close()
