"""The ``hsae.v1.HSAE`` servicer: parse (convert), tokenise, hand to the batcher, build (convert).

Thin on purpose: validation and protobuf live in :mod:`.convert`, batching and the models in
:mod:`.batcher` (Encode, EncodeStream and Decode all queue a job for its one worker; no model
runs on a request thread), status codes in :mod:`.errors` (every method is wrapped by
:func:`~hsae_runtime.serving.errors.handle_errors`). What is left here is request plumbing:
tokenising text on the request thread (so the worker only runs models), the client's deadline
and cancellation, and EncodeStream's pipelining.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import torch

from hsae_runtime.errors import InputError
from hsae_runtime.sae import SparseCode
from hsae_runtime.serving import convert
from hsae_runtime.serving.batcher import Batcher
from hsae_runtime.serving.calls import bind_to_call, remaining_s
from hsae_runtime.serving.convert import EncodeInput
from hsae_runtime.serving.errors import (
    DeadlineError,
    NotServedError,
    OversizeError,
    ShuttingDownError,
    StreamIdleError,
    handle_errors,
    status_for,
)
from hsae_runtime.serving.gate import CallGate
from hsae_runtime.serving.generate import (
    GenerateJob,
    generation_request_from_pb,
    stream_responses,
)
from hsae_runtime.serving.jobs import DecodeJob, EncodeJob, EncodeOutput, Job, LMInput
from hsae_runtime.serving.limits import ServingLimits
from hsae_runtime.serving.stubs import load as load_stubs
from hsae_runtime.serving.tokenise import BoundedTokeniser, token_strings

pb, pb_grpc = load_stubs()
log = logging.getLogger(__name__)
R = TypeVar("R")

_END = object()
_WAKE = object()
STREAM_DRAINED = (
    "the server is shutting down: every request received on this stream was answered; send "
    "the rest to another server"
)


@dataclass
class _StreamActivity:
    """What an EncodeStream's reader last did (read by the answering loop, no lock needed)."""

    last: float = field(default_factory=time.monotonic)
    """``time.monotonic()`` of the last request received or answer sent."""
    busy: bool = False
    """True from a request's arrival until it is queued for the answering loop."""

    def touch(self) -> None:
        self.last = time.monotonic()


