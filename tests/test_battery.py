"""The battery-cell use case: deterministic synthetic data whose physics is actually wired."""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import zygote

import mm_jupyter as mm
from mm_jupyter.store.provenance import deterministic
from mm_jupyter.usecases import battery
from mm_jupyter.usecases.battery import cell_dataset, cell_ref, load_cell
from mm_jupyter.usecases.training import initial_models, mse, train

ROOT = Path(__file__).resolve().parents[1]


def digest(x: torch.Tensor, y: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (x, y):
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


# -- the dataset API -----------------------------------------------------------------------------
def test_shapes_and_dtypes():
    x, y = cell_dataset(3, version=1)
    assert x.shape == (256, 5) and y.shape == (256, 1)
    assert x.dtype == torch.float32 and y.dtype == torch.float32
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.isfinite(x).all() and torch.isfinite(y).all()
    x2, y2 = cell_dataset(3, version=1, steps=37)
    assert x2.shape == (37, 5) and y2.shape == (37, 1)
    # normalised: features and target of order one, not volts or amperes
    assert x.abs().max() < 10 and y.abs().max() < 5
    assert len(battery.FEATURES) == 5


def test_same_arguments_give_identical_tensors():
    a = cell_dataset(5, version=2, steps=200, seed=9)
    b = cell_dataset(5, version=2, steps=200, seed=9)
    c = load_cell(5, version=2, steps=200, seed=9)
    for other in (b, c):
        assert torch.equal(a[0], other[0]) and torch.equal(a[1], other[1])
        assert digest(*a) == digest(*other)
    # fresh tensors each call, not a shared cache someone could mutate
    assert a[0].data_ptr() != b[0].data_ptr()


@pytest.mark.slow
def test_identical_in_a_fresh_process():
    args = [(3, 2, 256, 0), (0, 0, 100, 5), (17, 7, 64, 1)]
    code = (
        "import hashlib, json, sys\n"
        "from mm_jupyter.usecases.battery import cell_dataset\n"
        "out = []\n"
        "for a in json.loads(sys.argv[1]):\n"
        "    h = hashlib.sha256()\n"
        "    for t in cell_dataset(*a):\n"
        "        h.update(f'{t.dtype}{tuple(t.shape)}'.encode()); h.update(t.contiguous().numpy().tobytes())\n"
        "    out.append(h.hexdigest())\n"
        "print(json.dumps(out))\n"
    )
    res = zygote.run(code, json.dumps(args), cwd=ROOT, env=dict(os.environ), timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == [digest(*cell_dataset(*a)) for a in args]


def test_cells_versions_and_seeds_differ():
    base = digest(*cell_dataset(1, 1))
    others = [cell_dataset(2, 1), cell_dataset(1, 2), cell_dataset(1, 1, seed=1)]
    assert len({base, *(digest(*d) for d in others)}) == 4
    # and not just by a bit: the targets differ substantially
    for d in others:
        assert (d[1] - cell_dataset(1, 1)[1]).abs().mean() > 1e-2


def test_cell_ref_loads_the_same_data():
    ref = cell_ref(4, 2, steps=128, seed=3)
    assert isinstance(ref, mm.DatasetRef)
    assert ref.loader == "mm_jupyter.usecases.battery:load_cell"
    assert ref.kwargs == {"cell": 4, "version": 2, "steps": 128, "seed": 3}
    # the documented keyword form builds the same reference
    assert mm.DatasetRef(battery.LOADER, cell=4, version=2, steps=128, seed=3) == ref
    x, y = ref.load()
    ex, ey = cell_dataset(4, 2, 128, 3)
    assert torch.equal(x, ex) and torch.equal(y, ey)
    assert ref.content_hash() == mm.DatasetRef.from_json(ref.to_json()).content_hash()
    assert ref.content_hash() != cell_ref(4, 3, steps=128, seed=3).content_hash()


def test_target_is_the_measured_voltage():
    tr = battery.simulate_cell(6, version=3)
    _, y = cell_dataset(6, version=3)
    np.testing.assert_allclose(battery.voltage_to_volts(y[:, 0]), tr.voltage_measured, atol=1e-6)
    x = battery.features(tr)
    np.testing.assert_array_equal(cell_dataset(6, version=3)[0].numpy(), x.astype(np.float32))
    # the current features are the measured current, the previous one and a low-pass of it
    np.testing.assert_allclose(x[:, 0] * battery.Q0_AH, tr.current_measured)
    np.testing.assert_allclose(x[1:, 1], x[:-1, 0])
    assert np.corrcoef(x[:, 4], x[:, 0])[0, 1] > 0


# -- physics -------------------------------------------------------------------------------------
def test_ocv_is_smooth_monotone_and_in_range():
    s = np.linspace(0, 1, 2001)
    v = battery.ocv(s)
    assert np.all(np.diff(v) > 0)
    assert 2.85 <= v[0] <= 3.1 and 4.1 <= v[-1] <= 4.25
    assert np.all(np.abs(np.diff(v, 2)) < 1e-2)  # no jumps
    assert battery.ocv(-0.5) == battery.ocv(0.0) and battery.ocv(1.5) == battery.ocv(1.0)


def test_r0_gives_the_instantaneous_drop_and_rc_pairs_relax_exactly():
    p = battery.cell_parameters(2)
    current = np.r_[np.zeros(5), np.full(20, 5.0), np.zeros(40)]
    cur, soc, v, v1, v2 = battery.simulate(p, current, soc0=0.7)
    np.testing.assert_array_equal(cur, current)  # within SOC bounds: applied as requested
    # at the step, SOC and the RC voltages have not moved yet: the drop is I * R0 exactly
    assert v[5] - v[4] == pytest.approx(-5.0 * p.r0, abs=1e-12)
    # under load the RC pairs charge towards I * R: voltage keeps falling
    assert np.all(np.diff(v[5:25]) < 0)
    assert 0 < v1[24] < 5.0 * p.r1 and 0 < v2[24] < 5.0 * p.r2
    # at rest the RC voltages decay by exactly exp(-dt / tau) per step and the voltage recovers
    np.testing.assert_allclose(v1[26:] / v1[25:-1], math.exp(-battery.DT / p.tau1), rtol=1e-9)
    np.testing.assert_allclose(v2[26:] / v2[25:-1], math.exp(-battery.DT / p.tau2), rtol=1e-9)
    assert np.all(np.diff(v[25:]) > 0)
    assert v[-1] < battery.ocv(soc[-1]) + 1e-12  # still relaxing, never above OCV


def test_coulomb_counting_uses_the_aged_capacity():
    tr0 = battery.simulate_cell(8, version=0)
    tr6 = battery.simulate_cell(8, version=6)
    for tr in (tr0, tr6):
        np.testing.assert_allclose(np.diff(tr.soc), -tr.current[:-1] * battery.DT / tr.params.q, atol=1e-12)
    assert tr6.params.q == pytest.approx(tr0.params.q * tr6.params.soh)


def test_soc_and_current_stay_bounded():
    for cell in range(40):
        for version in (0, 9):
            tr = battery.simulate_cell(cell, version)
            assert tr.soc.min() >= battery.SOC_MIN - 1e-9 and tr.soc.max() <= battery.SOC_MAX + 1e-9
            assert -1.0 * battery.Q0_AH - 1e-9 <= tr.current.min() and tr.current.max() <= 3.0 * battery.Q0_AH + 1e-9
            assert np.isfinite(tr.voltage).all() and 2.5 < tr.voltage.min() and tr.voltage.max() < 4.5
    # the profile is not trivial: rests, discharge and charge all occur
    tr = battery.simulate_cell(1, 0)
    assert (tr.current == 0).any() and (tr.current > 1).any() and (tr.current < 0).any()


def test_ageing_lowers_capacity_raises_resistance_and_deepens_the_voltage_drop():
    soh = [battery.state_of_health(3, v) for v in range(8)]
    assert soh[0] == 1.0 and all(a > b for a, b in zip(soh, soh[1:]))
    assert 0.95 < soh[1] < 0.99  # roughly 3 % per version
    params = [battery.cell_parameters(3, v) for v in range(8)]
    for a, b in zip(params, params[1:]):
        assert b.q < a.q and b.r0 > a.r0 and b.r1 > a.r1 and b.r2 > a.r2
        assert b.c1 == a.c1 and b.c2 == a.c2
    # the same 1C discharge from the same SOC: the aged cell sags further at every step
    current = np.full(60, battery.Q0_AH)
    _, soc_new, v_new, _, _ = battery.simulate(params[0], current, soc0=0.8)
    _, soc_old, v_old, _, _ = battery.simulate(params[7], current, soc0=0.8)
    assert np.all(v_old < v_new)
    assert soc_old[-1] < soc_new[-1]  # less capacity: SOC falls faster
    assert (battery.ocv(0.8) - v_old[-1]) - (battery.ocv(0.8) - v_new[-1]) > 0.02
    # the per-cell spread: same version, different cells, different fade and parameters
    assert battery.state_of_health(3, 5) != battery.state_of_health(4, 5)
    assert battery.cell_parameters(3).r0 != battery.cell_parameters(4).r0
    # the dataset carries the SOH the simulation used
    x3, _ = cell_dataset(3, 3)
    assert float(x3[0, 3]) == pytest.approx((soh[3] - 0.85) / 0.1, abs=1e-6)


def test_measurement_noise_present_but_bounded():
    tr = battery.simulate_cell(11, 2)
    dv = tr.voltage_measured - tr.voltage
    di = tr.current_measured - tr.current
    assert 0.5 * battery.V_NOISE < dv.std() < 2 * battery.V_NOISE
    assert np.abs(dv).max() < 8 * battery.V_NOISE
    assert 0.5 * battery.I_NOISE < di.std() < 2 * battery.I_NOISE
    assert np.abs(di).max() < 8 * battery.I_NOISE
    # two measurements of the same version differ only when the seed does
    assert not np.array_equal(tr.voltage_measured, battery.simulate_cell(11, 2, seed=1).voltage_measured)


def test_a_trained_ffnn_predicts_the_voltage():
    data = cell_dataset(2, 1)
    model = initial_models(1, seed=4)[0]
    before = mse(model, data)
    with deterministic(0):
        train(model, data, {"epochs": 20, "lr": 1e-2})
    after = mse(model, data)
    assert after < 0.2 * before
    assert after < 0.5 * float(data[1].var())  # better than predicting the mean
