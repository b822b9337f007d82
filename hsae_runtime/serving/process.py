"""Process-wide settings of the server: malloc arenas, the garbage collector, the GIL interval.

**Arenas.** glibc gives each thread that allocates concurrently an arena of its own (up to 8
per core), and an arena keeps its high-water mark after the memory is freed. A gRPC server has
dozens of handler threads, so every request that allocated a large buffer on a thread not used
before (a 10 MiB message is parsed into bytes, a protobuf and a ``str``) left tens of MiB of
RSS behind in a fresh arena. Handlers run Python code under the GIL, so their allocations are
serialised anyway; capping the arenas costs no throughput and bounds that growth.

**Garbage collector.** After start-up the process holds millions of Python objects (the LM's
modules, the tokenizer, gRPC), and each full collection walked all of them with the GIL held:
a request that allocates many objects (a list of 8192 token ids) now and then set one off, and
every other thread, health checks included, stalled for 200-400 ms. Start-up objects are
frozen (``gc.freeze``), so collections only walk what requests create.

**Switch interval.** A thread that wants the GIL waits up to ``sys.getswitchinterval()``
(5 ms by default) before asking the holder to let go, and one RPC takes the GIL several times
(gRPC's polling thread, the handler, the response); the server uses 0.5 ms so that hand-overs
beside the batch worker stay short. The worker spends its time in torch ops that release the
GIL, so the shorter interval does not slow it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
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
    """Apply the server's process-wide settings; call once the models are loaded and before
    the thread pools start."""
    cap_malloc_arenas()
    sys.setswitchinterval(SERVER_SWITCH_INTERVAL_S)
    gc.collect()
    gc.freeze()


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
