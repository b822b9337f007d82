"""Long requests in chunks: the progress of one job that runs a piece at a time.

A job longer than ``max_chunk_tokens`` (LM tokens, or activation rows) is not run in one go:
the batcher runs one chunk of it, then other queued work, then the next chunk, so a short
request waits for at most one chunk. :class:`ChunkedJob` holds what carries over between
chunks: how far the job got, the LM's KV cache of the positions already run
(:class:`~hsae_runtime.lm.PrefixCache`, so each chunk's activations equal those of one forward
over the whole sequence), and the outputs of the chunks done. Rows are encoded independently,
so joining the chunks' codes gives the code of the whole request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from hsae_runtime.lm import PrefixCache
from hsae_runtime.serving.convert import EncodeOutput

if TYPE_CHECKING:
    from hsae_runtime.serving.batcher import Job


@dataclass
class ChunkedJob:
    """A job being run ``size`` tokens (or rows) at a time."""

    job: Job
    size: int
    """Tokens (LM input) or rows (activations) per chunk."""
    done: int = 0
    """Tokens or rows already run."""
    cache: PrefixCache = field(default_factory=PrefixCache)
    """The LM's KV cache of the first ``done`` tokens (unused for activation rows)."""
    parts: list[EncodeOutput] = field(default_factory=list)
    """The outputs of the chunks done that had rows to encode, in order."""

    def next_span(self) -> tuple[int, int]:
        """``(start, end)`` of the next chunk in the job's tokens or rows."""
        return self.done, min(self.done + self.size, self.job.cost)

    @property
    def finished(self) -> bool:
        return self.done >= self.job.cost

    def result(self, d_in: int) -> EncodeOutput:
        """The chunks' outputs joined along the rows: the job's whole output."""
        job = self.job
        if len(self.parts) == 1:
            return self.parts[0]
        if not self.parts:  # no chunk kept a row (e.g. only special tokens)
            n_budgets = len(job.budgets)
            return EncodeOutput(
                values=np.zeros((0, job.k), np.float32),
                indices=np.zeros((0, job.k), np.int32),
                reconstructions=torch.zeros(n_budgets, 0, d_in) if job.reconstructions else None,
                fvu=torch.zeros(n_budgets, 0) if job.fvu else None,
            )
        out = EncodeOutput(
            values=np.concatenate([np.asarray(p.values) for p in self.parts]),  # (N, k)
            indices=np.concatenate([np.asarray(p.indices) for p in self.parts]),  # (N, k)
        )
        recons = [p.reconstructions for p in self.parts if p.reconstructions is not None]
        if recons:
            out.reconstructions = torch.cat(recons, dim=1)  # (n_budgets, N, d_in)
        fvus = [p.fvu for p in self.parts if p.fvu is not None]
        if fvus:
            out.fvu = torch.cat(fvus, dim=1)  # (n_budgets, N)
        return out