def _gated(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a unary work call inside the servicer's :class:`CallGate` (counted, drained)."""

    @functools.wraps(method)
    def gated(self: HSAEServicer, request: Any, context: grpc.ServicerContext) -> Any:
        with self.gate.call():
            return method(self, request, context)

    return gated


@dataclass
class TokenInfo:
    token_ids: list[int]
    tokens: list[str]
    positions: list[int]


class HSAEServicer(pb_grpc.HSAEServicer):
    """Implements Info, Encode, EncodeStream, Decode and Generate on top of a :class:`Batcher`."""

    def __init__(
        self,
        batcher: Batcher,
        *,
        lm: Any | None = None,
        hookpoint: str = "",
        limits: ServingLimits | None = None,
        version: str = "",
        metrics: Any | None = None,
    ) -> None:
        self.batcher = batcher
        self.metrics = metrics
        """Counts every call by RPC and status (see ``handle_errors``), if given."""
        self.backend = batcher.backend
        self.config = batcher.backend.config
        self.lm = lm
        self.hookpoint = hookpoint
        self.limits = limits or ServingLimits()
        self.version = version
        self.gate = CallGate(self.limits.max_streams)
        self._vocab = int(lm.model.get_input_embeddings().num_embeddings) if lm is not None else 0
        self._text = (
            BoundedTokeniser.for_tokenizer(lm.tokenizer, self.limits.max_request_tokens)
            if lm is not None
            else None
        )

    # ------------------------------------------------------------------ RPCs
    @handle_errors
    def Info(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 - gRPC name
        return convert.info_to_pb(
            lm_name=self.lm.name if self.lm is not None else "",
            hookpoint=self.hookpoint if self.lm is not None else "",
            d_in=self.config.d_in,
            d_sae=self.config.d_sae,
            k_max=self.config.k_max,
            trained_budgets=list(self.config.trained_budgets),
            dtype=self.config.dtype,
            server_version=self.version,
            has_lm=self.lm is not None,
            max_request_tokens=self.limits.max_request_tokens,
            max_message_bytes=self.limits.max_message_bytes,
            backend=self.backend.name,
            device=str(self.backend.device),
        )

    @handle_errors
    @_gated
    def Encode(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        with self.batcher.arriving():  # the batcher holds its batch open for this request
            parsed, job, tokens = self._prepare(request, context)
            future = self.batcher.submit(job)
        out = self._wait(job, future, context)
        return self._respond(parsed, out, tokens)

    @handle_errors
    def EncodeStream(  # noqa: N802
        self, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        # A reader thread parses and submits request N+1 while this loop waits for N's
        # result; ``pending`` holds at most ``stream_window`` submitted items (back-pressure).
        pending: queue.Queue[object] = queue.Queue(maxsize=self.limits.stream_window)
        activity = _StreamActivity()

        def wake() -> None:  # the gate's shutdown news; a full queue re-checks after each item
            with contextlib.suppress(queue.Full):
                pending.put_nowait(_WAKE)

        with self.gate.stream(wake):
            reader = threading.Thread(
                target=self._read_stream,
                args=(request_iterator, context, pending, activity),
                name="hsae-stream-reader",
                daemon=True,
            )
            reader.start()
            yield from self._answer_stream(pending, activity, context)

    def _read_stream(
        self,
        request_iterator: Iterator[Any],
        context: grpc.ServicerContext,
        pending: queue.Queue[object],
        activity: _StreamActivity,
    ) -> None:
        def put(item: object) -> bool:
            while True:
                try:
                    pending.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    if not context.is_active():
                        return False

        try:
            for request in request_iterator:
                activity.busy = True
                activity.touch()
                start = time.perf_counter()
                job: EncodeJob | None = None
                try:
                    self.gate.check_open()  # items received while draining answer UNAVAILABLE
                    with self.batcher.arriving():
                        parsed, job, tokens = self._prepare(request, context)
                        future = self.batcher.submit(job)
                except Exception as err:  # noqa: BLE001 - answered in-stream
                    parsed, tokens, future = None, None, Future()
                    future.set_exception(err)
                ok = put((request.request_id, parsed, tokens, job, future, start))
                activity.busy = False
                if not ok:
                    return
        except Exception as err:  # noqa: BLE001 - the client went away mid-stream
            log.debug("EncodeStream reader ended: %s", err)
        finally:
            activity.busy = False
            put(_END)

    def _answer_stream(
        self,
        pending: queue.Queue[object],
        activity: _StreamActivity,
        context: grpc.ServicerContext,
    ) -> Iterator[Any]:
        """Answer the reader's items in order; end the stream when the client half-closes, when
        it sent nothing for ``stream_idle_timeout_s`` (DEADLINE_EXCEEDED), or on shutdown once
        every item received is answered (UNAVAILABLE)."""
        idle_limit = self.limits.stream_idle_timeout_s
        while True:
            if self.gate.draining:
                # Read ``busy`` before ``empty``: the reader clears it only after its put.
                if not activity.busy and pending.empty():
                    raise ShuttingDownError(STREAM_DRAINED)
                timeout = 0.05  # the reader is finishing an item: it comes in a moment
            else:
                timeout = max(activity.last + idle_limit - time.monotonic(), 0.0)
            try:
                item = pending.get(timeout=timeout)
            except queue.Empty:
                if self.gate.draining or activity.busy:
                    continue
                if time.monotonic() - activity.last >= idle_limit:
                    raise StreamIdleError(
                        f"the stream sent nothing for {idle_limit:g} s (the server's "
                        "--stream-idle-timeout-s) and was closed; open a new stream when "
                        "there is work to send"
                    ) from None
                continue
            if item is _END:
                return
            if item is _WAKE:
                continue
            request_id, parsed, tokens, job, future, start = item  # type: ignore[misc]
            try:
                out = self._wait(job, future, context)
                response = self._respond(parsed, out, tokens)
                log.debug("EncodeStream item %r OK %.1f ms", request_id, _ms(start))
            except Exception as err:  # noqa: BLE001 - mapped by the one status table
                code, message = status_for(err)
                log.debug("EncodeStream item %r %s: %s", request_id, code.name, message)
                response = pb.EncodeResponse(
                    request_id=request_id,
                    error=pb.RequestError(code=code.value[0], message=message),
                )
            yield response
            activity.touch()  # the idle clock restarts once the client has its answer

    @handle_errors
    @_gated
    def Decode(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        with self.batcher.arriving():
            parsed = convert.decode_request_from_pb(
                request, self.config, self.limits.max_request_tokens
            )
            size = len(parsed.budgets) * parsed.values.shape[0] * self.config.d_in * 4
            self._check_size(size)
            job = DecodeJob(SparseCode(parsed.values, parsed.indices), parsed.budgets)
            bind_to_call(job, context)
            future = self.batcher.submit(job)
        recons = self._wait(job, future, context)  # (n_budgets, N, d_in)
        return convert.decode_response_to_pb(parsed, recons)

    @handle_errors
    def Generate(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802
        with self.gate.call():
            if self.lm is None:
                raise NotServedError(
                    "this server runs without a language model (--no-lm): Generate needs one"
                )
            from hsae_runtime.generation_request import check_request

            prompt = request.WhichOneof("prompt")
            if prompt is None:
                raise InputError("a generate request needs a prompt", hint="set text or tokens")
            ids = self._token_ids(request.text if prompt == "text" else None, request.tokens.ids)
            limit = self.limits.max_request_tokens
            job = GenerateJob(generation_request_from_pb(request, ids, limit))
            check_request(job.request, self.backend, self._vocab)  # before the stream starts
            context.add_callback(job.cancel)
            self.batcher.submit_generation(job)
            yield from stream_responses(job, self.lm.tokenizer, request.request_id, self.gate)

    # ------------------------------------------------------------------ helpers
    def _wait(self, job: Job[R] | None, future: Future[R], context: grpc.ServicerContext) -> R:
        """The job's result, within the client's deadline and the server's shutdown grace."""
        try:
            return self.gate.wait(future, remaining_s(context))
        except TimeoutError:
            if job is not None:
                job.cancel()
            raise DeadlineError("deadline exceeded while waiting for the batch") from None
        except ShuttingDownError:
            if job is not None:
                job.cancel()
            raise

    def _prepare(
        self, request: Any, context: grpc.ServicerContext
    ) -> tuple[EncodeInput, EncodeJob, TokenInfo | None]:
        parsed = convert.encode_request_from_pb(
            request, self.config, self.limits.max_request_tokens
        )
        job = EncodeJob(parsed.budgets, parsed.reconstructions, parsed.fvu)
        tokens = None
        if parsed.kind == "activations":
            assert parsed.activations is not None
            job.activations = parsed.activations.reshape(-1, self.config.d_in)  # (N, d_in)
            rows = job.activations.shape[0]
        else:
            job.lm_input, tokens = self._tokenise(parsed)
            rows = len(tokens.positions)
        self._check_size(convert.response_bytes_estimate(parsed, rows, self.config.d_in))
        bind_to_call(job, context)
        return parsed, job, tokens

    def _tokenise(self, parsed: EncodeInput) -> tuple[LMInput, TokenInfo]:
        if self.lm is None:
            raise NotServedError(
                "this server runs without a language model (--no-lm): send activations"
            )
        from hsae_runtime.lm import special_token_mask

        tokenizer = self.lm.tokenizer
        ids = self._token_ids(parsed.text if parsed.kind == "text" else None, parsed.token_ids)
        if len(ids) > self.limits.max_request_tokens:
            raise InputError(
                f"too many tokens: {len(ids)} > max_request_tokens="
                f"{self.limits.max_request_tokens}",
                hint="split the text over several requests (or EncodeStream)",
            )
        token_ids = torch.tensor(ids, dtype=torch.long)  # (T,)
        if parsed.include_special:
            keep = torch.ones_like(token_ids, dtype=torch.bool)
        else:
            keep = ~special_token_mask(tokenizer, token_ids[None])[0]
        positions = keep.nonzero().flatten().tolist()
        if not positions:
            raise InputError(
                "nothing to encode: the input holds only special tokens",
                hint="set include_special_tokens to encode them",
            )
        kept = [ids[p] for p in positions]
        strings = token_strings(tokenizer, kept)
        return LMInput(token_ids, keep), TokenInfo(kept, strings, positions)

    def _token_ids(self, text: str | None, ids: Sequence[int]) -> list[int]:
        """``text`` tokenised (over-long text refused before it is all tokenised), else ``ids``
        checked against the vocabulary."""
        assert self.lm is not None and self._text is not None
        if text is not None:
            return self._text(text)
        bad = [i for i in ids if not 0 <= i < self._vocab]
        if bad:
            raise InputError(
                f"token ids {bad[:5]} out of range 0..{self._vocab - 1} for {self.lm.name}"
            )
        return list(ids)

    def _respond(self, parsed: EncodeInput, out: EncodeOutput, tokens: TokenInfo | None) -> Any:
        if tokens is not None:
            out.token_ids, out.tokens, out.positions = (
                tokens.token_ids,
                tokens.tokens,
                tokens.positions,
            )
        return convert.encode_response_to_pb(parsed, out)

    def _check_size(self, estimate: int) -> None:
        if estimate > self.limits.max_message_bytes:
            raise OversizeError(
                f"the response would be ~{estimate / 2**20:.1f} MiB, over the "
                f"{self.limits.max_message_bytes / 2**20:.0f} MiB message limit; send fewer "
                "tokens or budgets, or skip reconstructions"
            )


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1e3
