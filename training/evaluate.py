"""Evaluate an SAE at every budget: FVU, MSE, L0, CE with the reconstruction spliced in, dead %.

FVU is summed over the whole eval set (``Σ‖x − x̂‖² / Σ‖x − mean(x)‖²``, not a mean of per-batch
ratios). Cross-entropy is the LM's next-token loss over non-special targets with the hookpoint
replaced by the reconstruction at budget k (special positions such as BOS keep their clean
activation); ``ce_recovered = (CE_zero − CE_k) / (CE_zero − CE_clean)`` where CE_zero replaces
the hookpoint with zeros. The LM head dominates CE cost on large-vocabulary models, so CE can be
limited to the first ``ce_tokens`` tokens while FVU covers all ``tokens``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hsae_runtime.errors import DataError, InputError
from hsae_runtime.lm import (
    LoadedLM,
    capture,
    next_token_loss,
    resolve_hookpoint,
    special_token_mask,
    splice,
)
from hsae_runtime.sae import SAE
from hsae_runtime.training.data import iter_contexts, read_documents

logger = logging.getLogger(__name__)


def default_budgets(k_max: int) -> list[int]:
    """Powers of two up to k_max, plus k_max."""
    out = [1 << i for i in range(k_max.bit_length()) if (1 << i) <= k_max]
    return sorted(set(out) | {k_max})


@dataclass
class _Acc:
    sq_err: Tensor  # (n_budgets,) float64
    l0: Tensor  # (n_budgets,) float64
    ce_sum: Tensor  # (n_budgets,) float64
    fired: Tensor  # (d_sae,) bool
    sum_x: Tensor | None = None  # (d_in,) float64
    sum_sq: float = 0.0
    n: int = 0
    ce_clean: float = 0.0
    ce_zero: float = 0.0
    ce_n: int = 0


def evaluate(
    sae: SAE,
    lm: LoadedLM,
    data: str | Path | Sequence[Tensor],
    *,
    hookpoint: str | None = None,
    budgets: Sequence[int] | None = None,
    tokens: int = 100_000,
    ce_tokens: int | None = None,
    context: int = 128,
    lm_batch: int = 8,
    include_special: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Metrics of ``sae`` on ``data`` (a text file or a list of contexts ``[T]``).

    Returns ``{"tokens", "ce_tokens", "budgets": {"k": {...}}, "dead_fraction", ...}``.
    """
    budgets = sae.check_budgets(budgets or default_budgets(sae.config.k_max))
    name = hookpoint or sae.config.hookpoint
    if name is None:
        raise InputError("the SAE file has no hookpoint; pass one", hint="--hookpoint NAME")
    hp = resolve_hookpoint(lm.model, name)
    if lm.d_model != sae.config.d_in:
        raise InputError(f"the LM's width {lm.d_model} does not match the SAE's d_in "
                         f"{sae.config.d_in}", hint="evaluate with the LM the SAE was trained on")
    ce_limit = tokens if ce_tokens is None else min(ce_tokens, tokens)
    if isinstance(data, (str, Path)):
        contexts = iter_contexts(read_documents(data), lm.tokenizer, context)
    else:
        contexts = iter(data)
    nb = len(budgets)
    acc = _Acc(torch.zeros(nb, dtype=torch.float64), torch.zeros(nb, dtype=torch.float64),
               torch.zeros(nb, dtype=torch.float64),
               torch.zeros(sae.config.d_sae, dtype=torch.bool, device=sae.device))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tokens, unit="tok", unit_scale=True, desc="eval")
    k_top = max(budgets)
    while acc.n < tokens:
        batch = [c for _, c in zip(range(lm_batch), contexts)]
        if not batch:
            break
        ids = torch.stack(batch).to(lm.device)  # (B, T)
        keep = torch.ones_like(ids, dtype=torch.bool) if include_special else \
            ~special_token_mask(lm.tokenizer, ids)
        acts = capture(lm, hp, ids)  # (B, T, d)
        x = acts[keep].to(sae.device, sae.dtype)  # (N, d)
        with torch.inference_mode():
            code = sae.encode(x, k_top)
            recon = sae.reconstruct_from_code(code, budgets)  # (nb, N, d)
            xd = x.double()
            acc.sq_err += (recon.double() - xd).pow(2).sum(dim=(1, 2)).cpu()
            acc.sum_x = xd.sum(0) if acc.sum_x is None else acc.sum_x + xd.sum(0)
            acc.sum_sq += float(xd.pow(2).sum())
            for i, b in enumerate(budgets):
                acc.l0[i] += float((code.values[:, :b] > 0).sum())
            acc.fired[code.indices[code.values > 0]] = True
        acc.n += len(x)
        if acc.ce_n < ce_limit:
            _ce_batch(sae, lm, hp, ids, keep, budgets, acc)
        if bar is not None:
            bar.update(len(x))
    if bar is not None:
        bar.close()
    if acc.n == 0 or acc.sum_x is None:
        raise DataError(f"no evaluation tokens in {data}",
                        hint=f"need at least {context} tokens of text")
    var = acc.sum_sq - float(acc.sum_x.pow(2).sum()) / acc.n
    out: dict[str, Any] = {"tokens": acc.n, "ce_tokens": acc.ce_n,
                           "budgets": {}, "dead_fraction": float((~acc.fired).float().mean())}
    ce_clean = acc.ce_clean / acc.ce_n if acc.ce_n else float("nan")
    ce_zero = acc.ce_zero / acc.ce_n if acc.ce_n else float("nan")
    out["ce_clean"], out["ce_zero_ablation"] = ce_clean, ce_zero
    for i, b in enumerate(budgets):
        fvu = float(acc.sq_err[i]) / var
        ce = float(acc.ce_sum[i]) / acc.ce_n if acc.ce_n else float("nan")
        denom = ce_zero - ce_clean
        out["budgets"][str(b)] = {
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "mse": float(acc.sq_err[i]) / (acc.n * sae.config.d_in),
            "l0": float(acc.l0[i]) / acc.n,
            "ce": ce,
            "ce_delta": ce - ce_clean,
            "ce_recovered": (ce_zero - ce) / denom if denom else float("nan"),
        }
    return out


def _ce_batch(sae: SAE, lm: LoadedLM, hp: Any, ids: Tensor, keep: Tensor,
              budgets: list[int], acc: _Acc) -> None:
    """Clean, zero-ablated and spliced next-token CE for one batch."""
    target = keep.clone()
    target[:, 0] = False  # (B, T): targets that count
    count = int(target[:, 1:].sum())
    if count == 0:
        return

    def ce_of(logits: Tensor) -> float:
        return float(next_token_loss(logits, ids, target).sum())

    acc.ce_clean += ce_of(splice(lm, hp, ids))
    acc.ce_zero += ce_of(splice(lm, hp, ids, replace=torch.zeros_like, positions=keep))
    for i, b in enumerate(budgets):
        def recon(x: Tensor, b: int = b) -> Tensor:
            flat = x.reshape(-1, x.shape[-1]).to(sae.dtype)
            code = sae.encode(flat, b)
            return sae.decode(code).reshape(x.shape)

        acc.ce_sum[i] += ce_of(splice(lm, hp, ids, replace=recon, positions=keep))
    acc.ce_n += count


def plot_fvu(results: dict[str, dict[str, Any]], path: str | Path) -> None:
    """FVU against k (log-scaled k axis), one curve per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, res in results.items():
        ks = sorted(int(k) for k in res["budgets"])
        ax.plot(ks, [res["budgets"][str(k)]["fvu"] for k in ks], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("budget k (active latents)")
    ax.set_ylabel("FVU")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
