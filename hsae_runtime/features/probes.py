"""Linear probes for :mod:`hsae_runtime.features.absorption`, batched over letters.

* :func:`train_multi_probe`: one-vs-rest logistic probes trained by Adam (SAEBench's
  ``train_multi_probe``), on a dense ``[N, d]`` input or straight on a sparse code (an
  ``embedding_bag`` over the code's ``k`` entries instead of a matmul over ``d_sae`` mostly-zero
  columns).
* :func:`fit_balanced_logistic`: many small independent logistic regressions with sklearn's
  class-balanced objective, solved together by Newton's method; the L-BFGS version,
  :func:`fit_balanced_logistic_reference`, is its test oracle.

Shapes: ``N`` samples, ``d`` features, ``C`` classes, ``P`` problems, ``k`` features each.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hsae_runtime.sae import SparseCode


def train_multi_probe(x: Tensor | SparseCode, y: Tensor, *, epochs: int, lr: float,
                      weight_decay: float, batch_size: int, l1: float = 0.0, seed: int = 0,
                      end_lr: float = 1e-5, width: int | None = None) -> tuple[Tensor, Tensor]:
    """One-vs-rest logistic probes: ``x [N, d]``, ``y [N, C]`` in {0, 1} -> ``(W [C, d],
    b [C])``; class-balanced BCE (pos_weight = negatives / positives), Adam with exponential
    decay from ``lr`` to ``end_lr``, optional L1 on the weights.

    ``x`` may also be a :class:`SparseCode` (``[N, k]`` values and indices) of ``width`` d
    latents: the same probe as on its dense ``[N, d]`` view (equal up to float rounding), in
    ``O(N k C)`` per step instead of ``O(N d C)``.
    """
    gen = torch.Generator().manual_seed(seed)
    sparse = isinstance(x, SparseCode)
    if sparse:
        assert width is not None, "a sparse x needs its width"
        n, d = x.values.shape[0], width
    else:
        n, d = x.shape
    c = y.shape[1]
    layer = torch.nn.Linear(d, c)
    with torch.no_grad():
        bound = 1 / math.sqrt(d)
        layer.weight.uniform_(-bound, bound, generator=gen)
        layer.bias.uniform_(-bound, bound, generator=gen)
    pos = y.sum(0)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=(n - pos) / pos.clamp_min(1))
    opt = torch.optim.Adam(layer.parameters(), lr=lr, weight_decay=weight_decay)
    gamma = math.exp(math.log(end_lr / lr) / epochs)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)

    def logits(idx: Tensor) -> Tensor:
        if isinstance(x, SparseCode):
            # (B, C): Σ_j value_j · W[:, index_j], the dense matmul without its zeros
            return torch.nn.functional.embedding_bag(
                x.indices[idx], layer.weight.T, per_sample_weights=x.values[idx].float(),
                mode="sum") + layer.bias
        return layer(x[idx])

    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                opt.zero_grad()
                loss = loss_fn(logits(idx), y[idx])
                if l1:
                    loss = loss + l1 * layer.weight.abs().sum(-1).mean()
                loss.backward()
                opt.step()
            sched.step()
    return layer.weight.detach(), layer.bias.detach()


def _balanced_weights(y: Tensor) -> Tensor:
    """sklearn's ``class_weight="balanced"`` sample weights for ``y [P, N]`` (float64 0/1)."""
    n = y.shape[1]
    pos = y.sum(1, keepdim=True)
    return torch.where(y > 0, n / (2 * pos.clamp_min(1)), n / (2 * (n - pos).clamp_min(1)))


def fit_balanced_logistic(x: Tensor, y: Tensor, c: float = 1.0, *, max_iter: int = 100,
                          tol: float = 1e-8) -> tuple[Tensor, Tensor]:
    """Independent binary logistic regressions, one per problem: ``x [P, N, k]``, ``y [P, N]``
    (bool) -> ``(w [P, k], b [P])`` minimising sklearn's ``C · Σ sw_i · logloss_i + ½‖w‖²``
    with balanced sample weights (intercept not penalised).

    Newton's method with a backtracking (Armijo) line search, all P problems at once in
    float64, until every gradient entry is below ``tol · N`` (sklearn's L-BFGS stops at 1e-4 on
    the objective divided by N). k ≤ 10 here, so the ``[P, k+1, k+1]`` Hessians are tiny and a
    few steps reach the optimum that :func:`fit_balanced_logistic_reference` (L-BFGS)
    approaches in hundreds.
    """
    x, y = x.double(), y.double()
    p, n, k = x.shape
    sw = c * _balanced_weights(y)
    sign = 2 * y - 1
    xa = torch.cat([x, torch.ones(p, n, 1, dtype=torch.float64)], 2)  # (P, N, k+1)
    reg = torch.ones(k + 1, dtype=torch.float64)
    reg[k] = 0.0  # the intercept is not penalised

    def objective(th: Tensor) -> Tensor:  # th (..., P, k+1) -> (..., P)
        z = torch.einsum("pnk,...pk->...pn", xa, th)
        loss = (sw * torch.nn.functional.softplus(-sign * z)).sum(-1)
        return loss + 0.5 * (reg * th * th).sum(-1)

    theta = torch.zeros(p, k + 1, dtype=torch.float64)
    f = objective(theta)
    steps = 0.5 ** torch.arange(1, 40, dtype=torch.float64)  # (S,) backtracking ladder
    for _ in range(max_iter):
        s = torch.sigmoid(torch.einsum("pnk,pk->pn", xa, theta))
        grad = torch.einsum("pnk,pn->pk", xa, sw * (s - y)) + reg * theta  # (P, k+1)
        if float(grad.abs().max()) <= tol * n:
            break
        hess = torch.einsum("pnk,pn,pnj->pkj", xa, sw * s * (1 - s), xa)
        hess = hess + torch.diag_embed(reg + 1e-12)
        direction = -torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)  # (P, k+1)
        slope = (grad * direction).sum(1)  # (P,) ≤ 0
        full = theta + direction
        f_full = objective(full)
        ok = f_full <= f + 1e-4 * slope
        if bool(ok.all()):
            theta, f = full, f_full
            continue
        trial = theta + steps[:, None, None] * direction  # (S, P, k+1)
        f_trial = objective(trial)  # (S, P)
        fits = f_trial <= f + 1e-4 * steps[:, None] * slope
        if not bool((ok | fits.any(0)).any()):
            break  # no problem can still descend: at the optimum up to rounding
        first = fits.double().argmax(0)  # the largest step that passes, per problem
        shrunk = torch.where(fits.any(0)[:, None], trial[first, torch.arange(p)], theta)
        theta = torch.where(ok[:, None], full, shrunk)
        f = torch.where(ok, f_full, torch.where(fits.any(0), f_trial[first, torch.arange(p)], f))
    return theta[:, :k], theta[:, k]


def fit_balanced_logistic_reference(x: Tensor, y: Tensor, c: float = 1.0
                                    ) -> tuple[Tensor, Tensor]:
    """:func:`fit_balanced_logistic` by torch's L-BFGS on the summed objective (slow: the test
    oracle)."""
    x, y = x.double(), y.double()
    p, n, k = x.shape
    sw = _balanced_weights(y)
    w = torch.zeros(p, k, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(p, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-8,
                            line_search_fn="strong_wolfe")
    sign = 2 * y - 1

    def closure() -> Tensor:
        opt.zero_grad()
        z = torch.einsum("pnk,pk->pn", x, w) + b[:, None]
        loss = c * (sw * torch.nn.functional.softplus(-sign * z)).sum() + 0.5 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()
