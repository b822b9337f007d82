"""Generate on the server: parse the request, run its steps on the batch worker, build replies.

* :func:`generation_request_from_pb` validates a ``GenerateRequest`` (after the servicer has
  tokenised its prompt) into a :class:`~hsae_runtime.generation.GenerationRequest`;
  :func:`step_to_pb` builds one ``GenerateResponse`` per token.
* :class:`GenerateJob` is one call in progress: the worker puts its steps on a queue that the
  handler thread streams from; :meth:`GenerateJob.cancel` (the client went away) frees its
  place.
* :class:`GenerationScheduler` lives on the batcher's worker thread and does continuous
  batching: each :meth:`turn` either runs the prompts of the requests that arrived since the
  last turn, together, as a new :class:`~hsae_runtime.generation.GenerationBatch` and merges
  it into the running batch (:meth:`~hsae_runtime.generation.GenerationBatch.absorb`), or
  adds one token to every running request. Turns alternate when requests keep arriving, so
  the running requests advance at least every other turn. Finished and cancelled requests
  leave the batch before its next step. An LM whose KV cache cannot be padded keeps the
  newcomers as a batch of their own, and the batches take turns (round-robin). The worker
  runs a turn between two encode batches, so encode traffic waits for at most one generation
  step. At most ``max_generations`` requests are in progress; more get RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hsae_runtime.errors import InputError
from hsae_runtime.generation import GenerationBatch, GenerationRequest, Step
from hsae_runtime.kv_batch import UnsupportedCache
from hsae_runtime.lm import LoadedLM
from hsae_runtime.serving.errors import CancelledError, QueueFullError, ShuttingDownError
from hsae_runtime.serving.limits import DEFAULT_MAX_NEW_TOKENS
from hsae_runtime.serving.stubs import load as load_stubs
from hsae_runtime.steering import Intervention, SteerableSAE, SteerSpec

pb, _ = load_stubs()
log = logging.getLogger(__name__)

_OPS = {1: "set", 2: "scale", 3: "ablate"}
_DONE = object()


# ----------------------------------------------------------------------------- pb <-> request
def generation_request_from_pb(
    req: Any, prompt_ids: list[int], max_tokens: int
) -> GenerationRequest:
    """A ``GenerateRequest`` whose prompt is ``prompt_ids`` -> :class:`GenerationRequest`.

    Budget and latent ranges are checked later against the SAE (:class:`GenerationBatch`);
    here: the ops, and prompt plus new tokens within ``max_tokens``.
    """
    interventions = []
    for i, iv in enumerate(req.interventions):
        if iv.op not in _OPS:
            raise InputError(
                f"intervention {i} on latent {iv.latent}: op is not set",
                hint="use STEER_OP_SET, STEER_OP_SCALE or STEER_OP_ABLATE",
            )
        condition = iv.condition if iv.HasField("condition") else None
        interventions.append(Intervention(iv.latent, _OPS[iv.op], iv.value, condition))  # type: ignore[arg-type]
    new_tokens = req.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    if new_tokens < 0 or len(prompt_ids) + new_tokens > max_tokens:
        raise InputError(
            f"{len(prompt_ids)} prompt tokens + max_new_tokens={new_tokens} is over the "
            f"server's max_request_tokens={max_tokens} (or negative)",
            hint="shorten the prompt or ask for fewer new tokens",
        )
    return GenerationRequest(
        prompt_ids=prompt_ids,
        steer=SteerSpec(req.budget, tuple(interventions), not req.reconstruction_only),
        max_new_tokens=new_tokens,
        temperature=req.temperature,
        top_p=req.top_p or 1.0,
        seed=req.seed if req.HasField("seed") else None,
        stop=tuple(req.stop),
        top_logprobs=req.top_logprobs,
        compare_unsteered=req.compare_unsteered,
        return_code=req.return_code,
    )


def step_to_pb(step: Step, tokenizer: Any, request_id: str, text: str = "") -> Any:
    """One :class:`Step` -> ``GenerateResponse`` (``text``: the whole text, on the last)."""

    def tops(items: list[tuple[int, float]]) -> list[Any]:
        strings = tokenizer.batch_decode([[t] for t, _ in items]) if items else []
        return [
            pb.TokenLogprob(token_id=t, token=s, logprob=lp)
            for (t, lp), s in zip(items, strings, strict=True)
        ]

    msg = pb.GenerateResponse(
        index=step.index,
        token_id=step.token_id,
        token=step.token,
        logprob=step.logprob,
        top=tops(step.top),
        top_unsteered=tops(step.top_unsteered),
        finish_reason=step.finish_reason,
        text=text,
        request_id=request_id,
    )
    if step.unsteered_logprob is not None:
        msg.unsteered_logprob = step.unsteered_logprob
    if step.code is not None:
        indices = step.code.indices.cpu().numpy().astype(np.int32)  # (k',)
        values = step.code.values.detach().float().cpu().numpy()  # (k',)
        msg.indices.CopyFrom(
            pb.Tensor(data=indices.tobytes(), shape=[len(indices)], dtype=pb.DTYPE_INT32)
        )
        msg.values.CopyFrom(
            pb.Tensor(data=values.tobytes(), shape=[len(values)], dtype=pb.DTYPE_FLOAT32)
        )
    return msg


# ----------------------------------------------------------------------------- jobs
@dataclass
class GenerateJob:
    """One Generate call: its request and the queue of its steps (or its error)."""

    request: GenerationRequest
    out: queue.Queue[object] = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """The client went away: the worker drops the request before its next step."""
        self.cancelled.set()

    def steps(self, poll_s: float = 0.5) -> Iterator[Step]:
        """The request's steps as the worker makes them; raises its error, if any."""
        while True:
            try:
                item = self.out.get(timeout=poll_s)
            except queue.Empty:
                if self.cancelled.is_set():
                    raise CancelledError("the generation was cancelled") from None
                continue
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, Step)
            yield item


