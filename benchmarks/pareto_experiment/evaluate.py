"""Stage 5: FVU and dead latents on the held-out activations, and the spliced-in CE delta.

The CE delta is the expensive part (a 262k-word LM head), so the spliced runs share work: per
context the LM runs to the hookpoint once per group of configurations, and the hook returns a
batch of ``M`` replacement activations (``[M, T, d]`` from ``[1, T, d]``), so later blocks run
batched; logits are made ``--ce-chunk`` positions at a time and never kept. The first context
is cross-checked against ``hsae_runtime.lm.splice``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .settings import Settings

logger = logging.getLogger("pareto")  # one logger name for every module of the experiment


@torch.no_grad()
def eval_fvu(sae: Any, acts: Tensor, ks: list[int], chunk: int = 4096) -> dict[int, dict]:
    """FVU over all of ``acts [N, d_in]``, its per-token mean, and % latents never firing.

    ``fvu`` is the usual Σ‖x − x̂‖² / Σ‖x − mean‖². On Gemma-3 a few tokens with massive
    activations hold most of that variance, so ``fvu_token`` (the mean over tokens of
    ‖x − x̂‖² / ‖x − mean‖², ``hsae_runtime.sae.per_token_fvu``) shows the typical token.
    """
    from hsae_runtime.sae import per_token_fvu

    mean = acts.double().mean(0)
    denom = (acts.double() - mean).pow(2).sum().item()
    sse = torch.zeros(len(ks), dtype=torch.float64)
    tok = torch.zeros(len(ks), dtype=torch.float64)
    fired = torch.zeros(len(ks), sae.config.d_sae, dtype=torch.bool)
    for start in range(0, len(acts), chunk):
        x = acts[start:start + chunk]
        code = sae.encode(x, max(ks))
        recon = sae.reconstruct_from_code(code, ks)  # (n_budgets, N, d_in)
        sse += (recon - x).double().pow(2).sum(dim=(1, 2))
        tok += per_token_fvu(x.double(), recon.double(), mean).sum(-1)
        for i, k in enumerate(ks):
            idx = code.indices[:, :k][code.values[:, :k] > 0]
            fired[i, idx] = True
    dead = 100.0 * (1 - fired.float().mean(1))
    return {k: {"fvu": sse[i].item() / denom, "fvu_token": tok[i].item() / len(acts),
                "dead_pct": dead[i].item()} for i, k in enumerate(ks)}


def _ce_contexts(lm: Any, eval_txt: Path, context: int, n_tokens: int) -> list[Tensor]:
    """Eval contexts spread over the eval part (every j-th) until ``n_tokens`` predictions."""
    from hsae_runtime.training.data import iter_contexts, read_documents

    contexts = list(iter_contexts(read_documents(eval_txt), lm.tokenizer, context))
    need = max(1, math.ceil(n_tokens / (context - 1)))
    step = max(1, len(contexts) // need)
    return contexts[::step][:need]


def _ce_kl_per_token(lm: Any, hidden: Tensor, clean: Tensor, ids: Tensor,
                     chunk: int) -> tuple[Tensor, Tensor]:
    """Next-token CE and KL(clean ‖ spliced), each ``[M, T-1]``, from final hidden states.

    ``hidden [M, T, d]`` are the spliced runs, ``clean [T, d]`` the clean run; logits are made
    ``chunk`` positions at a time (the clean chunk once for all M) and never kept.
    """
    head = lm.model.get_output_embeddings().weight  # (vocab, d)
    cfg = getattr(lm.model.config, "text_config", None) or lm.model.config
    cap = getattr(cfg, "final_logit_softcapping", None)

    def logprobs(h: Tensor) -> Tensor:
        logits = F.linear(h, head).float()  # (chunk, vocab)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return torch.log_softmax(logits, dim=-1)

    target = ids[1:]
    ce = torch.empty(hidden.shape[0], len(target))
    kl = torch.empty(hidden.shape[0], len(target))
    for a in range(0, len(target), chunk):
        tgt = target[a:a + chunk]
        ref = logprobs(clean[:-1][a:a + chunk])  # (chunk, vocab)
        p_ref = ref.exp()
        for m in range(hidden.shape[0]):
            lp = logprobs(hidden[m, :-1][a:a + chunk])
            ce[m, a:a + chunk] = -lp.gather(-1, tgt[:, None])[:, 0]
            kl[m, a:a + chunk] = (p_ref * (ref - lp)).sum(-1).clamp_min(0.0)
    return ce, kl


@torch.no_grad()
def eval_ce(s: Settings, lm: Any, saes: dict[str, Any], eval_txt: Path, out: Path,
            on_context: Any = None) -> dict:
    """CE delta and KL of every (SAE, k) on a subset of eval contexts; partial results saved."""
    from hsae_runtime.lm import hook, next_token_loss, resolve_hookpoint, special_token_mask, splice

    configs = ce_configs(s, list(saes))
    hp = resolve_hookpoint(lm.model, s.hookpoint)
    base = lm.model.get_decoder() if hasattr(lm.model, "get_decoder") else lm.model.model
    contexts = _ce_contexts(lm, eval_txt, s.context, s.ce_tokens)
    state_path = out / "ce_partial.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    key = [s.ce_tokens, s.context, [list(c) for c in configs]]
    if state.get("key") != key:
        state = {"key": key, "done": 0, "tokens": 0, "clean": 0.0,
                 "sums": {f"{n}@{k}": 0.0 for n, k in configs},
                 "kl": {f"{n}@{k}": 0.0 for n, k in configs}}
    t0 = time.perf_counter()
    for ci in range(state["done"], len(contexts)):
        ids = contexts[ci]
        keep = ~special_token_mask(lm.tokenizer, ids[None])[0]  # (T,) positions SAEs replace
        count = keep[1:].float()  # predictions of special tokens do not count
        recon: dict[tuple[str, int], Tensor] = {}

        def make(x: Tensor) -> None:
            for name, sae in saes.items():
                mine = [k for n, k in configs if n == name]
                rec = sae.reconstruct(x[0], mine)  # (n_budgets, T, d)
                for i, k in enumerate(mine):
                    recon[(name, k)] = torch.where(keep[:, None], rec[i].to(x.dtype), x[0])

        groups = [[None] + configs[: s.ce_group - 1]]
        rest = configs[s.ce_group - 1:]
        groups += [rest[i:i + s.ce_group] for i in range(0, len(rest), s.ce_group)]
        clean_hidden: Tensor | None = None
        for group in groups:
            def swap(x: Tensor, group=group) -> Tensor:  # (1, T, d) -> (M, T, d)
                if not recon:
                    make(x)
                return torch.stack([x[0] if c is None else recon[c] for c in group])

            with hook(lm.model, hp, swap):
                hidden = base(input_ids=ids[None], use_cache=False).last_hidden_state
            if clean_hidden is None:
                clean_hidden = hidden[0]  # group 0 starts with the clean run
            ce, kl = _ce_kl_per_token(lm, hidden, clean_hidden, ids, s.ce_chunk)  # (M, T-1)
            for c, row, kl_row in zip(group, ce, kl):
                total = float((row * count).sum())
                if c is None:
                    state["clean"] += total
                else:
                    state["sums"][f"{c[0]}@{c[1]}"] += total
                    state["kl"][f"{c[0]}@{c[1]}"] += float((kl_row * count).sum())
                if ci == 0 and c is not None and c == configs[0]:
                    _cross_check(lm, hp, ids, keep, recon[c], row, splice, next_token_loss)
        state["tokens"] += int(count.sum())
        state["done"] = ci + 1
        state_path.write_text(json.dumps(state))
        logger.info("CE context %d/%d (%.0f s)", ci + 1, len(contexts), time.perf_counter() - t0)
        if on_context is not None:
            on_context(_ce_summary(state, len(contexts)))
    return _ce_summary(state, len(contexts))


def _ce_summary(state: dict[str, Any], n_contexts: int) -> dict[str, Any]:
    n = max(1, state["tokens"])
    return {"tokens": state["tokens"], "contexts_done": state["done"], "contexts": n_contexts,
            "clean_ce": state["clean"] / n,
            "delta": {key: v / n - state["clean"] / n for key, v in state["sums"].items()},
            "kl": {key: v / n for key, v in state.get("kl", {}).items()}}


def ce_configs(s: Settings, names: list[str]) -> list[tuple[str, int]]:
    """``(sae, k)`` pairs to splice: every SAE at every CE budget, or only those the claims use
    (HierarchicalTopK at each TopK's k, each TopK at its own k, the widest TopK at the smallest)."""
    match s.ce_mode:
        case "all":
            return [(name, k) for name in names for k in (s.ce_ks or s.eval_ks)]
        case "claims":
            h, top = f"htopk{s.k_max}", f"topk{max(s.topk_ks)}"
            pairs = [(h, k) for k in s.topk_ks] + [(f"topk{k}", k) for k in s.topk_ks]
            if min(s.topk_ks) != max(s.topk_ks):
                pairs.append((top, min(s.topk_ks)))
            return [(name, k) for name, k in pairs if name in names]  # --only may drop some
        case other:
            raise ValueError(f"ce_mode must be all or claims, got {other!r}")


def _cross_check(lm, hp, ids, keep, recon, row, splice, next_token_loss, n: int = 128) -> None:
    """The batched splice must agree with ``hsae_runtime.lm.splice`` (first ``n`` tokens)."""
    short, rec = ids[None, :n], recon[:n]
    logits = splice(lm, hp, short, replace=lambda x: rec[None].to(x.dtype),
                    positions=keep[None, :n])
    ref = next_token_loss(logits, short)[0]
    err = (ref - row[: n - 1]).abs().max().item()
    logger.info("batched splice vs lm.splice: max |ΔCE| = %.2e", err)
    if err > 1e-3 * max(1.0, ref.abs().max().item()):
        raise RuntimeError(f"batched splice disagrees with lm.splice (max |ΔCE| {err:.3g})")
