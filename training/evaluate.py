"""Evaluate one or several SAEs at every budget on the same eval tokens.

Per budget k (N counted tokens, sums over them, ``μ`` the mean counted eval activation):

* ``fvu = Σ‖x − x̂_k‖² / Σ‖x − μ‖²`` (corpus level: a few massive-activation tokens can hold
  most of the variance), ``explained_variance = 1 − fvu``;
* ``fvu_token``: the mean over tokens of ``‖x − x̂_k‖² / ‖x − μ‖²``
  (:func:`hsae_runtime.sae.per_token_fvu`), what the typical token sees;
* ``mse = Σ‖x − x̂_k‖² / (N · d_in)``; ``l0``: mean count of positive entries among the first k;
* ``dead_fraction``: latents never positive among the first k entries of any token (codes are
  nested prefixes, so it never increases with k); the result's top-level ``dead_fraction`` is
  the same at its largest budget;
* ``ce``: the LM's next-token cross-entropy with the hookpoint replaced by ``x̂_k`` at counted
  positions (special positions such as BOS keep their clean activation), over target positions
  that are not special tokens; ``ce_delta = ce − ce_clean``;
  ``ce_recovered = (ce_zero − ce) / (ce_zero − ce_clean)`` where ``ce_zero`` zero-ablates;
* ``kl``: the mean over the same target positions of ``KL(p_clean ‖ p_spliced)`` in nats, from
  the same logits as ``ce``.

Two passes over the same contexts. The first runs the LM only to the hookpoint and sums the
activations, so ``μ`` is the exact mean of the eval tokens (not a running estimate that would
change the centre under early tokens); it keeps the captured activations up to
``cache_bytes`` so the second pass recaptures only the rest. The second pass encodes each token
once per SAE at its largest budget and reads every budget off the prefixes; where CE is
counted (the first ``ce_tokens`` tokens: the LM head dominates CE cost on large vocabularies),
one clean and one zero-ablated forward per batch are shared by all SAEs and each (SAE, budget)
adds one spliced forward whose hook writes in the reconstructions already made.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Concatenate, ParamSpec

import torch
from torch import Tensor

from hsae_runtime.errors import ConfigError, DataError, InputError
from hsae_runtime.lm import (
    Hookpoint,
    LoadedLM,
    capture,
    resolve_hookpoint,
    special_token_mask,
    splice,
)
from hsae_runtime.sae import SAE, per_token_fvu
from hsae_runtime.training.data import iter_contexts, read_documents

logger = logging.getLogger(__name__)
P = ParamSpec("P")

DEFAULT_CACHE_BYTES = 256 << 20
"""Captured activations the first pass keeps for the second (the rest are captured again)."""

LOGIT_CHUNK_ELEMENTS = 1 << 22
"""float32 logits per CE/KL chunk: ``LOGIT_CHUNK_ELEMENTS // vocab`` positions at a time
(16 positions of Gemma's 262k vocabulary, 16 MiB per temporary)."""


def default_budgets(k_max: int) -> list[int]:
    """Powers of two up to k_max, plus k_max."""
    out = [1 << i for i in range(k_max.bit_length()) if (1 << i) <= k_max]
    return sorted(set(out) | {k_max})


def ce_and_kl(
    logits: Tensor,
    input_ids: Tensor,
    target: Tensor,
    clean_logits: Tensor | None = None,
    *,
    chunk_elements: int = LOGIT_CHUNK_ELEMENTS,
) -> tuple[float, float]:
    """Sums over counted targets of next-token CE and of ``KL(p_clean ‖ p)``, in nats.

    ``logits [B, T, vocab]`` predict ``input_ids [B, T]`` shifted by one; ``target [B, T]``
    (bool) marks the tokens whose prediction counts (``target[:, 0]`` is ignored).
    ``clean_logits [B, T, vocab]`` is the reference distribution (KL is 0.0 without it).
    log_softmax runs in float32 on chunks of positions, so no second ``[B, T, vocab]`` tensor
    is made; each position's KL is clamped at 0 against rounding.
    """
    vocab = logits.shape[-1]
    pred = torch.zeros_like(target, dtype=torch.bool)
    pred[:, :-1] = target[:, 1:]
    rows = pred.flatten().nonzero().squeeze(1).to(logits.device)  # (n,) positions b·T + t
    labels = input_ids.to(logits.device).flatten()[rows + 1]  # (n,) the next tokens
    flat = logits.reshape(-1, vocab)
    clean = None if clean_logits is None else clean_logits.reshape(-1, vocab)
    step = max(1, chunk_elements // vocab)
    ce = torch.zeros((), dtype=torch.float64, device=logits.device)
    kl = torch.zeros((), dtype=torch.float64, device=logits.device)
    for start in range(0, len(rows), step):
        r = rows[start : start + step]
        logp = torch.log_softmax(flat[r].float(), dim=-1)  # (chunk, vocab)
        ce -= logp.gather(-1, labels[start : start + step, None]).sum().double()
        if clean is not None:
            logq = torch.log_softmax(clean[r].float(), dim=-1)
            kl += (logq.exp() * (logq - logp)).sum(-1).clamp_min(0).sum().double()
    return float(ce), float(kl)


@dataclass
class _Batch:
    ids: Tensor  # (B, T)
    keep: Tensor  # (B, T) bool: counted tokens (the SAE replaces exactly these)
    acts: Tensor | None  # (N, d_in) counted activations kept from the first pass


@dataclass
class _Model:
    """One SAE's budgets and running sums (all float64 except ``first_pos``)."""

    sae: SAE
    budgets: list[int]
    sq_err: Tensor = field(init=False)  # (n_budgets,)
    tok_fvu: Tensor = field(init=False)  # (n_budgets,)
    l0: Tensor = field(init=False)  # (n_budgets,)
    ce: Tensor = field(init=False)  # (n_budgets,)
    kl: Tensor = field(init=False)  # (n_budgets,)
    first_pos: Tensor = field(init=False)  # (d_sae,) first code slot a latent was positive in

    def __post_init__(self) -> None:
        nb = len(self.budgets)
        self.sq_err, self.tok_fvu, self.l0, self.ce, self.kl = (
            torch.zeros(nb, dtype=torch.float64) for _ in range(5)
        )
        self.first_pos = torch.full((self.sae.config.d_sae,), max(self.budgets),
                                    dtype=torch.int64, device=self.sae.device)

    def add(self, x: Tensor, center: Tensor) -> Tensor:
        """Accumulate FVU / L0 / firing sums of ``x [N, d_in]``; returns ``x̂ [nb, N, d_in]``."""
        sae, k_top = self.sae, max(self.budgets)
        xs = x.to(sae.device, sae.dtype)
        code = sae.encode(xs, k_top)  # (N, k_top), sorted
        recon = sae.reconstruct_from_code(code, self.budgets)  # (nb, N, d_in)
        xd, mu = x.to(sae.device).double(), center.to(sae.device)
        for i in range(len(self.budgets)):
            r = recon[i].double()
            self.sq_err[i] += float((r - xd).pow(2).sum())
            self.tok_fvu[i] += float(per_token_fvu(xd, r, mu).sum())
        positive = code.values > 0  # (N, k_top)
        per_slot = positive.sum(0).cumsum(0).cpu()  # (k_top,): positives in slots 0..j
        self.l0 += per_slot[torch.tensor(self.budgets) - 1].double()
        slot = torch.arange(k_top, device=sae.device).expand_as(positive)
        self.first_pos.scatter_reduce_(0, code.indices[positive], slot[positive], reduce="amin")
        return recon


def evaluate_many(
    saes: Mapping[str, SAE],
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
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> dict[str, dict[str, Any]]:
    """Metrics of every SAE in ``saes`` on the same tokens of ``data``.

    ``data`` is a text file or a list of contexts ``[T]``. ``budgets`` (default: powers of two
    up to the largest k_max) must each fit some SAE; an SAE is evaluated at those up to its own
    k_max. All SAEs need the same ``d_in`` and hookpoint (``hookpoint`` overrides theirs).
    Returns ``{name: {"tokens", "ce_tokens", "hookpoint", "ce_clean", "ce_zero_ablation",
    "kl_zero_ablation", "dead_fraction", "budgets": {"k": {metric: value}}}}``, the metrics
    named in the module docstring.
    """
    hp = _check_models(saes, lm, hookpoint)
    models = {name: _Model(sae, b) for name, (sae, b) in _budgets_per_model(saes, budgets).items()}
    ce_limit = tokens if ce_tokens is None else min(ce_tokens, tokens)
    if isinstance(data, (str, Path)):
        contexts = iter_contexts(read_documents(data), lm.tokenizer, context)
    else:
        contexts = iter(data)
    with torch.inference_mode():
        batches, center, n = _center_pass(lm, hp, contexts, tokens, lm_batch, include_special,
                                          cache_bytes, progress)
        if n == 0:
            raise DataError(f"no evaluation tokens in {data}",
                            hint=f"need at least {context} tokens of text")
        shared = {"var": 0.0, "ce_n": 0, "ce_clean": 0.0, "ce_zero": 0.0, "kl_zero": 0.0}
        bar = _bar(progress, n, "eval")
        for batch in batches:
            x = batch.acts if batch.acts is not None else capture(lm, hp, batch.ids)[batch.keep]
            shared["var"] += float((x.double() - center.to(x.device)).pow(2).sum())
            ce = _CEBatch.run(lm, hp, batch, shared) if shared["ce_n"] < ce_limit else None
            for m in models.values():
                recon = m.add(x, center)  # (nb, N, d_in)
                if ce is not None:
                    ce.add(m, recon)
            if bar is not None:
                bar.update(len(x))
        if bar is not None:
            bar.close()
    return {name: _summary(m, n, shared, hp.name) for name, m in models.items()}


def _for_one_model(
    many: Callable[Concatenate[Mapping[str, SAE], P], dict[str, dict[str, Any]]],
) -> Callable[Concatenate[SAE, P], dict[str, Any]]:
    """``many`` for a single SAE, with ``many``'s other parameters (and defaults) as they are."""

    def one(sae: SAE, /, *args: P.args, **kwargs: P.kwargs) -> dict[str, Any]:
        """Metrics of one SAE: :func:`evaluate_many` with a single model."""
        return many({"model": sae}, *args, **kwargs)["model"]

    return one


evaluate = _for_one_model(evaluate_many)
"""``evaluate(sae, lm, data, **options)``: one SAE's metrics; options as :func:`evaluate_many`."""


def _check_models(saes: Mapping[str, SAE], lm: LoadedLM, hookpoint: str | None) -> Hookpoint:
    """The one hookpoint all SAEs read; typed errors for widths or hookpoints that differ."""
    if not saes:
        raise InputError("no SAE to evaluate")
    widths = {name: s.config.d_in for name, s in saes.items()}
    if len(set(widths.values())) > 1:
        raise ConfigError(f"the SAEs to compare have different d_in: {widths}",
                          hint="compare SAEs trained at the same hookpoint of the same LM")
    names = {name: hookpoint or s.config.hookpoint for name, s in saes.items()}
    if None in names.values():
        missing = [n for n, h in names.items() if h is None]
        raise InputError(f"no hookpoint in the SAE file(s) {missing}; pass one",
                         hint="--hookpoint NAME")
    if len(set(names.values())) > 1:
        raise ConfigError(f"the SAEs to compare read different hookpoints: {names}",
                          hint="pass --hookpoint NAME to evaluate all of them at one")
    d_in = next(iter(widths.values()))
    if lm.d_model != d_in:
        raise InputError(f"the LM's width {lm.d_model} does not match the SAE's d_in {d_in}",
                         hint="evaluate with the LM the SAE was trained on")
    return resolve_hookpoint(lm.model, str(next(iter(names.values()))))


def _budgets_per_model(saes: Mapping[str, SAE], budgets: Sequence[int] | None,
                       ) -> dict[str, tuple[SAE, list[int]]]:
    """Each SAE with the requested budgets it can serve (sorted, distinct)."""
    widest = max(saes.values(), key=lambda s: s.config.k_max)
    wanted = sorted(set(widest.check_budgets(budgets or default_budgets(widest.config.k_max))))
    out = {}
    for name, sae in saes.items():
        mine = [b for b in wanted if b <= sae.config.k_max]
        if not mine:
            raise InputError(f"SAE {name!r} (k_max={sae.config.k_max}) serves none of the "
                             f"budgets {wanted}", hint="add a budget at most its k_max")
        if len(mine) < len(wanted):
            logger.info("%s: k_max=%d, budgets above it are left out", name, sae.config.k_max)
        out[name] = (sae, mine)
    return out


def _bar(progress: bool, total: int, desc: str) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc=desc)


def _center_pass(lm: LoadedLM, hp: Hookpoint, contexts: Iterator[Tensor], tokens: int,
                 lm_batch: int, include_special: bool, cache_bytes: int, progress: bool,
                 ) -> tuple[list[_Batch], Tensor, int]:
    """Batches of at least ``tokens`` counted tokens, their mean activation ``[d_in]``
    (float64) and count; activations kept while they fit ``cache_bytes``."""
    batches: list[_Batch] = []
    total: Tensor | None = None
    n = cached = 0
    bar = _bar(progress, tokens, "eval: mean")
    while n < tokens:
        chunk = [c for _, c in zip(range(lm_batch), contexts)]
        if not chunk:
            break
        ids = torch.stack(chunk).to(lm.device)  # (B, T)
        keep = torch.ones_like(ids, dtype=torch.bool) if include_special else \
            ~special_token_mask(lm.tokenizer, ids)
        x = capture(lm, hp, ids)[keep]  # (N, d_in)
        total = x.double().sum(0) if total is None else total + x.double().sum(0)
        n += len(x)
        size = x.numel() * x.element_size()
        keep_acts = cached + size <= cache_bytes
        cached += size if keep_acts else 0
        batches.append(_Batch(ids, keep, x if keep_acts else None))
        if bar is not None:
            bar.update(len(x))
    if bar is not None:
        bar.close()
    center = torch.zeros(lm.d_model, dtype=torch.float64) if total is None else total / max(n, 1)
    return batches, center, n


@dataclass
class _CEBatch:
    """One batch's clean logits, shared by the spliced runs of every SAE and budget."""

    lm: LoadedLM
    hp: Hookpoint
    batch: _Batch
    target: Tensor  # (B, T) bool: tokens whose prediction counts
    clean: Tensor  # (B, T, vocab)

    @classmethod
    def run(cls, lm: LoadedLM, hp: Hookpoint, batch: _Batch, shared: dict[str, Any],
            ) -> _CEBatch | None:
        """Clean and zero-ablated forwards: their CE / KL sums go into ``shared``."""
        ids, keep = batch.ids, batch.keep
        target = keep.clone()
        target[:, 0] = False
        count = int(target[:, 1:].sum())
        if count == 0:
            return None
        clean = splice(lm, hp, ids)  # (B, T, vocab)
        shared["ce_clean"] += ce_and_kl(clean, ids, target)[0]
        zero = splice(lm, hp, ids, replace=torch.zeros_like, positions=keep)
        ce, kl = ce_and_kl(zero, ids, target, clean)
        shared["ce_zero"] += ce
        shared["kl_zero"] += kl
        shared["ce_n"] += count
        return cls(lm, hp, batch, target, clean)

    def add(self, m: _Model, recon: Tensor) -> None:
        """Spliced CE / KL sums of ``recon [nb, N, d_in]`` (at the counted tokens) into ``m``."""
        ids, keep = self.batch.ids, self.batch.keep
        for i, rec in enumerate(recon):
            def write(x: Tensor, rec: Tensor = rec) -> Tensor:  # (B, T, d_in)
                out = x.clone()
                out[keep.to(x.device)] = rec.to(x.device, x.dtype)
                return out

            logits = splice(self.lm, self.hp, ids, replace=write)
            ce, kl = ce_and_kl(logits, ids, self.target, self.clean)
            m.ce[i] += ce
            m.kl[i] += kl


def _summary(m: _Model, n: int, shared: Mapping[str, Any], hookpoint: str) -> dict[str, Any]:
    ce_n = shared["ce_n"]

    def per_target(total: float) -> float:
        return total / ce_n if ce_n else float("nan")

    ce_clean, ce_zero = per_target(shared["ce_clean"]), per_target(shared["ce_zero"])
    denom = ce_zero - ce_clean
    var = shared["var"]
    out: dict[str, Any] = {
        "tokens": n, "ce_tokens": ce_n, "hookpoint": hookpoint,
        "ce_clean": ce_clean, "ce_zero_ablation": ce_zero,
        "kl_zero_ablation": per_target(shared["kl_zero"]),
        "dead_fraction": float((m.first_pos >= max(m.budgets)).float().mean()),
        "budgets": {},
    }
    for i, b in enumerate(m.budgets):
        fvu = float(m.sq_err[i]) / var if var else float("nan")
        ce = per_target(float(m.ce[i]))
        out["budgets"][str(b)] = {
            "fvu": fvu,
            "fvu_token": float(m.tok_fvu[i]) / n,
            "explained_variance": 1.0 - fvu,
            "mse": float(m.sq_err[i]) / (n * m.sae.config.d_in),
            "l0": float(m.l0[i]) / n,
            "dead_fraction": float((m.first_pos >= b).float().mean()),
            "ce": ce,
            "ce_delta": ce - ce_clean,
            "ce_recovered": (ce_zero - ce) / denom if denom else float("nan"),
            "kl": per_target(float(m.kl[i])),
        }
    return out


def plot_fvu(results: Mapping[str, Mapping[str, Any]], path: str | Path) -> None:
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
