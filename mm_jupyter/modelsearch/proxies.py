"""Proxy scores: how well a candidate's frozen features suit the target task.

Feature-based model search (Alsatian, SHiFT) never fine-tunes a candidate; it extracts features
with the candidate's frozen feature extractor and trains a cheap proxy on them. Every search
approach (``base``, ``shift``, ``alsatian``) calls the same proxy on the same features, and
Alsatian's promise "same scores and ranking as ``base``" only holds if a proxy is a pure function of
its inputs and seed. Hence every proxy here is bit-reproducible:

* no global RNG is read or advanced (seeded ``torch.Generator`` only),
* BLAS work runs single-threaded under a lock (MKL's reductions may change with the thread count),
* only deterministic CPU kernels are used (fine under ``torch.use_deterministic_algorithms``).

Proxies (``PROXIES``):

``linear``  a linear classifier trained with Adam on standardised features (the Alsatian proxy);
            score = test accuracy, loss = test cross-entropy.
``knn``     cosine k-nearest-neighbour vote on standardised features;
            score = test accuracy, loss = 1 - mean vote share of the true class.
``logme``   LogME (You et al., ICML 2021), the mean per-class log marginal evidence of a Bayesian
            linear model on the train features; score = LogME, loss = -LogME.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import SearchError

__all__ = [
    "PROXIES",
    "ProxyScore",
    "get_proxy",
    "knn_proxy",
    "linear_proxies",
    "linear_proxy",
    "score_many",
    "logme_proxy",
]

PROXIES: tuple[str, ...] = ("linear", "knn", "logme")

_STD_EPS = 1e-6  # added to the train std so constant feature dimensions standardise to 0
_LOGME_MAX_ITER = 11  # as in the LogME paper's reference algorithm
_LOGME_TOL = 1e-3  # relative change of alpha/beta that counts as converged
_TINY = 1e-12  # guards divisions in the LogME updates against exactly-zero residuals/weights

_compute_lock = threading.Lock()


@dataclass(frozen=True)
class ProxyScore:
    """Result of one proxy evaluation; rankings sort by ``score`` (desc), then ``loss`` (asc)."""

    score: float  # higher is better (e.g. test accuracy)
    loss: float  # lower is better; used to break ties in rankings


# ---------------------------------------------------------------------------------------------
# input checks and shared helpers
# ---------------------------------------------------------------------------------------------


@contextmanager
def _pinned_threads() -> Iterator[None]:
    """Run the block with one intra-op thread, so results never depend on the caller's setting.

    The lock serialises proxies started from several threads: they all change the process-wide
    thread count, and restoring it out of order would leave the wrong value behind.
    """
    with _compute_lock:
        before = torch.get_num_threads()
        if before != 1:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            if before != 1:
                torch.set_num_threads(before)


def _as_features(x: Any, split: str) -> Tensor:
    """(N, ...) float tensor -> (N, D) float64 CPU tensor; rejects empty and non-finite input."""
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(np.asarray(x))
        except Exception as exc:
            raise SearchError(f"{split}_x must be a tensor of features, got {type(x).__name__}") from exc
    if x.is_complex() or x.dtype == torch.bool:
        raise SearchError(f"{split}_x must hold real-valued features, got dtype {x.dtype}")
    if x.dim() == 0:
        raise SearchError(f"{split}_x must have shape (N, D) (or (N, ...)), got a scalar")
    if x.shape[0] == 0:
        raise SearchError(f"{split} split is empty: {split}_x has 0 rows")
    x = x.detach().to(device="cpu", dtype=torch.float64).reshape(x.shape[0], -1).contiguous()
    if x.shape[1] == 0:
        raise SearchError(f"{split}_x has 0 feature dimensions (shape {tuple(x.shape)})")
    # one pass without a mask: a NaN or inf makes the sum NaN or inf; a sum that overflowed on finite
    # values is told apart by the exact test, which only then runs
    if not math.isfinite(float(x.sum())) and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise SearchError(f"{split} features contain NaN or inf values ({bad} of {x.shape[0]} rows affected)")
    features: Tensor = x
    return features


def _as_labels(y: Any, split: str) -> Tensor:
    """(N,) integer class indices -> int64 CPU tensor; rejects floats and negative labels."""
    if not isinstance(y, Tensor):
        try:
            y = torch.as_tensor(np.asarray(y))
        except Exception as exc:
            raise SearchError(f"{split}_y must be a tensor of class indices, got {type(y).__name__}") from exc
    if y.dtype.is_floating_point or y.is_complex() or y.dtype == torch.bool:
        raise SearchError(f"{split}_y must hold integer class indices (int64), got dtype {y.dtype}")
    y = y.detach().to(device="cpu", dtype=torch.int64)
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dim() != 1:
        raise SearchError(f"{split}_y must have shape (N,), got {tuple(y.shape)}")
    if y.numel() and int(y.min()) < 0:
        raise SearchError(f"{split}_y contains negative class indices (min {int(y.min())})")
    labels: Tensor = y
    return labels


#: The most classes a proxy takes: the linear layer's weights and Adam state and kNN's vote table have a row
#: per class up to the largest label, so labels that are ids, not indices, would exhaust memory.
MAX_CLASSES = 100_000


def _validate(train_x: Any, train_y: Any, test_x: Any, test_y: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Checked (train_x, train_y, test_x, test_y, num_classes); features are float64 (N, D)."""
    tx, vx = _as_features(train_x, "train"), _as_features(test_x, "test")
    ty, vy = _as_labels(train_y, "train"), _as_labels(test_y, "test")
    if tx.shape[0] != ty.shape[0]:
        raise SearchError(
            f"train split length mismatch: train_x has {tx.shape[0]} rows but train_y has {ty.shape[0]} labels"
        )
    if vx.shape[0] != vy.shape[0]:
        raise SearchError(
            f"test split length mismatch: test_x has {vx.shape[0]} rows but test_y has {vy.shape[0]} labels"
        )
    if tx.shape[1] != vx.shape[1]:
        raise SearchError(
            f"feature dimension mismatch: train features have {tx.shape[1]} dimensions, test features {vx.shape[1]}"
        )
    present = torch.unique(ty)
    if present.numel() < 2:
        raise SearchError(
            f"train split needs at least 2 classes to score features, got only class {int(present[0])}"
        )
    num_classes = int(max(int(ty.max()), int(vy.max()))) + 1
    if num_classes > MAX_CLASSES:
        found = int(torch.unique(torch.cat([ty, vy])).numel())
        raise SearchError(f"labels run up to {num_classes - 1:,}: a proxy takes class indices below {MAX_CLASSES:,} "
                          f"(its per-class state grows with the largest label); number the {found} classes "
                          f"present 0..{found - 1}")
    return tx, ty, vx, vy, num_classes


