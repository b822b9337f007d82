"""Encode-path throughput: torch vs ONNX Runtime, each against the machine's matmul roofline.

The encode path is ``x [N, d_in] -> (values, indices) [N, k]`` (centre, matmul + bias, sorted
top-k, ReLU, per-row mask). Its floor is the ``[N, d_in] @ [d_in, d_sae]`` matmul, so the
roofline is the faster of a plain torch matmul and a plain ONNX Runtime MatMul graph, measured
in the same run and the same thread count. A ratio of 1.0 means the encode costs no more than
the bare matmul. Target: the default CPU backend (ONNX Runtime) ≥ 0.8 at large N.

    python benchmarks/bench_onnx.py                   # d_in 2304, d_sae 16384, k 64
    python benchmarks/bench_onnx.py --n 64,256 --reps 2 --threads 2
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch


def best_ms(paths: dict, reps: int, passes: int = 2) -> dict[str, float]:
    """Best ms per path over ``passes`` passes of (warm-up + ``reps`` back-to-back runs).

    Several passes spread load from other processes on a shared machine over every path;
    back-to-back runs inside a pass keep the previous path's spinning worker threads (ORT's and
    OpenMP's spin for a while after a call) from landing on one path's every sample.
    """
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(passes):
        for name, fn in paths.items():
            fn()  # warm-up (ORT plans memory, torch picks kernels, spinners settle)
            for _ in range(reps):
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    return {name: t * 1e3 for name, t in best.items()}


def matmul_graph(W: np.ndarray) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", W.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", W.shape[1]])],
        [numpy_helper.from_array(W, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                             ir_version=8).SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--d-in", type=int, default=2304)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--n", default="64,256,1024")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import onnxruntime as ort

    from hsae_runtime import SAE, SAEConfig
    from hsae_runtime.exporters.onnx import build_onnx_model
    from hsae_runtime.onnx_backend import OnnxSAE

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with torch.no_grad():
        sae = SAE(SAEConfig(d_in=args.d_in, d_sae=args.d_sae, k_max=args.k))
        sae.b_enc.normal_(0, 0.1)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    # as OnnxSAE does: spinning idle ORT workers would steal the cores from the next path timed
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    cpu = ["CPUExecutionProvider"]
    W = sae.W_enc.detach().numpy()
    mm_sess = ort.InferenceSession(matmul_graph(W), opts, providers=cpu)
    enc_sess = ort.InferenceSession(
        build_onnx_model(sae, reconstruction=False).SerializeToString(), opts, providers=cpu)
    full_sess = ort.InferenceSession(build_onnx_model(sae).SerializeToString(), opts,
                                     providers=cpu)
    backend = OnnxSAE(build_onnx_model(sae, reconstruction=False).SerializeToString(),
                      sae.config, sae.W_dec.detach().numpy(), sae.b_dec.detach().numpy(),
                      providers=cpu, threads=args.threads)

    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"torch {torch.__version__}, onnxruntime {ort.__version__}")
    print(f"d_in={args.d_in} d_sae={args.d_sae} k={args.k}; ratio = roofline time / path time")
    header = f"{'N':>5}  {'path':<34} {'ms':>9} {'tokens/s':>10} {'GFLOP/s':>8} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for n in (int(v) for v in args.n.split(",")):
        x = torch.randn(n, args.d_in)
        x_np = x.numpy()
        k_rows = np.full(n, args.k, dtype=np.int64)
        flops = 2.0 * n * args.d_in * args.d_sae
        with torch.inference_mode():
            rows = best_ms({
                "matmul torch": lambda: x @ sae.W_enc,
                "matmul onnxruntime": lambda: mm_sess.run(None, {"x": x_np}),
                "encode torch (SAE.encode)": lambda: sae.encode(x, args.k),
                "encode onnxruntime (session)": lambda: enc_sess.run(None, {"x": x_np,
                                                                            "k": k_rows}),
                "encode onnxruntime (OnnxSAE)": lambda: backend.encode(x, args.k),
                "encode+reconstruct onnxruntime": lambda: full_sess.run(None, {"x": x_np,
                                                                               "k": k_rows}),
            }, args.reps, args.passes)
        roof = min(rows["matmul torch"], rows["matmul onnxruntime"])
        for name, ms in rows.items():
            print(f"{n:>5}  {name:<34} {ms:>9.1f} {n / ms * 1e3:>10.0f} "
                  f"{flops / ms / 1e6:>8.1f} {roof / ms:>6.2f}")
        print()


if __name__ == "__main__":
    main()
