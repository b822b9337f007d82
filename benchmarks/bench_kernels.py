"""CUDA kernels vs torch: masked top-k and the fused prefix decode (GPU only).

Shapes from the issue: d_in=2304, d_sae=65536, k in {32, 64, 128}, N in {1, 64, 4096}. For each
shape: ``torch.topk`` + ReLU + mask vs the Triton top-k on the same pre-activations, and the
torch segment-sum prefix decode vs the fused kernel at budgets k/4, k/2, k. Prints a ratio table
(torch time / kernel time; > 1 means the kernel is faster) and the card.

    python benchmarks/bench_kernels.py
"""

from __future__ import annotations

import torch


def cuda_ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    if not torch.cuda.is_available():
        print("skipped: no CUDA")
        return
    from hsae_runtime.kernels.prefix_decode import prefix_decode_reference, prefix_decode_triton
    from hsae_runtime.kernels.topk import masked_topk_reference, masked_topk_triton

    d_in, d_sae = 2304, 65536
    dev = "cuda"
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    W_dec = torch.randn(d_sae, d_in, device=dev) / d_in**0.5
    b_dec = torch.zeros(d_in, device=dev)
    header = (f"{'N':>5} {'k':>4}  {'topk torch ms':>13} {'topk kernel ms':>14} {'ratio':>6}  "
              f"{'decode torch ms':>15} {'decode kernel ms':>16} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    for k in (32, 64, 128):
        for n in (1, 64, 4096):
            pre = torch.randn(n, d_sae, device=dev)
            k_rows = torch.randint(1, k + 1, (n,), device=dev)
            t_ref = cuda_ms(lambda: masked_topk_reference(pre, k, k_rows))
            t_ker = cuda_ms(lambda: masked_topk_triton(pre, k, k_rows))
            v, i = masked_topk_reference(pre, k)
            kv, ki = masked_topk_triton(pre, k)
            # Exact ties occur among 4096 x 65536 random floats and torch.topk orders tied ids
            # arbitrarily, so compare values, and check that each id holds its value.
            assert torch.equal(kv, v) and torch.equal(pre.gather(1, ki).clamp_min(0), v)
            budgets = [k // 4, k // 2, k]
            d_ref = cuda_ms(lambda: prefix_decode_reference(v, i, W_dec, b_dec, budgets))
            d_ker = cuda_ms(lambda: prefix_decode_triton(v, i, W_dec, b_dec, budgets))
            print(f"{n:>5} {k:>4}  {t_ref:>13.3f} {t_ker:>14.3f} {t_ref / t_ker:>6.2f}  "
                  f"{d_ref:>15.3f} {d_ker:>16.3f} {d_ref / d_ker:>6.2f}")


if __name__ == "__main__":
    main()
