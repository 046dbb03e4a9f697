"""Proxy scores (mm_jupyter.modelsearch.proxies): reproducibility, signal, exactness, validation."""
from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from mm_jupyter.errors import SearchError
from mm_jupyter.modelsearch.proxies import (
    MAX_CLASSES,
    PROXIES,
    ProxyScore,
    get_proxy,
    knn_proxy,
    linear_proxies,
    linear_proxy,
    logme_proxy,
    score_many,
)


def blobs(n: int, dim: int, classes: int, separation: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs: class means ``separation`` apart (per-dimension scale), unit noise."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=g) * separation
    y = torch.randint(0, classes, (n,), generator=g)
    x = means[y] + torch.randn(n, dim, generator=g)
    return x, y


def split(x: torch.Tensor, y: torch.Tensor, n_train: int):
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


@pytest.fixture(scope="module")
def task():
    """One labelled task and three feature sets of decreasing quality for the same labels."""
    g = torch.Generator().manual_seed(7)
    n, dim, classes = 600, 32, 5
    y = torch.randint(0, classes, (n,), generator=g)
    means = torch.randn(classes, dim, generator=g)
    noise = torch.randn(n, dim, generator=g)
    good = means[y] * 1.0 + noise
    weak = means[y] * 0.3 + noise
    rand = torch.randn(n, dim, generator=g) * 3.0  # no relation to y
    return {"y": y, "good": good, "weak": weak, "random": rand, "n_train": 400}


def run(name: str, x: torch.Tensor, y: torch.Tensor, n_train: int, **kw) -> ProxyScore:
    return get_proxy(name)(*split(x, y, n_train), **kw)


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------


def test_registry_names_and_functions():
    assert PROXIES == ("linear", "knn", "logme")
    assert get_proxy("linear") is linear_proxy
    assert get_proxy("knn") is knn_proxy
    assert get_proxy("logme") is logme_proxy


@pytest.mark.parametrize("bad", ["Linear", "svm", "", None, 3])
def test_unknown_proxy_lists_choices(bad):
    with pytest.raises(SearchError) as err:
        get_proxy(bad)
    msg = str(err.value)
    assert "unknown proxy" in msg and all(p in msg for p in PROXIES)


# ---------------------------------------------------------------------------------------------
# reproducibility
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PROXIES)
def test_reproducible_despite_global_rng_and_threads(task, name):
    x, y, n_train = task["good"], task["y"], task["n_train"]
    first = run(name, x, y, n_train, seed=3)
    assert isinstance(first, ProxyScore)
    assert run(name, x, y, n_train, seed=3) == first
    torch.manual_seed(123)
    torch.rand(1000)
    assert run(name, x, y, n_train, seed=3) == first
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        assert run(name, x, y, n_train, seed=3) == first
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads  # the proxy restores the caller's setting
    torch.use_deterministic_algorithms(True)
    try:
        assert run(name, x, y, n_train, seed=3) == first
    finally:
        torch.use_deterministic_algorithms(False)
    # non-contiguous / differently typed copies of the same values give the same result
    assert get_proxy(name)(
        x[:n_train].double().T.contiguous().T, y[:n_train].int(), x[n_train:], y[n_train:], seed=3
    ) == first


@pytest.mark.parametrize("name", PROXIES)
def test_global_rng_untouched(task, name):
    torch.manual_seed(99)
    state = torch.get_rng_state()
    run(name, task["good"], task["y"], task["n_train"])
    assert torch.equal(torch.get_rng_state(), state)


def test_concurrent_calls_match_sequential(task):
    x, y, n_train = task["weak"], task["y"], task["n_train"]
    expected = {s: run("linear", x, y, n_train, seed=s, epochs=10) for s in range(4)}
    got: dict[int, ProxyScore] = {}

    def work(s: int) -> None:
        got[s] = run("linear", x, y, n_train, seed=s, epochs=10)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


def test_linear_seed_changes_result_only_slightly(task):
    x, y, n_train = task["weak"], task["y"], task["n_train"]
    scores = [run("linear", x, y, n_train, seed=s) for s in range(4)]
    assert len({s.loss for s in scores}) > 1  # the seed really drives init and shuffling
    accs = [s.score for s in scores]
    losses = [s.loss for s in scores]
    assert max(accs) - min(accs) <= 0.06
    assert max(losses) - min(losses) <= 0.1 * min(losses)


