"""Who may call a server: TLS credentials from PEM files and the bearer-token interceptor.

* :func:`tls_credentials` reads and parses the certificate chain and key up front, so a
  missing, unreadable or non-PEM file is a :class:`~hsae_runtime.errors.ConfigError` naming that
  file, not a bind failure later.
* :class:`TokenInterceptor` refuses calls without ``authorization: Bearer <token>`` (compared
  in constant time); health checks pass freely, so probes need no token. A token over plain TCP
  is readable on the wire: use both.
"""

from __future__ import annotations

import hmac
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from hsae_runtime.errors import ConfigError
from hsae_runtime.serving.errors import AuthError, status_for

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
"""Method-name prefix of ``grpc.health.v1``: reachable without a token."""


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` (health checks pass freely)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        got = dict(details.invocation_metadata).get("authorization", "")
        if hmac.compare_digest(str(got).encode(), self._expected):
            return handler
        code, message = status_for(
            AuthError("missing or wrong token: send metadata 'authorization: Bearer <token>'")
        )
        log.debug("%s %s peer rejected", details.method, code.name)

        def deny(_request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(code, message)

        match (handler.request_streaming, handler.response_streaming):
            case (False, False):
                return grpc.unary_unary_rpc_method_handler(deny)
            case (False, True):
                return grpc.unary_stream_rpc_method_handler(deny)
            case (True, False):
                return grpc.stream_unary_rpc_method_handler(deny)
            case (True, True):
                return grpc.stream_stream_rpc_method_handler(deny)
            case other:
                raise ValueError(f"unexpected handler kind {other}")


def tls_credentials(cert: Path | None, key: Path | None) -> grpc.ServerCredentials | None:
    """Server credentials from a PEM certificate chain and key (``None`` without TLS).

    Each file is read and parsed here, so a missing, unreadable or non-PEM file is a
    :class:`ConfigError` naming that file (not a bind failure later).
    """
    if cert is None or key is None:
        return None
    cert_pem = _read_pem(cert, "certificate")
    key_pem = _read_pem(key, "private key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cadata=cert_pem.decode("ascii", errors="replace"))
    except (ssl.SSLError, ValueError) as err:
        raise ConfigError(
            f"TLS certificate {cert} is not a readable PEM certificate ({err})",
            hint="pass a PEM certificate chain (-----BEGIN CERTIFICATE-----) to --tls-cert",
        ) from err
    try:  # the password callback keeps OpenSSL from prompting for an encrypted key
        context.load_cert_chain(cert, key, password=lambda: "")
    except (ssl.SSLError, ValueError) as err:
        raise ConfigError(
            f"TLS key {key} is not a readable PEM private key for {cert} ({err})",
            hint="pass the certificate's unencrypted PEM private key to --tls-key",
        ) from err
    return grpc.ssl_server_credentials([(key_pem, cert_pem)])


def _read_pem(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(
            f"cannot read the TLS {what} {path}: {err.strerror or err}",
            hint=f"pass a readable PEM {what} file",
        ) from err
    if b"-----BEGIN " not in data:
        raise ConfigError(
            f"TLS {what} {path} is not a readable PEM file (no -----BEGIN line)",
            hint=f"pass a PEM {what} file",
        )
    return data
