"""``HTTPServer``: uvicorn serving the HTTP app (:mod:`hsae_runtime.serving.http`) from a daemon
thread of the gRPC server's process, on a socket bound here (loopback unless told otherwise).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from fastapi import FastAPI


class HTTPServer:
    """uvicorn serving an app from a daemon thread (the gRPC server's process and batcher)."""

    def __init__(self, server: Any, thread: threading.Thread, port: int) -> None:
        self.server, self.thread, self.port = server, thread, port

    @classmethod
    def start(cls, app: FastAPI, host: str, port: int, timeout_s: float = 30.0) -> HTTPServer:
        """Bind ``host:port`` (0: a free port) and serve until :meth:`stop`."""
        import socket

        import uvicorn

        from hsae_runtime.errors import ConfigError

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that name it, and
        # with Nagle on, a response body written after its headers waits for the client's
        # delayed ACK (tens of ms per request). Accepted sockets inherit the option.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            sock.close()
            raise ConfigError(
                f"cannot bind the HTTP port {host}:{port}: {err}", hint="is it already in use?"
            ) from err
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="hsae-http", daemon=True
        )
        thread.start()
        deadline = time.monotonic() + timeout_s
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not server.started:
            server.should_exit = True
            raise ConfigError(f"the HTTP server on {host}:{port} did not start")
        return cls(server, thread, int(sock.getsockname()[1]))

    def stop(self, timeout_s: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
