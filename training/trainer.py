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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from hsae_runtime import loss as loss_mod
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
from hsae_runtime.training.distributed import init_distributed, rank_world
from hsae_runtime.training.optim import (
    AuxK,
    PrefixBalance,
    geometric_median,
    lr_at,
    project_decoder_grad,
    renorm_decoder,
)
from hsae_runtime.training.validation import Validator

if TYPE_CHECKING:
    from hsae_runtime.training.data_source import TrainingData

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


def train(cfg: TrainConfig) -> TrainResult:
    """Train an SAE as configured, write it to ``cfg.out`` (rank 0) and return it.

    The steps, in order: join the process group and pick the device (:func:`_environment`),
    open the activations (:func:`~hsae_runtime.training.data_source.open_training_data`),
    build the SAE and its optimiser (:func:`_build_model`), continue from a checkpoint
    (:func:`_resume`), run the passes over the data (:class:`_Loop`), and fold the scale in and
    write the model (:func:`_finish`).
    """
    from hsae_runtime.training.data_source import open_training_data

    env = _environment(cfg)
    data = open_training_data(cfg, rank=env.rank, world=env.world, device=env.device)
    model = _build_model(cfg, data.d_in, env.device)
    state = _resume(cfg, model, env.device)
    loop = _Loop(cfg, env, data, model, state)
    loop.run()
    return _finish(cfg, env, model, loop)


@dataclass(frozen=True)
class _Env:
    """This process's place in the run."""

    rank: int
    world: int
    device: torch.device


def _environment(cfg: TrainConfig) -> _Env:
    """Join torchrun's group (if launched so), check the batch splits over the ranks, make the
    output folder (rank 0) and resolve the device (each rank's own GPU under DDP)."""
    from hsae_runtime.lm import resolve_device

    init_distributed(cfg.device)
    rank, world = rank_world()
    if cfg.batch_tokens % world:
        raise ConfigError(
            f"batch_tokens ({cfg.batch_tokens}) must divide evenly over {world} ranks"
        )
    if rank == 0:
        Path(cfg.out).expanduser().parent.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    return _Env(rank, world, device)


@dataclass
class _Model:
    """The SAE being trained, its optimiser and its dead-latent tracker."""

    sae: SAE
    opt: torch.optim.Optimizer
    aux: AuxK
    total_steps: int
    checkpoint: Path | None
    """Where checkpoints go (``None``: no checkpoints)."""


