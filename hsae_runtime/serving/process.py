"""Process-wide settings of the server: malloc arenas and the GIL switch interval.

**Arenas.** glibc gives each thread that allocates concurrently an arena of its own (up to 8
per core), and an arena keeps its high-water mark after the memory is freed. A gRPC server has
dozens of handler threads, so every request that allocated a large buffer on a thread not used
before (a 10 MiB message is parsed into bytes, a protobuf and a ``str``) left tens of MiB of
RSS behind in a fresh arena. Handlers run Python code under the GIL, so their allocations are
serialised anyway; capping the arenas costs no throughput and bounds that growth.

**Switch interval.** A thread that wants the GIL waits up to ``sys.getswitchinterval()``
(5 ms by default) before asking the holder to let go, and answering one RPC takes the GIL many
times (gRPC's polling thread, the handler, the response). While the batch worker ran the LM,
each of those hand-overs could cost a full interval, so health checks beside a long request
occasionally took 200-400 ms. At 0.5 ms they stay near their idle latency; the worker spends its
time in torch ops that release the GIL, so the shorter interval costs it nothing measurable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform
import sys

log = logging.getLogger(__name__)

M_ARENA_MAX = -8
"""glibc's ``mallopt`` parameter number for the arena cap (``malloc.h``)."""

SERVER_ARENAS = 2
"""Arenas the server's threads share (the main thread's is one of them)."""

SERVER_SWITCH_INTERVAL_S = 0.0005
"""The server's GIL switch interval (seconds)."""


def tune_process() -> None:
    """Apply the server's process-wide settings; call before starting thread pools."""
    cap_malloc_arenas()
    sys.setswitchinterval(SERVER_SWITCH_INTERVAL_S)


def cap_malloc_arenas(arenas: int = SERVER_ARENAS) -> bool:
    """Limit the malloc arenas of this process to ``arenas``; ``False`` where it cannot.

    Takes effect for threads that have not allocated yet, so call it before starting thread
    pools. Only glibc has the setting; elsewhere nothing changes.
    """
    if arenas < 1:
        raise ValueError(f"arenas must be >= 1, got {arenas}")
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        done = bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        done = False
    if not done:
        log.warning("could not cap malloc arenas; RSS may keep the high-water of large requests")
    return done