def test_linear_hyperparameters_matter_and_are_checked(task):
    x, y, n_train = task["weak"], task["y"], task["n_train"]
    base = run("linear", x, y, n_train)
    assert run("linear", x, y, n_train, epochs=5) != base
    assert run("linear", x, y, n_train, batch_size=32) != base
    assert run("linear", x, y, n_train, weight_decay=0.1) != base
    for kw in ({"epochs": 0}, {"lr": 0.0}, {"lr": float("nan")}, {"batch_size": 0}, {"weight_decay": -1.0}):
        with pytest.raises(SearchError, match=next(iter(kw))):
            run("linear", x, y, n_train, **kw)
    with pytest.raises(SearchError, match="k must be"):
        run("knn", x, y, n_train, k=0)


def linear_reference(tx, ty, vx, vy, *, seed=0, epochs=20, lr=0.02, batch_size=512, weight_decay=0.0):
    """The documented procedure written plainly, with torch.optim.Adam and a fresh nn.Linear."""
    tx, vx = tx.double(), vx.double()
    mean, std = tx.mean(0), tx.std(0, unbiased=False) + 1e-6
    tx, vx = ((tx - mean) / std).float(), ((vx - mean) / std).float()
    n, d = tx.shape
    c = int(max(ty.max(), vy.max())) + 1
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(d, c)
    b = 1 / math.sqrt(d)
    with torch.no_grad():
        layer.weight.copy_(torch.rand((c, d), generator=g) * (2 * b) - b)
        layer.bias.copy_(torch.rand((c,), generator=g) * (2 * b) - b)
    opt = torch.optim.Adam(layer.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(layer(tx[idx]), ty[idx]).backward()
            opt.step()
    with torch.no_grad():
        logits = layer(vx)
        return (logits.argmax(1) == vy).double().mean().item(), torch.nn.functional.cross_entropy(logits, vy).item()


@pytest.mark.parametrize("kw", [{}, {"seed": 5, "epochs": 7, "lr": 0.05, "batch_size": 64, "weight_decay": 0.01}])
def test_linear_matches_reference_training_loop(task, kw):
    tx, ty, vx, vy = split(task["weak"], task["y"], task["n_train"])
    got = linear_proxy(tx, ty, vx, vy, **kw)
    acc, loss = linear_reference(tx, ty, vx, vy, **kw)
    assert got.score == pytest.approx(acc, abs=1 / len(vy) + 1e-12)  # argmax may flip on a near-tie
    assert got.loss == pytest.approx(loss, rel=1e-4)


def test_candidates_trained_together_get_the_bits_they_get_alone(task, monkeypatch):
    """A halving rung scores its survivors in one batched training; each result is bit-identical to
    the candidate alone, whatever shares its batch (order, subsets, another width, several groups)."""
    import mm_jupyter.modelsearch.proxies as proxies

    y, n_train = task["y"], task["n_train"]
    g = torch.Generator().manual_seed(11)
    feats = [task["good"], task["weak"], task["random"], task["weak"] * 2 + 1,
             torch.randn(len(y), 7, generator=g), task["good"][:, :7]]  # two are 7 wide: their own group
    pairs = [(f[:n_train], f[n_train:]) for f in feats]
    kw = {"seed": 3, "epochs": 4, "batch_size": 96, "weight_decay": 0.01}
    alone = [linear_proxy(tx, y[:n_train], vx, y[n_train:], **kw) for tx, vx in pairs]
    together = linear_proxies(pairs, y[:n_train], y[n_train:], **kw)
    assert together == alone
    assert linear_proxies(pairs[::-1], y[:n_train], y[n_train:], **kw) == alone[::-1]
    assert linear_proxies(pairs[1:3], y[:n_train], y[n_train:], **kw) == alone[1:3]
    monkeypatch.setattr(proxies, "_LINEAR_GROUP_BYTES", 1)  # one candidate per group
    assert linear_proxies(pairs, y[:n_train], y[n_train:], **kw) == alone
    monkeypatch.undo()
    for name in PROXIES:
        assert score_many(name, pairs, y[:n_train], y[n_train:], seed=3) == [
            get_proxy(name)(tx, y[:n_train], vx, y[n_train:], seed=3) for tx, vx in pairs]
    assert linear_proxies([], y[:n_train], y[n_train:]) == []
    with pytest.raises(SearchError, match="mismatch"):
        linear_proxies([pairs[0], (feats[0][:10], feats[0][n_train:])], y[:n_train], y[n_train:])


def test_batched_linear_scores_match_the_reference_and_rank_the_same(task):
    """Against the plain loop (nn.Linear, autograd, torch.optim.Adam) one candidate at a time: loss
    within 1e-4 relative, accuracy within one test item, the same ranking."""
    y, n_train = task["y"], task["n_train"]
    feats = [task["good"], task["weak"], task["random"], task["good"] * 0.5 + task["random"] * 0.2]
    pairs = [(f[:n_train], f[n_train:]) for f in feats]
    got = linear_proxies(pairs, y[:n_train], y[n_train:])
    ref = [linear_reference(tx, y[:n_train], vx, y[n_train:]) for tx, vx in pairs]
    for s, (acc, loss) in zip(got, ref):
        assert s.score == pytest.approx(acc, abs=1 / (len(y) - n_train) + 1e-12)
        assert s.loss == pytest.approx(loss, rel=1e-4)
    assert sorted(range(4), key=lambda i: (-got[i].score, got[i].loss)) == \
        sorted(range(4), key=lambda i: (-ref[i][0], ref[i][1]))


# ---------------------------------------------------------------------------------------------
# signal: informative features beat uninformative ones
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PROXIES)
def test_ranking_good_weak_random(task, name):
    y, n_train = task["y"], task["n_train"]
    good, weak, rand = (run(name, task[k], y, n_train) for k in ("good", "weak", "random"))
    assert good.score > weak.score > rand.score
    assert good.loss < weak.loss < rand.loss
    if name != "logme":  # accuracies: near perfect vs. chance (5 classes)
        assert good.score >= 0.95
        assert rand.score <= 0.35
        assert 0.0 <= rand.loss and good.loss >= 0.0


