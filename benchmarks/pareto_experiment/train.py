"""Stages 3-4: train every SAE on the cached activations, and time their training steps.

All SAEs share the data order, initialisation, token count, width and hyper-parameters; only
the objective (hierarchical or TopK) and the training budget ``k`` differ.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .settings import Settings, cache_root, sae_specs

logger = logging.getLogger("pareto")  # one logger name for every module of the experiment


# ---------------------------------------------------------------------------- 3. train
def train_config(s: Settings, lm_name: str, train_txt: Path, name: str, objective: str,
                 k: int, block_contexts: int, out: Path):
    from hsae_runtime.training.trainer import TrainConfig

    recipe = {key: getattr(s, key) for key in RECIPE if getattr(s, key) is not None}
    return TrainConfig(
        lm=lm_name, hookpoint=s.hookpoint, data=str(train_txt), d_sae=s.d_sae, k_max=s.k_max,
        out=str(out / "models" / f"{name}.safetensors"), objective=objective,  # type: ignore
        k=k, tokens=s.tokens, batch_tokens=s.batch_tokens, context=s.context,
        lm_batch=s.lm_batch, block_contexts=block_contexts, seed=s.seed,
        activation_cache=str(cache_root(s) / "cache" / "train"),
        val_data=str(train_txt.with_name("val.txt")),  # the experiment's own validation part
        cache_dtype="float32", device="cpu", progress=True, log_every=50, **recipe,
    )


RECIPE = ("lr", "warmup_frac", "decay_frac", "aux_alpha", "prefix_balance", "b_dec_init")
"""Settings fields passed to TrainConfig only when set (otherwise its defaults apply)."""


def train_order(s: Settings) -> list[tuple[str, str, int]]:
    """HierarchicalTopK and the widest TopK first: the claims need those two most."""
    specs = sae_specs(s)
    widest = [sp for sp in specs[1:] if sp[2] == max(s.topk_ks)]
    return specs[:1] + widest + [sp for sp in specs[1:] if sp not in widest]


def train_one(s: Settings, lm_name: str, train_txt: Path, block_contexts: int, out: Path,
              name: str, objective: str, k: int) -> dict[str, Any]:
    """Train one SAE (or reuse an existing model trained with the same settings)."""
    from hsae_runtime.training.trainer import train

    record = out / "models" / f"{name}.json"
    cfg = train_config(s, lm_name, train_txt, name, objective, k, block_contexts, out)
    want = {"config": {key: str(v) for key, v in asdict(cfg).items()}}
    if record.is_file() and Path(cfg.out).is_file():
        old = json.loads(record.read_text())
        if old.get("config") == want["config"]:
            logger.info("reusing %s", cfg.out)
            return old
    logger.info("training %s (%s, k=%d, %d tokens)", name, objective, k, s.tokens)
    result = train(cfg)
    losses = result.losses
    stats = {**want, "steps": result.steps, "tokens": result.tokens,
             "wall_s": result.wall_seconds, "sae_s": result.sae_seconds,
             "s_per_step": result.sae_seconds / max(1, result.steps),
             "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
             "validation": result.validation}
    if result.validation:
        best = min(result.validation, key=lambda h: h["val_loss"])
        stats.update(best_step=best["step"], best_val_loss=best["val_loss"])
    record.write_text(json.dumps(stats, indent=2))
    logger.info("%s: %d steps in %.0f s (%.3f s/step), final loss %.4f", name, result.steps,
                result.wall_seconds, stats["s_per_step"], stats["final_loss"])
    return stats


# ---------------------------------------------------------------------------- 4. timing
def time_steps(s: Settings, acts: Tensor) -> dict[str, float]:
    """Median seconds per training step of each objective, interleaved round by round.

    The step is the trainer's (encode, loss, backward, decoder projection, Adam, renorm);
    interleaving makes a CPU shared with other work slow every objective alike.
    """
    from hsae_runtime import loss as loss_mod
    from hsae_runtime.config import SAEConfig
    from hsae_runtime.sae import SAE
    from hsae_runtime.training.config import TrainConfig
    from hsae_runtime.training.optim import PrefixBalance, project_decoder_grad, renorm_decoder

    scale = math.sqrt(acts.shape[1] / acts[:4096].pow(2).sum(-1).mean().item())
    gen = torch.Generator().manual_seed(s.seed)
    batches = [acts[torch.randint(len(acts), (s.batch_tokens,), generator=gen)] * scale
               for _ in range(s.timing_steps)]
    power = s.prefix_balance if s.prefix_balance is not None else TrainConfig.prefix_balance
    runs = {}
    for name, objective, k in sae_specs(s):
        sae = SAE(SAEConfig(d_in=acts.shape[1], d_sae=s.d_sae, k_max=s.k_max))
        runs[name] = (sae, torch.optim.Adam(sae.parameters(), lr=s.lr or 1e-3), objective, k, [])
    balance = PrefixBalance(s.k_max, list(range(1, s.k_max + 1)), power)
    for _ in range(s.timing_rounds):
        for _name, (sae, opt, objective, k, times) in runs.items():
            encode = getattr(sae, "encode_for_training", sae.encode)
            for x in batches:
                t0 = time.perf_counter()
                code = encode(x, k)
                if objective == "hierarchical":
                    loss = loss_mod.hierarchical_topk_loss(
                        x, code.values, code.indices, sae.W_dec, sae.b_dec,
                        weights=balance.weights(x, code, sae))  # the trainer's prefix weights
                else:
                    loss = loss_mod.topk_loss(x, code.values, code.indices, sae.W_dec, sae.b_dec)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                project_decoder_grad(sae)
                opt.step()
                renorm_decoder(sae)
                times.append(time.perf_counter() - t0)
    # The first round warms up (kernel compilation, allocator); report the median of the rest.
    return {name: sorted(r[4][s.timing_steps:])[len(r[4][s.timing_steps:]) // 2]
            for name, r in runs.items()}
