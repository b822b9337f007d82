"""Long requests in chunks: the progress of one job that runs a piece at a time.

A job longer than ``max_chunk_tokens`` (LM tokens, activation or code rows) is not run at once:
the batcher runs one chunk of it, then other queued work, then the next chunk, so a short
request waits for at most one chunk. :class:`ChunkedJob` holds what carries over between
chunks: how far the job got, the LM's KV cache of the positions already run
(:class:`~hsae_runtime.lm.PrefixCache`, so each chunk's activations equal those of one forward
over the whole sequence), and the results of the chunks done. Rows are encoded (and codes
decoded) independently, so joining the chunks' results gives the result of the whole request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hsae_runtime.lm import PrefixCache
from hsae_runtime.serving.jobs import Job


@dataclass
class ChunkedJob:
    """A job being run ``size`` tokens (or rows) at a time."""

    job: Job[Any]
    size: int
    """Tokens (LM input) or rows (activations, codes) per chunk."""
    done: int = 0
    """Tokens or rows already run."""
    cache: PrefixCache = field(default_factory=PrefixCache)
    """The LM's KV cache of the first ``done`` tokens (unused for rows)."""
    parts: list[Any] = field(default_factory=list)
    """The results of the chunks done that had rows to compute, in order."""

    def next_span(self) -> tuple[int, int]:
        """``(start, end)`` of the next chunk in the job's tokens or rows."""
        return self.done, min(self.done + self.size, self.job.cost)

    @property
    def finished(self) -> bool:
        return self.done >= self.job.cost

    def result(self, d_in: int) -> Any:
        """The chunks' results joined: the job's whole result (:meth:`Job.join`)."""
        return self.job.join(self.parts, d_in)
