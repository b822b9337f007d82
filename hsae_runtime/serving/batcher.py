"""Dynamic batching: many concurrent requests -> one LM forward and one SAE encode.

Every model call of the server goes through here. Request threads (gRPC's pool) turn a parsed
request into a job (:mod:`~hsae_runtime.serving.jobs`: an ``EncodeJob``, text tokenised on
their own thread, or a ``DecodeJob``) and :meth:`Batcher.submit` it to a bounded queue; a full
queue raises :class:`~hsae_runtime.serving.errors.QueueFullError` (RESOURCE_EXHAUSTED) at once
instead of letting latency grow without bound. One worker thread owns the models:

1. it takes the oldest job, then keeps collecting until the batch holds ``max_batch_tokens``
   (padded LM tokens + other rows) or ``max_wait_ms`` has passed since the worker was free to
   run it (time queued while the previous batch ran does not count) - or, earlier, once the
   batch holds the expected number of jobs, nothing more is queued and no request is being
   parsed (:meth:`Batcher.arriving`). The expectation is the jobs the previous batch answered
   plus those that queued while it ran: clients in a closed loop send again once answered, so
   16 lockstep clients get one 16-job batch per round instead of two alternating half-size
   batches, and a lone client (expectation 1) is never delayed;
2. drops jobs whose client has gone (cancelled) or whose deadline has passed;
3. runs the LM once on the right-padded token batch, stopped at the hookpoint
   (:func:`hsae_runtime.lm.capture`), and keeps each job's wanted rows;
4. encodes all rows of all encode jobs with ONE top-k at the batch's largest budget - codes
   are nested prefixes, so each job slices ``[:, :k]`` for its own budget;
5. computes per-job reconstructions / FVU, decodes each decode job's code, and resolves each
   job's future.

Long jobs run in chunks, interleaved with the rest: a job over ``max_chunk_tokens`` (LM tokens,
activation or code rows) never joins a batch; it waits in a round-robin line of long jobs, and
each turn of the worker runs one batch of whatever short jobs are queued (without waiting for
more) and then one chunk of the next long job (:class:`~hsae_runtime.serving.chunks.ChunkedJob`:
an LM chunk runs on the KV cache of the chunks before it, so its activations are unchanged). A
short request therefore waits for at most one chunk. Cancellation and deadlines are checked
before every chunk; a failing chunk fails only its own job.

Generation (the Generate RPC) takes turns with them: with a
:class:`~hsae_runtime.serving.generate.GenerationScheduler`, each turn of the worker also runs
one generation step (the prompts of newly arrived requests, which then join the running
generation batch, or one token for every running request), so encode traffic waits for at most
one step, and the worker polls instead of blocking while generations are in progress.

If a batch fails, its jobs are retried one by one so one bad job cannot fail its neighbours.
One worker (not a pool) because the models are shared and a single CPU/GPU stream is the
bottleneck anyway; parallelism comes from batching. ``stats`` counts batches, LM forwards and
decodes so tests can see coalescing happen.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from hsae_runtime.serving.backend import Backend
from hsae_runtime.serving.batch_compute import BatchCompute, BatcherStats, Capture
from hsae_runtime.serving.chunks import ChunkedJob
from hsae_runtime.serving.errors import (
    CancelledError,
    DeadlineError,
    NotServedError,
    QueueFullError,
    ShuttingDownError,
)
from hsae_runtime.serving.jobs import DecodeJob, EncodeJob, HostArray, Job, LMInput
from hsae_runtime.serving.limits import BatcherConfig

if TYPE_CHECKING:
    from hsae_runtime.serving.generate import GenerateJob, GenerationScheduler
    from hsae_runtime.serving.metrics import ServerMetrics

log = logging.getLogger(__name__)

_STOP = object()
_WAKE = object()  # a generation arrived: the worker stops blocking on the queue
R = TypeVar("R")


class Batcher(BatchCompute):
    """Owns the models; turns queued jobs into batched forwards, encodes and decodes.

    ``capture`` runs the LM up to the hookpoint (``None`` on a ``--no-lm`` server);
    ``generation`` runs Generate requests (``None``: the server does not generate);
    ``metrics`` records each batch.
    """

    def __init__(
        self,
        backend: Backend,
        capture: Capture | None,
        config: BatcherConfig | None = None,
        *,
        pad_id: int = 0,
        generation: GenerationScheduler | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.backend = backend
        self.generation = generation
        self.metrics = metrics
        self._lm_seconds = 0.0  # LM time of the batch being computed (for metrics)
        self._lm_tokens = 0
        self.capture = capture
        self.config = config or BatcherConfig()
        self.pad_id = pad_id
        self.stats = BatcherStats()
        self._queue: queue.Queue[object] = queue.Queue(maxsize=self.config.max_queue)
        self._closed = False
        self._lock = threading.Lock()
        self._carry: deque[Job[Any]] = deque()
        self._long: deque[ChunkedJob] = deque()  # long jobs in progress, run a chunk per turn
        self._target_jobs = 1  # expected jobs: stop waiting once this many joined (see _run)
        self._arriving = 0  # requests being parsed that will submit a job (see arriving())
        self._center = backend.fvu_center()
        self._worker = threading.Thread(target=self._run, name="hsae-batcher", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ request side
    def submit(self, job: Job[R]) -> Future[R]:
        """Queue ``job``; raises QueueFullError / ShuttingDownError instead of blocking."""
        with self._lock:
            if self._closed:
                raise ShuttingDownError("the server is shutting down")
            job.enqueued = time.monotonic()
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise QueueFullError(
                    f"the request queue is full ({self.config.max_queue} waiting); retry later"
                ) from None
            self.stats.requests += 1
        return job.future

    def submit_generation(self, job: GenerateJob) -> None:
        """Queue a Generate request for the worker's next turn (RESOURCE_EXHAUSTED when the
        server runs as many as it allows)."""
        if self.generation is None:
            raise NotServedError("this server does not generate (it runs without an LM)")
        with self._lock:
            if self._closed:
                raise ShuttingDownError("the server is shutting down")
            self.generation.submit(job)
        with contextlib.suppress(queue.Full):  # a full queue keeps the worker busy anyway
            self._queue.put_nowait(_WAKE)

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Wrap a request's parsing and :meth:`submit`: the worker waits for such requests."""
        with self._lock:
            self._arriving += 1
        try:
            yield
        finally:
            with self._lock:
                self._arriving -= 1

    def run(self, job: Job[R], timeout: float | None = None) -> R:
        """Submit and wait; past ``timeout`` (the client's deadline) the job is cancelled."""
        future = self.submit(job)
        try:
            return future.result(timeout=timeout)
        except TimeoutError:
            job.cancel()
            raise DeadlineError("deadline exceeded while waiting for the batch") from None

    def close(self, timeout: float | None = None) -> None:
        """Stop taking jobs, finish the queued ones, stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(_STOP)
        self._worker.join(timeout)
        if self.generation is not None:
            self.generation.close()  # whatever is still generating answers UNAVAILABLE

    # ------------------------------------------------------------------ worker side
    def _next(self, timeout: float | None) -> object:
        if self._carry:
            return self._carry.popleft()
        if timeout is None:
            return self._queue.get()
        if timeout <= 0:
            return self._queue.get_nowait()
        return self._queue.get(timeout=timeout)

    def _run(self) -> None:
        stopping = False
        free_at = 0.0
        while not stopping or self._carry or self._busy():
            batch, stop_seen = self._gather(free_at, block=not stopping)
            stopping = stopping or stop_seen
            if batch:
                self._process(batch)
                # Closed-loop clients come back: expect the batch just answered plus what
                # queued meanwhile (a lone client gives 1, so it never waits).
                self._target_jobs = len(batch) + self._queue.qsize() + len(self._carry)
            if self._long:
                self._run_chunk()
            if self.generation is not None and self.generation.has_work():
                self.generation.turn()
            free_at = time.monotonic()

    def _busy(self) -> bool:
        """Work besides the queue: chunks of long jobs or generation steps."""
        return bool(self._long) or (self.generation is not None and self.generation.has_work())

    def _gather(self, free_at: float, *, block: bool) -> tuple[list[Job[Any]], bool]:
        """The next batch of short jobs (maybe none) and whether STOP was seen.

        Long jobs met on the way join the line of chunked jobs instead. While that line is not
        empty the batch takes only what is already queued: the worker has work to do.
        """
        batch: list[Job[Any]] = []
        wait_until = 0.0
        while True:
            if not batch:
                timeout = None if block and not self._busy() else 0.0
            elif not self.config.batching or _padded_cost(batch) >= self.config.max_batch_tokens:
                break
            else:
                # Once the expected jobs have joined, take only what is already queued.
                full = len(batch) >= self._target_jobs and self._arriving == 0
                timeout = 0.0 if full or self._busy() else wait_until - time.monotonic()
            try:
                item = self._next(timeout)
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            if item is _WAKE:
                continue
            assert isinstance(item, Job)
            if 0 < self.config.max_chunk_tokens < item.cost:
                self._long.append(ChunkedJob(item, self.config.max_chunk_tokens))
                continue
            if not batch:
                # The wait counts from when the worker is free to run the batch: a job queued
                # while the previous batch ran has not been held back by batching.
                wait_until = max(item.enqueued, free_at) + self.config.max_wait_ms / 1e3
            elif _padded_cost([*batch, item]) > self.config.max_batch_tokens:
                self._carry.append(item)
                break
            batch.append(item)
        return batch, False

    def _run_chunk(self) -> None:
        """One chunk of the next long job, which then goes to the back of the line."""
        chunked = self._long.popleft()
        job = chunked.job
        if not self._still_wanted(job):
            return
        try:
            out = self._compute_chunk(chunked)
        except Exception as err:  # noqa: BLE001 - the chunk's job fails, nothing else
            job.future.set_exception(err)
            return
        if out is not None:
            chunked.parts.append(out)
        chunked.done = chunked.next_span()[1]
        if chunked.finished:
            job.future.set_result(chunked.result(self.backend.config.d_in))
        else:
            self._long.append(chunked)

    def _compute_chunk(self, chunked: ChunkedJob) -> Any:
        """Run the next chunk of a long job; ``None`` if it keeps no row."""
        start, end = chunked.next_span()
        self.stats.chunks += 1
        match chunked.job:
            case DecodeJob() as job:
                return self._decode(job.rows(start, end), job.budgets)
            case EncodeJob(lm_input=None, activations=acts) as job:
                assert acts is not None
                rows: HostArray = acts[start:end]  # (t, d_in)
            case EncodeJob(lm_input=LMInput() as lm_input) as job:
                assert self.capture is not None, "LM job on a server without an LM"
                ids = lm_input.token_ids[None, start:end]  # (1, t)
                hidden = self.capture(ids, torch.ones_like(ids), chunked.cache)  # (1, t, d_in)
                self.stats.lm_forwards += 1
                rows = hidden[0][lm_input.keep[start:end].to(hidden.device)]
            case other:
                raise TypeError(f"the batcher cannot run a {type(other).__name__}")
        if rows.shape[0] == 0:
            return None
        piece = EncodeJob(job.budgets, job.reconstructions, job.fvu, activations=rows)
        return self._encode([piece])[0]

    def _process(self, batch: list[Job[Any]]) -> None:
        live = [job for job in batch if self._still_wanted(job)]
        if not live:
            return
        start, rows_before = time.perf_counter(), self.stats.rows
        self._lm_seconds, self._lm_tokens = 0.0, 0
        try:
            outputs = self._compute(live)
        except Exception as err:  # noqa: BLE001 - isolate the failing job, see below
            if len(live) == 1:
                live[0].future.set_exception(err)
                return
            log.warning("a batch of %d failed (%s); retrying its jobs one by one", len(live), err)
            for job in live:
                self._process([job])
            return
        for job, out in zip(live, outputs):
            job.future.set_result(out)
        if self.metrics is not None:
            seconds = time.perf_counter() - start
            self.metrics.observe_batch(
                rows=self.stats.rows - rows_before,
                requests=len(live),
                queue_depth=self._queue.qsize(),
                seconds=seconds,
                lm_seconds=self._lm_seconds,
                sae_seconds=max(seconds - self._lm_seconds, 0.0),
                lm_tokens=self._lm_tokens,
            )

    def _still_wanted(self, job: Job[Any]) -> bool:
        if job.cancelled or not job.is_active():
            job.future.set_exception(CancelledError("the request was cancelled"))
        elif job.deadline is not None and time.monotonic() > job.deadline:
            job.future.set_exception(DeadlineError("deadline exceeded before the request was run"))
        else:
            return True
        self.stats.dropped += 1
        return False

def _padded_cost(jobs: list[Job[Any]]) -> int:
    """Tokens the batch costs: LM sequences padded to the longest, plus all other rows."""
    lm = [isinstance(job, EncodeJob) and job.lm_input is not None for job in jobs]
    lengths = [job.cost for job, is_lm in zip(jobs, lm) if is_lm]
    rows = sum(job.cost for job, is_lm in zip(jobs, lm) if not is_lm)
    return len(lengths) * max(lengths, default=0) + rows
