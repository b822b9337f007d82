"""Generation with the SAE in the loop on Gemma-3 270M: cost against the plain LM, the KV cache,
and batching several requests.

Prints three tables (numbers go to docs/serving.md with the machine line):

1. tokens/s of greedy generation: the plain LM (same KV-cache loop, no hook) vs the SAE spliced
   at the hookpoint at a budget (error term kept), with and without a clamp intervention; the
   runs alternate and the ratio is the median of per-repeat ratios (robust to a busy machine);
2. the KV cache: one new token's step time after a short and a long prompt, vs re-running the
   whole sequence (what a step would cost without the cache);
3. aggregate tokens/s of ``--streams`` requests generating in one batch vs one request;
4. with ``--server-streams``: the same as concurrent Generate streams through a server (gRPC
   client threads in this process; prompts, sampling and the end of each stream as a client
   would see them), with the most generation batches the server ran at once (1: every
   stream that arrived while others were generating was merged into their batch);
   ``--server-only`` prints this table alone.

Run: ``python benchmarks/bench_generate.py [--sae runs/P_A/models/htopk64.safetensors]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from hsae_runtime.generation import GenerationBatch, GenerationRequest
from hsae_runtime.lm import LoadedLM, PrefixCache, forward_cached, load_lm
from hsae_runtime.sae import SAE
from hsae_runtime.steering import Intervention, SteerSpec

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-valid.txt"


def prompt_ids(lm: LoadedLM, text: str, n: int) -> list[int]:
    ids = lm.tokenizer(text)["input_ids"]
    assert len(ids) >= n, f"need {n} prompt tokens, the text has {len(ids)}"
    return ids[:n]


def plain_generate(lm: LoadedLM, prompts: list[list[int]], new_tokens: int) -> float:
    """Greedy generation without a hook (same left padding and cache); returns step seconds."""
    t = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (t - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in prompts])
    cache = PrefixCache()
    logits = forward_cached(lm, ids, mask, cache, (mask.cumsum(-1) - 1).clamp_min(0))
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
        assert cache.mask is not None
        positions = cache.mask.sum(-1, keepdim=True)
        logits = forward_cached(lm, nxt, torch.ones_like(nxt), cache, positions)
    return time.perf_counter() - start


def steered_generate(lm: LoadedLM, sae: SAE, hookpoint: str, reqs: list[GenerationRequest]):
    """Runs ``reqs`` as one batch; returns (step seconds after the prefill, batch)."""
    batch = GenerationBatch(lm, sae, hookpoint, reqs)
    batch.step()  # prefill + first token
    start = time.perf_counter()
    while not batch.done:
        batch.step()
    return time.perf_counter() - start, batch


def best(fn, repeats: int) -> float:
    return min(fn() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sae", type=Path, default=Path("runs/P_A/models/htopk64.safetensors"))
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--budget", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--server-streams", action="store_true",
                        help="also time concurrent Generate streams through a server")
    parser.add_argument("--server-only", action="store_true",
                        help="only the concurrent-streams table (implies --server-streams)")
    parser.add_argument("--server-repeats", type=int, default=2)
    parser.add_argument("--stagger-ms", type=float, default=0.0,
                        help="stream i starts i * this after the first (arrivals mid-generation)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sae = SAE.load(args.sae).requires_grad_(False)
    sae.pack_for_cpu_inference()
    lm = load_lm(sae.config.model_name, device="cpu")
    hookpoint = sae.config.hookpoint
    text = args.text.read_text(encoding="utf-8")[:200_000]
    prompt = prompt_ids(lm, text, args.prompt_tokens)
    n = args.new_tokens
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"torch threads, torch {torch.__version__}; LM {lm.name}, SAE {args.sae.name} "
          f"(d_sae {sae.config.d_sae}) at {hookpoint}, budget {args.budget}; load average "
          f"{os.getloadavg()[0]:.1f} at the start")
    if args.server_only:
        server_streams(args, prompt, lm, sae)
        print(f"load at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        return

    def request(interventions=(), **kw) -> GenerationRequest:
        return GenerationRequest(prompt, SteerSpec(args.budget, tuple(interventions)),
                                 max_new_tokens=n, **kw)

    # 1. SAE in the loop vs plain LM (one request, greedy, steps after the prefill). The runs
    # alternate and each repeat gives a ratio, so load from other processes hits all alike.
    steps = n - 1
    clamp = [Intervention(int(sae.config.d_sae // 2), "set", 40.0)]
    runs: dict[str, list[float]] = {"plain": [], "spliced": [], "steered": []}
    for _ in range(args.repeats):
        runs["plain"].append(plain_generate(lm, [prompt], n))
        runs["spliced"].append(steered_generate(lm, sae, hookpoint, [request()])[0])
        runs["steered"].append(steered_generate(lm, sae, hookpoint, [request(clamp)])[0])
    print(f"\n| generation (1 request, greedy, {steps} steps) | median tokens/s | "
          "median ratio to plain LM (paired) |")
    print("|---|---|---|")
    for name, key in (("plain LM (KV cache, no hook)", "plain"),
                      (f"SAE in the loop, k={args.budget}, error kept", "spliced"),
                      ("same + one clamp", "steered")):
        ratios = [p / t for p, t in zip(runs["plain"], runs[key], strict=True)]
        print(f"| {name} | {steps / statistics.median(runs[key]):.1f} | "
              f"{statistics.median(ratios):.2f} |")

    # 2. KV cache: a step after a short vs a long prompt, vs re-running the whole sequence.
    print("\n| prompt tokens | cached step (ms) | whole-sequence forward (ms) |")
    print("|---|---|---|")
    for length in (32, 512):
        ids = prompt_ids(lm, text, length)

        def cached_step() -> float:
            cache = PrefixCache()
            x = torch.tensor([ids])
            forward_cached(lm, x, torch.ones_like(x), cache, torch.arange(length)[None])
            one = torch.tensor([[ids[-1]]])
            start = time.perf_counter()
            forward_cached(lm, one, torch.ones_like(one), cache, torch.tensor([[length]]))
            return time.perf_counter() - start

        def full_forward() -> float:
            x = torch.tensor([ids + [ids[-1]]])
            start = time.perf_counter()
            with torch.inference_mode():
                lm.model(input_ids=x, use_cache=False, logits_to_keep=1)
            return time.perf_counter() - start

        print(f"| {length} | {best(cached_step, args.repeats) * 1e3:.1f} | "
              f"{best(full_forward, args.repeats) * 1e3:.1f} |")

    # 3. Several requests in one batch vs one (alternating, paired like 1.).
    one, many = [], []
    for _ in range(args.repeats):
        one.append(steered_generate(lm, sae, hookpoint, [request()])[0])
        reqs = [request(seed=i) for i in range(args.streams)]
        many.append(steered_generate(lm, sae, hookpoint, reqs)[0])
    gains = [args.streams * o / m for o, m in zip(one, many, strict=True)]
    print("\n| requests in one batch | median aggregate tokens/s | median gain (paired) |")
    print("|---|---|---|")
    print(f"| 1 | {steps / statistics.median(one):.1f} | 1.00 |")
    print(f"| {args.streams} | {args.streams * steps / statistics.median(many):.1f} | "
          f"{statistics.median(gains):.2f} |")

    if args.server_streams:
        server_streams(args, prompt, lm, sae)


def server_streams(args: argparse.Namespace, prompt: list[int], lm: LoadedLM, sae: SAE) -> None:
    """4. ``--streams`` concurrent Generate streams vs 1 through a server in this process.

    Rows: 1 stream; ``--streams`` streams with continuous batching (newcomers merged into the
    running batch); the same with merging switched off (``absorb`` refused: the scheduler's
    fallback, batches of the requests that arrived together take turns); and, as the bound,
    the same requests as one ``GenerationBatch`` in this process (prompts included, no
    server). The configurations alternate, best of ``--server-repeats`` each. With
    ``--stagger-ms``, stream ``i`` starts ``i`` times that after the first, so the streams
    arrive while the first ones generate (the case continuous batching is for).
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from unittest import mock

    from hsae_runtime.client import Client
    from hsae_runtime.kv_batch import UnsupportedCache
    from hsae_runtime.serving.server import ServerOptions, load_and_start

    running = load_and_start(args.sae, device="cpu", options=ServerOptions(port=0))
    n = args.new_tokens
    scheduler = running.batcher.generation
    assert scheduler is not None

    def refuse(self: GenerationBatch, other: GenerationBatch) -> dict[int, int]:
        raise UnsupportedCache("benchmark: batches kept apart")

    try:
        with Client(running.address, timeout=3600) as client:

            def one_stream(seed: int) -> int:
                time.sleep(seed * args.stagger_ms / 1e3)
                tokens = client.generate(tokens=prompt, budget=args.budget, max_new_tokens=n,
                                         temperature=1.0, seed=seed)
                return sum(1 for _ in tokens)

            def through_server(streams: int) -> tuple[float, int, int]:
                most, done = 0, threading.Event()

                def watch() -> None:  # the most batches the scheduler held at once
                    nonlocal most
                    while not done.wait(0.005):
                        most = max(most, scheduler.running_batches)

                watcher = threading.Thread(target=watch, daemon=True)
                watcher.start()
                start = time.perf_counter()
                with ThreadPoolExecutor(streams) as pool:
                    made = sum(pool.map(one_stream, range(streams)))
                seconds = time.perf_counter() - start
                done.set()
                watcher.join()
                return seconds, made, most

            def apart(streams: int) -> tuple[float, int, int]:
                with mock.patch.object(GenerationBatch, "absorb", refuse):
                    return through_server(streams)

            def one_batch(streams: int) -> tuple[float, int, int]:
                reqs = [GenerationRequest(prompt, SteerSpec(args.budget), max_new_tokens=n,
                                          temperature=1.0, seed=i) for i in range(streams)]
                start = time.perf_counter()
                batch = GenerationBatch(lm, sae, sae.config.hookpoint, reqs)
                made = 0
                while not batch.done:
                    made += len(batch.step())
                return time.perf_counter() - start, made, 1

            one_stream(0)  # warm-up
            configs = [
                ("1 stream", through_server, 1),
                (f"{args.streams} streams, continuous batching", through_server, args.streams),
                (f"{args.streams} streams, batches apart (no merging)", apart, args.streams),
                (f"{args.streams} requests in one GenerationBatch (no server; bound)", one_batch,
                 args.streams),
            ]
            results: dict[str, list[tuple[float, int, int]]] = {c[0]: [] for c in configs}
            for _ in range(args.server_repeats):
                for label, fn, streams in configs:
                    results[label].append(fn(streams))
            print("\n| concurrent Generate streams | tokens | wall s | aggregate tokens/s | gain "
                  "| most batches at once |")
            print("|---|---|---|---|---|---|")
            base = 0.0
            for label, _, _ in configs:
                seconds, made, most = min(results[label], key=lambda r: r[0])
                rate = made / seconds
                base = base or rate
                print(f"| {label} | {made} | {seconds:.1f} | {rate:.1f} | {rate / base:.2f} "
                      f"| {most} |")
    finally:
        running.stop(grace=1)


if __name__ == "__main__":
    main()
