"""THE place that maps exceptions to gRPC status codes and HTTP statuses.

Every RPC handler is wrapped by :func:`handle_errors`; the auth interceptor and the EncodeStream
per-item errors go through :func:`status_for` too, and the HTTP API through
:func:`http_status_for`, so one table decides what a client sees:

============================================  ===================  ====
exception                                     gRPC status          HTTP
============================================  ===================  ====
InputError, ConfigError, HookpointError ...   INVALID_ARGUMENT     400
  (any :class:`~hsae_runtime.errors.HSAEError`)
:class:`OversizeError`                        RESOURCE_EXHAUSTED   413
:class:`QueueFullError`                       RESOURCE_EXHAUSTED   429
:class:`StreamLimitError`                     RESOURCE_EXHAUSTED   429
:class:`AuthError`                            UNAUTHENTICATED      401
:class:`NotServedError`                       FAILED_PRECONDITION  400
:class:`DeadlineError`, :class:`StreamIdleError`  DEADLINE_EXCEEDED  504
:class:`CancelledError`                       CANCELLED            499
:class:`ShuttingDownError`                    UNAVAILABLE          503
anything else (a bug)                         INTERNAL             500, logged with its traceback
============================================  ===================  ====

User errors keep their message and hint; INTERNAL hides the exception text from the client (it
may leak paths or tensors) and says to read the server log instead.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from hsae_runtime.errors import HSAEError

log = logging.getLogger(__name__)


class ServingError(Exception):
    """Base of the server-side conditions that are not bad input values."""

    code = grpc.StatusCode.INTERNAL
    http_status = 500

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class OversizeError(ServingError):
    """A request or response larger than the configured message size."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 413


class QueueFullError(ServingError):
    """The batching queue is full: the client should back off and retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429


class StreamLimitError(ServingError):
    """As many EncodeStreams are open as the server allows (``--max-streams``)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429


class AuthError(ServingError):
    """Missing or wrong bearer token."""

    code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


class NotServedError(ServingError):
    """A request the server is not set up for (e.g. text on a ``--no-lm`` server)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 400


class DeadlineError(ServingError):
    """The client's deadline passed before the request was served."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504


class StreamIdleError(ServingError):
    """An EncodeStream sent nothing for longer than ``--stream-idle-timeout-s``."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504


class CancelledError(ServingError):
    """The client cancelled the request."""

    code = grpc.StatusCode.CANCELLED
    http_status = 499


class ShuttingDownError(ServingError):
    """The server is stopping and takes no new work."""

    code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


def status_for(err: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-visible message for ``err`` (logs bugs)."""
    match err:
        case ServingError():
            return err.code, err.message
        case HSAEError():
            return grpc.StatusCode.INVALID_ARGUMENT, str(err)
        case _:
            log.error("internal error serving a request", exc_info=err)
            return (
                grpc.StatusCode.INTERNAL,
                f"internal server error ({type(err).__name__}); see the server log",
            )


def http_status_for(err: BaseException) -> tuple[int, str, str]:
    """The HTTP status, the gRPC status name and the message for ``err`` (same table)."""
    code, message = status_for(err)
    match err:
        case ServingError():
            return err.http_status, code.name, message
        case HSAEError():
            return 400, code.name, message
        case _:
            return 500, code.name, message


F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(method: F) -> F:
    """Wrap a servicer method: map exceptions to a status, log one debug line per request, and
    count it in the servicer's ``metrics`` (a :class:`~hsae_runtime.serving.metrics.ServerMetrics`)
    when it has them.

    Works for unary handlers and for generator (streaming-response) handlers.
    """
    name = method.__name__

    def finish(
        owner: Any, context: grpc.ServicerContext, start: float, err: BaseException | None
    ) -> None:
        metrics = getattr(owner, "metrics", None)
        if metrics is not None:
            status = "OK" if err is None else status_for(err)[0].name
            metrics.observe_request(name, status, time.perf_counter() - start)
        if err is None:
            if log.isEnabledFor(logging.DEBUG):  # skip peer() and the clock when not logging
                ms = (time.perf_counter() - start) * 1e3
                log.debug("%s OK %.1f ms peer=%s", name, ms, context.peer())
            return
        code, message = status_for(err)
        if log.isEnabledFor(logging.DEBUG):
            ms = (time.perf_counter() - start) * 1e3
            log.debug("%s %s %.1f ms peer=%s: %s", name, code.name, ms, context.peer(), message)
        context.abort(code, message)

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream_wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            try:
                yield from method(self, request, context)
            except Exception as err:  # noqa: BLE001 - mapped to a status right here
                finish(self, context, start, err)
            else:
                finish(self, context, start, None)

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    def unary_wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        start = time.perf_counter()
        try:
            response = method(self, request, context)
        except Exception as err:  # noqa: BLE001 - mapped to a status right here
            finish(self, context, start, err)
            raise AssertionError("context.abort returned") from err  # abort always raises
        finish(self, context, start, None)
        return response

    return unary_wrapper  # type: ignore[return-value]