def _standardise(train_x: Tensor, test_x: Tensor, scratch: tuple[Tensor, Tensor] | None = None
                 ) -> tuple[Tensor, Tensor]:
    """Scale both splits with the train mean/std, so the proxy sees comparable feature scales.

    The std takes two passes (the mean, then the mean squared deviation from it): exact to rounding,
    and ten times faster than ``Tensor.std`` along the rows. ``scratch``: buffers of the two splits'
    shapes to write the results into (a caller scaling many candidates allocates them once)."""
    mean = train_x.mean(dim=0)
    t, v = scratch if scratch is not None else (torch.empty_like(train_x), torch.empty_like(test_x))
    centred = torch.sub(train_x, mean, out=t)
    std = (centred * centred).mean(dim=0).sqrt_().add_(_STD_EPS)
    return centred.div_(std), torch.sub(test_x, mean, out=v).div_(std)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise SearchError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise SearchError(f"seed must be an integer, got {seed!r}")
    return int(seed) % (2**63)  # torch.Generator.manual_seed takes a 64-bit value


def _check_float(name: str, value: Any, *, positive: bool) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SearchError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise SearchError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return v


# ---------------------------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------------------------


class _Adam:
    """Adam (Kingma & Ba) with L2 weight decay, betas 0.9/0.999, eps 1e-8: one step is PyTorch's fused
    kernel (``torch.optim.Adam(fused=True)``'s: one pass over each parameter and its state instead of
    seven elementwise ops, ~3x faster on the wide features of ``layers=``).

    Each parameter is updated on its own: the kernel computes an element's update in vector or scalar
    code by its place in the tensor, so candidates trained together pass one view each (see
    ``_train_linear``) and get the bits they get alone. Not ``torch.optim.Adam`` itself because the
    first optimizer constructed in a process imports ``torch._dynamo`` (over a second), and a proxy
    should cost milliseconds; the tests check that it follows ``torch.optim.Adam``'s trajectory.
    """

    def __init__(
        self, params: list[Tensor], *, lr: float, weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
    ) -> None:
        self.params = params
        self.lr, self.weight_decay, self.eps = lr, weight_decay, eps
        self.beta1, self.beta2 = betas
        self.steps = torch.zeros((), dtype=torch.float32)
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, grads: list[Tensor]) -> None:
        """One step with ``grads[j]`` the gradient of ``params[j]``."""
        self.steps.add_(1)
        torch._fused_adam_(self.params, grads, self.exp_avg, self.exp_avg_sq, [], [self.steps] * len(self.params),
                           lr=self.lr, beta1=self.beta1, beta2=self.beta2, weight_decay=self.weight_decay,
                           eps=self.eps, amsgrad=False, maximize=False)


