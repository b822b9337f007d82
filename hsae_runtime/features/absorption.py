"""First-letter feature absorption (Chanin et al. 2024, "A is for Absorption"), as SAEBench runs
it, measured at every budget of an SAE: an interpretability measure that needs no LLM judge.

The recipe (SAEBench ``sae_bench/evals/absorption``, version 0.6.0; parameters in
:class:`AbsorptionConfig`, defaults = SAEBench's):

1. Words: vocabulary tokens that are ASCII letters (optionally after one leading space), split
   80/20 into train / test words. Each word gets an in-context prompt of 10 other words of its
   split, ``"{word} has the first letter: X"`` per line, ending with the word's own
   ``"{word} has the first letter:"``; the residual at the word's token is read at the SAE's
   hookpoint (SAEBench reads position -6, which is the word's token for Gemma's tokenizer; we
   find the token by tokenising the prompt up to the word, so any tokenizer works).
2. A ground-truth probe: 26 one-vs-rest logistic regressions on the residual (Adam, lr 1e-2
   decaying to 1e-5, weight decay 1e-4, 50 epochs, class-balanced BCE).
3. Per budget k, the SAE code at k (a dense ``[N, d_sae]`` view of the top-k code): an
   L1-penalised multi-probe on the latents (L1 0.01, 50 epochs) ranks latents per letter; for
   k_probe = 1..10 a class-balanced logistic regression on the top-k_probe latents (sklearn's
   objective, C = 1, solved by L-BFGS) is scored by F1 on the test words. The letter's *main
   latents* are those of the largest k_probe reached while each step gains > 0.03 F1.
4. For test words the probe gets right (answer letter, probe score > 0): the absorption
   fraction (how much of the probe projection that the main latents miss is carried by at most
   3 other latents with probe cosine ≥ 0.1 and positive projection, if those carry ≥ 40 % of it)
   and full absorption (no main latent fires, the top projecting latent has probe cosine
   ≥ 0.025 and carries ≥ 40 % of the projection). Per letter: means over those words; the
   summary averages letters whose ground-truth probe reaches F1 ≥ 0.6.

Shapes: ``N`` words, ``d_in``, ``d_sae``, 26 letters.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hsae_runtime.errors import DataError
from hsae_runtime.lm import LoadedLM, capture
from hsae_runtime.sae import SAE

logger = logging.getLogger(__name__)

LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class AbsorptionConfig:
    """SAEBench's absorption parameters (defaults) plus the word sample size."""

    prompt_template: str = "{word} has the first letter:"
    max_icl_examples: int = 10
    n_words: int | None = None
    """Sample this many alpha tokens (None = all of them, as SAEBench)."""
    train_fraction: float = 0.8
    seed: int = 42
    probe_epochs: int = 50
    probe_lr: float = 1e-2
    probe_weight_decay: float = 1e-4
    sparse_l1: float = 0.01
    sparse_weight_decay: float = 1e-6
    batch_size: int = 4096
    max_k_value: int = 10
    f1_jump_threshold: float = 0.03
    full_absorption_cos: float = 0.025
    fraction_cos: float = 0.1
    projection_proportion: float = 0.4
    max_absorbing_latents: int = 3
    min_probe_f1: float = 0.6
    lm_batch: int = 16


@dataclass
class WordData:
    """Residuals at the word token and labels: ``x [N, d_in]``, ``letter [N]`` (0..25)."""

    words: list[str]
    x: Tensor
    letter: Tensor


def alpha_tokens(tokenizer: Any) -> list[str]:
    """Vocabulary entries whose text is ASCII letters, optionally after one leading space."""
    ids = sorted(set(tokenizer.get_vocab().values()))
    texts = tokenizer.batch_decode([[i] for i in ids])
    out = []
    for text in texts:
        word = text[1:] if text.startswith(" ") else text
        if word and word.isascii() and word.isalpha():
            out.append(text)
    return sorted(set(out))


