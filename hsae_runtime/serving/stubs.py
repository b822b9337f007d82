"""Access to the generated gRPC stubs, with a clear error when they are missing or stale.

The stubs are build outputs (``make proto``), not committed. We do not generate them on import:
importing a library should not write into its own install folder, and grpcio-tools is a dev
dependency. Instead :func:`load` raises :class:`StubsMissingError` naming the command to run.
Tests and the demo call :func:`hsae_runtime.serving.build_proto.ensure` first, so a fresh clone
works without remembering ``make proto``.
"""

from __future__ import annotations

from types import ModuleType

from hsae_runtime.errors import HSAEError


class StubsMissingError(HSAEError):
    """The generated gRPC modules are missing or older than the proto."""


def load() -> tuple[ModuleType, ModuleType]:
    """``(hsae_pb2, hsae_pb2_grpc)``, checked against the proto when running from a checkout."""
    from hsae_runtime.serving import build_proto

    try:
        from hsae_runtime.serving.pb import hsae_pb2, hsae_pb2_grpc
    except ImportError as err:
        raise StubsMissingError(
            f"the gRPC stubs in {build_proto.PB_DIR} are missing ({err})",
            hint="run `make proto` (python -m hsae_runtime.serving.build_proto)",
        ) from err
    if build_proto.PROTO_FILE.exists() and not build_proto.is_current():
        raise StubsMissingError(
            f"the gRPC stubs in {build_proto.PB_DIR} are older than {build_proto.PROTO_FILE}",
            hint="run `make proto` to regenerate them",
        )
    return hsae_pb2, hsae_pb2_grpc
