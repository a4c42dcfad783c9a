"""Linear probes solved, not trained: L2-regularised multinomial logistic regression by L-BFGS.

A frozen linear probe is a convex problem, so its answer should not depend on a learning
rate, a batch size or how many epochs someone had patience for. :func:`solve_linear` whitens
the training features (``z = (x - m) P``: ``m`` their mean, ``P = U diag(lambda)^-1/2`` from the
eigen-decomposition of their covariance, directions with ``lambda <= eig_floor * max lambda``
dropped) and minimises, full batch::

    f(V, b) = mean_i CE(V z_i + b, y_i) + l2 / 2 * ||V||^2          (bias not penalised)

with ``torch.optim.LBFGS(line_search_fn="strong_wolfe")`` along a small grid of ``l2``, each
solve warm-started from the previous one (the regularisation path). The path starts in the
middle of the grid (1e-3 of 1e-1 .. 1e-6) from ``V = 0`` and goes weaker; only if the start
stays best does it go stronger from the start's solution. The ``l2`` with the best validation
accuracy (ties: lower validation loss) is kept and returned as weights on ``x`` (``W = V P^T``,
``b - W m``). Why the middle (measured on the demo's phone layers, 78k frames): the strong end
(1e-1, 1e-2) was 3-17 points worse on valid at every layer of every model and cost a third of
the path's iterations; from the middle the path needs 35-40 % fewer iterations and chooses the
same ``l2`` (valid within 0.05 points, the solves' own noise). On few examples in many dimensions,
where strong ``l2`` wins, the path still gets there (weaker values lose first).

Why whiten (issue 15, measured on the demo's phone probes: 78k frames x 256 features, whose
covariance has condition number ~1.5e7): on the raw standardised features L-BFGS needed the
full 100 iterations at every ``l2`` and still moved valid accuracy by points, and with a
gradient tolerance of 1e-3 a warm-started weaker ``l2`` was declared converged after 0-1
iterations, so one layer in three got a real solve and "spiked" 2-3 points above its
neighbours. Whitened, every solve converges (max |gradient| <= 1e-4) in 20-70 iterations
(and at the default tolerance below in fewer).
It also makes the probe invariant to any invertible linear map of the features: the penalty
``||V||^2 = W C W^T`` (``C`` the covariance) is the variance of the logits the weights produce,
so a probe's accuracy depends on what the features span, not on how they are scaled or mixed.
A solve has *converged* when the largest gradient entry is at most ``tol``; the path stops
early once ``patience`` weaker values in a row did not beat the best validation accuracy.

How tight (``tol=None``, the default: :func:`auto_tol`): the gradient is a mean over the ``n``
training examples of (softmax residual) x (whitened feature), terms of unit scale, so the
gradient *of the population objective* at the sample's optimum is itself of order
``1 / sqrt(n)``: optimising further moves the probe less than another sample of the same
corpus would. ``tol = 0.1 / sqrt(n)`` (at most 1e-3) stops at a tenth of that noise. Measured
on the demo's phone layers (78k frames, 40 classes; tol 3.6e-4): 77-99 L-BFGS iterations per
path against 184-194 at tol 1e-4, and valid accuracy within 0.07 points of a tol 1e-5 solve
(602 iterations); the L2 values between which the solves cannot tell apart any more also stop
costing iterations (the warm start is already within the noise).

The weighted-sum probe (``N`` layers, ``sum_n softmax(a)_n x_n`` then the linear map): every
layer is whitened by the plain average's ``m, P`` (exact: the softmax weights sum to 1, so
mixing whitened layers = whitening the mix); the L2 path runs on the plain average (``a = 0``:
convex, the cost of one layer), and at the chosen ``l2`` the layer logits ``a`` (penalised by
``layer_l2 / 2 * ||a||^2``) and ``V, b`` are optimised together from there, one more entry of the
path (``joint: true``). Without the penalty on ``a`` the optimum lies at infinity whenever one
layer is best (softmax weight 0.998 on the last layer after 600 iterations, never converged,
on the demo's Mockingjay), and a joint solve at every ``l2`` cost 5x the plain path. That
problem is not convex; the result is deterministic for the same inputs and its convergence
is reported the same way.

Everything is plain float32 on the device of the inputs (the covariance in float64), without
randomness: the same inputs give bitwise the same solution (on the same machine and thread count).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

DEFAULT_L2_GRID = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
DEFAULT_EIG_FLOOR = 1e-6
DEFAULT_LAYER_L2 = 1e-3
AUTO_TOL_SCALE = 0.1
AUTO_TOL_MAX = 1e-3


def middle_start(n: int) -> int:
    """Where the L2 path starts on a grid of ``n`` values: the middle (the stronger one of the
    two middle values of an even grid; 1e-3 on the default grid)."""
    return max(0, (n - 1) // 2)


def auto_tol(n: int) -> float:
    """The gradient tolerance for ``n`` training examples: a tenth of the gradient's sampling
    noise, ``0.1 / sqrt(n)``, at most 1e-3 (module docstring, "How tight")."""
    return min(AUTO_TOL_MAX, AUTO_TOL_SCALE / math.sqrt(max(int(n), 1)))



@dataclass
class LinearSolution:
    """Outcome of :func:`solve_linear` (weights act on standardised features).

    Attributes:
        tol: the gradient tolerance the solves used (resolved from ``tol=None``).
        weight: ``(C, H)``; bias ``(C,)`` (on the solver's input features, not the whitened
            ones); layer_logits ``(N,)`` for the weighted sum, else None.
        l2: the chosen L2 strength; iterations / converged / grad_norm / loss: its solve.
        iterations_total: L-BFGS iterations over the whole path.
        valid_acc, valid_loss: at the chosen ``l2``.
        path: one dict per ``l2`` tried (``l2, valid_acc, valid_loss, iterations, converged, grad_norm``).
        rank: whitened dimensions kept (``<= H``).
    """

    weight: torch.Tensor
    bias: torch.Tensor
    layer_logits: torch.Tensor | None
    l2: float
    iterations: int
    converged: bool
    grad_norm: float
    loss: float
    iterations_total: int
    valid_acc: float
    valid_loss: float
    path: list[dict[str, Any]] = field(default_factory=list)
    rank: int = 0
    tol: float = 0.0


def standardize_stats(x: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and standard deviation over the first dimension.

    Args:
        x: ``(n, ..., H)`` training features.
        eps: floor of the standard deviation (constant features stay finite, become 0).

    Returns:
        ``mean, std`` of shape ``x.shape[1:]`` (float32; computed in float64 for accuracy).
    """
    x64 = x.double()
    mean = x64.mean(0)
    std = x64.std(0, unbiased=False).clamp_min(eps)
    return mean.float(), std.float()