def _prompt(word: str, pool: list[str], cfg: AbsorptionConfig, rng: random.Random
            ) -> tuple[str, str]:
    """``(prompt, prompt up to and including the word)``."""
    examples = rng.sample([w for w in pool if w != word], cfg.max_icl_examples)
    lines = [cfg.prompt_template.format(word=w) + " " + w.strip()[0].upper() for w in examples]
    head = "\n" + "\n".join(lines) + "\n"
    before, after = cfg.prompt_template.split("{word}", 1)
    return head + before + word + after, head + before + word


@torch.inference_mode()
def word_data(lm: LoadedLM, hookpoint: str, words: list[str], cfg: AbsorptionConfig,
              rng: random.Random, *, progress: bool = True) -> WordData:
    """Residuals of ``words`` at their token in their prompts (a word that does not stay one
    token inside its prompt is dropped)."""
    from tqdm.auto import tqdm

    tok = lm.tokenizer
    prompts = [_prompt(w, words, cfg, rng) for w in words]
    kept_words, rows = [], []
    bar = tqdm(total=len(words), desc="absorption: LM", unit="word", disable=not progress)
    for start in range(0, len(words), cfg.lm_batch):
        batch_words = words[start : start + cfg.lm_batch]
        pairs = prompts[start : start + len(batch_words)]
        enc = [tok(p)["input_ids"] for p, _ in pairs]
        ends = [len(tok(h)["input_ids"]) - 1 for _, h in pairs]
        width = max(len(e) for e in enc)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.tensor([e + [pad] * (width - len(e)) for e in enc])
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc])
        acts = capture(lm, hookpoint, ids, mask)  # (B, T, d_in)
        for row, (word, e, at) in enumerate(zip(batch_words, enc, ends)):
            if tok.decode([e[at]]) != word:
                continue
            kept_words.append(word)
            rows.append(acts[row, at].float().cpu())
        bar.update(len(batch_words))
    bar.close()
    if not rows:
        raise DataError("no word stayed one token inside its prompt",
                        hint="the tokenizer splits the words of its own vocabulary differently")
    letters = torch.tensor([LETTERS.index(w.strip()[0].lower()) for w in kept_words])
    return WordData(kept_words, torch.stack(rows), letters)


def train_multi_probe(x: Tensor, y: Tensor, *, epochs: int, lr: float, weight_decay: float,
                      batch_size: int, l1: float = 0.0, seed: int = 0,
                      end_lr: float = 1e-5) -> tuple[Tensor, Tensor]:
    """One-vs-rest logistic probes: ``x [N, d]``, ``y [N, C]`` in {0, 1} -> ``(W [C, d],
    b [C])``; class-balanced BCE (pos_weight = negatives / positives), Adam with exponential
    decay from ``lr`` to ``end_lr``, optional L1 on the weights."""
    gen = torch.Generator().manual_seed(seed)
    n, d = x.shape
    c = y.shape[1]
    layer = torch.nn.Linear(d, c)
    with torch.no_grad():
        bound = 1 / math.sqrt(d)
        layer.weight.uniform_(-bound, bound, generator=gen)
        layer.bias.uniform_(-bound, bound, generator=gen)
    pos = y.sum(0)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=(n - pos) / pos.clamp_min(1))
    opt = torch.optim.Adam(layer.parameters(), lr=lr, weight_decay=weight_decay)
    gamma = math.exp(math.log(end_lr / lr) / epochs)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                opt.zero_grad()
                loss = loss_fn(layer(x[idx]), y[idx])
                if l1:
                    loss = loss + l1 * layer.weight.abs().sum(-1).mean()
                loss.backward()
                opt.step()
            sched.step()
    return layer.weight.detach(), layer.bias.detach()


