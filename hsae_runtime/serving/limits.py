"""Per-request and per-stream limits of a server, in one light module (the CLI's defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from hsae_runtime.errors import ConfigError


@dataclass(frozen=True)
class ServingLimits:
    """Per-request limits (reported by Info) and per-stream ones."""

    max_request_tokens: int = 8192
    """Most tokens (or activation / code rows) in one request."""
    max_message_bytes: int = 64 * 2**20
    """Largest message received or sent."""
    stream_window: int = 32
    """Most requests of one EncodeStream in flight at once (back-pressure on the reader)."""
    max_streams: int = 16
    """Most EncodeStreams open at once; more get RESOURCE_EXHAUSTED. Each open stream holds
    one gRPC handler thread, so the server keeps this at most half of its threads."""
    stream_idle_timeout_s: float = 60.0
    """An EncodeStream with nothing in flight that sends nothing for this long is closed with
    DEADLINE_EXCEEDED, freeing its thread."""

    def __post_init__(self) -> None:
        for name in ("max_request_tokens", "max_message_bytes", "stream_window", "max_streams"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.stream_idle_timeout_s > 0:  # also refuses NaN
            raise ConfigError(
                f"stream_idle_timeout_s must be > 0, got {self.stream_idle_timeout_s}"
            )
