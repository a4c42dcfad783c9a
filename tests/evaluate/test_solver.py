"""The linear solver: the optimum of the stated objective, L2 chosen on valid, determinism; intervals."""
import numpy as np
import pytest
import torch

from aviary.evaluate.metrics import bootstrap_interval, group_counts
from aviary.evaluate.solver import evaluate_linear, solve_linear, standardize_stats


def _blobs(n, d=5, c=3, sep=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=g) * sep
    y = torch.randint(0, c, (n,), generator=g)
    x = centres[y] + torch.randn(n, d, generator=g)
    return x, y


def _objective64(x, y, w, b, l2):
    """The documented objective in the caller's features, written out independently, float64:
    mean CE + l2/2 ||V||^2 with V the weights on whitened features, i.e. l2/2 tr(W C W^T), C the
    (biased) covariance of the training features: the variance of the logits."""
    x = x.double()
    logits = x @ w.double().t() + b.double()
    lse = torch.logsumexp(logits, 1)
    ce = (lse - logits[torch.arange(len(y)), y]).mean()
    xc = x - x.mean(0)
    cov = xc.t() @ xc / len(x)
    return ce + 0.5 * l2 * torch.einsum("ch,hk,ck->", w.double(), cov, w.double())


def test_solution_is_the_optimum_of_the_objective():
    x, y = _blobs(400)
    xv, yv = _blobs(200, seed=1)
    sol = solve_linear((x, y), (xv, yv), 3, l2_grid=[1e-2], tol=1e-5, max_iter=500)
    assert sol.grad_norm <= 2e-5 and sol.l2 == 1e-2 and sol.rank == 5
    # Reference: the same objective minimised in float64 by plain gradient descent with Newton-free
    # steps from another start; both must agree (strictly convex at l2 > 0: one optimum).
    w = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=2000, tolerance_grad=1e-12, tolerance_change=0, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        f = _objective64(x, y, w, b, 1e-2)
        f.backward()
        return f

    opt.step(closure)
    # float32 solve vs float64 reference: weights agree to float32 gradient resolution.
    torch.testing.assert_close(sol.weight.double(), w.detach(), atol=3e-4, rtol=1e-3)
    torch.testing.assert_close(sol.bias.double(), b.detach(), atol=1e-4, rtol=1e-4)
    assert abs(float(_objective64(x, y, sol.weight, sol.bias, 1e-2)) - sol.loss) < 1e-5


def test_l2_is_chosen_on_validation_along_a_warm_started_path():
    # 30 training examples in 300 dimensions, 295 of them noise: unregularised fits overfit.
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (30,), generator=g)
    x = torch.randn(30, 300, generator=g)
    x[:, :5] += 0.5 * (2 * y[:, None] - 1)
    yv = torch.randint(0, 2, (400,), generator=g)
    xv = torch.randn(400, 300, generator=g)
    xv[:, :5] += 0.5 * (2 * yv[:, None] - 1)
    grid = [1e-6, 1e-3, 1e-1, 1.0, 1e-2]
    full = solve_linear((x, y), (xv, yv), 2, l2_grid=grid, patience=10, start=0)
    l2s = [p["l2"] for p in full.path]
    assert l2s == sorted(l2s, reverse=True) == [1.0, 1e-1, 1e-2, 1e-3, 1e-6]  # start 0: strongest first
    # The default path starts in the middle (1e-2), goes weaker, and since nothing weaker won,
    # stronger from there: the same grid, the same choice.
    sol = solve_linear((x, y), (xv, yv), 2, l2_grid=grid, patience=10)
    assert [p["l2"] for p in sol.path] == [1e-2, 1e-3, 1e-6, 1e-1, 1.0]
    best = max(sol.path, key=lambda p: (p["valid_acc"], -p["valid_loss"]))
    assert sol.l2 == best["l2"] == full.l2 and sol.valid_acc == pytest.approx(best["valid_acc"], abs=1e-6)
    assert sol.l2 >= 1e-2  # regularisation helps with 30 examples in 300 dimensions
    assert sol.iterations_total == sum(p["iterations"] for p in sol.path)
    acc, _ = evaluate_linear(xv, yv, sol.weight, sol.bias)
    assert acc == pytest.approx(sol.valid_acc)