@pytest.mark.parametrize("name", PROXIES)
def test_higher_dimensional_features_are_flattened(task, name):
    x, y, n_train = task["weak"], task["y"], task["n_train"]
    assert run(name, x.reshape(-1, 4, 2, 4), y, n_train) == run(name, x, y, n_train)


def test_linear_classes_from_train_and_test(task):
    # a test label never seen in train widens C; such rows can never be right
    x, y, n_train = task["good"], task["y"].clone(), task["n_train"]
    y[n_train:n_train + 10] = 9
    score = run("linear", x, y, n_train)
    assert score.score <= 1.0 - 10 / (len(y) - n_train) + 1e-9
    assert math.isfinite(score.loss)


def test_features_at_paper_scale_are_handled():
    x, y = blobs(2500, 512, 10, 0.3, seed=1)
    for name in PROXIES:
        s = run(name, x, y, 2000)
        assert math.isfinite(s.score) and math.isfinite(s.loss)
    assert run("linear", x, y, 2000).score > 0.9
    assert run("knn", x, y, 2000).score > 0.9


# ---------------------------------------------------------------------------------------------
# knn exactness
# ---------------------------------------------------------------------------------------------

# Train points are symmetric around 0 with equal spread in both dimensions, so standardising is an
# isotropic scaling and cosine similarities are those of the raw points.
KNN_TRAIN_X = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
KNN_TRAIN_Y = torch.tensor([0, 1, 1, 0])
KNN_TEST_X = torch.tensor([[1.0, 1.0], [-1.0, -0.1]])
KNN_TEST_Y = torch.tensor([1, 0])


def test_knn_k1_tie_goes_to_lower_index():
    # test 0 is equally similar to train 0 (class 0) and train 2 (class 1): train 0 wins -> wrong
    # test 1 is nearest to train 1 (class 1) -> wrong as well
    s = knn_proxy(KNN_TRAIN_X, KNN_TRAIN_Y, KNN_TEST_X, KNN_TEST_Y, k=1)
    assert s == ProxyScore(score=0.0, loss=1.0)
    # same points, true labels flipped: both right
    s = knn_proxy(KNN_TRAIN_X, KNN_TRAIN_Y, KNN_TEST_X, torch.tensor([0, 1]), k=1)
    assert s == ProxyScore(score=1.0, loss=0.0)


def test_knn_k2_vote_tie_goes_to_nearest_class():
    # test 0: neighbours train 0 (class 0), train 2 (class 1): 1:1, class 0 came first -> predicts 0
    # test 1: neighbours train 1 (class 1, sim .995), train 3 (class 0, sim .0995) -> predicts 1
    s = knn_proxy(KNN_TRAIN_X, KNN_TRAIN_Y, KNN_TEST_X, torch.tensor([0, 0]), k=2)
    assert s.score == 0.5
    assert s.loss == pytest.approx(0.5)