def linear_proxy(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    seed: int = 0,
    epochs: int = 20,
    lr: float = 0.02,
    batch_size: int = 512,
    weight_decay: float = 0.0,
) -> ProxyScore:
    """Train one linear layer on frozen features and report test accuracy / cross-entropy.

    This is Alsatian's proxy: cheap enough to run for every candidate at every halving rung, and
    a faithful signal of how linearly separable the candidate's features make the task.

    Procedure (all float32 on CPU, single-threaded, bit-reproducible for the same inputs+seed):

    * features are flattened to (N, D) and standardised with the train mean and std (+1e-6), in
      float64;
    * ``C = max label + 1`` over train and test; one ``nn.Linear(D, C)`` is initialised like
      PyTorch's default (uniform in ±1/sqrt(D) for weight and bias), drawn from a
      ``torch.Generator`` seeded with ``seed`` (the global RNG is never touched);
    * ``epochs`` passes of mini-batches of ``batch_size`` rows, reshuffled every epoch by the same
      generator (an epoch of a single mini-batch takes the rows in data order: a shuffle would
      only reorder the gradient's sum); Adam (``lr``, betas 0.9/0.999, eps 1e-8, L2
      ``weight_decay``; the same update as ``torch.optim.Adam``, see ``_Adam``) on mean
      cross-entropy, its gradient written out
      (``(softmax - onehot) / rows``);
    * evaluation: score = test accuracy, loss = mean test cross-entropy.

    Defaults: ``epochs=20``, ``lr=0.02``, ``batch_size=512``, ``weight_decay=0.0``.
    It is ``linear_proxies`` of one candidate: scoring candidates one by one or together gives the
    same bits.
    """
    return linear_proxies([(train_x, test_x)], train_y, test_y, seed=seed, epochs=epochs, lr=lr,
                          batch_size=batch_size, weight_decay=weight_decay)[0]


#: Bytes one group's epoch touches (features, layer, gradient and Adam state, float32) at most; more
#: candidates train in several groups. What fits a last-level cache is read from it every epoch, not
#: from memory: 70 arms of 6,272 features train 1.6x faster in groups of 5 than all together.
_LINEAR_GROUP_BYTES = 12 << 20


