"""What each decoder direction does downstream: logit lens and nearest latents.

* :func:`logit_lens` passes every decoder row ``W_dec[i] [d_in]`` through the LM's final norm
  and unembedding (the direct path from the residual stream to the logits) and keeps the top
  and bottom tokens, plus a histogram of the row's logits (for Neuronpedia's logit panel).
* :func:`decoder_neighbours` ranks the other latents by cosine similarity of decoder rows.

Both work on latent chunks, so memory is ``O(chunk · vocab)`` and ``O(chunk · d_sae)``. Neither
runs the LM: only its final norm module and unembedding matrix are used.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from hsae_runtime.lm import LoadedLM

logger = logging.getLogger(__name__)

_FINAL_NORMS = ("model.norm", "model.language_model.norm", "transformer.ln_f",
                "model.final_layernorm", "gpt_neox.final_layer_norm")


class Lens(NamedTuple):
    """Per latent: ``top_ids / top_values [d_sae, n]`` (largest logits first),
    ``bottom_ids / bottom_values [d_sae, n]`` (most negative first), and a logit histogram
    ``hist [d_sae, bins]`` over ``edges [d_sae, bins + 1]``."""

    top_ids: Tensor
    top_values: Tensor
    bottom_ids: Tensor
    bottom_values: Tensor
    hist: Tensor
    edges: Tensor


def final_norm_and_unembedding(lm: LoadedLM) -> tuple[nn.Module, Tensor]:
    """The LM's final norm (identity when none is found) and unembedding ``[vocab, d_in]``."""
    model = lm.model
    modules = dict(model.named_modules())
    norm = next((modules[name] for name in _FINAL_NORMS if name in modules), None)
    if norm is None:
        logger.warning("no final norm found in %s; the logit lens skips it", type(model).__name__)
        norm = nn.Identity()
    head = cast(Any, model).get_output_embeddings()
    if head is None:
        raise AttributeError(f"{type(model).__name__} has no output embeddings")
    return norm, head.weight.detach()


@torch.inference_mode()
def logit_lens(w_dec: Tensor, norm: nn.Module, w_u: Tensor, *, n: int = 10, bins: int = 24,
               chunk: int = 64) -> Lens:
    """Top/bottom ``n`` tokens of ``norm(W_dec[i]) @ W_Uᵀ`` for every latent ``i``.

    ``w_dec [d_sae, d_in]``, ``w_u [vocab, d_in]``; ``bins`` equal-width histogram bins of each
    row's logits between its minimum and maximum.
    """
    parts: list[list[Tensor]] = [[] for _ in range(6)]
    for start in range(0, len(w_dec), chunk):
        rows = w_dec[start : start + chunk].to(w_u.dtype)
        logits = (norm(rows[:, None, :])[:, 0, :] @ w_u.T).float()  # (chunk, vocab)
        top = logits.topk(n, dim=1)
        bottom = logits.topk(n, dim=1, largest=False)
        lo, hi = logits.min(1).values, logits.max(1).values
        width = (hi - lo).clamp_min(1e-12)
        idx = ((logits - lo[:, None]) / width[:, None] * bins).long().clamp(0, bins - 1)
        hist = torch.zeros(len(rows), bins, dtype=torch.int64).scatter_add_(
            1, idx, torch.ones_like(idx))
        steps = torch.linspace(0, 1, bins + 1)
        edges = lo[:, None] + width[:, None] * steps[None]
        for part, value in zip(parts, (top.indices, top.values, bottom.indices, bottom.values,
                                       hist, edges)):
            part.append(value)
    return Lens(*(torch.cat(p) for p in parts))


@torch.inference_mode()
def decoder_neighbours(w_dec: Tensor, *, n: int = 5, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """``(ids, cosines) [d_sae, n]``: latents whose decoder rows point closest (self excluded)."""
    unit = w_dec.float() / w_dec.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = min(n, len(unit) - 1)
    ids, cos = [], []
    for start in range(0, len(unit), chunk):
        sim = unit[start : start + chunk] @ unit.T  # (chunk, d_sae)
        own = torch.arange(start, start + len(sim))
        sim[torch.arange(len(sim)), own] = float("-inf")
        top = sim.topk(n, dim=1)
        ids.append(top.indices)
        cos.append(top.values)
    return torch.cat(ids), torch.cat(cos)