def whitening(x: torch.Tensor, eig_floor: float = DEFAULT_EIG_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``m`` ``(H,)`` and whitening map ``P`` ``(H, k)`` of ``(n, H)`` features: ``(x - m) P``
    has identity covariance; directions of variance ``<= eig_floor`` x the largest are dropped."""
    x64 = x.double()
    m = x64.mean(0)
    xc = x64 - m
    cov = xc.t() @ xc / max(len(x64), 1)
    lam, U = torch.linalg.eigh(cov)
    keep = lam > eig_floor * max(float(lam.max()), 1e-300)
    if not bool(keep.any()):
        raise ValueError("linear solve: the training features are constant (no direction of variance)")
    return m.float(), (U[:, keep] / lam[keep].sqrt()).float()


def _whiten(x: torch.Tensor, m: torch.Tensor, P: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    # (n, H) or layer-major (N, n, H) -> (..., k), in chunks of rows (no (n, H) temporary).
    flat = x.reshape(-1, x.shape[-1])
    out = torch.empty(flat.shape[0], P.shape[1], dtype=torch.float32, device=x.device)
    for s in range(0, flat.shape[0], chunk):
        torch.mm(flat[s:s + chunk] - m, P, out=out[s:s + chunk])
    return out.reshape(*x.shape[:-1], P.shape[1])


def _mix(x: torch.Tensor, layer_logits: torch.Tensor | None) -> torch.Tensor:
    # x: (n, H), or layer-major (N, n, H) -> (n, H). Layer-major makes the mix one
    # matrix-vector product over contiguous memory (and its gradient another): measured 4x
    # faster than einsum over (n, N, H), which copies a permuted x on every call.
    if layer_logits is None:
        return x
    return torch.tensordot(torch.softmax(layer_logits, 0), x, dims=1)


def _logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            layer_logits: torch.Tensor | None) -> torch.Tensor:
    return torch.addmm(bias, _mix(x, layer_logits), weight.t())  # (n, C)


def evaluate_linear(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    layer_logits: torch.Tensor | None = None, chunk: int = 65536) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of a linear probe on standardised features
    (``(n, H)``, or layer-major ``(N, n, H)`` with ``layer_logits``)."""
    correct = 0
    loss = 0.0
    with torch.no_grad():
        for s in range(0, len(y), chunk):
            xs = x[:, s:s + chunk] if layer_logits is not None else x[s:s + chunk]
            lg = _logits(xs, weight, bias, layer_logits)
            loss += float(F.cross_entropy(lg, y[s:s + chunk], reduction="sum"))
            correct += int((lg.argmax(-1) == y[s:s + chunk]).sum())
    n = max(len(y), 1)
    return correct / n, loss / n


def _solve_one(x: torch.Tensor, y: torch.Tensor, params: list[torch.Tensor], l2: float, max_iter: int,
               tol: float, history_size: int, layer_l2: float = 0.0) -> tuple[int, bool, float, float]:
    """Minimise the objective at one ``l2`` in place; returns (iterations, converged, grad max, loss)."""
    weight, bias = params[0], params[1]
    layer_logits = params[2] if len(params) > 2 else None
    # tolerance_change far below float32 resolution of the loss: stop on the gradient, or when
    # the line search can make no progress at all (then `converged` says False).
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, max_eval=max(2 * max_iter, 25),
                            tolerance_grad=tol, tolerance_change=1e-12, history_size=history_size,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(_logits(x, weight, bias, layer_logits), y)
        loss = loss + 0.5 * l2 * weight.pow(2).sum()
        if layer_logits is not None:
            loss = loss + 0.5 * layer_l2 * layer_logits.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    iterations = int(opt.state[opt._params[0]].get("n_iter", 0))
    # Final gradient, measured afresh (the optimiser's last one may predate its last step).
    loss = float(closure().detach())
    gmax = max(float(p.grad.abs().max()) for p in params)
    if not math.isfinite(loss):
        raise FloatingPointError(f"linear probe solve diverged at l2={l2:g} (loss {loss}); "
                                 "are the features finite?")
    return iterations, gmax <= tol, gmax, loss


def _path(train: tuple[torch.Tensor, torch.Tensor], valid: tuple[torch.Tensor, torch.Tensor], num_classes: int,
          grid: Sequence[float], max_iter: int, tol: float, history_size: int, patience: int,
          start: int = 0) -> LinearSolution:
    """The warm-started L2 path of the plain linear probe on whitened ``(n, k)`` features.

    ``grid`` runs from the strongest ``l2`` to the weakest. The path starts at ``grid[start]``
    (from zero weights) and goes weaker, each solve warm-started from the previous one, until
    ``patience`` values in a row fail to beat the best valid accuracy; if the start itself
    stayed best, it goes stronger from the start's solution the same way. With ``start=0``
    that is the plain strongest-first path.
    """
    x, y = train
    weight = torch.zeros(num_classes, x.shape[-1], dtype=torch.float32, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float32, device=x.device, requires_grad=True)
    params = [weight, bias]
    best: LinearSolution | None = None
    best_key = (-1.0, 0.0)
    path: list[dict[str, Any]] = []
    total = 0

    def walk(order: Sequence[float]) -> None:
        nonlocal best, best_key, total
        worse = 0
        for l2 in order:
            iters, conv, gmax, loss = _solve_one(x, y, params, l2, max_iter, tol, history_size)
            total += iters
            vacc, vloss = evaluate_linear(valid[0], valid[1], weight.detach(), bias.detach())
            path.append({"l2": l2, "valid_acc": round(vacc, 6), "valid_loss": round(vloss, 6), "iterations": iters,
                         "converged": conv, "grad_norm": float(f"{gmax:.3g}")})
            log.debug("l2 %g: %d iterations, converged %s (max grad %.2e), valid %.4f", l2, iters, conv, gmax, vacc)
            key = (vacc, -vloss)
            if key > best_key:
                best_key, worse = key, 0
                best = LinearSolution(weight=weight.detach().clone(), bias=bias.detach().clone(), layer_logits=None,
                                      l2=l2, iterations=iters, converged=conv, grad_norm=gmax, loss=loss,
                                      iterations_total=0, valid_acc=vacc, valid_loss=vloss)
            else:
                worse += 1
                if worse >= patience:
                    return

    start = min(max(int(start), 0), len(grid) - 1)
    walk(grid[start:])
    assert best is not None
    if start > 0 and best.l2 == grid[start]:
        # Nothing weaker beat the start: the best may lie on the stronger side.
        with torch.no_grad():
            weight.copy_(best.weight)
            bias.copy_(best.bias)
        walk(grid[start - 1::-1])
    best.iterations_total = total
    best.path = path
    return best


def solve_linear(train: tuple[torch.Tensor, torch.Tensor], valid: tuple[torch.Tensor, torch.Tensor],
                 num_classes: int, *, weighted: bool = False, l2_grid: Sequence[float] = DEFAULT_L2_GRID,
                 max_iter: int = 200, tol: float | None = None, patience: int = 2,
                 history_size: int = 20, eig_floor: float = DEFAULT_EIG_FLOOR,
                 layer_l2: float = DEFAULT_LAYER_L2, start: int | None = None) -> LinearSolution:
    """Fit the linear (or weighted-sum + linear) probe along an L2 path; choose ``l2`` on valid.

    Args:
        train, valid: ``(x, y)`` with standardised float32 features ``x`` of shape ``(n, H)``,
            or layer-major ``(N, n, H)`` with ``weighted``; ``y`` long class ids in ``[0, num_classes)``.
        num_classes: C.
        weighted: learn softmax layer weights over the ``N`` stacked layers as well.
        l2_grid: L2 strengths (sorted from the largest to the smallest; the path starts at ``start``).
        max_iter: L-BFGS iterations at most per ``l2``.
        tol: convergence = max |gradient| <= tol; None: :func:`auto_tol` of the training examples.
        patience: stop the path after this many ``l2`` values in a row without a better valid accuracy.
        history_size: L-BFGS memory.
        eig_floor: whitening drops directions of variance at most this fraction of the largest.
        layer_l2: L2 on the weighted sum's layer logits (fixed, not on the path).
        start: index into the sorted grid where the path starts (from zero weights); None: the
            middle (:func:`middle_start`); 0: strongest first. It goes weaker from there and,
            only if the start stayed best, stronger.

    Returns:
        :class:`LinearSolution`.
    """
    x, y = train
    if weighted and x.dim() != 3:
        raise ValueError(f"weighted solve needs layer-major features (N, n, H), got shape {tuple(x.shape)}")
    if not weighted and x.dim() != 2:
        raise ValueError(f"linear solve needs features (n, H), got shape {tuple(x.shape)}")
    if len(y) == 0:
        raise ValueError("linear solve: no training examples")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"linear solve: labels must lie in [0, {num_classes}), got {int(y.min())}..{int(y.max())}")
    tol = auto_tol(len(y)) if tol is None else float(tol)
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    grid = sorted({float(v) for v in l2_grid}, reverse=True)
    if not grid or min(grid) < 0:
        raise ValueError(f"l2_grid must be non-empty and >= 0, got {list(l2_grid)}")
    start = middle_start(len(grid)) if start is None else start
    m, P = whitening(x.mean(0) if weighted else x, eig_floor)
    x, valid = _whiten(x, m, P), (_whiten(valid[0], m, P), valid[1])
    # The weighted sum: the L2 path on the plain average of the layers (layer logits fixed at 0:
    # convex, exactly whitened, one layer's cost), then the joint solve at the chosen l2.
    if weighted:
        best = _path((x.mean(0), y), (valid[0].mean(0), valid[1]), num_classes, grid, max_iter, tol, history_size,
                     patience, start)
        params = [best.weight.clone().requires_grad_(True), best.bias.clone().requires_grad_(True),
                  torch.zeros(x.shape[0], dtype=torch.float32, device=x.device, requires_grad=True)]
        iters, conv, gmax, loss = _solve_one(x, y, params, best.l2, max_iter, tol, history_size, layer_l2)
        lw = params[2].detach()
        vacc, vloss = evaluate_linear(valid[0], valid[1], params[0].detach(), params[1].detach(), lw)
        best.path.append({"l2": best.l2, "joint": True, "valid_acc": round(vacc, 6), "valid_loss": round(vloss, 6),
                          "iterations": iters, "converged": conv, "grad_norm": float(f"{gmax:.3g}")})
        best = LinearSolution(weight=params[0].detach().clone(), bias=params[1].detach().clone(), layer_logits=lw,
                              l2=best.l2, iterations=iters, converged=conv, grad_norm=gmax, loss=loss,
                              iterations_total=best.iterations_total + iters, valid_acc=vacc, valid_loss=vloss,
                              path=best.path)
    else:
        best = _path((x, y), valid, num_classes, grid, max_iter, tol, history_size, patience, start)
    best.rank = P.shape[1]
    best.tol = tol
    # Back to the caller's features: V (z) + b = V P^T (x - m) + b.
    best.weight = best.weight @ P.t()
    best.bias = best.bias - best.weight @ m
    return best
