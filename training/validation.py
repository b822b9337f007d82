"""Validation during training: a held-out document split, its activations, early stopping.

Every choice a training run makes from data (which checkpoint to keep, when to stop) is made on
validation documents that the SAE never trains on; a separate eval text is only ever reported.

* :func:`split_data` holds out ``val_fraction`` of a local text file's documents (whole
  documents, by a seeded shuffle) and writes the two parts once into a cache folder keyed on
  the file's identity, the fraction and the seed, so the activation cache of the train part
  stays valid across runs.
* :class:`Validator` measures the training objective on the validation activations every
  ``val_every`` steps (in the same scaled units as the training loss), keeps the weights of the
  best evaluation and signals a stop once ``patience`` evaluations in a row brought no
  improvement. The trainer writes the best weights, so a run that starts to overfit returns
  the SAE from before it did.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from hsae_runtime.errors import DataError
from hsae_runtime.sae import SAE

logger = logging.getLogger(__name__)

MIN_VAL_DOCUMENTS = 8
"""Fewer documents than this are not split: the run trains on all of them, without validation."""


def split_cache_dir() -> Path:
    """Where split files live: ``$HSAE_CACHE_DIR/splits`` or ``~/.cache/hsae-runtime/splits``."""
    root = os.environ.get("HSAE_CACHE_DIR") or Path.home() / ".cache" / "hsae-runtime"
    return Path(root) / "splits"


def split_data(data: str, val_fraction: float, seed: int) -> tuple[str, str | None]:
    """``(train_data, val_data)`` for a local text file; ``val_data`` is None when not split.

    Sources other than local files (``hf:...``) and files with fewer than
    :data:`MIN_VAL_DOCUMENTS` documents are returned unsplit, with a warning.
    """
    from hsae_runtime.training.buffer import data_identity
    from hsae_runtime.training.data import read_documents, split_documents

    if val_fraction <= 0:
        return data, None
    path = Path(data).expanduser()
    if not path.is_file():
        logger.warning("validation split needs a local text file; %s is trained on whole, "
                       "without validation (pass --val-data FILE)", data)
        return data, None
    name, stamp = data_identity(path)
    key = hashlib.sha1(f"{name}:{stamp}:{val_fraction}:{seed}".encode()).hexdigest()[:12]
    folder = split_cache_dir() / f"{path.stem}-{key}"
    train_path, val_path = folder / "train.txt", folder / "val.txt"
    if train_path.is_file() and val_path.is_file():
        return str(train_path), str(val_path)
    docs = list(read_documents(path))
    if len(docs) < MIN_VAL_DOCUMENTS:
        logger.warning("%s has %d documents (blank-line blocks); fewer than %d are not split, "
                       "so the run has no validation", data, len(docs), MIN_VAL_DOCUMENTS)
        return data, None
    split = split_documents(docs, val_fraction=val_fraction, eval_fraction=0.0, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    for target, part in ((val_path, split.val), (train_path, split.train)):
        tmp = target.with_suffix(f".{os.getpid()}.tmp")  # DDP ranks write the same files at once
        tmp.write_text("\n\n".join(part) + "\n", encoding="utf-8")
        tmp.replace(target)
    logger.info("validation split of %s: %d train / %d validation documents (seed %d) in %s",
                data, len(split.train), len(split.val), seed, folder)
    return str(train_path), str(val_path)


def validation_activations(lm: object, hookpoint: object, val_data: str, *, tokens: int,
                           context: int, lm_batch: int, include_special: bool,
                           cache_dir: str | None) -> Tensor:
    """Up to ``tokens`` hookpoint activations ``[N_val, d_in]`` of ``val_data`` (float32, cpu).

    With ``cache_dir`` (the run's activation cache) they are kept in
    ``<cache_dir>-val/<key>.safetensors``, keyed on what they depend on, and reused.
    """
    from safetensors.torch import load_file, save_file

    from hsae_runtime.training.buffer import LMActivationSource, data_identity

    source = LMActivationSource(lm, hookpoint, val_data, context=context,  # type: ignore[arg-type]
                                block_contexts=max(1, lm_batch), lm_batch=lm_batch,
                                include_special=include_special)
    path = None
    if cache_dir is not None:
        name, stamp = data_identity(val_data)
        key = {**source.key(), "tokens": tokens, "data": name, "data_stamp": stamp}
        digest = hashlib.sha1(repr(sorted(key.items())).encode()).hexdigest()[:16]
        path = Path(str(Path(cache_dir)) + "-val") / f"{digest}.safetensors"
        if path.is_file():
            return load_file(path)["acts"]
    parts, n = [], 0
    for _, acts in source.blocks():
        parts.append(acts[: tokens - n])
        n += len(parts[-1])
        if n >= tokens:
            break
    out = torch.cat(parts) if parts else torch.empty(0)
    if path is not None and len(out):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({"acts": out.contiguous()}, tmp)
        tmp.replace(path)
    return out


def objective_loss(sae: SAE, x: Tensor, objective: str, k: int, budgets: list[int],
                   chunk: int = 4096) -> float:
    """The training objective on ``x [N, d_in]`` (no gradients): what validation compares.

    ``hierarchical``: the mean over ``budgets`` of the prefix MSEs (the paper's loss, equal
    weights); ``topk``: the MSE of the code at ``k``.
    """
    from hsae_runtime.loss import prefix_errors

    sel = torch.tensor([b - 1 for b in budgets]) if objective == "hierarchical" else \
        torch.tensor([k - 1])
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(x), chunk):
            xs = x[start:start + chunk]
            code = sae.encode(xs, k)
            per = prefix_errors(xs, code.values, code.indices, sae.W_dec, sae.b_dec)  # (k,)
            total += float(per.double().cpu()[sel].mean()) * len(xs)
    return total / max(1, len(x))


@dataclass
class Validator:
    """Validation loss every ``every`` steps, the best weights so far, and the stop signal."""

    acts: Tensor
    """``[N_val, d_in]`` validation activations, already scaled like the training batches."""
    objective: str
    k: int
    budgets: list[int]
    every: int
    patience: int
    """Evaluations without improvement before stopping (0: never stop early)."""
    best_loss: float = float("inf")
    best_step: int = -1
    best_state: dict[str, Tensor] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    stale: int = 0

    def __post_init__(self) -> None:
        if len(self.acts) == 0:
            raise DataError("the validation part yielded no activations",
                            hint="use more validation text or a larger --val-fraction")

    def due(self, step: int, last: bool) -> bool:
        return last or step % self.every == 0

    def check(self, sae: SAE, step: int, train_loss: float) -> None:
        """Evaluate at ``step``; remember the weights when they are the best so far."""
        loss = objective_loss(sae, self.acts.to(sae.device), self.objective, self.k,
                              self.budgets)
        self.history.append({"step": step, "train_loss": train_loss, "val_loss": loss})
        if loss < self.best_loss:
            self.best_loss, self.best_step, self.stale = loss, step, 0
            self.best_state = {n: p.detach().clone() for n, p in sae.state_dict().items()}
        else:
            self.stale += 1
        logger.info("step %d: train loss %.5g, validation loss %.5g (best %.5g at step %d)",
                    step, train_loss, loss, self.best_loss, self.best_step)

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.stale >= self.patience

    def restore_best(self, sae: SAE) -> None:
        """Load the best evaluation's weights into ``sae`` (a no-op before any evaluation)."""
        if self.best_state:
            sae.load_state_dict(self.best_state)
