"""Process-wide settings of the server (malloc arena cap, GIL switch interval); token strings."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from hsae_runtime.serving.process import cap_malloc_arenas
from hsae_runtime.serving.tokenise import token_strings

# Counts the heaps malloc_info lists after eight threads have each allocated, with and without
# the cap. A fresh interpreter each time: the cap only affects threads that allocate after it.
_COUNT_HEAPS = textwrap.dedent(
    """
    import ctypes, os, sys, tempfile, threading
    from hsae_runtime.serving.process import cap_malloc_arenas
    if sys.argv[1] == "cap":
        assert cap_malloc_arenas(1)
    barrier = threading.Barrier(8)
    def work():
        barrier.wait()  # all eight allocate at once, so without the cap they need arenas
        for _ in range(2000):
            bytearray(4096)
    threads = [threading.Thread(target=work) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    libc = ctypes.CDLL("libc.so.6")
    libc.fopen.restype = ctypes.c_void_p
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    path = tempfile.mktemp()
    fp = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, fp)
    libc.fclose(fp)
    print(open(path).read().count("<heap nr="))
    os.unlink(path)
    """
)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the arena cap is a glibc setting")
def test_arena_cap_stops_threads_from_creating_arenas():
    def heaps(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _COUNT_HEAPS, mode], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        return int(out.stdout.strip())

    assert heaps("cap") == 1
    # Without it the same threads spread over several arenas (whether they do depends on
    # contention, so repeat before concluding the cap made no difference).
    assert max(heaps("free") for _ in range(3)) > 1


def test_arena_cap_rejects_nonsense():
    with pytest.raises(ValueError, match="arenas"):
        cap_malloc_arenas(0)


def test_token_strings_equal_batch_decode(lm):
    tok = lm.tokenizer
    ids = list(range(len(tok)))  # every id, special tokens included
    assert token_strings(tok, ids) == tok.batch_decode([[i] for i in ids])
    assert token_strings(tok, []) == []


class _SlowTokenizer:
    """A tokenizer without a Rust backend: only ``batch_decode``."""

    def batch_decode(self, seqs):
        return [f"<{s[0]}>" for s in seqs]


def test_token_strings_fall_back_without_a_fast_backend():
    assert token_strings(_SlowTokenizer(), [3, 1]) == ["<3>", "<1>"]


def test_tune_process_shortens_the_gil_switch_interval():
    out = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom hsae_runtime.serving.process import "
         "tune_process, SERVER_SWITCH_INTERVAL_S as s\ntune_process()\n"
         "print(sys.getswitchinterval() == s, s < 0.005)"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


def test_tune_process_freezes_start_up_objects():
    code = "import gc\nfrom hsae_runtime.serving.process import tune_process\ntune_process()\n"
    code += "print(gc.get_freeze_count() > 1000)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_tune_malloc_reports_whether_it_applied():
    from hsae_runtime.serving.process import tune_malloc

    assert tune_malloc() is (platform.libc_ver()[0] == "glibc")
    with pytest.raises(ValueError, match="arenas"):
        tune_malloc(arenas=0)
