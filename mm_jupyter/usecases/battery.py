"""Synthetic battery-cell data: a second-order equivalent-circuit model (ECM) of a Li-ion cell.

The multi-model management paper's use case keeps one small voltage model per battery cell and
retrains the cells whose measurements changed. This module produces that data without downloading
anything: every cell has its own (seeded) parameters, ages with the dataset ``version`` and draws a
new measurement per version.

Model (time step ``DT`` seconds, discharge current positive)::

    V_k      = OCV(SOC_k) - I_k * R0 - V1_k - V2_k            terminal voltage
    Vj_{k+1} = Vj_k * a_j + Rj * (1 - a_j) * I_k,  a_j = exp(-DT / (Rj * Cj))   two RC pairs, exact
    SOC_{k+1} = SOC_k - I_k * DT / Q                          coulomb counting

Ageing by state of health ``SOH`` in (0, 1]: ``Q = Q0 * SOH`` and every resistance grows as
``R * (1 + k_R * (1 - SOH))``. The measured voltage and current carry seeded Gaussian noise.

Everything is pure numpy with explicit seeds, so the same arguments give bit-identical tensors in
every process (what provenance-based recovery relies on).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from ..store.provenance import DatasetRef
from ..store.trust import trusted

if TYPE_CHECKING:
    import torch

#: Sampling interval of the simulated measurements, in seconds.
DT = 10.0
#: Nominal capacity (Ah) of a fresh cell; 1C = this many amperes.
Q0_AH = 2.5
#: Bounds the current profile keeps the true state of charge within.
SOC_MIN, SOC_MAX = 0.05, 0.98
#: Loader reference recorded in provenance.
LOADER = "mm_jupyter.usecases.battery:load_cell"
#: Fixed normalisation of the features (not data dependent, so cells stay comparable).
V_CENTER, V_SCALE = 3.7, 0.3
FEATURES = ("current", "previous_current", "soc_estimate", "soh", "filtered_current")


@dataclass(frozen=True)
class CellParameters:
    """Electrical parameters of one cell at one state of health (SI units: ohm, farad, A·s)."""

    q: float      # usable capacity, ampere-seconds
    r0: float     # series resistance
    r1: float     # fast RC pair
    c1: float
    r2: float     # slow RC pair (diffusion)
    c2: float
    soh: float    # state of health in (0, 1]

    @property
    def tau1(self) -> float:
        return self.r1 * self.c1

    @property
    def tau2(self) -> float:
        return self.r2 * self.c2


#: Nominal fresh-cell parameters (a 2.5 Ah 18650-like cell).
NOMINAL = CellParameters(q=Q0_AH * 3600.0, r0=0.015, r1=0.010, c1=2_000.0, r2=0.020, c2=30_000.0, soh=1.0)
#: Lognormal sigma of the per-cell spread of each parameter.
SPREAD = {"q": 0.03, "r0": 0.10, "r1": 0.15, "c1": 0.10, "r2": 0.15, "c2": 0.10}
#: Resistance growth per unit of lost health: R * (1 + k * (1 - SOH)).
AGEING_K = {"r0": 2.5, "r1": 2.0, "r2": 3.0}
#: Mean SOH lost per dataset version, and its per-cell lognormal spread.
FADE_PER_VERSION, FADE_SPREAD = 0.03, 0.2
SOH_FLOOR = 0.3
V_NOISE, I_NOISE = 0.002, 0.01  # volts, amperes (standard deviations)


def ocv(soc: np.ndarray | float) -> np.ndarray:
    """Open-circuit voltage of a state of charge: smooth, strictly increasing, ~2.94 V at 0 and
    ~4.16 V at 1 (linear trend, logarithmic ends, exponential knee when nearly empty)."""
    s = np.clip(np.asarray(soc, dtype=np.float64), 0.0, 1.0)
    return 3.25 + 0.7 * s + 0.04 * np.log((s + 0.005) / (1.005 - s)) - 0.1 * np.exp(-s / 0.05)


def _cell_rng(seed: int, cell: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(cell) & 0xFFFFFFFF, *stream])


def fresh_parameters(cell: int, seed: int = 0) -> CellParameters:
    """Cell ``cell``'s parameters when new: nominal values times seeded lognormal factors."""
    rng = _cell_rng(seed, cell, 0)
    factors = {k: float(rng.lognormal(0.0, s)) for k, s in SPREAD.items()}
    return CellParameters(
        q=NOMINAL.q * factors["q"], r0=NOMINAL.r0 * factors["r0"], r1=NOMINAL.r1 * factors["r1"],
        c1=NOMINAL.c1 * factors["c1"], r2=NOMINAL.r2 * factors["r2"], c2=NOMINAL.c2 * factors["c2"], soh=1.0,
    )