def test_knn_k3_exact_scores():
    # test 0: train 0 (c0), train 2 (c1), then the tie train 1 (c1) / train 3 (c0) -> train 1:
    #         votes c0=1, c1=2 -> predicts 1 (right); true-class share 2/3
    # test 1: train 1 (c1), train 3 (c0), train 2 (c1) -> predicts 1 (wrong); share 1/3
    s = knn_proxy(KNN_TRAIN_X, KNN_TRAIN_Y, KNN_TEST_X, KNN_TEST_Y, k=3)
    assert s.score == 0.5
    assert s.loss == pytest.approx(1.0 - (2 / 3 + 1 / 3) / 2)


def test_knn_k_larger_than_train_uses_all_points():
    s = knn_proxy(KNN_TRAIN_X, KNN_TRAIN_Y, KNN_TEST_X, KNN_TEST_Y, k=50)
    # all four points vote 2:2 for every test row; the nearest neighbour's class wins
    assert s == knn_proxy(KNN_TRAIN_X, KNN_TRAIN_Y, KNN_TEST_X, KNN_TEST_Y, k=4)
    assert s.score == 0.0 and s.loss == pytest.approx(0.5)


def test_knn_duplicate_points_tie_by_index():
    train_x = torch.tensor([[1.0, 0.0]] * 3 + [[-1.0, 0.0]] * 3)
    train_y = torch.tensor([2, 1, 1, 0, 0, 0])
    test_x = torch.tensor([[2.0, 0.0]])
    # 3 identical neighbours; k=1 -> index 0 (class 2); k=2 -> 2 and 1 tie 1:1, class 2 first
    assert knn_proxy(train_x, train_y, test_x, torch.tensor([2]), k=1).score == 1.0
    assert knn_proxy(train_x, train_y, test_x, torch.tensor([2]), k=2).score == 1.0
    # k=3 -> classes 2, 1, 1: class 1 wins
    assert knn_proxy(train_x, train_y, test_x, torch.tensor([1]), k=3) == ProxyScore(1.0, pytest.approx(1 / 3))


def test_knn_matches_bruteforce_reference(task):
    """Against a plain-Python k-NN (sorted by (-similarity, index)) on random data."""
    x, y, n_train = task["weak"], task["y"], task["n_train"]
    tx, ty, vx, vy = split(x, y, n_train)
    k = 7
    got = knn_proxy(tx, ty, vx, vy, k=k)
    mean, std = tx.double().mean(0), tx.double().std(0, unbiased=False) + 1e-6
    a = torch.nn.functional.normalize((tx.double() - mean) / std, dim=1).float()
    b = torch.nn.functional.normalize((vx.double() - mean) / std, dim=1).float()
    sims = (b @ a.T).tolist()
    correct, share = 0, 0.0
    for i, row in enumerate(sims):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]
        classes = [int(ty[j]) for j in order]
        counts = {c: classes.count(c) for c in classes}
        best = max(counts.values())
        pred = next(c for c in classes if counts[c] == best)
        correct += pred == int(vy[i])
        share += classes.count(int(vy[i])) / k
    assert got.score == correct / len(sims)
    assert got.loss == pytest.approx(1 - share / len(sims), abs=1e-12)


def test_knn_chunking_does_not_change_result(task, monkeypatch):
    from mm_jupyter.modelsearch import proxies

    x, y, n_train = task["weak"], task["y"], task["n_train"]
    whole = run("knn", x, y, n_train, k=4)
    monkeypatch.setattr(proxies, "_KNN_CHUNK", 7)
    assert run("knn", x, y, n_train, k=4) == whole


# ---------------------------------------------------------------------------------------------
# LogME
# ---------------------------------------------------------------------------------------------


def logme_reference(f: np.ndarray, labels: np.ndarray) -> float:
    """Straightforward LogME with explicit D x D matrices (inverse, log-determinant), no SVD."""
    n, d = f.shape
    ftf = f.T @ f
    values = []
    for c in np.unique(labels):
        y = (labels == c).astype(np.float64)
        fty = f.T @ y
        alpha, beta = 1.0, 1.0
        for _ in range(11):
            t_old = alpha / beta
            a = alpha * np.eye(d) + beta * ftf
            a_inv = np.linalg.inv(a)
            m = beta * a_inv @ fty
            gamma = d - alpha * np.trace(a_inv)
            alpha = gamma / (m @ m)
            beta = (n - gamma) / np.sum((f @ m - y) ** 2)
            if abs(alpha / beta - t_old) / t_old <= 1e-3:
                break
        a = alpha * np.eye(d) + beta * ftf
        m = beta * np.linalg.solve(a, fty)
        _, logdet = np.linalg.slogdet(a)
        ev = (
            d / 2 * np.log(alpha) + n / 2 * np.log(beta) - n / 2 * np.log(2 * np.pi)
            - beta / 2 * np.sum((f @ m - y) ** 2) - alpha / 2 * (m @ m) - logdet / 2
        )
        values.append(ev / n)
    return float(np.mean(values))


