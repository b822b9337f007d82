"""Early stopping at the hookpoint: time of ``capture`` after block L / time of a full forward.

Target (issue 3): ratio ≤ (L+1)/N_layers + 0.1. The full forward includes the LM head, which is
most of the cost for large-vocabulary models (Gemma-3 270M: 262k words).

    python benchmarks/bench_early_stop.py                      # Gemma-3 270M from PyPI GGUF
    python benchmarks/bench_early_stop.py --lm path/to/folder --batch 4 --context 128
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hsae_runtime.gguf import gemma3_270m_path
from hsae_runtime.lm import capture, load_lm


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description="early-stop benchmark")
    parser.add_argument("--lm", default=None, help="LM (default: Gemma-3 270M GGUF from PyPI)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", default=None, help="comma-separated block indices")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    lm = load_lm(args.lm or str(gemma3_270m_path()), device=args.device)
    vocab = len(lm.tokenizer)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (args.batch, args.context), generator=gen)
    ids[:, 0] = lm.tokenizer.bos_token_id or 2
    ids = ids.to(lm.device)
    n = lm.n_layers
    layers = ([int(x) for x in args.layers.split(",")] if args.layers
              else sorted({0, n // 4, n // 2, (3 * n) // 4, n - 1}))

    def full() -> None:
        with torch.inference_mode():
            lm.model(input_ids=ids, use_cache=False)
            if lm.device.type == "cuda":
                torch.cuda.synchronize()

    t_full = _time(full, args.repeats)
    print(f"{lm.name}: {n} blocks, batch {args.batch}x{args.context}, device {lm.device}")
    print(f"full forward: {1000 * t_full:.1f} ms")
    print(f"{'hookpoint':<18} {'ms':>8} {'ratio':>7} {'target':>7}  ok")
    worst = 0.0
    for layer in layers:
        def early(layer: int = layer) -> None:
            capture(lm, f"model.layers.{layer}", ids)
            if lm.device.type == "cuda":
                torch.cuda.synchronize()

        t = _time(early, args.repeats)
        ratio, target = t / t_full, (layer + 1) / n + 0.1
        worst = max(worst, ratio - target)
        print(f"{'model.layers.' + str(layer):<18} {1000 * t:>8.1f} {ratio:>7.3f} {target:>7.3f}  "
              f"{'yes' if ratio <= target else 'NO'}")
    print("all within target" if worst <= 0 else "SOME ABOVE TARGET")


if __name__ == "__main__":
    main()