@dataclass
class _Running:
    batch: GenerationBatch
    jobs: dict[int, GenerateJob]
    """The jobs of the batch's live requests, by request id."""


class GenerationScheduler:
    """Generation requests waiting and running, stepped by the batch worker (see module doc)."""

    def __init__(
        self,
        lm: LoadedLM,
        sae: SteerableSAE,
        hookpoint: str,
        *,
        max_generations: int = 64,
        metrics: Any | None = None,
    ) -> None:
        self.lm, self.sae, self.hookpoint = lm, sae, hookpoint
        self.max_generations = max_generations
        self.metrics = metrics
        self._lock = threading.Lock()
        self._waiting: list[GenerateJob] = []
        self._running: deque[_Running] = deque()
        self._live = 0  # waiting + running, for the cap
        self._closed = False
        self._prefilled_last = False  # the last turn ran prompts, so the next steps the batch

    @property
    def live(self) -> int:
        """Requests waiting or generating."""
        return self._live

    def submit(self, job: GenerateJob) -> None:
        """Queue ``job`` for the next turn; RESOURCE_EXHAUSTED at the cap."""
        with self._lock:
            if self._closed:
                raise ShuttingDownError("the server is shutting down")
            if self._live >= self.max_generations:
                raise QueueFullError(
                    f"{self._live} generations are in progress, the server's most; retry later"
                )
            self._waiting.append(job)
            self._live += 1
        self._report()

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def running_batches(self) -> int:
        """Generation batches in progress (1 with continuous batching, 0 when idle)."""
        return len(self._running)

    def turn(self) -> None:
        """Run the waiting requests' prompts and merge them in, or step the running batch."""
        waiting: list[GenerateJob] = []
        if not (self._prefilled_last and self._running):
            with self._lock:
                waiting, self._waiting = self._waiting, []
        self._prefilled_last = bool(waiting)
        if waiting:
            self._start(waiting)
        elif self._running:
            running = self._running[0]
            alive = self._step(running)
            if self._running and self._running[0] is running:  # close() may have emptied it
                if alive:
                    self._running.rotate(-1)
                else:
                    self._running.popleft()

    def close(self) -> None:
        """Fail every request in progress (the server is stopping)."""
        with self._lock:
            self._closed = True
            jobs = [*self._waiting, *(j for r in self._running for j in r.jobs.values())]
            self._waiting, self._running = [], deque()
        for job in jobs:
            job.out.put(ShuttingDownError("the server is shutting down"))
        self._live = 0

    # ------------------------------------------------------------------ worker side
    def _start(self, jobs: list[GenerateJob]) -> None:
        jobs = [j for j in jobs if not self._dropped(j)]
        if not jobs:
            return
        try:
            batch = GenerationBatch(self.lm, self.sae, self.hookpoint, [j.request for j in jobs])
        except Exception as err:  # noqa: BLE001 - one bad request must not fail the others
            if len(jobs) == 1:
                self._fail(jobs, err)
                return
            for job in jobs:  # find the bad one: start each alone
                self._start([job])
            return
        running = _Running(batch, dict(enumerate(jobs)))
        if self._step(running):
            self._merge(running)

    def _merge(self, new: _Running) -> None:
        """Join ``new`` (past its prompts) into the running batch, or queue it beside."""
        target = self._running[-1] if self._running else None
        if target is not None:
            try:
                ids = target.batch.absorb(new.batch)
            except UnsupportedCache as err:
                log.debug("generation batches run apart: %s", err)
            except Exception as err:  # noqa: BLE001 - the newcomers fail, the worker goes on
                log.exception("could not merge a generation batch into the running one")
                self._fail(list(new.jobs.values()), err)
                return
            else:
                target.jobs.update((ids[old], job) for old, job in new.jobs.items() if old in ids)
                return
        self._running.append(new)

    def _step(self, running: _Running) -> bool:
        """One step of ``running`` (the first runs the prompts); False once it is over."""
        for request, job in list(running.jobs.items()):
            if job.cancelled.is_set():
                running.batch.cancel(request)
                del running.jobs[request]
                self._release(1)
        start = time.perf_counter()
        lm_before, sae_before = running.batch.lm_seconds, running.batch.sae_seconds
        try:
            steps = running.batch.step()
        except Exception as err:  # noqa: BLE001 - the batch's requests fail, nothing else
            self._fail(list(running.jobs.values()), err)
            running.jobs.clear()
            return False
        for step in steps:
            job = running.jobs[step.request]
            job.out.put(step)
            if step.finish_reason:
                job.out.put(_DONE)
                del running.jobs[step.request]
                self._release(1)
        if self.metrics is not None and steps:
            self.metrics.observe_generation_step(
                tokens=len(steps),
                seconds=time.perf_counter() - start,
                lm_seconds=running.batch.lm_seconds - lm_before,
                sae_seconds=running.batch.sae_seconds - sae_before,
            )
        return not running.batch.done

    def _dropped(self, job: GenerateJob) -> bool:
        if job.cancelled.is_set():
            self._release(1)
            return True
        return False

    def _fail(self, jobs: list[GenerateJob], err: BaseException) -> None:
        for job in jobs:
            job.out.put(err)
        self._release(len(jobs))

    def _release(self, n: int) -> None:
        with self._lock:
            self._live = max(self._live - n, 0)
        self._report()

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.generation_streams.set(self._live)


def stream_responses(job: GenerateJob, tokenizer: Any, request_id: str, gate: Any) -> Iterator[Any]:
    """The job's ``GenerateResponse`` messages as the worker makes them (the handler's loop).

    Ends with UNAVAILABLE when the server's shutdown grace is over (``gate.aborted``); however
    it ends - finished, failed, or the client gone - the job is cancelled, which frees its place.
    """
    new_ids: list[int] = []
    try:
        for step in job.steps():
            if gate.aborted:
                raise ShuttingDownError("the server is shutting down; the generation was cut short")
            new_ids.append(step.token_id)
            text = tokenizer.decode(new_ids) if step.finish_reason else ""
            yield step_to_pb(step, tokenizer, request_id, text)
    finally:
        job.cancel()
