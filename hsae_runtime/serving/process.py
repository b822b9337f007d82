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
import functools
import gc
import logging
import platform
import sys

log = logging.getLogger(__name__)

M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -2, -3, -8
"""glibc's ``mallopt`` parameter numbers (``malloc.h``)."""

SERVER_ARENAS = 2
"""Arenas the server's threads share (the main thread's is one of them)."""

SERVER_MMAP_THRESHOLD = 1 << 20
"""Allocations from this size (bytes) are mmapped, and the threshold stays put."""

SERVER_TOP_PAD = 64 << 20
"""Free space (bytes) an arena keeps at its top for the next large buffers."""

SERVER_SWITCH_INTERVAL_S = 0.0005
"""The server's GIL switch interval (seconds)."""


@functools.cache
def tune_process() -> None:
    """Apply the server's process-wide settings; call once the models are loaded and before
    the thread pools start. Runs once per process: a second server in the same process (tests,
    an application embedding ``start()``) finds them set and pays no second full collection."""
    tune_malloc()
    sys.setswitchinterval(SERVER_SWITCH_INTERVAL_S)
    gc.collect()
    gc.freeze()


def tune_malloc(
    mmap_threshold: int = SERVER_MMAP_THRESHOLD,
    top_pad: int = SERVER_TOP_PAD,
    arenas: int = SERVER_ARENAS,
) -> bool:
    """Set glibc's allocator up for a long-running server with large per-batch buffers;
    ``False`` where it cannot (not glibc).

    * ``M_MMAP_THRESHOLD``: glibc raises its mmap threshold each time a large mmapped block is
      freed, so after a few batches the multi-MB buffers come from the heap, which fragments
      and lets RSS creep up under mixed load. An explicit threshold turns that off.
    * ``M_TOP_PAD``: with the threshold alone, every buffer over it would be mmapped,
      first-touched and unmapped again per batch, so each batch pays thousands of page faults.
      Each arena keeps up to this much free space at its top, large buffers are carved from it,
      and a steady batch size faults nothing (numbers in ``docs/benchmarks-core.md``). The cost
      is at most that pad per arena, hence the arena cap.
    * ``M_ARENA_MAX``: see the module docstring.
    """
    done = cap_malloc_arenas(arenas)
    done &= _mallopt(M_MMAP_THRESHOLD, mmap_threshold) & _mallopt(M_TOP_PAD, top_pad)
    if not done:
        log.warning("could not tune malloc; RSS may keep the high-water of large requests")
    return done


def cap_malloc_arenas(arenas: int = SERVER_ARENAS) -> bool:
    """Cap the malloc arenas of this process at ``arenas``; takes effect for threads that have
    not allocated yet (``False`` where this is not glibc)."""
    if arenas < 1:
        raise ValueError(f"arenas must be >= 1, got {arenas}")
    return _mallopt(M_ARENA_MAX, arenas)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """This process's C library if it is glibc (``None`` elsewhere)."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _mallopt(param: int, value: int) -> bool:
    """``mallopt(param, value)``; ``False`` where this is not glibc."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(param, value))