@pytest.mark.parametrize(("n", "dim", "sep"), [(300, 16, 0.7), (200, 40, 0.2), (50, 80, 0.5), (120, 8, 0.0)])
def test_logme_matches_reference(n, dim, sep):
    x, y = blobs(n, dim, 4, sep, seed=n + dim)
    got = logme_proxy(x, y, x[:3], y[:3])
    want = logme_reference(x.double().numpy(), y.numpy())
    assert got.score == pytest.approx(want, rel=1e-7, abs=1e-9)
    assert got.loss == -got.score


def test_logme_uses_train_split_only(task):
    x, y, n_train = task["good"], task["y"], task["n_train"]
    a = logme_proxy(x[:n_train], y[:n_train], x[n_train:], y[n_train:])
    b = logme_proxy(x[:n_train], y[:n_train], torch.randn(5, x.shape[1]), torch.tensor([0, 1, 2, 3, 4]))
    assert a == b


def test_logme_invariances(task):
    x, y, n_train = task["weak"], task["y"], task["n_train"]
    tx, ty, vx, vy = split(x.double(), y, n_train)
    base = logme_proxy(tx, ty, vx, vy).score
    # only the singular values and left singular vectors matter: a rotation of feature space ...
    q, _ = torch.linalg.qr(torch.randn(tx.shape[1], tx.shape[1], generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64))
    assert logme_proxy(tx @ q, ty, vx @ q, vy).score == pytest.approx(base, rel=1e-9)
    # ... and a reordering of the samples leave it unchanged
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(1))
    assert logme_proxy(tx[perm], ty[perm], vx, vy).score == pytest.approx(base, rel=1e-9)
    # the maximised evidence is invariant to scaling the features (alpha absorbs the scale); with
    # N > D the fixed point converges, so the computed value is too
    for c in (0.01, 10.0, 1000.0):
        assert logme_proxy(tx * c, ty, vx, vy).score == pytest.approx(base, abs=1e-6)
    # not invariant to a shift: the model has no bias term
    assert abs(logme_proxy(tx + 5.0, ty, vx, vy).score - base) > 1e-3


def test_logme_grows_with_separation():
    values = [logme_proxy(*split(*blobs(400, 24, 3, sep, seed=5), 300)).score for sep in (0.0, 0.3, 0.6, 1.2)]
    assert values == sorted(values) and values[-1] - values[0] > 0.3


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PROXIES)
def test_validation_errors(name):
    f = get_proxy(name)
    x, y = blobs(40, 6, 3, 1.0, seed=0)
    tx, ty, vx, vy = split(x, y, 30)

    with pytest.raises(SearchError, match=r"train split length mismatch.*30 rows.*29 labels"):
        f(tx, ty[:-1], vx, vy)
    with pytest.raises(SearchError, match=r"test split length mismatch.*10 rows.*12 labels"):
        f(tx, ty, vx, torch.cat([vy, vy[:2]]))
    with pytest.raises(SearchError, match=r"at least 2 classes.*class 1"):
        f(tx, torch.ones_like(ty), vx, vy)
    bad = tx.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(SearchError, match=r"train features contain NaN or inf.*1 of 30 rows"):
        f(bad, ty, vx, vy)
    bad = vx.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(SearchError, match=r"test features contain NaN or inf"):
        f(tx, ty, bad, vy)
    with pytest.raises(SearchError, match=r"train split is empty"):
        f(tx[:0], ty[:0], vx, vy)
    with pytest.raises(SearchError, match=r"test split is empty"):
        f(tx, ty, vx[:0], vy[:0])
    with pytest.raises(SearchError, match=r"feature dimension mismatch.*6.*5"):
        f(tx, ty, vx[:, :5], vy)
    with pytest.raises(SearchError, match=r"train_y must hold integer class indices"):
        f(tx, ty.float(), vx, vy)
    with pytest.raises(SearchError, match=r"negative class indices"):
        f(tx, ty - 1, vx, vy)
    with pytest.raises(SearchError, match=r"train_y must have shape \(N,\)"):
        f(tx, ty.reshape(5, 6), vx, vy)
    with pytest.raises(SearchError, match=r"seed must be an integer"):
        f(tx, ty, vx, vy, seed=1.5)
    ids = ty * 7_000_000_000  # labels that are ids, not indices: refused before a per-class table is allocated
    with pytest.raises(SearchError, match=r"labels run up to 14,000,000,000.*number the 3 classes present 0\.\.2"):
        f(tx, ids, vx, vy * 7_000_000_000)
    most = torch.tensor(MAX_CLASSES - 1)
    assert f(tx, torch.where(ty == 2, most, ty), vx, vy) is not None  # the largest label still taken


