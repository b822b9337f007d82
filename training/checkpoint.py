"""Training state, atomic checkpoints with exact resume, and the progress bar.

A checkpoint holds the SAE in training units, the Adam state, the dead-latent counters and the
data position ``(epoch, block, batch)`` plus the activation scale, so a resumed run takes the
same next step as an uninterrupted one. It is written to a temp file and renamed into place.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hsae_runtime.errors import ConfigError
from hsae_runtime.sae import SAE

if TYPE_CHECKING:
    from hsae_runtime.training.config import TrainConfig

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainState:
    """Where a run is: steps and tokens done, data position, activation scale."""

    step: int = 0
    tokens: int = 0
    epoch: int = 0
    block: int = 0
    batch: int = 0
    epoch_started: bool = False
    scale: float | None = None


_RESUME_KEYS = ("lm", "hookpoint", "data", "d_sae", "k_max", "objective", "k", "budgets",
                "tokens", "batch_tokens", "lr", "context", "block_contexts", "seed")


def save_checkpoint(path: Path, cfg: TrainConfig, sae: SAE, opt: torch.optim.Optimizer,
                     aux: Any, state: TrainState, rank: int) -> None:
    if rank != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": asdict(cfg),
        "sae": {k: v.detach().cpu() for k, v in sae.state_dict().items()},
        "optimizer": opt.state_dict(),
        "since_fired": aux.since_fired.cpu(),
        "state": asdict(state),
    }
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, cfg: TrainConfig, sae: SAE, opt: torch.optim.Optimizer,
                     aux: Any, device: torch.device) -> TrainState:
    payload = torch.load(path, map_location="cpu", weights_only=False)
    saved = payload["config"]
    changed = [k for k in _RESUME_KEYS
               if (tuple(saved[k]) if isinstance(saved[k], list) else saved[k]) != getattr(cfg, k)]
    if changed:
        raise ConfigError(f"cannot resume: settings differ from the checkpoint: {changed}",
                          hint="resume with the same flags, or use a new --checkpoint-dir")
    sae.load_state_dict(payload["sae"])
    opt.load_state_dict(payload["optimizer"])
    aux.since_fired.copy_(payload["since_fired"].to(device))
    return TrainState(**payload["state"])


class Progress:
    """tqdm bar on rank 0: tokens, tok/s, loss, FVU at a few budgets, dead %."""

    def __init__(self, cfg: TrainConfig, rank: int, total_steps: int, state: TrainState) -> None:
        self.cfg = cfg
        self.bar = None
        if rank == 0 and cfg.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps * cfg.batch_tokens, initial=state.tokens,
                            unit="tok", unit_scale=True, dynamic_ncols=True, desc="train")
        k = cfg.train_k
        self.budgets = sorted({b for b in (1, k // 8, k // 2, k) if b >= 1})
        self.last = state.tokens

    def update(self, state: TrainState, loss: float, sae: SAE, x: Tensor, code: Any, aux: Any,
               lm_s: float, sae_s: float) -> None:
        if self.bar is None:
            return
        self.bar.update(state.tokens - self.last)
        self.last = state.tokens
        if state.step % self.cfg.log_every:
            return
        from hsae_runtime.sae import SparseCode, fvu

        with torch.no_grad():
            rec = sae.reconstruct_from_code(SparseCode(code.values.detach(),
                                                       code.indices), self.budgets)
            fvus = fvu(x, rec).tolist()
        post = {"loss": f"{loss:.4g}"}
        post.update({f"fvu@{b}": f"{f:.3f}" for b, f in zip(self.budgets, fvus)})
        post["dead"] = f"{100 * aux.dead_fraction():.1f}%"
        post["lm/sae"] = f"{lm_s:.0f}s/{sae_s:.0f}s"
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
