"""Admission of work calls (Encode, Decode, EncodeStream): the stream cap and graceful drain.

Every work call passes through one :class:`CallGate`, which

* counts the calls in progress, so a shutdown can wait for exactly those;
* caps open EncodeStreams: each holds a gRPC handler thread for as long as it is open, so more
  streams than ``max_streams`` get RESOURCE_EXHAUSTED at once instead of taking every thread
  (the server keeps ``max_streams`` at most half its handler threads);
* on :meth:`drain` refuses new calls with UNAVAILABLE (the listener stays up, health says
  NOT_SERVING) while the calls in progress finish, and wakes open streams so they end once
  their received items are answered;
* on :meth:`abort` (the grace period is over) makes every call still waiting for a result
  answer UNAVAILABLE at once, with a message, instead of being cut off by the server's stop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from typing import Any, TypeVar

from hsae_runtime.serving.errors import ShuttingDownError, StreamLimitError

T = TypeVar("T")

DRAINING = "the server is shutting down and takes no new requests; retry on another server"
ABORTED = (
    "the server stopped before this request finished (its shutdown grace period ran out); "
    "retry on another server"
)


class CallGate:
    """Counts work calls, caps streams, and drains them on shutdown (thread-safe)."""

    def __init__(self, max_streams: int) -> None:
        self.max_streams = max_streams
        self._cond = threading.Condition()
        self._calls = 0
        self._streams = 0
        self._draining = False
        self._aborted: Future[Any] = Future()
        self._wakers: set[Callable[[], None]] = set()

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def aborted(self) -> bool:
        return self._aborted.done()

    @property
    def calls(self) -> int:
        """Work calls in progress (streams included)."""
        return self._calls

    @property
    def streams(self) -> int:
        """EncodeStreams open."""
        return self._streams

    def check_open(self) -> None:
        """Raise :class:`ShuttingDownError` once the server is draining."""
        if self._draining:
            raise ShuttingDownError(DRAINING)

    @contextmanager
    def call(self) -> Iterator[None]:
        """Around a unary work call (Encode, Decode)."""
        with self._cond:
            self.check_open()
            self._calls += 1
        try:
            yield
        finally:
            self._leave()

    @contextmanager
    def stream(self, wake: Callable[[], None]) -> Iterator[None]:
        """Around an EncodeStream; ``wake()`` is called on :meth:`drain` and :meth:`abort`."""
        with self._cond:
            self.check_open()
            if self._streams >= self.max_streams:
                raise StreamLimitError(
                    f"{self._streams} EncodeStreams are open, the most this server allows "
                    "(--max-streams): close an idle stream, retry later, or send unary Encode "
                    "calls"
                )
            self._streams += 1
            self._calls += 1
            self._wakers.add(wake)
        try:
            yield
        finally:
            with self._cond:
                self._streams -= 1
                self._wakers.discard(wake)
            self._leave()

    def _leave(self) -> None:
        with self._cond:
            self._calls -= 1
            if self._calls == 0:
                self._cond.notify_all()

    def wait(self, future: Future[T], timeout: float | None) -> T:
        """``future``'s result; TimeoutError after ``timeout`` s; ShuttingDownError on abort."""
        if not future.done():
            either: list[Future[Any]] = [future, self._aborted]
            wait_futures(either, timeout, return_when=FIRST_COMPLETED)
        if future.done():
            return future.result()
        if self._aborted.done():
            raise ShuttingDownError(ABORTED)
        raise TimeoutError

    def drain(self) -> None:
        """Refuse new calls from now on; open streams end once their items are answered."""
        with self._cond:
            self._draining = True
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no work call is in progress; False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._calls == 0, timeout)

    def abort(self) -> None:
        """Calls still waiting for a result answer UNAVAILABLE now (implies :meth:`drain`)."""
        with self._cond:
            self._draining = True
            if not self._aborted.done():
                self._aborted.set_result(None)
            wakers = list(self._wakers)
        for wake in wakers:
            wake()
