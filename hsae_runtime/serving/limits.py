"""Every default of serving, in one light module (no torch, no grpc): the CLI, the server, the
batcher, the servicer and the client all read their defaults from here.

* :class:`ServingLimits` - per-request and per-stream limits (reported by Info);
* :class:`BatcherConfig` - the batching queue: batch size, wait, queue length, chunking;
* ``DEFAULT_*`` - where a server listens and how long calls and shutdown may take.
"""

from __future__ import annotations

from dataclasses import dataclass

from hsae_runtime.errors import ConfigError

DEFAULT_HOST = "127.0.0.1"
"""Interface a server binds unless told otherwise (loopback: not exposed to the network)."""
DEFAULT_PORT = 50051
"""TCP port of a server and of the client's default address."""
DEFAULT_ADDRESS = f"{DEFAULT_HOST}:{DEFAULT_PORT}"
"""``host:port`` the client and ``hsae-runtime encode`` connect to by default."""
DEFAULT_GRACE_S = 10.0
"""Seconds in-flight calls get to finish when a server stops."""
DEFAULT_CALL_TIMEOUT_S = 60.0
"""The client's default deadline per call, in seconds."""
DEFAULT_MAX_NEW_TOKENS = 20
"""Tokens a Generate request makes when it leaves ``max_new_tokens`` at 0."""


@dataclass(frozen=True)
class ServingLimits:
    """Per-request limits (reported by Info) and per-stream ones."""

    max_request_tokens: int = 8192
    """Most tokens (or activation / code rows) in one request."""
    max_message_bytes: int = 64 * 2**20
    """Largest message received or sent (the client uses the same default)."""
    stream_window: int = 32
    """Most requests of one EncodeStream in flight at once (back-pressure on the reader)."""
    max_streams: int = 16
    """Most EncodeStreams open at once; more get RESOURCE_EXHAUSTED. Each open stream holds
    one gRPC handler thread, so the server keeps this at most half of its threads."""
    stream_idle_timeout_s: float = 60.0
    """An EncodeStream with nothing in flight that sends nothing for this long is closed with
    DEADLINE_EXCEEDED, freeing its thread."""
    max_generations: int = 16
    """Most Generate requests in progress at once (each streams from a handler thread); more
    get RESOURCE_EXHAUSTED."""

    def __post_init__(self) -> None:
        for name in (
            "max_request_tokens",
            "max_message_bytes",
            "stream_window",
            "max_streams",
            "max_generations",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.stream_idle_timeout_s > 0:  # also refuses NaN
            raise ConfigError(
                f"stream_idle_timeout_s must be > 0, got {self.stream_idle_timeout_s}"
            )


@dataclass(frozen=True)
class BatcherConfig:
    """Limits of the batching queue (:class:`~hsae_runtime.serving.batcher.Batcher`)."""

    max_batch_tokens: int = 8192
    """Most tokens (padded LM positions + activation or code rows) in one batch. A single
    larger request still runs, alone."""

    max_wait_ms: float = 5.0
    """Longest the worker, once free, holds a batch open for more jobs to join (it closes
    sooner once the expected number of jobs has joined)."""

    max_queue: int = 256
    """Most jobs waiting; beyond it requests get RESOURCE_EXHAUSTED."""

    max_chunk_tokens: int = 512
    """Longer jobs (LM tokens, activation or code rows) run in chunks of this size,
    interleaved with other jobs, so no request waits for more than one chunk of a long one.
    0 never splits."""

    batching: bool = True
    """False runs every job alone (one forward / encode per request): for benchmarks."""

    def __post_init__(self) -> None:
        for name, low in (("max_batch_tokens", 1), ("max_queue", 1), ("max_chunk_tokens", 0)):
            if getattr(self, name) < low:
                raise ConfigError(
                    f"BatcherConfig.{name} must be >= {low}, got {getattr(self, name)}"
                )
        if not self.max_wait_ms >= 0:  # also refuses NaN
            raise ConfigError(f"BatcherConfig.max_wait_ms must be >= 0, got {self.max_wait_ms}")