def linear_proxies(
    features: Sequence[tuple[Tensor, Tensor]],
    train_y: Tensor,
    test_y: Tensor,
    *,
    seed: int = 0,
    epochs: int = 20,
    lr: float = 0.02,
    batch_size: int = 512,
    weight_decay: float = 0.0,
) -> list[ProxyScore]:
    """``linear_proxy`` of several candidates — ``(train_x, test_x)`` each, on the same labels — trained
    together: one batched matmul per step for all of them instead of one small matmul per candidate.

    Candidates with the same feature width form one group (as many as fit ``_LINEAR_GROUP_BYTES``,
    at least one); the same seed draws the same initial layer and the same shuffles for each, so a group
    is a stack of independent problems, and every candidate's result is the same whichever others
    share its group (batched matmuls compute each stacked problem on its own).
    """
    seed = _check_seed(seed)
    epochs = _check_int("epochs", epochs, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    lr = _check_float("lr", lr, positive=True)
    weight_decay = _check_float("weight_decay", weight_decay, positive=False)
    groups: dict[int, list[int]] = {}
    shapes = [_rows_width(train_x) for train_x, _ in features]
    for i, (_, width) in enumerate(shapes):
        groups.setdefault(width, []).append(i)
    out: list[ProxyScore | None] = [None] * len(features)
    classes = _classes(train_y, test_y)
    for members in groups.values():
        rows, width = shapes[members[0]]
        copies = 2 if rows > batch_size else 1  # (with several mini-batches, an epoch's shuffled copy too)
        per = max(1, _LINEAR_GROUP_BYTES // max(1, 4 * width * (copies * rows + 4 * classes)))
        buffers: list[Tensor] = []  # the groups of one width share their stacks and scratch
        for start in range(0, len(members), per):
            chunk = members[start : start + per]
            tx, ty, vx, vy, num_classes = _stacked([features[i] for i in chunk], train_y, test_y, buffers,
                                                   min(per, len(members)))
            scores = _train_linear(tx, ty, vx, vy, num_classes, seed=seed, epochs=epochs, lr=lr,
                                   batch_size=batch_size, weight_decay=weight_decay)
            for i, score in zip(chunk, scores):
                out[i] = score
    return [s for s in out if s is not None]


def _classes(train_y: Any, test_y: Any) -> int:
    """Classes the layer will have (for sizing groups only; ``_validate`` checks the labels)."""
    try:
        return max(int(torch.as_tensor(y).max()) for y in (train_y, test_y)) + 1
    except (RuntimeError, ValueError, TypeError, OverflowError):
        return 1


def _rows_width(x: Any) -> tuple[int, int]:
    """Rows and features per row of ``x`` as ``_as_features`` flattens it, (0, 0) where it would
    refuse the shape: groups candidates before their features are converted (and checked)."""
    try:
        shape = np.shape(x)
    except (ValueError, TypeError):  # ragged nested lists: _validate names the problem
        return 0, 0
    return (shape[0], math.prod(shape[1:])) if len(shape) >= 1 else (0, 0)


def _stacked(features: Sequence[tuple[Tensor, Tensor]], train_y: Tensor, test_y: Tensor, buffers: list[Tensor],
             most: int) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """The checked, standardised (K, N, D) train and (K, M, D) test features (float32) of candidates
    of one width, written into the stacks through one float64 scratch per split instead of new
    tensors per candidate (fresh memory costs a page fault per 4 KiB, more than the arithmetic).
    ``buffers``: the stacks (for ``most`` candidates) and scratch, made at the first group of a width
    and used by its later groups."""
    for j, (train_x, test_x) in enumerate(features):
        tx, ty, vx, vy, num_classes = _validate(train_x, train_y, test_x, test_y)
        if not buffers:
            buffers += [torch.empty((most, *tx.shape), dtype=torch.float32),
                        torch.empty((most, *vx.shape), dtype=torch.float32), torch.empty_like(tx), torch.empty_like(vx)]
        for split, x in enumerate(_standardise(tx, vx, (buffers[2], buffers[3]))):
            buffers[split][j].copy_(x)
    k = len(features)
    return buffers[0][:k], ty, buffers[1][:k], vy, num_classes


def _train_linear(tx: Tensor, ty: Tensor, vx: Tensor, vy: Tensor, num_classes: int, *, seed: int, epochs: int,
                  lr: float, batch_size: int, weight_decay: float) -> list[ProxyScore]:
    """Train ``K`` linear layers at once (see ``linear_proxy``) on ``tx`` (K, N, D); test on ``vx`` (K, M, D).
    Each epoch's shuffle is one gather for all candidates, and every mini-batch a plain (K, rows, D) slice.
    Logits are computed as (K, classes, rows): ``W @ Xᵀ`` runs ~2x faster than ``X @ Wᵀ`` for few
    classes and wide features, and the weight's gradient is then ``grad @ X`` without a transpose."""
    k, n, dim = tx.shape
    with _pinned_threads(), torch.no_grad():
        gen = torch.Generator(device="cpu").manual_seed(seed)
        bound = 1.0 / math.sqrt(dim)
        weight = torch.rand((num_classes, dim), generator=gen) * (2 * bound) - bound
        bias = torch.rand((num_classes,), generator=gen) * (2 * bound) - bound
        w = weight.expand(k, num_classes, dim).contiguous()  # (K, C, D), as nn.Linear keeps it
        b = bias[:, None].expand(k, num_classes, 1).contiguous()
        onehot = F.one_hot(ty, num_classes).to(torch.float32).t().contiguous()  # (C, N)
        adam = _Adam([*w.unbind(0), *b.unbind(0)], lr=lr, weight_decay=weight_decay)  # a view per candidate
        # the epoch's shuffled copy and the weight gradient live in buffers made once (a fresh tensor of
        # this size per epoch cost more in page faults than the copy and the matmuls together); an epoch
        # of one mini-batch takes the rows in data order: shuffling them would only reorder a sum
        shuffle = n > batch_size
        xs, targets = (torch.empty_like(tx), torch.empty_like(onehot)) if shuffle else (tx, onehot)
        w_grad, b_grad = torch.empty_like(w), torch.empty_like(b)
        grads = [*w_grad.unbind(0), *b_grad.unbind(0)]
        for _ in range(epochs):
            if shuffle:
                order = torch.randperm(n, generator=gen)
                torch.index_select(tx, 1, order, out=xs)
                torch.index_select(onehot, 1, order, out=targets)
            for start in range(0, n, batch_size):
                xb = xs[:, start : start + batch_size]
                grad = torch.softmax(torch.baddbmm(b, w, xb.transpose(1, 2)), dim=1)  # (K, C, rows)
                grad.sub_(targets[:, start : start + batch_size]).div_(xb.shape[1])  # d(mean cross-entropy)/d(logits)
                torch.bmm(grad, xb, out=w_grad)
                torch.sum(grad, dim=2, keepdim=True, out=b_grad)
                adam.step(grads)
        logp = torch.log_softmax(torch.baddbmm(b, w, vx.transpose(1, 2)), dim=1)  # (K, C, M)
        losses = -logp.gather(1, vy.expand(k, 1, -1)).squeeze(1).mean(dim=1)
        accuracy = (logp.argmax(dim=1) == vy).to(torch.float64).mean(dim=1)
    return [ProxyScore(score=float(a), loss=float(loss)) for a, loss in zip(accuracy, losses)]


# ---------------------------------------------------------------------------------------------
# knn
# ---------------------------------------------------------------------------------------------

_KNN_CHUNK = 1024  # test rows per similarity block: bounds memory at chunk x train floats


def _nearest(sims: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest entries per row, nearest first, equal values by lower index.

    ``topk`` alone is fast but does not say which of several equal values it keeps; a full stable
    sort is deterministic but slow. So: the k-th largest value is the threshold, everything above
    it is taken, and the places still free go to the threshold ties with the lowest indices.
    """
    thr = torch.topk(sims, k, dim=1, largest=True, sorted=True).values[:, k - 1 : k]
    above = sims > thr
    ties = sims == thr
    free = k - above.sum(dim=1, keepdim=True)
    chosen = above | (ties & (torch.cumsum(ties, dim=1) <= free))
    idx = chosen.nonzero()[:, 1].reshape(sims.shape[0], k)  # ascending index within each row
    by_sim = torch.sort(sims.gather(1, idx), dim=1, descending=True, stable=True).indices
    return idx.gather(1, by_sim)


def knn_proxy(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    seed: int = 0,
    k: int = 5,
) -> ProxyScore:
    """Cosine-similarity k-NN on standardised features: a training-free separability signal.

    * features are standardised with the train mean/std and L2-normalised (in float64), and the
      cosine similarities are computed in float32;
    * each test row takes its ``min(k, N_train)`` most similar train rows; equal similarities are
      broken by the lower train index;
    * prediction = the class with most votes; a tie in votes goes to the tied class whose first
      vote comes from the nearer neighbour;
    * score = test accuracy, loss = 1 - mean share of the k votes that went to the true class.

    Default ``k=5``. ``seed`` is accepted for a uniform proxy signature; the result does not
    depend on it.
    """
    _check_seed(seed)
    k = _check_int("k", k, 1)
    tx, ty, vx, vy, num_classes = _validate(train_x, train_y, test_x, test_y)
    tx, vx = _standardise(tx, vx)
    tx = F.normalize(tx, dim=1, eps=1e-12).to(torch.float32)
    vx = F.normalize(vx, dim=1, eps=1e-12).to(torch.float32)
    k = min(k, tx.shape[0])
    correct = 0
    share_sum = 0.0
    with _pinned_threads():
        train_t = tx.T.contiguous()
        positions = torch.arange(k, dtype=torch.int64)
        for start in range(0, vx.shape[0], _KNN_CHUNK):
            block = vx[start : start + _KNN_CHUNK]
            labels = vy[start : start + _KNN_CHUNK]
            neigh = ty[_nearest(block @ train_t, k)]  # (m, k) class of each neighbour, nearest first
            m = neigh.shape[0]
            votes = torch.zeros((m, num_classes), dtype=torch.int64).scatter_add_(
                1, neigh, torch.ones_like(neigh)
            )
            first = torch.full((m, num_classes), k, dtype=torch.int64).scatter_reduce_(
                1, neigh, positions.expand(m, k), reduce="amin", include_self=True
            )
            # more votes wins; among equal votes the class seen first (nearest) wins
            pred = (votes * (k + 1) - first).argmax(dim=1)
            correct += int((pred == labels).sum())
            share_sum += float(votes.gather(1, labels[:, None]).sum()) / k
    n_test = vx.shape[0]
    return ProxyScore(score=correct / n_test, loss=1.0 - share_sum / n_test)


# ---------------------------------------------------------------------------------------------
# LogME
# ---------------------------------------------------------------------------------------------


def _logme_evidence(
    sigma: np.ndarray, z2: np.ndarray, residual: Callable[[float], float], n: int, dim: int
) -> float:
    """Maximised per-sample log evidence of one target (You et al., ICML 2021, Algorithm 1).

    Model: ``y = F w + e``, ``w ~ N(0, I/alpha)``, ``e ~ N(0, I/beta)``. In the eigenbasis ``V`` of
    ``F^T F`` (eigenvalues ``sigma``, the squared singular values of ``F``) with
    ``z2 = (V^T F^T y)**2``, the posterior mean ``m = beta A^-1 F^T y`` (``A = alpha I + beta F^T F``)
    is diagonal, so each fixed-point step is O(rank):

        t = alpha / beta
        gamma = sum(sigma / (sigma + t))              effective number of parameters
        |m|^2 = sum(z2 / (sigma + t)^2)
        |Fm - y|^2 = residual(t)                      (computed by the caller, see logme_proxy)
        alpha <- gamma / |m|^2,   beta <- (n - gamma) / |Fm - y|^2

    from alpha = beta = 1, until alpha/beta changes by at most 1e-3 (relative) or after 11 steps.
    The evidence is then evaluated at the final (alpha, beta):

        L = D/2 log alpha + n/2 log beta - n/2 log 2pi - beta/2 |Fm - y|^2 - alpha/2 |m|^2
            - 1/2 log|A|

    where ``log|A|`` counts ``alpha + beta sigma_i`` for the given directions and ``alpha`` for the
    remaining ``D - len(sigma)``. Returns ``L / n``.
    """
    alpha, beta = 1.0, 1.0

    def moments(alpha: float, beta: float) -> tuple[float, float, float]:
        t = alpha / beta
        denom = sigma + t
        gamma = float(np.sum(sigma / denom))
        m2 = float(np.sum(z2 / denom**2))
        return gamma, m2, residual(t)

    for _ in range(_LOGME_MAX_ITER):
        t_old = alpha / beta
        gamma, m2, res2 = moments(alpha, beta)
        alpha = max(gamma / max(m2, _TINY), _TINY)
        beta = max(max(n - gamma, _TINY) / max(res2, _TINY), _TINY)
        if abs(alpha / beta - t_old) / t_old <= _LOGME_TOL:
            break
    _, m2, res2 = moments(alpha, beta)
    logdet = float(np.sum(np.log(alpha + beta * sigma))) + (dim - sigma.shape[0]) * math.log(alpha)
    evidence = (
        dim / 2.0 * math.log(alpha)
        + n / 2.0 * math.log(beta)
        - n / 2.0 * math.log(2.0 * math.pi)
        - beta / 2.0 * res2
        - alpha / 2.0 * m2
        - 0.5 * logdet
    )
    return float(evidence / n)


def logme_proxy(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    seed: int = 0,
) -> ProxyScore:
    """LogME: how well a Bayesian linear model on the features explains the labels, no training.

    For every class present in the train split, the one-hot target column gets its maximised log
    marginal evidence per sample (see ``_logme_evidence``); LogME is the mean over those classes.
    Features are used as given (flattened, float64, not standardised). The spectrum comes from
    one decomposition shared by all classes: the thin SVD ``F = U S V^T`` when ``N <= D``, the
    eigendecomposition of ``F^T F`` (same ``V`` and ``S^2``, about 3x faster) when ``N > D``.
    score = LogME (higher is better), loss = -LogME.

    Only the train split is used; the test split and ``seed`` are accepted (and validated) so
    that all proxies share one signature.
    """
    _check_seed(seed)
    tx, ty, _, _, _ = _validate(train_x, train_y, test_x, test_y)
    n, dim = tx.shape
    classes = torch.unique(ty)
    targets = (ty[:, None] == classes[None, :]).to(torch.float64)  # (n, classes) one-hot
    with _pinned_threads():
        if n > dim:
            sigma_t, v = torch.linalg.eigh(tx.T @ tx)
            sigma = sigma_t.clamp_min(0.0).numpy()
            z2 = ((v.T @ (tx.T @ targets)) ** 2).numpy()  # (D, classes)
            y2 = (targets**2).sum(dim=0).numpy()
            proj_sq = None
        else:
            u, s, _ = torch.linalg.svd(tx, full_matrices=False)
            sigma = (s**2).numpy()
            proj = (u.T @ targets).numpy()  # (rank, classes): coordinates of y in U
            proj_sq = proj**2
            z2 = sigma[:, None] * proj_sq
            y2 = (targets**2).sum(dim=0).numpy()
    values = []
    for j in range(classes.shape[0]):
        if proj_sq is None:
            # |Fm - y|^2 = |y|^2 - sum(z2 (sigma + 2t) / (sigma + t)^2): no division by sigma
            zj, yj = z2[:, j], float(y2[j])

            def residual(t: float, col: np.ndarray = zj, rest: float = yj) -> float:
                return max(rest - float(np.sum(col * (sigma + 2.0 * t) / (sigma + t) ** 2)), 0.0)

        else:
            # |Fm - y|^2 = sum(proj^2 (t / (sigma + t))^2) + |y outside span(U)|^2: exact when the
            # features can fit y almost perfectly (N <= D), where the form above would cancel
            pj = proj_sq[:, j]
            outside = max(float(y2[j]) - float(np.sum(pj)), 0.0)

            def residual(t: float, col: np.ndarray = pj, rest: float = outside) -> float:
                return float(np.sum(col * (t / (sigma + t)) ** 2)) + rest

        values.append(_logme_evidence(sigma, z2[:, j], residual, n, dim))
    value = float(np.mean(values))
    if not math.isfinite(value):
        raise SearchError("LogME did not produce a finite value for these features")
    return ProxyScore(score=value, loss=-value)


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[..., ProxyScore]] = {
    "linear": linear_proxy,
    "knn": knn_proxy,
    "logme": logme_proxy,
}


def get_proxy(name: str) -> Callable[..., ProxyScore]:
    """The proxy function called ``name`` (one of ``PROXIES``), so searches can name proxies."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise SearchError(f"unknown proxy {name!r}; choose one of {', '.join(PROXIES)}")
    return _REGISTRY[name]


def score_many(name: str, features: Sequence[tuple[Tensor, Tensor]], train_y: Tensor, test_y: Tensor, *,
               seed: int = 0) -> list[ProxyScore]:
    """Proxy ``name`` for several candidates' ``(train_x, test_x)`` on the same labels (a halving rung):
    the linear proxy trains them together (``linear_proxies``), the others one by one. Each score is
    the one ``get_proxy(name)`` gives the candidate alone."""
    score_fn = get_proxy(name)
    if score_fn is linear_proxy:
        return linear_proxies(features, train_y, test_y, seed=seed)
    return [score_fn(tx, train_y, vx, test_y, seed=seed) for tx, vx in features]