def test_path_from_the_middle_skips_the_strong_end_when_a_weaker_l2_wins():
    # Many examples, separable: the weak end wins. Started at the grid's middle (1e-3 of the
    # default grid) the path never solves 1e-1 / 1e-2, chooses what the full path chooses, and
    # costs fewer iterations (the demo's phone layers: 35-40 % fewer, same l2).
    xa, ya = _blobs(4000, d=20, c=5, sep=1.0)
    x, y, xv, yv = xa[:3000], ya[:3000], xa[3000:], ya[3000:]
    full = solve_linear((x, y), (xv, yv), 5, start=0, patience=6)
    mid = solve_linear((x, y), (xv, yv), 5, patience=6)
    assert full.l2 < 1e-3 and mid.l2 == full.l2
    assert max(p["l2"] for p in mid.path) == 1e-3 and mid.path[0]["l2"] == 1e-3
    assert mid.valid_acc == pytest.approx(full.valid_acc, abs=2e-3)
    assert mid.iterations_total < full.iterations_total


def test_path_stops_after_patience_without_improvement():
    x, y = _blobs(300, sep=4.0)
    sol = solve_linear((x, y), (x, y), 3, l2_grid=[1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6], patience=1)
    assert 1 <= len(sol.path) <= 6
    accs = [p["valid_acc"] for p in sol.path]
    if len(sol.path) < 6:  # stopped: the last one did not beat the best before it
        assert accs[-1] <= max(accs[:-1])


def test_same_inputs_give_bitwise_the_same_solution():
    x, y = _blobs(500, d=8, c=4)
    xs = torch.stack([x, torch.randn(500, 8, generator=torch.Generator().manual_seed(5))], 0)  # (2, n, d)
    a = solve_linear((xs, y), (xs, y), 4, weighted=True)
    b = solve_linear((xs, y), (xs, y), 4, weighted=True)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.layer_logits, b.layer_logits)
    assert a.path == b.path
    # The weighted solve prefers the informative layer (0) over the noise layer (1).
    assert float(torch.softmax(a.layer_logits, 0)[0]) > 0.5


def test_solver_refuses_bad_input():
    x, y = _blobs(20)
    with pytest.raises(ValueError, match="labels must lie"):
        solve_linear((x, y + 5), (x, y), 3)
    with pytest.raises(ValueError, match=r"\(N, n, H\)"):
        solve_linear((x, y), (x, y), 3, weighted=True)
    with pytest.raises(ValueError, match="no training examples"):
        solve_linear((x[:0], y[:0]), (x, y), 3)


