"""Server plumbing: health, reflection, TLS + token auth, graceful shutdown, the CLI process.

TLS uses a throwaway self-signed certificate made with the ``openssl`` command (skipped where
it is missing). The CLI test runs ``hsae-runtime serve`` as a real process, queries it with
``hsae-runtime encode`` and checks that SIGTERM exits 0.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from serving_helpers import DelayedBackend, self_signed_tls

from hsae_runtime.serving import build_proto

build_proto.ensure()  # generated stubs are build outputs: make sure they exist and are current

from hsae_runtime.client import Client, ServerError  # noqa: E402
from hsae_runtime.serving import server as srv  # noqa: E402
from hsae_runtime.serving.backend import TorchBackend  # noqa: E402

pytestmark = pytest.mark.timeout(120)
X = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_tls(tmp_path_factory.mktemp("tls"))


def test_health_and_reflection(sae):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    running = srv.start(TorchBackend(sae), options=srv.ServerOptions(port=0))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "hsae.v1.HSAE"):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            db = ProtoReflectionDescriptorDatabase(channel)
            assert "hsae.v1.HSAE" in db.get_services()
            service = DescriptorPool(db).FindServiceByName("hsae.v1.HSAE")
            assert {m.name for m in service.methods} == {
                "Info", "Encode", "EncodeStream", "Decode", "Generate"
            }
    finally:
        running.stop(grace=1)


def test_tls_and_token(sae, tls_files):
    cert, key = tls_files
    options = srv.ServerOptions(port=0, tls_cert=cert, tls_key=key, token="s3cret")
    running = srv.start(TorchBackend(sae), options=options)
    address = f"127.0.0.1:{running.port}"
    try:
        with Client(address, token="s3cret", tls=cert) as good:
            assert good.info().d_in == 64
            res = good.encode(activations=X, budgets=[4])
            np.testing.assert_array_equal(res.indices, sae.encode(torch.from_numpy(X), 4).indices)
            assert len(list(good.stream([{"activations": X, "budgets": [2]}]))) == 1
        for token in (None, "wrong"):
            with Client(address, token=token, tls=cert) as bad:
                with pytest.raises(ServerError) as info:
                    bad.encode(activations=X, budgets=[4])
                assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(ServerError) as info:
                    list(bad.stream([{"activations": X, "budgets": [2]}]))
                assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        # health stays open for probes
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(address, creds) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with Client(address, token="s3cret", timeout=3) as plain:  # TLS server, plain client
            with pytest.raises(ServerError) as info:
                plain.info()
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(grace=1)


def test_graceful_stop_finishes_in_flight_request(sae):
    running = srv.start(DelayedBackend(sae, 0.8), options=srv.ServerOptions(port=0))
    address = f"127.0.0.1:{running.port}"
    result: dict[str, object] = {}

    def slow_call() -> None:
        with Client(address) as c:
            result["res"] = c.encode(activations=X, budgets=[4])

    caller = threading.Thread(target=slow_call)
    caller.start()
    time.sleep(0.3)  # the request is now inside the batch
    stopper = threading.Thread(target=running.stop, kwargs={"grace": 10})
    stopper.start()
    time.sleep(0.1)
    with Client(address, timeout=3) as late:  # refused once stop has begun
        with pytest.raises(ServerError) as info:
            late.encode(activations=X, budgets=[4])
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
    caller.join(10)
    stopper.join(10)
    assert "res" in result and result["res"].k == 4  # type: ignore[attr-defined]


def test_cli_serve_encode_and_sigterm(tiny_sae_path, tiny_lm_dir):
    from typer.testing import CliRunner

    from hsae_runtime.cli import app

    proc = subprocess.Popen(
        [sys.executable, "-m", "hsae_runtime.cli", "-v", "serve", str(tiny_sae_path),
         "--lm", str(tiny_lm_dir), "--port", "0", "--device", "cpu", "--grace", "5"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        port = None
        deadline = time.monotonic() + 90
        lines = []
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            match = re.search(r"serving on 127\.0\.0\.1:(\d+)", line)
            port = int(match.group(1)) if match else None
        assert port, "".join(lines)
        assert "k_max=16" in "".join(lines)
        out = CliRunner().invoke(
            app, ["encode", "--server", f"127.0.0.1:{port}", "--budgets", "4,8", "the lazy dog"]
        )
        assert out.exit_code == 0, out.output
        assert "fvu@4" in out.output and "fvu@8" in out.output and " | " in out.output
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "SIGTERM" in err and "stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
