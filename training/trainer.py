"""Train a HierarchicalTopK (or plain TopK) SAE on live LM activations.

Call :func:`train` with a :class:`~hsae_runtime.training.config.TrainConfig` (the CLI
``hsae-runtime train`` is a thin wrapper). Notable choices:

* Activations are scaled by ``s`` so that E‖s·x‖² = d_in during training (one learning rate
  fits every LM); at save time ``s`` is folded into the weights (``b_enc/s``, ``b_dec/s``), so
  latent values and reconstructions come out in raw units and the decoder stays unit-norm.
* ``W_dec`` rows are kept unit-norm: the gradient component parallel to each row is removed
  before the Adam step and the rows are renormalised after it. ``W_enc`` starts as ``W_decᵀ``
  and ``b_dec`` at the data mean or geometric median of the first batch.
* AuxK (Gao et al. 2024): latents that have not fired for ``dead_tokens`` tokens are "dead";
  the top ``aux_k`` dead pre-activations must explain the residual, weighted by α = 1/32.
* Data order is pinned by ``(epoch, block, batch)`` (see ``buffer.py``), and checkpoints carry
  it with the optimiser state, so ``resume=True`` continues exactly.
* DDP: launch under ``torchrun``; gradients are averaged with ``all_reduce`` (gloo on CPU,
  NCCL on GPU). Every rank holds the same block and trains on its slice of each global batch,
  so N ranks follow the same trajectory as 1 rank on the same data.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from hsae_runtime.config import SAEConfig
from hsae_runtime.errors import ConfigError, DataError
from hsae_runtime.gguf import portable_lm_name
from hsae_runtime.sae import SAE
from hsae_runtime.training.checkpoint import (
    CHECKPOINT_NAME,
    Progress,
    TrainState,
    load_checkpoint,
    save_checkpoint,
)
from hsae_runtime.training.config import TrainConfig
from hsae_runtime.training.distributed import rank_world
from hsae_runtime.training.optim import (
    AuxK,
    PrefixBalance,
    geometric_median,
    lr_at,
    project_decoder_grad,
    renorm_decoder,
)

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What :func:`train` returns besides writing ``cfg.out``."""

    sae: SAE
    """The trained SAE in raw activation units (scale folded in)."""
    steps: int
    tokens: int
    losses: list[float] = field(default_factory=list)
    """Loss of every step (rank-averaged)."""
    validation: list[dict[str, float]] = field(default_factory=list)
    """``{"step", "train_loss", "val_loss"}`` at every validation evaluation."""
    best_step: int | None = None
    """Step of the best validation loss: the weights that were written."""
    lm_seconds: float = 0.0
    sae_seconds: float = 0.0
    wall_seconds: float = 0.0


