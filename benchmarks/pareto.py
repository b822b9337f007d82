"""Reproduce the paper's Pareto claim on a real LM: one HierarchicalTopK SAE vs TopK SAEs.

One command (from the repository root)::

    .venv/bin/python benchmarks/pareto.py --out runs/pareto          # Gemma-3 270M, ~1 h
    .venv/bin/python benchmarks/pareto.py --quick --out runs/quick   # tiny random LM, ~1 min

Stages, each resumable from what it left under ``--out`` (rerun the command to continue):

1. **split** the text into documents (WikiText's `` = Title = `` headings delimit articles;
   otherwise blank-line blocks) and hold out every ``--eval-every``-th document: the eval part
   is never trained on (``data/train.txt``, ``data/eval.txt``);
2. **cache** hookpoint activations of both parts once (``hsae_runtime.training.buffer``'s
   activation cache, float32, special tokens excluded);
3. **train** one HierarchicalTopK SAE (k_max) and TopK SAEs at ``--topk-ks`` with
   ``hsae_runtime.training.trainer.train`` on exactly the same cached activations, data order,
   initialisation, token count, width and hyper-parameters (``models/*.safetensors``). Every
   SAE has the same k_max, so a TopK SAE can be read at any budget, not just its own;
4. **time** training steps, interleaving the objectives so that a shared CPU slows all alike;
5. **eval**: FVU on the whole eval part and dead-latent % at every ``--eval-ks`` budget, and the
   next-token CE delta with the reconstruction spliced in on a subset of eval contexts;
6. **report**: ``results.json``, ``table.md``, ``pareto.png``.

The CE delta is the expensive part (a 262k-word LM head), so the spliced runs share work: per
context the LM runs to the hookpoint once per group of configurations, and the hook returns a
batch of ``M`` replacement activations (``[M, T, d]`` from ``[1, T, d]``), so later blocks run
batched; logits are made ``--ce-chunk`` positions at a time and never kept. The first context
is cross-checked against ``hsae_runtime.lm.splice``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "wikitext2-valid.txt"
logger = logging.getLogger("pareto")
_TITLE = re.compile(r"^ ?= [^=].* = ?$")  # " = Title = " (not " = = Section = = ")


@dataclass
class Settings:
    """Everything the experiment depends on; recorded in results.json."""

    out: str
    lm: str | None = None  # None: Gemma-3 270M Q4_K_M from PyPI
    hookpoint: str = "model.layers.9"
    data: str = str(DEFAULT_DATA)
    eval_every: int = 5
    max_docs: int | None = None
    context: int = 1024
    lm_batch: int = 4
    d_sae: int = 4096
    k_max: int = 64
    topk_ks: tuple[int, ...] = (8, 16, 32, 64)
    eval_ks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    tokens: int = 2_097_152
    batch_tokens: int = 1024
    lr: float = 5e-4
    warmup_frac: float = 0.02
    decay_frac: float = 0.2
    aux_alpha: float = 0.0
    b_dec_init: str = "median"
    seed: int = 0
    ce_tokens: int = 8192
    ce_ks: tuple[int, ...] | None = None  # None: the eval budgets
    ce_mode: str = "all"  # all: every SAE at ce_ks; claims: only the configurations the claims use
    ce_group: int = 12
    ce_chunk: int = 256
    timing_rounds: int = 4
    timing_steps: int = 5
    threads: int | None = None
    cache_dir: str | None = None  # where data/ and cache/ live (default: out); runs can share
    train: bool = True  # False: evaluate the models already under out/ (partial reports)
    quick: bool = False


def cache_root(s: Settings) -> Path:
    """Folder of the document split and activation caches (the cache is keyed on its paths)."""
    return Path(s.cache_dir or s.out)


def sae_specs(s: Settings) -> list[tuple[str, str, int]]:
    """``(name, objective, k)`` of every SAE: the hierarchical one first."""
    return [(f"htopk{s.k_max}", "hierarchical", s.k_max)] + [
        (f"topk{k}", "topk", k) for k in s.topk_ks
    ]


# ---------------------------------------------------------------------------- 1. split
def split_documents(s: Settings, out: Path) -> tuple[Path, Path, dict[str, int]]:
    """Write ``data/train.txt`` and ``data/eval.txt`` (one blank-line block per document)."""
    from hsae_runtime.errors import DataError

    path = Path(s.data).expanduser()
    if not path.is_file():
        raise DataError(f"data file not found: {s.data}",
                        hint="the benchmark reads ../shared/data/wikitext2-valid.txt relative to "
                        "the repository root; pass --data FILE to use another text")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    docs: list[list[str]] = []
    if any(_TITLE.match(line) for line in lines):
        for line in lines:
            if _TITLE.match(line) or not docs:
                docs.append([])
            if line.strip():
                docs[-1].append(line.strip())
    else:
        from hsae_runtime.training.data import read_documents

        docs = [[ln for ln in d.splitlines() if ln.strip()] for d in read_documents(path)]
    docs = [d for d in docs if d][: s.max_docs]
    train = [d for i, d in enumerate(docs) if i % s.eval_every != s.eval_every - 1]
    held = [d for i, d in enumerate(docs) if i % s.eval_every == s.eval_every - 1]
    if not train or not held:
        raise DataError(f"{s.data} has {len(docs)} documents; need at least {s.eval_every}")
    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, part in (("train", train), ("eval", held)):
        p = folder / f"{name}.txt"
        text = "\n\n".join("\n".join(d) for d in part) + "\n"
        # Rewrite only on change: the activation cache is keyed on the file's mtime.
        if not p.is_file() or p.read_text(encoding="utf-8") != text:
            p.write_text(text, encoding="utf-8")
        paths.append(p)
    return paths[0], paths[1], {"documents": len(docs), "train_docs": len(train),
                                "eval_docs": len(held)}


# ---------------------------------------------------------------------------- 2. cache
def cache_activations(s: Settings, lm: Any, text: Path, folder: Path, block_contexts: int):
    """Fill (or reuse) the activation cache for ``text``; returns the ActivationCache."""
    from hsae_runtime.lm import resolve_hookpoint
    from hsae_runtime.training.buffer import ActivationCache, BlockSource, LMActivationSource

    source = LMActivationSource(lm, resolve_hookpoint(lm.model, s.hookpoint), text,
                                context=s.context, block_contexts=block_contexts,
                                lm_batch=s.lm_batch)
    cache = ActivationCache(folder, source.key(), "float32")
    if not cache.complete:
        t0 = time.perf_counter()
        n = sum(len(a) for _, a in BlockSource(source, cache).blocks())
        logger.info("cached %d tokens of %s in %.0f s (%.0f tok/s)", n, text.name,
                    time.perf_counter() - t0, n / (time.perf_counter() - t0))
    return cache


def load_cache(cache: Any) -> Tensor:
    return torch.cat([a for _, a in cache.blocks()])  # (N, d_in)


# ---------------------------------------------------------------------------- 3. train
def train_config(s: Settings, lm_name: str, train_txt: Path, name: str, objective: str,
                 k: int, block_contexts: int, out: Path):
    from hsae_runtime.training.trainer import TrainConfig

    return TrainConfig(
        lm=lm_name, hookpoint=s.hookpoint, data=str(train_txt), d_sae=s.d_sae, k_max=s.k_max,
        out=str(out / "models" / f"{name}.safetensors"), objective=objective,  # type: ignore
        k=k, tokens=s.tokens, batch_tokens=s.batch_tokens, lr=s.lr, warmup_frac=s.warmup_frac,
        decay_frac=s.decay_frac, context=s.context, lm_batch=s.lm_batch,
        block_contexts=block_contexts, b_dec_init=s.b_dec_init,  # type: ignore
        aux_alpha=s.aux_alpha, seed=s.seed, activation_cache=str(cache_root(s) / "cache" / "train"),
        cache_dtype="float32", device="cpu", progress=True, log_every=50,
    )


def train_order(s: Settings) -> list[tuple[str, str, int]]:
    """HierarchicalTopK and the widest TopK first: the claims need those two most."""
    specs = sae_specs(s)
    widest = [sp for sp in specs[1:] if sp[2] == max(s.topk_ks)]
    return specs[:1] + widest + [sp for sp in specs[1:] if sp not in widest]


def train_one(s: Settings, lm_name: str, train_txt: Path, block_contexts: int, out: Path,
              name: str, objective: str, k: int) -> dict[str, Any]:
    """Train one SAE (or reuse an existing model trained with the same settings)."""
    from hsae_runtime.training.trainer import train

    record = out / "models" / f"{name}.json"
    cfg = train_config(s, lm_name, train_txt, name, objective, k, block_contexts, out)
    want = {"config": {key: str(v) for key, v in asdict(cfg).items()}}
    if record.is_file() and Path(cfg.out).is_file():
        old = json.loads(record.read_text())
        if old.get("config") == want["config"]:
            logger.info("reusing %s", cfg.out)
            return old
    logger.info("training %s (%s, k=%d, %d tokens)", name, objective, k, s.tokens)
    result = train(cfg)
    losses = result.losses
    stats = {**want, "steps": result.steps, "tokens": result.tokens,
             "wall_s": result.wall_seconds, "sae_s": result.sae_seconds,
             "s_per_step": result.sae_seconds / max(1, result.steps),
             "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:]))}
    record.write_text(json.dumps(stats, indent=2))
    logger.info("%s: %d steps in %.0f s (%.3f s/step), final loss %.4f", name, result.steps,
                result.wall_seconds, stats["s_per_step"], stats["final_loss"])
    return stats


# ---------------------------------------------------------------------------- 4. timing
def time_steps(s: Settings, acts: Tensor) -> dict[str, float]:
    """Median seconds per training step of each objective, interleaved round by round.

    The step is the trainer's (encode, loss, backward, decoder projection, Adam, renorm);
    interleaving makes a CPU shared with other work slow every objective alike.
    """
    from hsae_runtime import loss as loss_mod
    from hsae_runtime.config import SAEConfig
    from hsae_runtime.sae import SAE
    from hsae_runtime.training.optim import project_decoder_grad, renorm_decoder

    scale = math.sqrt(acts.shape[1] / acts[:4096].pow(2).sum(-1).mean().item())
    gen = torch.Generator().manual_seed(s.seed)
    batches = [acts[torch.randint(len(acts), (s.batch_tokens,), generator=gen)] * scale
               for _ in range(s.timing_steps)]
    runs = {}
    for name, objective, k in sae_specs(s):
        sae = SAE(SAEConfig(d_in=acts.shape[1], d_sae=s.d_sae, k_max=s.k_max))
        runs[name] = (sae, torch.optim.Adam(sae.parameters(), lr=s.lr), objective, k, [])
    for _ in range(s.timing_rounds):
        for _name, (sae, opt, objective, k, times) in runs.items():
            encode = getattr(sae, "encode_for_training", sae.encode)
            for x in batches:
                t0 = time.perf_counter()
                code = encode(x, k)
                if objective == "hierarchical":
                    loss = loss_mod.hierarchical_topk_loss(x, code.values, code.indices,
                                                           sae.W_dec, sae.b_dec)
                else:
                    loss = loss_mod.topk_loss(x, code.values, code.indices, sae.W_dec, sae.b_dec)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                project_decoder_grad(sae)
                opt.step()
                renorm_decoder(sae)
                times.append(time.perf_counter() - t0)
    # The first round warms up (kernel compilation, allocator); report the median of the rest.
    return {name: sorted(r[4][s.timing_steps:])[len(r[4][s.timing_steps:]) // 2]
            for name, r in runs.items()}


# ---------------------------------------------------------------------------- 5. eval
@torch.no_grad()
def eval_fvu(sae: Any, acts: Tensor, ks: list[int], chunk: int = 4096) -> dict[int, dict]:
    """FVU over all of ``acts [N, d_in]``, its per-token mean, and % latents never firing.

    ``fvu`` is the usual Σ‖x − x̂‖² / Σ‖x − mean‖². On Gemma-3 a few tokens with massive
    activations hold most of that variance, so ``fvu_token`` (the mean over tokens of
    ‖x − x̂‖² / ‖x − mean‖², ``hsae_runtime.sae.per_token_fvu``) shows the typical token.
    """
    from hsae_runtime.sae import per_token_fvu

    mean = acts.double().mean(0)
    denom = (acts.double() - mean).pow(2).sum().item()
    sse = torch.zeros(len(ks), dtype=torch.float64)
    tok = torch.zeros(len(ks), dtype=torch.float64)
    fired = torch.zeros(len(ks), sae.config.d_sae, dtype=torch.bool)
    for start in range(0, len(acts), chunk):
        x = acts[start:start + chunk]
        code = sae.encode(x, max(ks))
        recon = sae.reconstruct_from_code(code, ks)  # (n_budgets, N, d_in)
        sse += (recon - x).double().pow(2).sum(dim=(1, 2))
        tok += per_token_fvu(x.double(), recon.double(), mean).sum(-1)
        for i, k in enumerate(ks):
            idx = code.indices[:, :k][code.values[:, :k] > 0]
            fired[i, idx] = True
    dead = 100.0 * (1 - fired.float().mean(1))
    return {k: {"fvu": sse[i].item() / denom, "fvu_token": tok[i].item() / len(acts),
                "dead_pct": dead[i].item()} for i, k in enumerate(ks)}


def _ce_contexts(lm: Any, eval_txt: Path, context: int, n_tokens: int) -> list[Tensor]:
    """Eval contexts spread over the eval part (every j-th) until ``n_tokens`` predictions."""
    from hsae_runtime.training.data import iter_contexts, read_documents

    contexts = list(iter_contexts(read_documents(eval_txt), lm.tokenizer, context))
    need = max(1, math.ceil(n_tokens / (context - 1)))
    step = max(1, len(contexts) // need)
    return contexts[::step][:need]


def _ce_per_token(lm: Any, hidden: Tensor, ids: Tensor, chunk: int) -> Tensor:
    """Next-token CE ``[M, T-1]`` from final hidden states ``[M, T, d]`` (chunked LM head)."""
    head = lm.model.get_output_embeddings().weight  # (vocab, d)
    cfg = getattr(lm.model.config, "text_config", None) or lm.model.config
    cap = getattr(cfg, "final_logit_softcapping", None)
    target = ids[1:]
    out = torch.empty(hidden.shape[0], len(target))
    for m in range(hidden.shape[0]):
        for a in range(0, len(target), chunk):
            logits = F.linear(hidden[m, :-1][a:a + chunk], head).float()  # (chunk, vocab)
            if cap:
                logits = torch.tanh(logits / cap) * cap
            tgt = target[a:a + chunk]
            out[m, a:a + chunk] = logits.logsumexp(-1) - logits.gather(-1, tgt[:, None])[:, 0]
    return out


@torch.no_grad()
def eval_ce(s: Settings, lm: Any, saes: dict[str, Any], eval_txt: Path, out: Path,
            on_context: Any = None) -> dict:
    """CE delta of every (SAE, k) on a subset of eval contexts; partial results saved."""
    from hsae_runtime.lm import hook, next_token_loss, resolve_hookpoint, special_token_mask, splice

    configs = ce_configs(s, list(saes))
    hp = resolve_hookpoint(lm.model, s.hookpoint)
    base = lm.model.get_decoder() if hasattr(lm.model, "get_decoder") else lm.model.model
    contexts = _ce_contexts(lm, eval_txt, s.context, s.ce_tokens)
    state_path = out / "ce_partial.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    key = [s.ce_tokens, s.context, [list(c) for c in configs]]
    if state.get("key") != key:
        state = {"key": key, "done": 0, "tokens": 0,
                 "clean": 0.0, "sums": {f"{n}@{k}": 0.0 for n, k in configs}}
    t0 = time.perf_counter()
    for ci in range(state["done"], len(contexts)):
        ids = contexts[ci]
        keep = ~special_token_mask(lm.tokenizer, ids[None])[0]  # (T,) positions SAEs replace
        count = keep[1:].float()  # predictions of special tokens do not count
        recon: dict[tuple[str, int], Tensor] = {}

        def make(x: Tensor) -> None:
            for name, sae in saes.items():
                mine = [k for n, k in configs if n == name]
                rec = sae.reconstruct(x[0], mine)  # (n_budgets, T, d)
                for i, k in enumerate(mine):
                    recon[(name, k)] = torch.where(keep[:, None], rec[i].to(x.dtype), x[0])

        groups = [[None] + configs[: s.ce_group - 1]]
        rest = configs[s.ce_group - 1:]
        groups += [rest[i:i + s.ce_group] for i in range(0, len(rest), s.ce_group)]
        for group in groups:
            def swap(x: Tensor, group=group) -> Tensor:  # (1, T, d) -> (M, T, d)
                if not recon:
                    make(x)
                return torch.stack([x[0] if c is None else recon[c] for c in group])

            with hook(lm.model, hp, swap):
                hidden = base(input_ids=ids[None], use_cache=False).last_hidden_state
            ce = _ce_per_token(lm, hidden, ids, s.ce_chunk)  # (M, T-1)
            for c, row in zip(group, ce):
                total = float((row * count).sum())
                if c is None:
                    state["clean"] += total
                else:
                    state["sums"][f"{c[0]}@{c[1]}"] += total
                if ci == 0 and c is not None and c == configs[0]:
                    _cross_check(lm, hp, ids, keep, recon[c], row, splice, next_token_loss)
        state["tokens"] += int(count.sum())
        state["done"] = ci + 1
        state_path.write_text(json.dumps(state))
        logger.info("CE context %d/%d (%.0f s)", ci + 1, len(contexts), time.perf_counter() - t0)
        if on_context is not None:
            on_context(_ce_summary(state, len(contexts)))
    return _ce_summary(state, len(contexts))


def _ce_summary(state: dict[str, Any], n_contexts: int) -> dict[str, Any]:
    n = max(1, state["tokens"])
    return {"tokens": state["tokens"], "contexts_done": state["done"], "contexts": n_contexts,
            "clean_ce": state["clean"] / n,
            "delta": {key: v / n - state["clean"] / n for key, v in state["sums"].items()}}


def ce_configs(s: Settings, names: list[str]) -> list[tuple[str, int]]:
    """``(sae, k)`` pairs to splice: every SAE at every CE budget, or only those the claims use
    (HierarchicalTopK at each TopK's k, each TopK at its own k, the widest TopK at the smallest)."""
    match s.ce_mode:
        case "all":
            return [(name, k) for name in names for k in (s.ce_ks or s.eval_ks)]
        case "claims":
            h, top = f"htopk{s.k_max}", f"topk{max(s.topk_ks)}"
            pairs = [(h, k) for k in s.topk_ks] + [(f"topk{k}", k) for k in s.topk_ks]
            return pairs + [(top, min(s.topk_ks))] if min(s.topk_ks) != max(s.topk_ks) else pairs
        case other:
            raise ValueError(f"ce_mode must be all or claims, got {other!r}")


def _cross_check(lm, hp, ids, keep, recon, row, splice, next_token_loss, n: int = 128) -> None:
    """The batched splice must agree with ``hsae_runtime.lm.splice`` (first ``n`` tokens)."""
    short, rec = ids[None, :n], recon[:n]
    logits = splice(lm, hp, short, replace=lambda x: rec[None].to(x.dtype),
                    positions=keep[None, :n])
    ref = next_token_loss(logits, short)[0]
    err = (ref - row[: n - 1]).abs().max().item()
    logger.info("batched splice vs lm.splice: max |ΔCE| = %.2e", err)
    if err > 1e-3 * max(1.0, ref.abs().max().item()):
        raise RuntimeError(f"batched splice disagrees with lm.splice (max |ΔCE| {err:.3g})")


# ---------------------------------------------------------------------------- 6. report
def write_report(s: Settings, results: dict[str, Any], out: Path) -> None:
    ks = list(s.eval_ks)
    names = [n for n, _, _ in sae_specs(s) if n in results["fvu"]]
    trained = {n: k for n, _, k in sae_specs(s)}
    fvu = results["fvu"]
    ce = results.get("ce") or {}

    def row(name: str, fmt, key: str) -> str:
        cells = []
        for k in ks:
            value = (fvu[name][str(k)][key] if key != "ce"
                     else ce.get("delta", {}).get(f"{name}@{k}"))
            text = "–" if value is None else fmt(value)
            cells.append(f"**{text}**" if k == trained[name] else text)
        return f"| {name} | " + " | ".join(cells) + " |"

    head = "| SAE | " + " | ".join(f"k={k}" for k in ks) + " |\n|---|" + "---|" * len(ks)
    lines = ["### FVU on the held-out documents (bold: the budget the SAE was trained at)", "",
             head, *[row(n, lambda v: f"{v:.4f}", "fvu") for n in names], "",
             "### Per-token FVU: mean over eval tokens of ‖x − x̂‖² / ‖x − mean‖²", "",
             head, *[row(n, lambda v: f"{v:.4f}", "fvu_token") for n in names], ""]
    if ce:
        lines += [f"### CE delta (nats/token) with the reconstruction spliced in "
                  f"({ce['tokens']} predicted tokens, "
                  f"{ce['contexts_done']}/{ce['contexts']} contexts, "
                  f"clean CE {ce['clean_ce']:.4f})", "",
                  head, *[row(n, lambda v: f"{v:+.4f}", "ce") for n in names], ""]
    lines += ["### Dead latents (% never firing on the eval part at that budget)", "",
              head, *[row(n, lambda v: f"{v:.1f}", "dead_pct") for n in names], ""]
    summary = results["summary"]
    lines += ["### Claims", "", "| quantity | value |", "|---|---|"]
    lines += [f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |"
              for key, value in summary.items()]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    plot(s, results, out / "pareto.png")


def plot(s: Settings, results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(s.eval_ks)
    ce = (results.get("ce") or {}).get("delta", {})
    panels = [("fvu", "FVU (held-out documents)"),
              ("fvu_token", "per-token FVU (mean over tokens)")]
    panels += [("ce", "CE delta (nats/token)")] if ce else []
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.6), squeeze=False)
    colours = plt.get_cmap("viridis")
    specs = sae_specs(s)
    for j, (key, label) in enumerate(panels):
        ax = axes[0, j]
        for i, (name, objective, k_train) in enumerate(specs):
            if name not in results["fvu"]:
                continue
            if key != "ce":
                ys = [results["fvu"][name][str(k)][key] for k in ks]
            else:
                ys = [ce.get(f"{name}@{k}", float("nan")) for k in ks]
            if objective == "hierarchical":
                ax.plot(ks, ys, "o-", color="crimson", lw=2.5, zorder=5,
                        label=f"HierarchicalTopK (k_max={k_train})")
                continue
            colour = colours(0.15 + 0.7 * (i - 1) / max(1, len(specs) - 2))
            ax.plot(ks, ys, "--", color=colour, lw=1.2, marker="." if key != "ce" else "o",
                    label=f"TopK k={k_train} (dashed: read at other k)")
            if k_train in ks:
                ax.plot([k_train], [ys[ks.index(k_train)]], "s", color=colour, ms=9, zorder=6)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        positive = key != "ce" or all(v > 0 for v in ce.values())
        if positive:
            ax.set_yscale("log")
        else:
            ax.set_yscale("symlog", linthresh=0.01)
        ax.set_xlabel("budget k (active latents per token)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"{results['lm']} @ {s.hookpoint}, d_sae={s.d_sae}, "
                 f"{results['train_tokens']:,} training tokens (squares: trained k)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def summarise(s: Settings, fvu: dict, timing: dict[str, float], stats: dict) -> dict[str, Any]:
    h = f"htopk{s.k_max}"
    out: dict[str, Any] = {}

    def at(name: str, k: int, key: str) -> float | None:
        return fvu.get(name, {}).get(str(k), {}).get(key)

    top = f"topk{max(s.topk_ks)}"
    low = 8 if 8 in s.eval_ks else min(s.eval_ks)
    for key, label in (("fvu", "FVU"), ("fvu_token", "per-token FVU")):
        for k in s.topk_ks:
            a, b = at(h, k, key), at(f"topk{k}", k, key)
            if a is not None and b is not None:
                out[f"{label} ratio HTopK/TopK-{k} at k={k}"] = a / b
        a, b = at(top, low, key), at(h, low, key)
        if a is not None and b is not None:
            out[f"{label} {top} read at k={low} / HTopK at k={low}"] = a / b
    for name, t in timing.items():
        if name != h:
            out[f"step time HTopK / {name} (interleaved, median)"] = timing[h] / t
    for name, st in stats.items():
        out[f"training s/step {name} (whole run)"] = st["s_per_step"]
    return out


# ---------------------------------------------------------------------------- main
def _tiny_lm(out: Path) -> str:
    """The tests' tiny random Gemma-2 + tokenizer, built once under ``out`` (quick mode)."""
    folder = out / "tiny_lm"
    if not (folder / "config.json").is_file():
        import importlib.util

        spec = importlib.util.spec_from_file_location("_conftest", REPO / "tests" / "conftest.py")
        assert spec is not None and spec.loader is not None
        conftest = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(conftest)
        folder.mkdir(parents=True, exist_ok=True)
        tok = conftest.build_tiny_tokenizer(folder)
        conftest.build_tiny_lm(folder, vocab_size=len(tok))
    return str(folder)


def run(s: Settings) -> dict[str, Any]:
    from hsae_runtime.lm import gemma3_270m_path, load_lm
    from hsae_runtime.sae import SAE

    if s.threads:
        torch.set_num_threads(s.threads)
        try:  # numba's kernels have their own pool; cap it too (never via the env var, which
            import numba  # numba refuses to change once its threads have started)

            numba.set_num_threads(min(s.threads, numba.config.NUMBA_NUM_THREADS))
        except ImportError:
            pass
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    train_txt, eval_txt, split = split_documents(s, cache_root(s))
    lm_name = s.lm or (_tiny_lm(out) if s.quick else str(gemma3_270m_path()))
    lm = load_lm(lm_name, device="cpu")
    timings["load_lm_s"] = time.perf_counter() - t
    # One block holds every training context, so each pass shuffles over the whole train part.
    block_contexts = 1 << 20
    t = time.perf_counter()
    train_cache = cache_activations(s, lm, train_txt, cache_root(s) / "cache" / "train",
                                    block_contexts)
    timings["cache_s"] = time.perf_counter() - t
    train_acts = load_cache(train_cache)

    # Train every SAE first, then evaluate; a killed run keeps the finished models.
    stats: dict[str, Any] = {}
    for name, objective, k in train_order(s):
        path = out / "models" / f"{name}.safetensors"
        if s.train:
            t = time.perf_counter()
            stats[name] = train_one(s, lm_name, train_txt, block_contexts, out, name,
                                    objective, k)
            timings["train_s"] = timings.get("train_s", 0.0) + time.perf_counter() - t
        elif path.is_file():
            stats[name] = json.loads((out / "models" / f"{name}.json").read_text())
        else:
            logger.warning("no %s (--no-train): left out of the report", path)
    times_path = out / "step_times.json"
    step_times: dict[str, float] = (json.loads(times_path.read_text())
                                    if times_path.is_file() else {})
    if s.train and s.timing_rounds > 1:
        t = time.perf_counter()
        step_times = time_steps(s, train_acts)
        times_path.write_text(json.dumps(step_times, indent=2))
        timings["step_timing_s"] = time.perf_counter() - t
        logger.info("median s/step: %s", {k: round(v, 4) for k, v in step_times.items()})

    t = time.perf_counter()
    eval_cache = cache_activations(s, lm, eval_txt, cache_root(s) / "cache" / "eval",
                                   block_contexts)
    timings["cache_s"] += time.perf_counter() - t
    eval_acts = load_cache(eval_cache)
    logger.info("activations: %d train tokens, %d eval tokens (d=%d)", len(train_acts),
                len(eval_acts), train_acts.shape[1])
    results: dict[str, Any] = {
        "settings": asdict(s), "lm": Path(lm_name).name, "split": split,
        "train_tokens_unique": len(train_acts), "eval_tokens": len(eval_acts),
        "train_tokens": s.tokens // s.batch_tokens * s.batch_tokens,
        "passes": s.tokens / len(train_acts), "fvu": {}, "training": stats,
        "step_time_s": step_times, "timings_s": timings, "ce": None,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
    }

    def save() -> None:
        results["summary"] = summarise(s, results["fvu"], results["step_time_s"],
                                       results["training"])
        write_report(s, results, out)
        (out / "results.json").write_text(json.dumps(results, indent=2))

    saes: dict[str, Any] = {}
    for name in stats:
        t = time.perf_counter()
        saes[name] = SAE.load(out / "models" / f"{name}.safetensors")
        fvu = eval_fvu(saes[name], eval_acts, list(s.eval_ks))
        results["fvu"][name] = {str(k): v for k, v in fvu.items()}
        timings["eval_fvu_s"] = timings.get("eval_fvu_s", 0.0) + time.perf_counter() - t
        logger.info("%s FVU: %s", name, {k: round(v["fvu"], 4) for k, v in fvu.items()})
        save()
    save()  # an FVU-only report exists before the slow CE stage
    if s.ce_tokens > 0:
        t = time.perf_counter()

        def save_ce(ce: dict[str, Any]) -> None:  # after every context: partial results survive
            results["ce"] = ce
            timings["eval_ce_s"] = time.perf_counter() - t
            save()

        save_ce(eval_ce(s, lm, saes, eval_txt, out, on_context=save_ce))
    logger.info("timings: %s", {k: round(v) for k, v in timings.items()})
    return results


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for caches, models and results")
    p.add_argument("--quick", action="store_true",
                   help="tiny random Gemma-2, small SAEs, few tokens: an end-to-end smoke run")
    p.add_argument("--lm", help="hub id, folder or .gguf (default: Gemma-3 270M from PyPI)")
    p.add_argument("--hookpoint")
    p.add_argument("--data", help=f"text file (default {DEFAULT_DATA})")
    p.add_argument("--cache-dir", help="share the split and activation caches of another --out")
    ints = ["eval-every", "max-docs", "context", "lm-batch", "d-sae", "k-max", "tokens",
            "batch-tokens", "seed", "ce-tokens", "ce-group", "ce-chunk", "timing-rounds",
            "timing-steps", "threads"]
    for name in ints:
        p.add_argument(f"--{name}", type=int)
    for name in ("lr", "warmup-frac", "decay-frac", "aux-alpha"):
        p.add_argument(f"--{name}", type=float)
    for name in ("topk-ks", "eval-ks", "ce-ks"):
        p.add_argument(f"--{name}", help="comma-separated budgets")
    p.add_argument("--no-train", dest="train", action="store_false", default=None,
                   help="skip training and step timing; evaluate the models already in --out")
    p.add_argument("--ce-mode", choices=["all", "claims"],
                   help="splice every SAE at every budget (all) or only the claims' pairs")
    a = p.parse_args(argv)
    base: dict[str, Any] = {}
    if a.quick:
        base = dict(d_sae=256, k_max=16, topk_ks=(4, 8, 16), eval_ks=(1, 2, 4, 8, 16),
                    context=128, lm_batch=8, max_docs=20, tokens=16_384, batch_tokens=256,
                    lr=2e-3, ce_tokens=512, ce_chunk=128, timing_rounds=2, timing_steps=2,
                    hookpoint="model.layers.1", quick=True)
    for key, value in vars(a).items():
        if value is None or key == "quick":
            continue
        if key in ("topk_ks", "eval_ks", "ce_ks"):
            value = tuple(int(v) for v in value.split(","))
        base[key] = value
    return Settings(**base)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    s = parse_args(argv)
    results = run(s)
    sys.stdout.write((Path(s.out) / "table.md").read_text())
    return 0 if results["fvu"] else 1


if __name__ == "__main__":
    sys.exit(main())
