"""The work a request hands the batcher, and what it gets back (no protobuf, no grpc).

Every model call of the server is a :class:`Job` run by the batcher's one worker thread. A job
carries what all kinds share - a deadline, a cancellation flag, the client's liveness and the
future of its result - and its size (:attr:`Job.cost`, tokens or rows), by which the worker
batches and chunks it. The kinds:

* :class:`EncodeJob` - tokens for the LM (:class:`LMInput`) or activation rows -> an
  :class:`EncodeOutput` (code, and reconstructions / FVU when asked);
* :class:`DecodeJob` - a code -> reconstructions ``[n_budgets, N, d_in]``.

A new kind (e.g. generation) subclasses :class:`Job`, says how its chunk results join
(:meth:`Job.join`), and gets one case in the batcher's ``_compute`` and ``_compute_chunk``.

Host arrays are numpy wherever numpy has the dtype and torch only for bfloat16: request threads
touch numpy only, because each torch call releases and re-takes the GIL, which a few dozen gRPC
threads contend for (numbers in ``docs/serving.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np
import torch
from torch import Tensor

from hsae_runtime.sae import SparseCode

HostArray = np.ndarray | Tensor
"""A CPU array: numpy (float32 / float16 / int32) or a tensor (bfloat16, or the LM's rows)."""

R = TypeVar("R")


def as_tensor(a: HostArray) -> Tensor:
    """A host array as a tensor, sharing memory."""
    return torch.from_numpy(a) if isinstance(a, np.ndarray) else a


def _always_active() -> bool:
    return True


@dataclass
class EncodeOutput:
    """What the batcher computed for one encode job (CPU arrays)."""

    values: HostArray
    """``[N, k]`` sorted descending (numpy float32 from the batcher)."""
    indices: HostArray
    """``[N, k]`` latent ids (numpy int32 from the batcher)."""
    reconstructions: Tensor | None = None
    """``[n_budgets, N, d_in]`` in request order."""
    fvu: Tensor | None = None
    """``[n_budgets, N]`` per-token FVU."""
    token_ids: list[int] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)


@dataclass(kw_only=True)
class Job(Generic[R]):
    """One request's work for the batcher's worker; ``future`` gets its result ``R``."""

    deadline: float | None = None
    """``time.monotonic()`` after which the result is useless."""
    is_active: Callable[[], bool] = _always_active
    """False once the client has gone (the gRPC context's ``is_active``)."""
    future: Future[R] = field(default_factory=Future)
    enqueued: float = 0.0
    """``time.monotonic()`` when it was queued."""
    cancelled: bool = False

    @property
    def cost(self) -> int:
        """Tokens or rows: what batching counts and chunking splits."""
        raise NotImplementedError

    def join(self, parts: Sequence[R], d_in: int) -> R:
        """The results of the job's chunks, in order, as the result of the whole job."""
        raise NotImplementedError

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class LMInput:
    """A token sequence for the LM and which of its positions to encode."""

    token_ids: Tensor
    """``[T]`` int64."""
    keep: Tensor
    """``[T]`` bool: positions whose activations are encoded."""


@dataclass
class EncodeJob(Job[EncodeOutput]):
    """Encode tokens or activations. Exactly one of ``lm_input`` / ``activations`` is set."""

    budgets: list[int]
    """Validated budgets in request order; the code is returned at their maximum."""
    reconstructions: bool = False
    fvu: bool = False
    activations: HostArray | None = None
    """``[N, d_in]`` rows (raw-activation requests): numpy or a CPU tensor."""
    lm_input: LMInput | None = None

    @property
    def k(self) -> int:
        return max(self.budgets)

    @property
    def cost(self) -> int:
        if self.lm_input is not None:
            return int(self.lm_input.token_ids.shape[0])
        assert self.activations is not None
        return int(self.activations.shape[0])

    def join(self, parts: Sequence[EncodeOutput], d_in: int) -> EncodeOutput:
        """The chunks' outputs joined along the rows (chunks that kept no row are left out)."""
        if len(parts) == 1:
            return parts[0]
        if not parts:  # no chunk kept a row (e.g. only special tokens)
            n_budgets = len(self.budgets)
            return EncodeOutput(
                values=np.zeros((0, self.k), np.float32),
                indices=np.zeros((0, self.k), np.int32),
                reconstructions=torch.zeros(n_budgets, 0, d_in) if self.reconstructions else None,
                fvu=torch.zeros(n_budgets, 0) if self.fvu else None,
            )
        out = EncodeOutput(
            values=np.concatenate([np.asarray(p.values) for p in parts]),  # (N, k)
            indices=np.concatenate([np.asarray(p.indices) for p in parts]),  # (N, k)
        )
        recons = [p.reconstructions for p in parts if p.reconstructions is not None]
        if recons:
            out.reconstructions = torch.cat(recons, dim=1)  # (n_budgets, N, d_in)
        fvus = [p.fvu for p in parts if p.fvu is not None]
        if fvus:
            out.fvu = torch.cat(fvus, dim=1)  # (n_budgets, N)
        return out


@dataclass
class DecodeJob(Job[Tensor]):
    """Reconstruct a code at several budgets -> ``[n_budgets, N, d_in]`` float32 (CPU)."""

    code: SparseCode
    """Validated ``values [N, k]`` float32 and ``indices [N, k]`` int64 (-1 = skip), CPU."""
    budgets: list[int]
    """Validated budgets (each at most ``k``), in request order."""

    @property
    def cost(self) -> int:
        return int(self.code.values.shape[0])

    def rows(self, start: int, end: int) -> SparseCode:
        """The code's rows ``start:end``."""
        return SparseCode(self.code.values[start:end], self.code.indices[start:end])

    def join(self, parts: Sequence[Tensor], d_in: int) -> Tensor:
        return parts[0] if len(parts) == 1 else torch.cat(list(parts), dim=1)
