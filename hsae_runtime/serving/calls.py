"""Tying a batcher job to the gRPC call it serves: the client's deadline becomes the job's,
and the job is cancelled when the client goes away (:func:`bind_to_call`)."""

from __future__ import annotations

import time
from typing import Any

import grpc

from hsae_runtime.serving.jobs import Job


def bind_to_call(job: Job[Any], context: grpc.ServicerContext) -> None:
    """Give ``job`` the call's deadline, and cancel it when the client goes away."""
    remaining = remaining_s(context)
    if remaining is not None:
        job.deadline = time.monotonic() + remaining
    job.is_active = context.is_active
    context.add_callback(job.cancel)


def remaining_s(context: grpc.ServicerContext) -> float | None:
    """Seconds to the client's deadline; ``None`` without one (gRPC then reports ~forever)."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e7:
        return None
    return max(remaining, 0.0)