def test_standardize_stats():
    x = torch.randn(1000, 3) * torch.tensor([1.0, 10.0, 0.0]) + 5
    mean, std = standardize_stats(x)
    z = (x - mean) / std
    torch.testing.assert_close(z[:, :2].mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(z[:, :2].std(0, unbiased=False), torch.ones(2), atol=1e-4, rtol=0)
    assert torch.isfinite(z).all()  # the constant feature stays finite


def test_bootstrap_resamples_utterances_not_frames():
    # 20 utterances: one of 1000 frames all correct, 19 of 10 frames all wrong.
    correct = np.array([1000] + [0] * 19, dtype=float)
    total = np.array([1000] + [10] * 19, dtype=float)
    acc = correct.sum() / total.sum()
    lo, hi = bootstrap_interval(correct, total, seed=0)
    assert lo <= acc <= hi
    # Frame-level resampling would give a tiny interval (1190 frames); by utterance it is wide:
    # whether the long utterance is drawn 0, 1 or 2 times swings the accuracy from 0 to ~0.9.
    assert hi - lo > 0.3
    assert (lo, hi) == bootstrap_interval(correct, total, seed=0)
    rng = np.random.default_rng(0)
    c, t = rng.integers(0, 30, 50).astype(float), np.full(50, 30.0)
    assert bootstrap_interval(c, t, seed=1) != bootstrap_interval(c, t, seed=2)
    # More utterances of the same kind narrow the interval.
    many = bootstrap_interval(np.tile([8.0, 2.0], 200), np.tile([10.0, 10.0], 200))
    few = bootstrap_interval(np.tile([8.0, 2.0], 5), np.tile([10.0, 10.0], 5))
    assert many[1] - many[0] < few[1] - few[0] and many[0] <= 0.5 <= many[1]
    assert np.isnan(bootstrap_interval(np.zeros(3), np.zeros(3))[0])


def test_group_counts():
    c, t = group_counts(np.array([1, 0, 1, 1]), np.array([0, 0, 2, 2]), 3)
    assert c.tolist() == [1, 0, 2] and t.tolist() == [2, 0, 2]


def test_probe_is_invariant_to_an_invertible_linear_map_of_the_features():
    # The penalty is the logits' variance, so mixing and rescaling the features (here a random,
    # badly conditioned map: condition number ~300, covariance ~1e5) gives the same probe; on plain standardised
    # features this is where L-BFGS stalled and a ridge penalty on W gave another answer.
    x, y = _blobs(600, d=6, c=4, sep=1.0)
    xv, yv = _blobs(300, d=6, c=4, sep=1.0, seed=1)
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    A = (Q * torch.logspace(0, 2.5, 6, dtype=torch.float64)).float()
    kw = dict(l2_grid=[1e-1, 1e-2, 1e-3], tol=1e-5, max_iter=500, patience=5)
    s1 = solve_linear((x, y), (xv, yv), 4, **kw)
    s2 = solve_linear((x @ A, y), (xv @ A, yv), 4, **kw)
    assert [p["l2"] for p in s1.path] == [p["l2"] for p in s2.path]
    for p1, p2 in zip(s1.path, s2.path):
        assert p1["valid_loss"] == pytest.approx(p2["valid_loss"], abs=2e-4)
    l1 = xv @ s1.weight.t() + s1.bias
    l2 = (xv @ A) @ s2.weight.t() + s2.bias
    torch.testing.assert_close(l1, l2, atol=2e-3, rtol=1e-3)


def test_warm_started_path_reaches_each_cold_start_optimum():
    # Correlated features (32 directions carry the variance of 64): each solve of the warm-started
    # path must reach the optimum a solve from zero at that l2 reaches, at the probes' own default
    # tolerance. Before whitening, a weaker l2 started within the absolute tolerance of the old
    # optimum, was declared converged after 0-1 iterations, and kept the stronger l2's accuracy.
    from aviary.evaluate.probe import ProbeConfig

    tol = ProbeConfig(task="phone").tol
    g = torch.Generator().manual_seed(0)
    n, d, c = 4000, 64, 8
    base = torch.randn(n, 32, generator=g)
    # spread over three decades of scale (covariance condition ~1e7, like the demo's layers)
    x = (base * torch.logspace(0, -3, 32)) @ torch.randn(32, d, generator=g) + 3e-4 * torch.randn(n, d, generator=g)
    x = (x - x.mean(0)) / x.std(0)
    y = (base[:, -8:] @ torch.randn(8, c, generator=g) + 0.5 * torch.randn(n, c, generator=g)).argmax(1)
    grid = [1e-2, 1e-3, 1e-4]
    path = solve_linear((x, y), (x, y), c, l2_grid=grid, tol=tol, patience=5, max_iter=300).path
    assert all(p["converged"] for p in path)
    for p in path:
        cold = solve_linear((x, y), (x, y), c, l2_grid=[p["l2"]], tol=tol, max_iter=300)
        assert p["valid_loss"] == pytest.approx(cold.valid_loss, abs=2e-3), p["l2"]


def test_auto_tolerance_is_a_tenth_of_the_gradient_noise():
    from aviary.evaluate.solver import auto_tol

    assert auto_tol(1_000_000) == pytest.approx(1e-4)
    assert auto_tol(40_000) == pytest.approx(5e-4)
    assert auto_tol(100) == 1e-3 and auto_tol(0) == 1e-3  # capped: small problems are cheap anyway
    x, y = _blobs(40_000, d=8, c=4, sep=0.5)
    xv, yv = _blobs(2000, d=8, c=4, sep=0.5, seed=1)
    sol = solve_linear((x, y), (xv, yv), 4, l2_grid=[1e-2, 1e-4])
    assert sol.tol == pytest.approx(5e-4)
    assert all(p["converged"] and p["grad_norm"] <= 5e-4 for p in sol.path)
    with pytest.raises(ValueError, match="tol"):
        solve_linear((x, y), (xv, yv), 4, tol=0.0)


def test_auto_tolerance_moves_the_probe_less_than_another_sample_would():
    # What the auto tolerance promises: stopping there changes the probe's logits by much less
    # than drawing another training sample of the same size does (the optimisation error is
    # small against the estimation error), at a fraction of a tight solve's iterations.
    g = torch.Generator().manual_seed(0)
    d, c, n = 32, 8, 20_000
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)  # correlated, badly scaled
    w_true = torch.randn(c, d, generator=g)

    def sample(m, seed):
        gs = torch.Generator().manual_seed(seed)
        z = torch.randn(m, d, generator=gs)
        logits = z @ w_true.t() * 0.7 + torch.randn(m, c, generator=gs)
        return z @ mix, logits.argmax(1)

    a, b, v = sample(n, 1), sample(n, 2), sample(4000, 3)
    kw = dict(l2_grid=[1e-3], max_iter=2000)
    auto = solve_linear(a, v, c, **kw)
    tight = solve_linear(a, v, c, tol=1e-6, **kw)
    other = solve_linear(b, v, c, tol=1e-6, **kw)

    def logits(s):
        return v[0] @ s.weight.t() + s.bias

    def rms(t):
        return float(t.pow(2).mean().sqrt())

    optimisation = rms(logits(auto) - logits(tight))
    estimation = rms(logits(other) - logits(tight))
    assert optimisation < 0.3 * estimation, (optimisation, estimation)
    assert auto.iterations_total < 0.7 * tight.iterations_total