def fit_balanced_logistic(x: Tensor, y: Tensor, c: float = 1.0) -> tuple[Tensor, Tensor]:
    """Independent binary logistic regressions, one per problem: ``x [P, N, k]``, ``y [P, N]``
    (bool) -> ``(w [P, k], b [P])`` minimising sklearn's ``C · Σ sw_i · logloss_i + ½‖w‖²``
    with balanced sample weights (L-BFGS, float64)."""
    x, y = x.double(), y.double()
    p, n, k = x.shape
    pos = y.sum(1, keepdim=True)
    sw = torch.where(y > 0, n / (2 * pos.clamp_min(1)), n / (2 * (n - pos).clamp_min(1)))
    w = torch.zeros(p, k, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(p, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-8,
                            line_search_fn="strong_wolfe")
    sign = 2 * y - 1

    def closure() -> Tensor:
        opt.zero_grad()
        z = torch.einsum("pnk,pk->pn", x, w) + b[:, None]
        loss = c * (sw * torch.nn.functional.softplus(-sign * z)).sum() + 0.5 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def dense_code(sae: SAE, x: Tensor, k: int) -> Tensor:
    """``[N, d_sae]`` latent activations of the top-k code of ``x [N, d_in]``."""
    with torch.inference_mode():
        code = sae.encode(x, k)
    out = torch.zeros(len(x), sae.config.d_sae)
    return out.scatter_(1, code.indices, code.values.float())


def _f1(pred: Tensor, truth: Tensor) -> float:
    tp = float((pred & truth).sum())
    denom = float(pred.sum() + truth.sum())
    return 2 * tp / denom if denom else 0.0


def main_latents(train_acts: Tensor, train_y: Tensor, test_acts: Tensor, test_y: Tensor,
                 cfg: AbsorptionConfig) -> list[list[int]]:
    """Per letter, its main latents (k-sparse probing with the F1-jump rule)."""
    onehot = torch.nn.functional.one_hot(train_y, 26).float()
    w, _ = train_multi_probe(train_acts, onehot, epochs=cfg.probe_epochs, lr=cfg.probe_lr,
                             weight_decay=cfg.sparse_weight_decay, batch_size=cfg.batch_size,
                             l1=cfg.sparse_l1, seed=cfg.seed)
    ranked = w.topk(cfg.max_k_value, dim=1).indices  # (26, max_k)
    truth_train = train_y[None, :] == torch.arange(26)[:, None]  # (26, N)
    truth_test = test_y[None, :] == torch.arange(26)[:, None]
    f1 = torch.zeros(26, cfg.max_k_value)
    for kk in range(1, cfg.max_k_value + 1):
        feats = ranked[:, :kk]  # (26, kk)
        wk, bk = fit_balanced_logistic(train_acts[:, feats].permute(1, 0, 2), truth_train)
        score = torch.einsum("pnk,pk->pn", test_acts[:, feats].permute(1, 0, 2).double(), wk)
        pred = score + bk[:, None] > 0
        for letter in range(26):
            f1[letter, kk - 1] = _f1(pred[letter], truth_test[letter])
    out = []
    for letter in range(26):
        best, chosen = -100.0, []
        for kk in range(1, cfg.max_k_value + 1):
            if float(f1[letter, kk - 1]) > best + cfg.f1_jump_threshold:
                best, chosen = float(f1[letter, kk - 1]), ranked[letter, :kk].tolist()
            else:
                break
        out.append(chosen)
    return out


def absorption_scores(acts: Tensor, resid_proj: Tensor, cos: Tensor, main: list[int],
                      cfg: AbsorptionConfig) -> tuple[Tensor, Tensor]:
    """Per word (rows of ``acts [N, d_sae]``): absorption fraction and full absorption (bool).

    ``resid_proj [N]``: the residual's projection on the unit probe direction; ``cos
    [d_sae]``: each decoder row's cosine with it; ``main``: the letter's main latents."""
    proj = acts * cos[None, :]  # (N, d_sae): each latent's probe projection
    main_idx = torch.tensor(main, dtype=torch.int64)
    main_proj = proj[:, main_idx].sum(1)
    others = torch.ones(acts.shape[1], dtype=torch.bool)
    others[main_idx] = False
    candidate = others[None, :] & (cos[None, :] >= cfg.fraction_cos) & (proj > 0)
    top = torch.where(candidate, proj, 0.0).topk(cfg.max_absorbing_latents, dim=1).values
    absorbing = top.clamp_min(0).sum(1)
    share = absorbing / resid_proj
    unaccounted = resid_proj - main_proj
    taken = torch.minimum(absorbing, unaccounted)
    frac = (taken / (taken + main_proj)).clamp(0, 1)
    frac = torch.where(main_proj <= 0, 1.0, frac)
    frac = torch.where((main_proj >= resid_proj) | (share < cfg.projection_proportion), 0.0, frac)
    none_fire = (acts[:, main_idx].abs() < 1e-8).all(1)
    best = proj.topk(1, dim=1)
    best_cos = cos[best.indices[:, 0]]
    full = (none_fire & (best_cos >= cfg.full_absorption_cos) & (resid_proj >= 0)
            & (best.values[:, 0] / resid_proj >= cfg.projection_proportion))
    return frac, full


def ground_truth_probe(train: WordData, cfg: AbsorptionConfig) -> tuple[Tensor, Tensor]:
    """The 26 first-letter probes on the residual: ``(W [26, d_in], b [26])``."""
    onehot = torch.nn.functional.one_hot(train.letter, 26).float()
    return train_multi_probe(train.x, onehot, epochs=cfg.probe_epochs, lr=cfg.probe_lr,
                             weight_decay=cfg.probe_weight_decay, batch_size=cfg.batch_size,
                             seed=cfg.seed)


def absorption_at_budget(sae: SAE, k: int, train: WordData, test: WordData,
                         probe: tuple[Tensor, Tensor], probe_f1: list[float],
                         cfg: AbsorptionConfig) -> dict[str, Any]:
    """SAEBench's absorption metrics of ``sae`` at budget ``k`` (see the module docstring)."""
    w, b = probe
    train_acts, test_acts = dense_code(sae, train.x, k), dense_code(sae, test.x, k)
    main = main_latents(train_acts, train.letter, test_acts, test.letter, cfg)
    unit = w / w.norm(dim=1, keepdim=True)  # (26, d_in)
    w_dec = sae.W_dec.detach().float()
    cos = unit @ (w_dec / w_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)).T  # (26, d_sae)
    scores = test.x @ w.T + b  # (N, 26)
    per_letter = []
    for letter in range(26):
        rows = ((test.letter == letter) & (scores[:, letter] > 0)).nonzero().squeeze(1)
        if len(rows) == 0:
            per_letter.append(None)
            continue
        frac, full = absorption_scores(test_acts[rows], test.x[rows] @ unit[letter],
                                       cos[letter], main[letter], cfg)
        per_letter.append({"letter": LETTERS[letter], "probe_true_positives": len(rows),
                           "mean_absorption_fraction": float(frac.mean()),
                           "full_absorption_rate": float(full.double().mean()),
                           "num_split_features": len(main[letter]),
                           "probe_f1": probe_f1[letter]})
    used = [p for p in per_letter if p is not None and p["probe_f1"] >= cfg.min_probe_f1]

    def mean(key: str) -> float:
        return sum(p[key] for p in used) / len(used) if used else float("nan")

    return {"budget": k, "letters": len(used),
            "mean_absorption_fraction": mean("mean_absorption_fraction"),
            "mean_full_absorption_rate": mean("full_absorption_rate"),
            "mean_num_split_features": mean("num_split_features"),
            "per_letter": [p for p in per_letter if p is not None]}


def prepare_words(lm: LoadedLM, hookpoint: str, cfg: AbsorptionConfig, *, progress: bool = True
                  ) -> tuple[WordData, WordData]:
    """Train and test words with their residuals (SAEBench's 80/20 split of the alpha tokens)."""
    rng = random.Random(cfg.seed)
    words = alpha_tokens(lm.tokenizer)
    rng.shuffle(words)
    if cfg.n_words is not None:
        words = words[: cfg.n_words]
    cut = int(len(words) * cfg.train_fraction)
    train = word_data(lm, hookpoint, words[:cut], cfg, rng, progress=progress)
    test = word_data(lm, hookpoint, words[cut:], cfg, rng, progress=progress)
    return train, test


def probe_f1(test: WordData, probe: tuple[Tensor, Tensor]) -> list[float]:
    """The ground-truth probe's F1 per letter on the test words."""
    w, b = probe
    pred = (test.x @ w.T + b) > 0  # (N, 26)
    return [_f1(pred[:, i], test.letter == i) for i in range(26)]