def _build_model(cfg: TrainConfig, d_in: int, device: torch.device) -> _Model:
    """A freshly initialised SAE (seeded by ``cfg.seed``) with Adam and AuxK."""
    sae_config = SAEConfig(
        d_in=d_in, d_sae=cfg.d_sae, k_max=cfg.k_max,
        budgets=(cfg.budgets if cfg.objective == "hierarchical" else (cfg.train_k,)),
        model_name=portable_lm_name(cfg.lm), hookpoint=cfg.hookpoint,
    )  # fmt: skip
    sae = SAE(sae_config, device=device)
    sae.reset_parameters(generator=torch.Generator().manual_seed(cfg.seed))
    sae.to(device)
    fused = device.type == "cuda"
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.peak_lr, betas=(0.9, 0.999), eps=1e-8,
                           **({"fused": True} if fused else {"foreach": True}))  # fmt: skip
    aux = AuxK(cfg.d_sae, cfg.dead_tokens, cfg.aux_alpha, device=device)
    ckpt = Path(cfg.checkpoint_dir) / CHECKPOINT_NAME if cfg.checkpoint_dir else None
    return _Model(sae, opt, aux, max(1, cfg.tokens // cfg.batch_tokens), ckpt)


def _resume(cfg: TrainConfig, model: _Model, device: torch.device) -> TrainState:
    """The state to start from: the checkpoint's with ``cfg.resume`` (loading the SAE, Adam and
    AuxK in place), else step 0."""
    if not cfg.resume:
        return TrainState()
    if model.checkpoint is None:
        raise ConfigError("resume needs a checkpoint_dir", hint="pass --checkpoint-dir")
    if not model.checkpoint.is_file():
        logger.warning("no checkpoint in %s; starting from scratch", cfg.checkpoint_dir)
        return TrainState()
    state = load_checkpoint(model.checkpoint, cfg, model.sae, model.opt, model.aux, device)
    logger.info("resumed at step %d (%d tokens)", state.step, state.tokens)
    return state


class _Loop:
    """Passes over the data until the token budget, ``max_steps`` or early stopping ends the run.

    Each pass walks the source's blocks from where ``state`` says (block, then batch within
    it), shuffles each block by ``(seed, epoch, block)``, and runs one optimiser step per
    global batch (:meth:`_step`), this rank taking its slice.
    """

    def __init__(
        self, cfg: TrainConfig, env: _Env, data: TrainingData, model: _Model, state: TrainState
    ) -> None:
        self.cfg, self.env, self.data, self.model, self.state = cfg, env, data, model, state
        self.budgets = list(model.sae.config.trained_budgets)
        weight = cfg.prefix_balance if cfg.objective == "hierarchical" else 0.0
        self.balance = PrefixBalance(cfg.k_max, self.budgets, weight)
        self.validator: Validator | None = None
        self.main_losses: list[float] = []  # the objective without AuxK, for validation
        self.progress = Progress(cfg, env.rank, model.total_steps, state)
        self.result = TrainResult(sae=model.sae, steps=state.step, tokens=state.tokens)
        self.sae_seconds = 0.0
        self.t_start = time.perf_counter()

    def run(self) -> None:
        state, cfg = self.state, self.cfg
        done = state.step >= self.model.total_steps
        while not done:
            done = self._one_pass()
            if not done:
                state.epoch += 1
                state.block = 0
                state.batch = 0
                state.epoch_started = False
                if state.step == 0:
                    raise DataError(
                        f"{cfg.data} has fewer tokens than one batch ({cfg.batch_tokens})",
                        hint="use more text or a smaller --batch-tokens",
                    )
                logger.info("epoch %d done; starting another pass over the data", state.epoch)
        self.progress.close()

    def _one_pass(self) -> bool:
        """The rest of the current pass; True once the run is over."""
        state, cfg = self.state, self.cfg
        any_block = False
        first = state.block if state.epoch_started else 0
        for block_index, acts in self.data.source.blocks(first):
            any_block = True
            state.epoch_started = True
            state.block = block_index
            self._first_block_setup(acts)
            n_batches = len(acts) // cfg.batch_tokens
            if n_batches == 0:
                continue
            seed = _mix(cfg.seed, state.epoch, block_index)
            perm = torch.randperm(len(acts), generator=torch.Generator().manual_seed(seed))
            for j in range(state.batch, n_batches):
                if self._step(acts, perm[j * cfg.batch_tokens : (j + 1) * cfg.batch_tokens], j):
                    return True
            state.batch = 0
        if not any_block:
            raise DataError(
                f"no usable text in {cfg.data}", hint=f"need at least {cfg.context} tokens of text"
            )
        return False

    def _first_block_setup(self, acts: Tensor) -> None:
        """From the first block seen: the activation scale, ``b_dec``'s start, the validator."""
        state, cfg = self.state, self.cfg
        if state.scale is None:
            state.scale = _scale_for(acts, self.data.d_in)
            if state.step == 0:
                _init_b_dec(self.model.sae, acts[: cfg.batch_tokens] * state.scale, cfg.b_dec_init)
        if self.validator is None and self.data.val_acts is not None:
            self.validator = Validator(
                (self.data.val_acts * state.scale).to(self.env.device), cfg.objective,
                cfg.train_k, self.budgets,
                every=cfg.val_every or max(1, self.model.total_steps // 20),
                patience=cfg.patience,
            )  # fmt: skip

    def _step(self, acts: Tensor, batch: Tensor, j: int) -> bool:
        """One optimiser step on the global batch ``acts[batch]`` (this rank's slice of it,
        batch ``j`` of the block); True once the run is over."""
        cfg, state, env, m = self.cfg, self.state, self.env, self.model
        assert state.scale is not None
        local = cfg.batch_tokens // env.world
        idx = batch[env.rank * local : (env.rank + 1) * local]
        x = (acts[idx] * state.scale).to(env.device)  # (N, d_in)
        t0 = time.perf_counter()
        for group in m.opt.param_groups:
            group["lr"] = lr_at(
                state.step, m.total_steps, cfg.peak_lr, cfg.warmup_frac, cfg.decay_frac
            )
        code = m.sae.encode_for_training(x, cfg.train_k)
        if cfg.objective == "hierarchical":
            main = loss_mod.hierarchical_topk_loss(
                x, code.values, code.indices, m.sae.W_dec, m.sae.b_dec, self.budgets,
                weights=self.balance.weights(x, code, m.sae),
            )  # fmt: skip
        else:
            main = loss_mod.topk_loss(x, code.values, code.indices, m.sae.W_dec, m.sae.b_dec)
        aux_loss = m.aux.loss(m.sae, x, code)
        total = main + aux_loss if aux_loss is not None else main
        m.opt.zero_grad(set_to_none=True)
        total.backward()
        if env.world > 1:
            for p in m.sae.parameters():
                assert p.grad is not None
                dist.all_reduce(p.grad)
                p.grad.div_(env.world)
        project_decoder_grad(m.sae)
        m.opt.step()
        renorm_decoder(m.sae)
        m.aux.update(code.indices, cfg.batch_tokens)
        loss_value = total.detach()
        if env.world > 1:
            dist.all_reduce(loss_value)
            loss_value /= env.world
        self.sae_seconds += time.perf_counter() - t0
        state.step += 1
        state.tokens += cfg.batch_tokens
        state.batch = j + 1
        self.result.losses.append(float(loss_value))
        self.main_losses.append(float(main.detach()))
        self.progress.update(
            state, float(loss_value), m.sae, x, code, m.aux, self.data.timer.lm_s, self.sae_seconds
        )
        if m.checkpoint is not None and state.step % cfg.checkpoint_every == 0:
            save_checkpoint(m.checkpoint, cfg, m.sae, m.opt, m.aux, state, env.rank)
        return self._validate_and_check_end()

    def _validate_and_check_end(self) -> bool:
        """Whether the run ends after this step (budget, ``max_steps`` or early stopping);
        validates when due."""
        state, cfg, validator = self.state, self.cfg, self.validator
        last = state.step >= self.model.total_steps or bool(
            cfg.max_steps and state.step >= cfg.max_steps
        )
        if validator is not None and validator.due(state.step, last):
            recent = self.main_losses[-validator.every :]
            validator.check(self.model.sae, state.step, sum(recent) / len(recent))
            if validator.should_stop:
                logger.info(
                    "validation loss has not improved for %d evaluations: stopping at step %d",
                    validator.patience, state.step,
                )  # fmt: skip
                last = True
        return last


def _finish(cfg: TrainConfig, env: _Env, model: _Model, loop: _Loop) -> TrainResult:
    """Last checkpoint, the best validated weights, the scale folded in, the file written."""
    state, validator, result = loop.state, loop.validator, loop.result
    if model.checkpoint is not None:
        save_checkpoint(model.checkpoint, cfg, model.sae, model.opt, model.aux, state, env.rank)
    if validator is not None:
        validator.restore_best(model.sae)
        result.validation = validator.history
        result.best_step = validator.best_step
    out = finalize(model.sae, state.scale or 1.0, cfg, state, validator)
    if env.rank == 0:
        out.save(cfg.out)
        logger.info("wrote %s (%d steps, %d tokens)", cfg.out, state.step, state.tokens)
    result.sae, result.steps, result.tokens = out, state.step, state.tokens
    result.lm_seconds, result.sae_seconds = loop.data.timer.lm_s, loop.sae_seconds
    result.wall_seconds = time.perf_counter() - loop.t_start
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
