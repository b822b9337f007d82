"""Shared pieces of the serving tests (not a test module): a slow backend, an in-process server,
a throwaway TLS certificate.

``start_server`` runs the real gRPC server on 127.0.0.1, port 0, over the tiny SAE (and the
tiny LM when given), with small limits so size errors are cheap to provoke.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from hsae_runtime.lm import capture, special_token_mask
from hsae_runtime.sae import SAE, SparseCode
from hsae_runtime.serving import build_proto

build_proto.ensure()  # generated stubs are build outputs: make sure they exist and are current

from hsae_runtime.serving import server as srv  # noqa: E402
from hsae_runtime.serving.backend import TorchBackend  # noqa: E402
from hsae_runtime.serving.limits import BatcherConfig, ServingLimits  # noqa: E402
from hsae_runtime.serving.stubs import load as load_stubs  # noqa: E402

pb, pb_grpc = load_stubs()

HOOKPOINT = "model.layers.1"
TEXT = "The quick brown fox jumps over the lazy dog."
MAX_MESSAGE = 256 * 2**10
MAX_TOKENS = 512
BUG_VALUE = 12345.0
"""An activation row holding this value makes :class:`DelayedBackend` raise (a fake bug)."""
GOOD = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)


class DelayedBackend(TorchBackend):
    """The torch backend, sleeping ``delay`` s before each encode; raises on :data:`BUG_VALUE`."""

    def __init__(self, sae: SAE, delay: float = 0.0) -> None:
        super().__init__(sae)
        self.delay = delay

    def encode(self, x: torch.Tensor, k: int) -> SparseCode:
        time.sleep(self.delay)
        if bool((x == BUG_VALUE).any()):
            raise RuntimeError("simulated bug")
        return super().encode(x, k)


def start_server(sae: SAE, lm=None, *, delay: float = 0.0, **batching) -> srv.RunningServer:
    """Serve ``sae`` (and ``lm`` at :data:`HOOKPOINT`) on a free loopback port."""
    options = srv.ServerOptions(
        port=0,
        limits=ServingLimits(max_request_tokens=MAX_TOKENS, max_message_bytes=MAX_MESSAGE),
        batching=BatcherConfig(**{"max_wait_ms": 2.0, **batching}),
    )
    backend = DelayedBackend(sae, delay)
    if lm is None:
        return srv.start(backend, options=options)
    return srv.start(
        backend,
        lm=lm,
        hookpoint=HOOKPOINT,
        capture=lambda ids, mask, cache=None: capture(lm, HOOKPOINT, ids, mask, cache=cache),
        options=options,
    )


@contextmanager
def running_server(sae: SAE, lm=None, **kwargs) -> Iterator[srv.RunningServer]:
    """:func:`start_server` for a ``with`` block (a module fixture), stopped with 1 s grace."""
    running = start_server(sae, lm, **kwargs)
    try:
        yield running
    finally:
        running.stop(grace=1)


def self_signed_tls(folder: Path) -> tuple[Path, Path]:
    """``(cert.pem, key.pem)`` in ``folder``: a one-day EC certificate for localhost and
    127.0.0.1 made by the ``openssl`` command; skips the test where that is missing."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def req(**fields):
    return pb.EncodeRequest(**fields)


def wire(x: np.ndarray, dtype=None):
    dtype = dtype if dtype is not None else pb.DTYPE_FLOAT32
    return pb.Tensor(data=x.tobytes(), shape=list(x.shape), dtype=dtype)


def direct_encode(lm, sae: SAE, ids: list[int], k: int, include_special: bool = False):
    """What the server should answer for token ``ids``: (rows ``[T', d_in]``, their code)."""
    ids_t = torch.tensor([ids])
    acts = capture(lm, HOOKPOINT, ids_t)[0]  # (T, d_in)
    keep = torch.ones(len(ids), dtype=torch.bool)
    if not include_special:
        keep = ~special_token_mask(lm.tokenizer, ids_t)[0]
    x = acts[keep]
    return x, sae.encode(x, k)
