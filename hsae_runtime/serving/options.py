"""The settings of a gRPC server (:class:`ServerOptions`): where it listens, TLS and token,
handler threads, the optional HTTP / metrics ports, and the limits and batching it runs with.

A frozen dataclass with no side effects: ``__post_init__`` only validates, raising
:class:`~hsae_runtime.errors.ConfigError` with a hint. :mod:`~hsae_runtime.serving.server`
starts a server from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hsae_runtime.errors import ConfigError
from hsae_runtime.serving.limits import DEFAULT_HOST, DEFAULT_PORT, BatcherConfig, ServingLimits


@dataclass(frozen=True)
class ServerOptions:
    """Network, security and capacity settings of a server."""

    host: str = DEFAULT_HOST
    """Interface to bind; ``0.0.0.0`` exposes the server to the network."""
    port: int = DEFAULT_PORT
    """TCP port; 0 picks a free one (tests)."""
    limits: ServingLimits = field(default_factory=ServingLimits)
    batching: BatcherConfig = field(default_factory=BatcherConfig)
    tls_cert: Path | None = None
    """PEM certificate chain; with ``tls_key`` turns on TLS."""
    tls_key: Path | None = None
    """PEM private key for ``tls_cert``."""
    token: str | None = None
    """Bearer token every call except health must carry."""
    max_workers: int = 64
    """gRPC handler threads: bounds concurrent RPCs being served (the rest wait in gRPC). Open
    EncodeStreams may hold at most half of them (``limits.max_streams``)."""
    reserved_workers: int = 2
    """A separate pool of handler threads for health checks and Info only, so they answer
    while every other thread is busy."""
    http_port: int | None = None
    """Also serve the HTTP/JSON API on this port of ``host`` (0: a free one; None: no HTTP)."""
    metrics_port: int | None = None
    """Serve Prometheus ``/metrics`` on this port of ``host`` (0: a free one; None: none)."""
    features_dir: Path | None = None
    """A static folder (latent dashboards) served under ``/features`` on the HTTP port."""

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError(
                "TLS needs both a certificate and a key", hint="pass --tls-cert and --tls-key"
            )
        if self.token is not None and not self.token.strip():
            raise ConfigError("the token is empty", hint="put a non-empty token in --token-file")
        for name in ("port", "http_port", "metrics_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ConfigError(f"{name} must be in 0..65535, got {value}")
        if self.features_dir is not None and self.http_port is None:
            raise ConfigError("--features needs --http-port", hint="the folder is served over HTTP")
        if self.features_dir is not None and not Path(self.features_dir).is_dir():
            raise ConfigError(f"--features {self.features_dir} is not a folder")
        if self.max_workers < 2 or self.reserved_workers < 1:
            raise ConfigError(
                f"need max_workers >= 2 and reserved_workers >= 1, got {self.max_workers} and "
                f"{self.reserved_workers}"
            )
        if self.limits.max_streams > self.max_workers // 2:
            raise ConfigError(
                f"max_streams={self.limits.max_streams} is over half of the "
                f"{self.max_workers} handler threads",
                hint="open streams each hold a thread: lower --max-streams so unary calls "
                "always find one",
            )
