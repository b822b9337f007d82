"""Load round of the serving benchmark: many clients, mixed good and bad requests.

32 clients each send a random mix: encodes of 1-8 rows at mixed budgets, with FVU and
reconstructions, decodes, info, and ~15 % bad requests that must come back INVALID_ARGUMENT.
``bench_load`` reports unexpected errors, p50/p99 latency, throughput and the server's RSS growth
after a warm-up round. Run through ``bench_serving.py``.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from serving_abuse import bench_abuse
from serving_common import D_IN, K_MAX, ServerProcess, lm_vocab_size, pct

from hsae_runtime.serving import build_proto

build_proto.ensure()

from hsae_runtime.client import Client, ServerError  # noqa: E402

BAD_KINDS = ("budget_zero", "budget_over", "wrong_width", "nan", "empty")


def mixed_request(c: Client, rng: random.Random) -> tuple[str, grpc.StatusCode | None]:
    """Send one random request; return (kind, the status code we expect: None = OK)."""
    roll = rng.random()
    rows = rng.choice((1, 1, 2, 4, 8))
    x = np.random.default_rng(rng.randrange(2**31)).standard_normal((rows, D_IN))
    x = x.astype(np.float32)
    if roll < 0.15:
        kind = rng.choice(BAD_KINDS)
        match kind:
            case "budget_zero":
                c.encode(activations=x, budgets=[0, 8])
            case "budget_over":
                c.encode(activations=x, budgets=[K_MAX + 1])
            case "wrong_width":
                c.encode(activations=x[:, :100], budgets=[8])
            case "nan":
                x[0, 0] = np.nan
                c.encode(activations=x, budgets=[8])
            case "empty":
                c.encode(activations=np.zeros((0, D_IN), np.float32), budgets=[8])
            case other:
                raise ValueError(other)
        return kind, grpc.StatusCode.INVALID_ARGUMENT
    if roll < 0.20:
        c.info()
        return "info", None
    budgets = sorted(rng.sample([8, 16, 32, 64], rng.randint(1, 4)))
    if roll < 0.30:
        res = c.encode(activations=x, budgets=budgets)
        c.decode(res.indices, res.values, budgets=budgets)
        return "encode+decode", None
    recon, fvu = rng.random() < 0.1, rng.random() < 0.3
    c.encode(activations=x, budgets=budgets, reconstructions=recon, fvu=fvu)
    return "encode", None


def run_clients(
    address: str,
    clients: int,
    per_client: int,
    seed: int,
    request: Callable[[Client, random.Random], tuple[str, str]],
) -> tuple[list[float], list[str], Counter[str], float]:
    """``clients`` threads each send ``per_client`` requests made by ``request(client, rng)``,
    which returns (kind, problem; "" when the outcome was the expected one).

    Returns the latencies (s), the problems, the count of each kind and the wall time (s).
    """
    latencies: list[float] = []
    unexpected: list[str] = []
    kinds: Counter[str] = Counter()
    lock = threading.Lock()

    def run(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        with Client(address, timeout=300) as c:
            for _ in range(per_client):
                t = time.perf_counter()
                kind, problem = request(c, rng)
                dt = time.perf_counter() - t
                with lock:
                    latencies.append(dt)
                    kinds[kind] += 1
                    if problem:
                        unexpected.append(problem)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(latencies), unexpected, kinds, time.perf_counter() - start


def _mixed(c: Client, rng: random.Random) -> tuple[str, str]:
    try:
        kind, expected = mixed_request(c, rng)
    except ServerError as err:
        return "error", "" if err.code == grpc.StatusCode.INVALID_ARGUMENT else str(err)
    return kind, f"{kind}: expected {expected.name}, got OK" if expected is not None else ""


def load_round(address: str, clients: int, per_client: int, seed: int) -> dict[str, object]:
    lat, unexpected, kinds, elapsed = run_clients(address, clients, per_client, seed, _mixed)
    return {
        "requests": len(lat),
        "bad_requests": kinds["error"],
        "unexpected": unexpected,
        "p50_ms": lat[len(lat) // 2] * 1e3,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
        "rps": len(lat) / elapsed,
    }


def bench_load(model: Path, per_client: int) -> dict[str, object]:
    server = ServerProcess(model)
    try:
        # Warm-up, a full round: handler threads, malloc arenas and oneDNN's buffers for the
        # varying batch shapes reach their working size first, so the growth measured below is
        # what a leak would show, not first-use allocation. Since batches merge closed-loop
        # clients (larger batches, higher peak), RSS plateaus after ~8000 requests here: four
        # rounds after a 2/3-size warm-up gave +4.6 %, +1.1 %, -2.2 %, -0.1 %.
        load_round(server.address, 32, per_client, seed=1)
        rss_before = server.rss_bytes()
        result = load_round(server.address, 32, per_client, seed=2)
        rss_after = server.rss_bytes()
        rc = server.stop()
    except BaseException:
        server.proc.kill()
        raise
    result["rss_before_mb"] = rss_before / 2**20
    result["rss_after_mb"] = rss_after / 2**20
    result["rss_growth_pct"] = 100 * (rss_after - rss_before) / rss_before
    result["exit_code"] = rc
    return result


# ---------------------------------------------------------------------------- LM traffic
def corpus_words() -> list[str]:
    """Words of the WikiText-2 validation text next to the checkout (or a small stand-in)."""
    path = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext2-valid.txt"
    if path.exists():
        return path.read_text(encoding="utf-8").split()
    stand_in = "the cat sat on the mat while seven engines hummed in the winter castle " * 50
    return [str(word) for word in stand_in.split()]


def text_token_request(
    c: Client, rng: random.Random, words: list[str], vocab: int, d_in: int
) -> tuple[str, grpc.StatusCode | None]:
    """One random LM-traffic request: text, token ids, a few activation rows or a bad one."""
    roll = rng.random()
    budgets = sorted(rng.sample([8, 16, 32, 64], rng.randint(1, 3)))
    fvu = rng.random() < 0.3
    if roll < 0.4:
        start, n = rng.randrange(len(words) - 64), rng.randint(5, 60)
        c.encode(text=" ".join(words[start : start + n]), budgets=budgets, fvu=fvu)
        return "text", None
    if roll < 0.8:
        ids = [rng.randrange(vocab) for _ in range(rng.randint(4, 64))]
        c.encode(tokens=ids, budgets=budgets, fvu=fvu)
        return "tokens", None
    if roll < 0.9:
        x = np.random.default_rng(rng.randrange(2**31)).standard_normal((rng.randint(1, 4), d_in))
        c.encode(activations=x.astype(np.float32), budgets=budgets)
        return "activations", None
    match rng.choice(("bad_token", "empty_text", "budget_zero")):
        case "bad_token":
            c.encode(tokens=[1, vocab + 5], budgets=[8])
        case "empty_text":
            c.encode(text="   ", budgets=[8])
        case "budget_zero":
            c.encode(text="hello", budgets=[0])
        case other:
            raise ValueError(other)
    return "bad", grpc.StatusCode.INVALID_ARGUMENT


def lm_round(
    address: str, clients: int, per_client: int, seed: int, words: list[str], vocab: int, d_in: int
) -> dict[str, Any]:
    def request(c: Client, rng: random.Random) -> tuple[str, str]:
        expected: grpc.StatusCode | None = grpc.StatusCode.INVALID_ARGUMENT
        try:
            kind, expected = text_token_request(c, rng, words, vocab, d_in)
        except ServerError as err:
            return "error", "" if err.code == expected else str(err)
        return kind, f"{kind}: expected {expected.name}, got OK" if expected else ""

    lat, unexpected, _, _ = run_clients(address, clients, per_client, seed, request)
    return {"requests": len(lat), "unexpected": unexpected, "p99_ms": pct(lat, 0.99) * 1e3}


def bench_soak(model: Path, rounds: int, clients: int, per_client: int) -> dict[str, Any]:
    """RSS over ``rounds`` rounds of text / token traffic after one warm-up round."""
    words, vocab = corpus_words(), lm_vocab_size(model)
    server = ServerProcess(model, lm=True)
    try:
        with Client(server.address) as c:
            d_in = c.info().d_in
        start_mem = server.memory()
        lm_round(server.address, clients, per_client, 0, words, vocab, d_in)  # warm-up
        mems, unexpected, requests = [server.memory()], [], 0
        for r in range(rounds):
            res = lm_round(server.address, clients, per_client, r + 1, words, vocab, d_in)
            mems.append(server.memory())
            unexpected += res["unexpected"]
            requests += res["requests"]
            print(
                f"  soak round {r + 1}/{rounds}: {_mem_text(mems[-1])}, {server.threads()} threads",
                flush=True,
            )
        rc = server.stop(timeout=180)
    except BaseException:
        server.proc.kill()
        raise
    first, last = mems[0], mems[-1]
    return {
        "requests": requests,
        "unexpected": unexpected,
        "start": start_mem,
        "after_warmup": first,
        "end": last,
        "peak_rss": max(m["VmRSS"] for m in mems),
        "rss_growth_pct": 100 * (last["VmRSS"] - first["VmRSS"]) / first["VmRSS"],
        "exit_code": rc,
    }


def _mem_text(m: dict[str, int]) -> str:
    return " ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in m.items())


# ---------------------------------------------------------------------------- main
def main() -> int:
    import argparse
    import os
    import tempfile

    from serving_common import lm_sae, machine

    parser = argparse.ArgumentParser(description="LM soak and abuse rounds of the serving bench")
    parser.add_argument("--quick", action="store_true", help="2 short soak rounds (smoke test)")
    parser.add_argument("--rounds", type=int, default=8, help="soak rounds after the warm-up")
    parser.add_argument("--per-client", type=int, default=300, help="soak requests per client")
    parser.add_argument("--only", choices=("soak", "abuse"), help="run one of the two")
    args = parser.parse_args()
    rounds, per_client = (2, 30) if args.quick else (args.rounds, args.per_client)
    print(f"machine: {machine()}")
    mib = 2**20
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        model = lm_sae(Path(tmp))
        if model is None:
            return 1
        if args.only != "abuse":
            s = bench_soak(model, rounds, 8, per_client)
            a, e = s["after_warmup"], s["end"]
            print(
                f"soak: {rounds} rounds x 8 clients x {per_client} text/token requests after a "
                f"warm-up round ({s['requests']} requests), unexpected errors "
                f"{len(s['unexpected'])}: {s['unexpected'][:3]}"
            )
            print(f"  start       {_mem_text(s['start'])}")
            print(f"  after warm-up {_mem_text(a)}")
            print(f"  end         {_mem_text(e)}")
            print(
                f"  RSS growth {s['rss_growth_pct']:+.1f} % (target < 5 %), peak "
                f"{s['peak_rss'] / mib:.0f} MiB, exit code {s['exit_code']}"
            )
            ok &= s["rss_growth_pct"] < 5 and not s["unexpected"]
        if args.only != "soak":
            r = bench_abuse(model)
            t0, t1 = r["text10_rss"]
            print("abuse round (Gemma-3 270M L6 server, defaults):")
            print(f"  10 MiB text alone: refused in {r['text10_s'] * 1e3:.0f} ms, RSS "
                  f"{t0 / mib:.0f} -> {t1 / mib:.0f} MiB ({(t1 - t0) / mib:+.1f} MiB)")  # fmt: skip
            print(f"  10 MiB text under load: {r['text10_busy_s'] * 1e3:.0f} ms")
            print(f"  idle streams open / refused: {r['streams']}")
            print(f"  max-size request: {r['long_s']:.1f} s (one 512-token request alone: "
                  f"{r['chunk_ms']:.0f} ms)")  # fmt: skip
            print(f"  16 small clients: {r['small_requests']} requests, p50 "
                  f"{r['small_p50_ms']:.0f} ms, p99 {r['small_p99_ms']:.0f} ms, max "
                  f"{r['small_max_ms']:.0f} ms")  # fmt: skip
            print(f"  health: {r['health_checks']} checks, p99 {r['health_p99_ms']:.1f} ms, max "
                  f"{r['health_max_ms']:.1f} ms, failures {r['health_failures']}; slowest "
                  f"(s, ms) {r['health_slowest']}; events (s) {r['events']}")  # fmt: skip
            print(f"  RSS {r['rss_before'] / mib:.0f} -> {r['rss_after'] / mib:.0f} MiB; "
                  f"unexpected errors {len(r['unexpected'])}: {r['unexpected'][:3]}; "
                  f"exit code {r['exit_code']}")  # fmt: skip
            ok &= not r["unexpected"] and not r["health_failures"] and r["health_max_ms"] < 100
    print(f"load average at the end: {os.getloadavg()}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