def init_distributed(device: str) -> bool:
    """Join the torchrun process group when launched under torchrun; returns whether DDP."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if int(os.environ["WORLD_SIZE"]) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    use_nccl = device != "cpu" and torch.cuda.is_available()
    if use_nccl:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_nccl else "gloo")
    return True


def train(cfg: TrainConfig) -> TrainResult:
    """Train an SAE as configured, write it to ``cfg.out`` (rank 0) and return it."""
    from hsae_runtime.lm import load_lm, resolve_device, resolve_hookpoint
    from hsae_runtime.training.buffer import (
        ActivationCache,
        BlockSource,
        LMActivationSource,
        Timer,
    )

    init_distributed(cfg.device)
    rank, world = rank_world()
    if cfg.batch_tokens % world:
        raise ConfigError(f"batch_tokens ({cfg.batch_tokens}) must divide evenly over "
                          f"{world} ranks")
    if rank == 0:
        Path(cfg.out).expanduser().parent.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    timer = Timer()

    from hsae_runtime.training.validation import Validator, split_data, validation_activations

    if cfg.val_data is not None:
        train_data, val_data = cfg.data, cfg.val_data
    else:
        train_data, val_data = split_data(cfg.data, cfg.val_fraction, cfg.seed)
    cache = None
    lm = None
    hp_name = cfg.hookpoint

    def get_lm() -> Any:
        nonlocal lm
        if lm is None:
            if world > 1 and rank != 0:
                dist.barrier()  # rank 0 builds any GGUF cache first; the others then read it
            lm = load_lm(cfg.lm, dtype=cfg.lm_dtype, device=device)
            if world > 1 and rank == 0:
                dist.barrier()
        return lm

    if cfg.activation_cache is not None:
        stored = _read_manifest(Path(cfg.activation_cache))
        if stored is not None and _cache_matches(stored["key"], cfg, train_data):
            cache = ActivationCache(cfg.activation_cache, stored["key"], cfg.cache_dtype)
    if cache is None or not cache.complete:
        if not str(train_data).startswith("hf:") and not Path(train_data).expanduser().is_file():
            raise DataError(f"data file not found: {cfg.data}",
                            hint="pass a .txt or .jsonl file, or hf:DATASET[:CONFIG][:SPLIT]")
        loaded = get_lm()
        hp = resolve_hookpoint(loaded.model, cfg.hookpoint)
        lm_source = LMActivationSource(
            loaded, hp, train_data, context=cfg.context, block_contexts=cfg.block_contexts,
            lm_batch=cfg.lm_batch, include_special=cfg.include_special, timer=timer,
        )
        if cfg.activation_cache is not None:
            cache = ActivationCache(cfg.activation_cache, lm_source.key(), cfg.cache_dtype)
        source = BlockSource(lm_source, cache)
        d_in = loaded.d_model
    else:
        source = BlockSource(None, cache)
        d_in = int(next(cache.blocks(0))[1].shape[1])
        logger.info("training from the activation cache in %s", cfg.activation_cache)
    val_acts = None
    if val_data is not None:
        loaded = get_lm()
        val_acts = validation_activations(
            loaded, resolve_hookpoint(loaded.model, cfg.hookpoint), val_data,
            tokens=cfg.val_tokens, context=cfg.context, lm_batch=cfg.lm_batch,
            include_special=cfg.include_special, cache_dir=cfg.activation_cache)

    sae_config = SAEConfig(
        d_in=d_in, d_sae=cfg.d_sae, k_max=cfg.k_max,
        budgets=(cfg.budgets if cfg.objective == "hierarchical" else (cfg.train_k,)),
        model_name=portable_lm_name(cfg.lm), hookpoint=hp_name,
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    sae = SAE(sae_config, device=device)
    sae.reset_parameters(generator=gen)
    sae.to(device)
    fused = device.type == "cuda"
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.peak_lr, betas=(0.9, 0.999), eps=1e-8,
                           **({"fused": True} if fused else {"foreach": True}))
    total_steps = max(1, cfg.tokens // cfg.batch_tokens)
    aux = AuxK(cfg.d_sae, cfg.dead_tokens, cfg.aux_alpha, device=device)

    state = TrainState()
    ckpt = Path(cfg.checkpoint_dir) / CHECKPOINT_NAME if cfg.checkpoint_dir else None
    if cfg.resume:
        if ckpt is None:
            raise ConfigError("resume needs a checkpoint_dir", hint="pass --checkpoint-dir")
        if ckpt.is_file():
            state = load_checkpoint(ckpt, cfg, sae, opt, aux, device)
            logger.info("resumed at step %d (%d tokens)", state.step, state.tokens)
        else:
            logger.warning("no checkpoint in %s; starting from scratch", cfg.checkpoint_dir)

    from hsae_runtime import loss as loss_mod

    encode = getattr(sae, "encode_for_training", sae.encode)
    budgets = list(sae_config.trained_budgets)
    validator: Validator | None = None
    main_losses: list[float] = []
    balance = PrefixBalance(cfg.k_max, budgets, cfg.prefix_balance if cfg.objective
                            == "hierarchical" else 0.0)
    local_batch = cfg.batch_tokens // world
    progress = Progress(cfg, rank, total_steps, state)
    result = TrainResult(sae=sae, steps=state.step, tokens=state.tokens)
    t_start = time.perf_counter()
    sae_s = 0.0
    done = state.step >= total_steps
    while not done:
        any_block = False
        for block_index, acts in source.blocks(state.block if state.epoch_started else 0):
            any_block = True
            state.epoch_started = True
            state.block = block_index
            if state.scale is None:
                state.scale = _scale_for(acts, d_in)
                if state.step == 0:
                    _init_b_dec(sae, acts[: cfg.batch_tokens] * state.scale, cfg.b_dec_init)
            if validator is None and val_acts is not None:
                validator = Validator(
                    (val_acts * state.scale).to(device), cfg.objective, cfg.train_k, budgets,
                    every=cfg.val_every or max(1, total_steps // 20), patience=cfg.patience)
            n_batches = len(acts) // cfg.batch_tokens
            if n_batches == 0:
                continue
            perm = torch.randperm(len(acts), generator=torch.Generator().manual_seed(
                _mix(cfg.seed, state.epoch, block_index)))
            for j in range(state.batch, n_batches):
                idx = perm[j * cfg.batch_tokens: (j + 1) * cfg.batch_tokens]
                idx = idx[rank * local_batch: (rank + 1) * local_batch]
                x = (acts[idx] * state.scale).to(device)  # (N, d_in)
                t0 = time.perf_counter()
                for group in opt.param_groups:
                    group["lr"] = lr_at(state.step, total_steps, cfg.peak_lr, cfg.warmup_frac,
                                        cfg.decay_frac)
                code = encode(x, cfg.train_k)
                if cfg.objective == "hierarchical":
                    main = loss_mod.hierarchical_topk_loss(
                        x, code.values, code.indices, sae.W_dec, sae.b_dec, budgets,
                        weights=balance.weights(x, code, sae))
                else:
                    main = loss_mod.topk_loss(x, code.values, code.indices, sae.W_dec, sae.b_dec)
                aux_loss = aux.loss(sae, x, code)
                total = main + aux_loss if aux_loss is not None else main
                opt.zero_grad(set_to_none=True)
                total.backward()
                if world > 1:
                    for p in sae.parameters():
                        assert p.grad is not None
                        dist.all_reduce(p.grad)
                        p.grad.div_(world)
                project_decoder_grad(sae)
                opt.step()
                renorm_decoder(sae)
                aux.update(code.indices, cfg.batch_tokens)
                loss_value = total.detach()
                if world > 1:
                    dist.all_reduce(loss_value)
                    loss_value /= world
                sae_s += time.perf_counter() - t0
                state.step += 1
                state.tokens += cfg.batch_tokens
                state.batch = j + 1
                result.losses.append(float(loss_value))
                main_losses.append(float(main.detach()))
                progress.update(state, float(loss_value), sae, x, code, aux, timer.lm_s, sae_s)
                if ckpt is not None and state.step % cfg.checkpoint_every == 0:
                    save_checkpoint(ckpt, cfg, sae, opt, aux, state, rank)
                last = state.step >= total_steps or bool(
                    cfg.max_steps and state.step >= cfg.max_steps)
                if validator is not None and validator.due(state.step, last):
                    recent = main_losses[-validator.every:]  # the objective, without AuxK
                    validator.check(sae, state.step, sum(recent) / len(recent))
                    if validator.should_stop:
                        logger.info("validation loss has not improved for %d evaluations: "
                                    "stopping at step %d", validator.patience, state.step)
                        last = True
                if last:
                    done = True
                    break
            if done:
                break
            state.batch = 0
        if not any_block:
            raise DataError(f"no usable text in {cfg.data}",
                            hint=f"need at least {cfg.context} tokens of text")
        if not done:
            state.epoch += 1
            state.block = 0
            state.batch = 0
            state.epoch_started = False
            if state.step == 0:
                raise DataError(f"{cfg.data} has fewer tokens than one batch ({cfg.batch_tokens})",
                                hint="use more text or a smaller --batch-tokens")
            logger.info("epoch %d done; starting another pass over the data", state.epoch)
    progress.close()
    if ckpt is not None:
        save_checkpoint(ckpt, cfg, sae, opt, aux, state, rank)
    if validator is not None:
        validator.restore_best(sae)
        result.validation = validator.history
        result.best_step = validator.best_step
    out = finalize(sae, state.scale or 1.0, cfg, state, validator)
    if rank == 0:
        out.save(cfg.out)
        logger.info("wrote %s (%d steps, %d tokens)", cfg.out, state.step, state.tokens)
    result.sae, result.steps, result.tokens = out, state.step, state.tokens
    result.lm_seconds, result.sae_seconds = timer.lm_s, sae_s
    result.wall_seconds = time.perf_counter() - t_start
    return result


# ---------------------------------------------------------------------------- helpers

def _mix(seed: int, epoch: int, block: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + block) % (2**63 - 1)


def _scale_for(acts: Tensor, d_in: int) -> float:
    """``s`` with E‖s·x‖² = d_in, from the first block."""
    if len(acts) == 0:
        raise DataError("the first block of activations is empty")
    mean_sq = acts.double().pow(2).sum(-1).mean().item()
    return math.sqrt(d_in / mean_sq) if mean_sq > 0 else 1.0


@torch.no_grad()
def _init_b_dec(sae: SAE, x: Tensor, how: str) -> None:
    match how:
        case "mean":
            sae.b_dec.copy_(x.mean(0))
        case "median":
            sae.b_dec.copy_(geometric_median(x))
        case "zero":
            sae.b_dec.zero_()
        case other:
            raise ValueError(f"unknown b_dec_init {other!r}")


@torch.no_grad()
def finalize(sae: SAE, scale: float, cfg: TrainConfig, state: TrainState,
             validator: Any = None) -> SAE:
    """Copy of ``sae`` with the activation scale folded in (works on raw activations)."""
    val = {}
    if validator is not None and validator.best_step >= 0:
        val = {"val_fraction": cfg.val_fraction if cfg.val_data is None else None,
               "best_step": validator.best_step, "best_val_loss": validator.best_loss}
    config = SAEConfig.from_dict({
        **sae.config.to_dict(),
        "normalization_scale": scale,
        "training": {
            "objective": cfg.objective, "k": cfg.train_k, "tokens": state.tokens,
            "steps": state.step, "batch_tokens": cfg.batch_tokens, "lr": cfg.peak_lr,
            "context": cfg.context, "data": str(cfg.data), "seed": cfg.seed,
            "aux_alpha": cfg.aux_alpha, "b_dec_init": cfg.b_dec_init,
            "prefix_balance": cfg.prefix_balance, **val,
        },
    })
    out = SAE(config, device="meta")
    out.W_enc = torch.nn.Parameter(sae.W_enc.detach().clone().cpu(), requires_grad=False)
    out.b_enc = torch.nn.Parameter((sae.b_enc.detach() / scale).cpu(), requires_grad=False)
    out.W_dec = torch.nn.Parameter(sae.W_dec.detach().clone().cpu(), requires_grad=False)
    out.b_dec = torch.nn.Parameter((sae.b_dec.detach() / scale).cpu(), requires_grad=False)
    return out


def _cache_matches(key: dict[str, Any], cfg: TrainConfig, train_data: str) -> bool:
    from hsae_runtime.training.buffer import data_identity

    data, stamp = data_identity(train_data)
    return (key.get("lm") == cfg.lm and key.get("hookpoint") == cfg.hookpoint
            and key.get("data") == data and key.get("data_stamp") == stamp
            and key.get("context") == cfg.context
            and key.get("block_contexts") == cfg.block_contexts
            and key.get("include_special") == cfg.include_special)


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    import json

    from hsae_runtime.training.buffer import MANIFEST

    path = folder / MANIFEST
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