def test_errors_render_as_one_line():
    with pytest.raises(SearchError) as err:
        linear_proxy(torch.zeros(3, 2), torch.tensor([0, 0, 0]), torch.zeros(1, 2), torch.tensor([0]))
    assert err.value._render_traceback_() == [f"SearchError: {err.value}"]


def test_finite_features_whose_sum_overflows_are_accepted():
    """The NaN/inf check sums the features first; a sum that overflows on finite values (float64
    features near 1e308) must not be taken for an inf: the exact test decides."""
    from mm_jupyter.modelsearch.proxies import _as_features

    huge = torch.randn(30, 6, dtype=torch.float64)
    huge[:, 0] = 1e308  # the column's sum is inf, every value is finite
    assert not math.isfinite(float(huge.sum()))
    assert torch.equal(_as_features(huge, "train"), huge)
    huge[4, 1] = float("-inf")
    with pytest.raises(SearchError, match=r"train features contain NaN or inf.*1 of 30 rows"):
        _as_features(huge, "train")


def test_standardisation_matches_torch_std():
    """The two-pass std (mean, then mean squared deviation) against torch's own, at the scales and
    offsets features come in; both splits scaled by the train statistics."""
    from mm_jupyter.modelsearch.proxies import _standardise

    g = torch.Generator().manual_seed(3)
    for rows, dim, scale, offset in ((32, 6272, 1.0, 0.0), (400, 17, 1e-3, 5.0), (7, 3, 1e4, -1e5)):
        tx = (torch.randn(rows, dim, generator=g, dtype=torch.float64) * scale + offset)
        vx = torch.randn(9, dim, generator=g, dtype=torch.float64) * scale + offset
        mean, std = tx.mean(0), tx.std(0, unbiased=False) + 1e-6
        got_t, got_v = _standardise(tx.clone(), vx.clone())
        torch.testing.assert_close(got_t, (tx - mean) / std, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got_v, (vx - mean) / std, rtol=1e-9, atol=1e-9)
    const = torch.full((5, 2), 3.0, dtype=torch.float64)  # a constant dimension standardises to 0
    assert torch.equal(_standardise(const, const)[0], torch.zeros(5, 2, dtype=torch.float64))


def test_a_single_batch_epoch_does_not_depend_on_row_order(task):
    """With every train row in one mini-batch an epoch takes the rows in data order (a shuffle
    would only reorder a sum): permuting the train rows changes the result by rounding only, and a
    batch size just below the row count (shuffled mini-batches) is the reference procedure's."""
    tx, ty, vx, vy = split(task["weak"], task["y"], task["n_train"])
    perm = torch.randperm(len(tx), generator=torch.Generator().manual_seed(1))
    one = linear_proxy(tx, ty, vx, vy)
    permuted = linear_proxy(tx[perm], ty[perm], vx, vy)
    assert permuted.loss == pytest.approx(one.loss, rel=1e-5)
    assert permuted.score == pytest.approx(one.score, abs=1 / len(vy) + 1e-12)
    acc, loss = linear_reference(tx, ty, vx, vy)
    assert one.loss == pytest.approx(loss, rel=1e-4)
    two = linear_proxy(tx, ty, vx, vy, batch_size=len(tx) - 1)  # two mini-batches per epoch: shuffled
    acc, loss = linear_reference(tx, ty, vx, vy, batch_size=len(tx) - 1)
    assert two.loss == pytest.approx(loss, rel=1e-4)


@pytest.mark.parametrize("bad", [torch.tensor(3.0), 5, object()])
def test_candidates_scored_together_refuse_shapeless_features(bad):
    """Grouping candidates by width reads shapes before the features are checked: a candidate
    without rows still gets the one SearchError of the checks, not a TypeError."""
    y = torch.tensor([0, 1, 0, 1])
    with pytest.raises(SearchError, match="train_x"):
        linear_proxies([(bad, torch.zeros(4, 2))], y, y)
