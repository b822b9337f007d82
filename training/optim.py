"""Optimisation pieces of the trainer: LR schedule, decoder constraints, b_dec init, AuxK.

AuxK follows Gao et al. 2024 ("Scaling and evaluating sparse autoencoders", Appendix A.2): the
residual of the main reconstruction is modelled by the top ``aux_k`` pre-activations among
dead latents, and that loss (normalised by the residual's variance) is added with weight α.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from hsae_runtime.sae import SAE, SparseCode


def lr_at(step: int, total: int, peak: float, warmup_frac: float, decay_frac: float) -> float:
    """Linear warm-up, constant, then linear decay to 0 over the last ``decay_frac`` steps."""
    warmup = int(total * warmup_frac)
    decay = int(total * decay_frac)
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if decay and step >= total - decay:
        return peak * max(0.0, (total - step) / decay)
    return peak


@torch.no_grad()
def project_decoder_grad(sae: SAE) -> None:
    """Remove the gradient component parallel to each (unit-norm) decoder row."""
    grad = sae.W_dec.grad
    if grad is None:
        return
    w = sae.W_dec
    grad -= (grad * w).sum(-1, keepdim=True) * w


@torch.no_grad()
def renorm_decoder(sae: SAE) -> None:
    sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))


@torch.no_grad()
def geometric_median(x: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm on ``x [N, d]`` -> ``[d]`` (robust to outlier tokens)."""
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=-1).clamp_min(1e-8)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - y).norm() <= tol * y.norm().clamp_min(1e-8):
            y = new
            break
        y = new
    return y.float()


class AuxK:
    """Dead-latent counter and the auxiliary loss (disabled when ``alpha == 0``)."""

    def __init__(self, d_sae: int, dead_tokens: int, alpha: float, *,
                 device: torch.device | str = "cpu", aux_k: int | None = None) -> None:
        self.dead_tokens = dead_tokens
        self.alpha = alpha
        self.aux_k = aux_k
        self.since_fired = torch.zeros(d_sae, dtype=torch.int64, device=device)

    def dead_mask(self) -> Tensor:
        return self.since_fired >= self.dead_tokens

    def dead_fraction(self) -> float:
        return float(self.dead_mask().float().mean())

    @torch.no_grad()
    def update(self, indices: Tensor, global_tokens: int) -> None:
        """Count ``global_tokens`` more; reset latents that fired (on any rank)."""
        fired = torch.zeros_like(self.since_fired)
        idx = indices.reshape(-1)
        fired[idx[idx >= 0]] = 1
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(fired, op=dist.ReduceOp.MAX)
        self.since_fired += global_tokens
        self.since_fired[fired.bool()] = 0

    def loss(self, sae: SAE, x: Tensor, code: SparseCode) -> Tensor | None:
        """α · ‖e − ê‖² / ‖e − mean(e)‖² for the residual e, or None if nothing is dead."""
        if self.alpha <= 0:
            return None
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if n_dead == 0:
            return None
        k_aux = min(self.aux_k or x.shape[-1] // 2, n_dead)
        recon = sae._decode_flat(code.values, code.indices)  # (N, d_in)
        residual = (x - recon).detach()
        pre = sae.pre_activations(x)  # (N, d_sae)
        pre = pre.masked_fill(~dead, float("-inf"))
        values, indices = pre.topk(k_aux, dim=-1)
        values = torch.relu(values)
        e_hat = sae._decode_flat(values, indices, bias=False)
        denom = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
        aux = (e_hat - residual).pow(2).sum() / denom
        return self.alpha * torch.nan_to_num(aux, nan=0.0)


class PrefixBalance:
    """Per-prefix loss weights ``w_j ∝ ē_j^(−p)`` from a running mean ``ē_j`` of prefix errors.

    ``p = 0`` is the paper's equal weighting. ``p = 1`` gives every prefix the same *relative*
    weight (its gradient is that of ``Σ_j log e_j``), so the large budgets, whose absolute errors
    are many times smaller than those of the first few latents, are not drowned out. Errors
    are measured without gradients on ``rows`` rows of a batch every ``every`` steps; the
    weights are restricted to the trained ``budgets`` (zero elsewhere) and sum to 1.
    """

    def __init__(self, k: int, budgets: list[int], power: float, *, every: int = 4,
                 rows: int = 128, decay: float = 0.9) -> None:
        self.k, self.power, self.every, self.rows, self.decay = k, power, every, rows, decay
        self.mask = torch.zeros(k, dtype=torch.float64)
        self.mask[[b - 1 for b in budgets]] = 1.0
        self.mean: Tensor | None = None  # (K,) running mean of prefix errors
        self.calls = 0

    @property
    def active(self) -> bool:
        return self.power != 0.0

    def weights(self, x: Tensor, code: SparseCode, sae: SAE) -> Tensor | None:
        """``[K]`` weights for this step (``None`` when balancing is off: equal weights)."""
        from hsae_runtime.loss import prefix_errors

        if not self.active:
            return None
        if self.mean is None or self.calls % self.every == 0:
            rows = slice(0, min(self.rows, x.shape[0]))
            err = prefix_errors(x[rows], code.values[rows].detach(), code.indices[rows],
                                sae.W_dec.detach(), sae.b_dec.detach()).double().cpu()
            err = err.clamp_min(1e-12)
            old = err if self.mean is None else self.mean
            self.mean = self.decay * old + (1 - self.decay) * err
        self.calls += 1
        w = self.mean.pow(-self.power) * self.mask
        return (w / w.sum()).float()
