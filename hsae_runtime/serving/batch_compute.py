"""How the batcher's worker runs one batch on the models: one LM forward for all token jobs,
one top-k for all encode jobs at the batch's largest budget (each job slices its own prefix),
then per-job reconstructions / FVU; each decode job runs on its own.

:class:`BatchCompute` is the model half of :class:`~hsae_runtime.serving.batcher.Batcher`
(which inherits it): the queue, batching and chunking stay there, the math is here.
:class:`BatcherStats` counts what ran, so tests can see coalescing happen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from hsae_runtime.lm import PrefixCache
from hsae_runtime.sae import SparseCode, per_token_fvu
from hsae_runtime.serving.backend import Backend
from hsae_runtime.serving.jobs import DecodeJob, EncodeJob, EncodeOutput, HostArray, Job, as_tensor


@dataclass
class BatcherStats:
    """Counters (read them under no lock: they only grow and are for tests and logs)."""

    requests: int = 0
    batches: int = 0
    lm_forwards: int = 0
    encodes: int = 0
    rows: int = 0
    dropped: int = 0
    chunks: int = 0
    """Chunks of long jobs run (each one LM forward, or one slice of activation / code rows)."""
    decodes: int = 0
    """Prefix reconstructions run for decode jobs (one per job or chunk)."""


class Capture(Protocol):
    """The LM up to the hookpoint: ``token_ids [B, T]``, ``attention_mask [B, T]`` ->
    ``[B, T, d_in]`` (:func:`hsae_runtime.lm.capture`). With ``cache`` the call is the next
    chunk of sequences whose earlier chunks ran with the same cache."""

    def __call__(
        self, token_ids: Tensor, attention_mask: Tensor, cache: PrefixCache | None = None, /
    ) -> Tensor: ...


class BatchCompute:
    """Runs a batch of jobs on the models; the attributes below are set by the batcher."""

    backend: Backend
    capture: Capture | None
    pad_id: int
    stats: BatcherStats
    _center: Tensor
    _lm_seconds: float  # LM time of the batch being computed (for metrics)
    _lm_tokens: int

    def _compute(self, jobs: list[Job[Any]]) -> list[Any]:
        """Each job's result: all encode jobs in one encode, each decode job on its own."""
        encodes = [job for job in jobs if isinstance(job, EncodeJob)]
        results: dict[int, Any] = dict(zip(map(id, encodes), self._encode(encodes)))
        for job in jobs:
            if isinstance(job, DecodeJob):
                results[id(job)] = self._decode(job.code, job.budgets)
            elif not isinstance(job, EncodeJob):
                raise TypeError(f"the batcher cannot run a {type(job).__name__}")
        return [results[id(job)] for job in jobs]

    def _decode(self, code: SparseCode, budgets: list[int]) -> Tensor:
        """``code [N, k]`` -> ``[n_budgets, N, d_in]`` float32 on the CPU."""
        self.stats.decodes += 1
        return self.backend.reconstruct_from_code(code, budgets).cpu()

    def _encode(self, jobs: list[EncodeJob]) -> list[EncodeOutput]:
        """One LM forward (if any job has tokens) and one top-k for all ``jobs``."""
        if not jobs:
            return []
        x, sizes = self._rows(jobs)  # (N, d_in) on the backend's device; rows per job
        k = max(job.k for job in jobs)
        code = self.backend.encode(x, k)  # (N, k): one top-k for the whole batch
        self.stats.batches += 1
        self.stats.encodes += 1
        self.stats.rows += x.shape[0]
        # One host copy for the batch; each job gets numpy views (no torch call per job, see
        # the GIL note in jobs).
        values = code.values.float().cpu().numpy()  # (N, k) float32
        indices = code.indices.to(torch.int32).cpu().numpy()  # (N, k) int32
        outputs = []
        start = 0
        for job, n in zip(jobs, sizes):
            rows = slice(start, start + n)
            start += n
            out = EncodeOutput(values=values[rows, : job.k], indices=indices[rows, : job.k])
            if job.reconstructions or job.fvu:
                sub = SparseCode(code.values[rows, : job.k], code.indices[rows, : job.k])
                recon = self.backend.reconstruct_from_code(sub, job.budgets)  # (n_budgets, n, d_in)
                if job.reconstructions:
                    out.reconstructions = recon.cpu()
                if job.fvu:
                    center = self._center.to(recon.device)
                    xj = x[rows].float().to(recon.device)
                    out.fvu = per_token_fvu(xj, recon, center).cpu()
            outputs.append(out)
        return outputs

    def _rows(self, jobs: list[EncodeJob]) -> tuple[Tensor, list[int]]:
        """All jobs' rows as one ``[N, d_in]`` tensor in the backend's device and dtype."""
        lm_inputs = [job.lm_input for job in jobs if job.lm_input is not None]
        acts: dict[int, Tensor] = {}
        if lm_inputs:
            assert self.capture is not None, "LM job on a server without an LM"
            lengths = [int(lm.token_ids.shape[0]) for lm in lm_inputs]
            ids = torch.full((len(lengths), max(lengths)), self.pad_id, dtype=torch.long)  # (B, T)
            mask = torch.zeros_like(ids)
            for i, lm in enumerate(lm_inputs):
                ids[i, : lengths[i]] = lm.token_ids
                mask[i, : lengths[i]] = 1
            lm_start = time.perf_counter()
            hidden = self.capture(ids, mask)  # (B, T, d_in), right padding leaves rows intact
            self._lm_seconds += time.perf_counter() - lm_start
            self._lm_tokens += int(mask.sum())
            self.stats.lm_forwards += 1
            for i, lm in enumerate(lm_inputs):
                acts[id(lm)] = hidden[i, : lengths[i]][lm.keep.to(hidden.device)]
        parts: list[HostArray] = []
        for job in jobs:
            if job.lm_input is not None:
                parts.append(acts[id(job.lm_input)])
            else:
                assert job.activations is not None
                parts.append(job.activations)
        sizes = [int(p.shape[0]) for p in parts]
        if all(isinstance(p, np.ndarray) for p in parts) and len({p.dtype for p in parts}) == 1:
            x = as_tensor(np.concatenate(parts) if len(parts) > 1 else parts[0])  # (N, d_in)
        else:
            dtype = self.backend.dtype
            tensors = [as_tensor(p).to(self.backend.device, dtype) for p in parts]
            x = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
        return x.to(self.backend.device, self.backend.dtype), sizes
