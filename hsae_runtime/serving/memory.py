"""Process-wide memory settings of the server: how many malloc arenas its threads may create.

glibc gives each thread that allocates concurrently an arena of its own (up to 8 per core),
and an arena keeps its high-water mark after the memory is freed. A gRPC server has dozens of
handler threads, so every request that allocated a large buffer on a thread not used before
(a 10 MiB message is parsed into bytes, a protobuf and a ``str``) left tens of MiB of RSS
behind in a fresh arena. Handlers run Python code under the GIL, so their allocations are
serialised anyway; capping the arenas costs no throughput and bounds that growth.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

M_ARENA_MAX = -8
"""glibc's ``mallopt`` parameter number for the arena cap (``malloc.h``)."""

SERVER_ARENAS = 2
"""Arenas the server's threads share (the main thread's is one of them)."""


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