def state_of_health(cell: int, version: int = 0, seed: int = 0) -> float:
    """SOH of ``cell`` at dataset ``version``: 1.0, then about 0.97, 0.94, ... (per-cell fade rate)."""
    if version < 0:
        raise ValueError(f"version must be >= 0, not {version}")
    rate = FADE_PER_VERSION * float(_cell_rng(seed, cell, 1).lognormal(0.0, FADE_SPREAD))
    return max(SOH_FLOOR, 1.0 - rate * version)


def aged(params: CellParameters, soh: float) -> CellParameters:
    """``params`` (of a fresh cell) at state of health ``soh``: less capacity, more resistance."""
    if not 0.0 < soh <= 1.0:
        raise ValueError(f"state of health must be in (0, 1], not {soh}")
    lost = 1.0 - soh
    return replace(
        params, q=params.q * soh, soh=soh,
        r0=params.r0 * (1 + AGEING_K["r0"] * lost),
        r1=params.r1 * (1 + AGEING_K["r1"] * lost),
        r2=params.r2 * (1 + AGEING_K["r2"] * lost),
    )


def cell_parameters(cell: int, version: int = 0, seed: int = 0) -> CellParameters:
    """Parameters of ``cell`` at dataset ``version`` (fresh spread, then aged to its SOH)."""
    return aged(fresh_parameters(cell, seed), state_of_health(cell, version, seed))


def current_profile(rng: np.random.Generator, steps: int, capacity_ah: float = Q0_AH) -> np.ndarray:
    """A drive-cycle-like current request (A, discharge positive) of ``steps`` samples.

    Segments of 4-32 samples: rest, constant-current discharge, constant-current charge, pulse
    trains and dynamic (noisy) load. Bounded to [-1C, 3C]; ``simulate`` additionally limits it so
    the state of charge stays in [SOC_MIN, SOC_MAX].
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, not {steps}")
    c = capacity_ah
    lengths = rng.integers(4, 33, size=steps // 4 + 1)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    nseg = int(np.searchsorted(starts, steps, side="left"))
    lengths, starts = lengths[:nseg], starts[:nseg]
    kind = rng.integers(0, 5, size=nseg)
    amp = rng.uniform(0.2, 2.5, size=nseg) * c
    period = rng.integers(1, 5, size=nseg)
    seg = np.repeat(np.arange(nseg), lengths)[:steps]
    local = np.arange(steps) - starts[seg]
    a, k = amp[seg], kind[seg]
    on = (local // period[seg]) % 2 == 0
    dynamic = 0.4 * a + 0.5 * a * rng.standard_normal(steps)
    current = np.select(
        [k == 0, k == 1, k == 2, k == 3],
        [np.zeros(steps), a, -0.35 * a, np.where(on, a, 0.1 * a)],
        default=dynamic,
    )
    clipped: np.ndarray = np.clip(current, -1.0 * c, 3.0 * c)
    return clipped


@dataclass(frozen=True)
class CellTrace:
    """One simulated measurement: true and measured signals, one value per sample."""

    params: CellParameters
    current: np.ndarray           # true current, A
    current_measured: np.ndarray  # with sensor noise
    soc: np.ndarray               # true state of charge at each sample
    voltage: np.ndarray           # true terminal voltage, V
    voltage_measured: np.ndarray  # with sensor noise
    v1: np.ndarray                # polarisation voltages of the RC pairs
    v2: np.ndarray


def simulate(params: CellParameters, current: np.ndarray, soc0: float, dt: float = DT,
             v10: float = 0.0, v20: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Run the ECM over a requested ``current``; returns (current, soc, voltage, v1, v2).

    The applied current is the request limited so that SOC stays in [SOC_MIN, SOC_MAX]; the RC
    pairs are discretised exactly for a current held constant over each step.
    """
    req = np.asarray(current, dtype=np.float64)
    n = len(req)
    a1, a2 = math.exp(-dt / params.tau1), math.exp(-dt / params.tau2)
    b1, b2 = params.r1 * (1 - a1), params.r2 * (1 - a2)
    q = params.q
    cur = np.empty(n)
    soc = np.empty(n)
    v1 = np.empty(n)
    v2 = np.empty(n)
    s, x1, x2 = float(soc0), float(v10), float(v20)
    for i, r in enumerate(req.tolist()):
        hi, lo = (s - SOC_MIN) * q / dt, (s - SOC_MAX) * q / dt
        r = hi if r > hi else (lo if r < lo else r)
        cur[i], soc[i], v1[i], v2[i] = r, s, x1, x2
        s -= r * dt / q
        x1 = x1 * a1 + b1 * r
        x2 = x2 * a2 + b2 * r
    voltage = ocv(soc) - cur * params.r0 - v1 - v2
    return cur, soc, voltage, v1, v2


