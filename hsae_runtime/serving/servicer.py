"""The ``hsae.v1.HSAE`` servicer: parse (convert), tokenise, hand to the batcher, build (convert).

Thin on purpose: validation and protobuf live in :mod:`.convert`, batching and the models in
:mod:`.batcher`, status codes in :mod:`.errors` (every method is wrapped by
:func:`~hsae_runtime.serving.errors.handle_errors`). What is left here is request plumbing:
tokenising text on the request thread (so the worker only runs models), the client's deadline
and cancellation, and EncodeStream's pipelining.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from hsae_runtime.errors import InputError
from hsae_runtime.sae import SparseCode
from hsae_runtime.serving import convert
from hsae_runtime.serving.batcher import Batcher, Job, LMInput
from hsae_runtime.serving.convert import EncodeInput, EncodeOutput
from hsae_runtime.serving.errors import (
    DeadlineError,
    NotServedError,
    OversizeError,
    handle_errors,
    status_for,
)
from hsae_runtime.serving.stubs import load as load_stubs

pb, pb_grpc = load_stubs()
log = logging.getLogger(__name__)

_END = object()


@dataclass(frozen=True)
class ServingLimits:
    """Per-request limits, reported by Info."""

    max_request_tokens: int = 8192
    """Most tokens (or activation / code rows) in one request."""
    max_message_bytes: int = 64 * 2**20
    """Largest message received or sent."""
    stream_window: int = 32
    """Most requests of one EncodeStream in flight at once (back-pressure on the reader)."""


@dataclass
class TokenInfo:
    token_ids: list[int]
    tokens: list[str]
    positions: list[int]


class HSAEServicer(pb_grpc.HSAEServicer):
    """Implements Info, Encode, EncodeStream and Decode on top of a :class:`Batcher`."""

    def __init__(
        self,
        batcher: Batcher,
        *,
        lm: Any | None = None,
        hookpoint: str = "",
        limits: ServingLimits | None = None,
        version: str = "",
    ) -> None:
        self.batcher = batcher
        self.backend = batcher.backend
        self.config = batcher.backend.config
        self.lm = lm
        self.hookpoint = hookpoint
        self.limits = limits or ServingLimits()
        self.version = version
        self._vocab = int(lm.model.get_input_embeddings().num_embeddings) if lm is not None else 0

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
    def Encode(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        with self.batcher.arriving():  # the batcher holds its batch open for this request
            parsed, job, tokens = self._prepare(request, context)
            future = self.batcher.submit(job)
        out = self.batcher.result(job, future, timeout=_remaining(context))
        return self._respond(parsed, out, tokens)

    @handle_errors
    def EncodeStream(  # noqa: N802
        self, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        pending: queue.Queue[object] = queue.Queue(maxsize=self.limits.stream_window)

        def put(item: object) -> bool:
            while True:
                try:
                    pending.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    if not context.is_active():
                        return False

        def read() -> None:
            # Runs beside the response loop so request N+1 is batched while N is computed.
            try:
                for request in request_iterator:
                    start = time.perf_counter()
                    try:
                        with self.batcher.arriving():
                            parsed, job, tokens = self._prepare(request, context)
                            future = self.batcher.submit(job)
                    except Exception as err:  # noqa: BLE001 - answered in-stream below
                        parsed, tokens, future = None, None, Future()
                        future.set_exception(err)
                    if not put((request.request_id, parsed, tokens, future, start)):
                        return
            except Exception as err:  # noqa: BLE001 - the client went away mid-stream
                log.debug("EncodeStream reader ended: %s", err)
            finally:
                put(_END)

        threading.Thread(target=read, name="hsae-stream-reader", daemon=True).start()
        while True:
            item = pending.get()
            if item is _END:
                return
            request_id, parsed, tokens, future, start = item  # type: ignore[misc]
            try:
                out = future.result(timeout=_remaining(context))
                response = self._respond(parsed, out, tokens)
                log.debug("EncodeStream item %r OK %.1f ms", request_id, _ms(start))
            except Exception as err:  # noqa: BLE001 - mapped by the one status table
                if isinstance(err, TimeoutError):
                    err = DeadlineError("deadline exceeded while waiting for the batch")
                code, message = status_for(err)
                log.debug("EncodeStream item %r %s: %s", request_id, code.name, message)
                response = pb.EncodeResponse(
                    request_id=request_id,
                    error=pb.RequestError(code=code.value[0], message=message),
                )
            yield response

    @handle_errors
    def Decode(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        parsed = convert.decode_request_from_pb(
            request, self.config, self.limits.max_request_tokens
        )
        size = len(parsed.budgets) * parsed.values.shape[0] * self.config.d_in * 4
        self._check_size(size)
        code = SparseCode(parsed.values, parsed.indices)
        recons = self.backend.reconstruct_from_code(code, parsed.budgets)  # (n_budgets, N, d_in)
        return convert.decode_response_to_pb(parsed, recons)

    # ------------------------------------------------------------------ helpers
    def _prepare(
        self, request: Any, context: grpc.ServicerContext
    ) -> tuple[EncodeInput, Job, TokenInfo | None]:
        parsed = convert.encode_request_from_pb(
            request, self.config, self.limits.max_request_tokens
        )
        job = Job(budgets=parsed.budgets, reconstructions=parsed.reconstructions, fvu=parsed.fvu)
        tokens = None
        if parsed.kind == "activations":
            assert parsed.activations is not None
            job.activations = parsed.activations.reshape(-1, self.config.d_in)  # (N, d_in)
            rows = job.activations.shape[0]
        else:
            job.lm_input, tokens = self._tokenise(parsed)
            rows = len(tokens.positions)
        self._check_size(convert.response_bytes_estimate(parsed, rows, self.config.d_in))
        remaining = _remaining(context)
        if remaining is not None:
            job.deadline = time.monotonic() + remaining
        job.is_active = context.is_active
        context.add_callback(job.cancel)
        return parsed, job, tokens

    def _tokenise(self, parsed: EncodeInput) -> tuple[LMInput, TokenInfo]:
        if self.lm is None:
            raise NotServedError(
                "this server runs without a language model (--no-lm): send activations"
            )
        from hsae_runtime.lm import special_token_mask

        tokenizer = self.lm.tokenizer
        if parsed.kind == "text":
            ids = list(tokenizer(parsed.text, add_special_tokens=True)["input_ids"])
        else:
            ids = parsed.token_ids
            bad = [i for i in ids if not 0 <= i < self._vocab]
            if bad:
                raise InputError(
                    f"token ids {bad[:5]} out of range 0..{self._vocab - 1} for {self.lm.name}"
                )
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
        strings = tokenizer.batch_decode([[i] for i in kept])
        return LMInput(token_ids, keep), TokenInfo(kept, strings, positions)

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


def _remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds to the client's deadline; ``None`` without one (gRPC then reports ~forever)."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e7:
        return None
    return max(remaining, 0.0)


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1e3