def simulate_cell(cell: int, version: int = 0, steps: int = 256, seed: int = 0) -> CellTrace:
    """Simulate one measurement of ``cell`` at dataset ``version`` (aged to that version's SOH)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, not {steps}")
    params = cell_parameters(cell, version, seed)
    rng = _cell_rng(seed, cell, 2, int(version), int(steps))
    soc0 = float(rng.uniform(0.55, 0.95))
    request = current_profile(rng, steps)
    cur, soc, voltage, v1, v2 = simulate(params, request, soc0)
    i_meas = cur + I_NOISE * rng.standard_normal(steps)
    v_meas = voltage + V_NOISE * rng.standard_normal(steps)
    return CellTrace(params, cur, i_meas, soc, voltage, v_meas, v1, v2)


def features(trace: CellTrace) -> np.ndarray:
    """The five model inputs (float64, shape (steps, 5)), in the order of ``FEATURES``.

    Only what a battery management system knows: the measured current, the previous one, a
    coulomb-counting SOC estimate (known start, measured current, nominal capacity times SOH),
    the SOH and an exponentially filtered current (tracks the slow polarisation).
    """
    i = trace.current_measured
    prev = np.concatenate([[0.0], i[:-1]])
    q_est = NOMINAL.q * trace.params.soh
    soc_est = trace.soc[0] - np.concatenate([[0.0], np.cumsum(i[:-1])]) * DT / q_est
    alpha = 1.0 - math.exp(-DT / NOMINAL.tau2)
    filt = np.empty_like(i)
    acc = 0.0
    for k, x in enumerate(prev.tolist()):
        acc += alpha * (x - acc)
        filt[k] = acc
    c = Q0_AH
    return np.stack([
        i / c, prev / c, (soc_est - 0.5) / 0.25, np.full_like(i, (trace.params.soh - 0.85) / 0.1), filt / (0.5 * c),
    ], axis=1)


def cell_arrays(cell: int, version: int = 0, steps: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` as float32 numpy arrays; see ``cell_dataset``."""
    trace = simulate_cell(cell, version, steps, seed)
    x = features(trace).astype(np.float32)
    y = ((trace.voltage_measured - V_CENTER) / V_SCALE).astype(np.float32).reshape(-1, 1)
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def cell_dataset(cell: int, version: int = 0, steps: int = 256, seed: int = 0) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Training data of one cell's voltage model: ``(X, y)``.

    ``X``: float32 (steps, 5), the normalised ``FEATURES``; ``y``: float32 (steps, 1), the measured
    terminal voltage as ``(V - 3.7) / 0.3``. Higher versions are later, aged measurements of the same
    cell. Bit-identical for the same arguments in every process.
    """
    import torch

    x, y = cell_arrays(cell, version, steps, seed)
    return torch.from_numpy(x), torch.from_numpy(y)


@trusted
def load_cell(cell: int, version: int = 0, steps: int = 256, seed: int = 0) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Dataset loader recorded in provenance: the same as ``cell_dataset``."""
    return cell_dataset(cell, version, steps, seed)


def cell_ref(cell: int, version: int = 0, steps: int = 256, seed: int = 0) -> DatasetRef:
    """``DatasetRef`` of ``load_cell(cell, version, steps, seed)`` for ``mm.Provenance(datasets=...)``."""
    return DatasetRef(LOADER, {"cell": int(cell), "version": int(version), "steps": int(steps), "seed": int(seed)})


def voltage_to_volts(y: "np.ndarray | torch.Tensor") -> np.ndarray:
    """Undo the target normalisation of ``cell_dataset``."""
    return np.asarray(y, dtype=np.float64) * V_SCALE + V_CENTER
