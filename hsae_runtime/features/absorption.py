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
3. Per budget k, the SAE code at k: an L1-penalised multi-probe on the latents (L1 0.01, 50
   epochs, computed on the sparse code) ranks latents per letter; for k_probe = 1..10 a
   class-balanced logistic regression on the top-k_probe latents (sklearn's objective, C = 1,
   solved by Newton's method) is scored by F1 on the test words. The letter's *main
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
import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hsae_runtime.errors import DataError
from hsae_runtime.features.probes import fit_balanced_logistic, train_multi_probe
from hsae_runtime.lm import LoadedLM, capture
from hsae_runtime.sae import SAE, SparseCode

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
    probe_seed: int | None = None
    """Seed of the probes' initialisation and batch order (None = ``seed``): another value
    retrains the probes on the same words, to see how much of a result is probe noise."""
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


def _probe_seed(cfg: AbsorptionConfig) -> int:
    return cfg.seed if cfg.probe_seed is None else cfg.probe_seed


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


def build_prompts(words: list[str], cfg: AbsorptionConfig, rng: random.Random
                  ) -> list[tuple[str, str]]:
    """Each word's ICL prompt (examples drawn from ``words``), as :func:`_prompt` returns it."""
    return [_prompt(w, words, cfg, rng) for w in words]


@torch.inference_mode()
def word_residuals(lm: LoadedLM, hookpoint: str, words: list[str],
                   prompts: list[tuple[str, str]], cfg: AbsorptionConfig, *,
                   progress: bool = True) -> WordData:
    """Residuals of ``words`` at their token in their ``prompts`` (from :func:`build_prompts`);
    a word that does not stay one token inside its prompt is dropped, the others keep their
    order.

    Prompts are run in batches of ``cfg.lm_batch`` grouped by token length, so a batch is
    padded only where lengths differ (never, for Gemma's tokenizer: every prompt has the same
    length); right padding under the attention mask leaves the real positions unchanged.
    """
    from tqdm.auto import tqdm

    tok = lm.tokenizer
    enc = tok([p for p, _ in prompts])["input_ids"]
    ends = [len(h) - 1 for h in tok([h for _, h in prompts])["input_ids"]]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    order = sorted(range(len(words)), key=lambda i: len(enc[i]))
    got: dict[int, Tensor] = {}
    bar = tqdm(total=len(words), desc="absorption: LM", unit="word", disable=not progress)
    for start in range(0, len(order), cfg.lm_batch):
        batch = order[start : start + cfg.lm_batch]
        width = max(len(enc[i]) for i in batch)
        ids = torch.tensor([enc[i] + [pad] * (width - len(enc[i])) for i in batch])
        mask = torch.tensor([[1] * len(enc[i]) + [0] * (width - len(enc[i])) for i in batch])
        acts = capture(lm, hookpoint, ids, mask)  # (B, T, d_in)
        for row, i in enumerate(batch):
            if tok.decode([enc[i][ends[i]]]) == words[i]:
                got[i] = acts[row, ends[i]].float().cpu()
        bar.update(len(batch))
    bar.close()
    kept = sorted(got)
    kept_words = [words[i] for i in kept]
    x = torch.stack([got[i] for i in kept]) if kept else torch.zeros(0, lm.d_model)
    letters = torch.tensor([LETTERS.index(w.strip()[0].lower()) for w in kept_words],
                           dtype=torch.int64)
    return WordData(kept_words, x, letters)


def concat_words(parts: list[WordData]) -> WordData:
    """One :class:`WordData` from several (in order)."""
    return WordData([w for p in parts for w in p.words], torch.cat([p.x for p in parts]),
                    torch.cat([p.letter for p in parts]))


def dense_code(code: SparseCode, d_sae: int) -> Tensor:
    """``[N, d_sae]`` latent activations of a code ``[N, k]`` (the probes on k ≤ 10 chosen
    latents and the per-word absorption rules read columns of it)."""
    out = torch.zeros(code.values.shape[0], d_sae)
    return out.scatter_(1, code.indices, code.values.float())


def _f1(pred: Tensor, truth: Tensor) -> float:
    tp = float((pred & truth).sum())
    denom = float(pred.sum() + truth.sum())
    return 2 * tp / denom if denom else 0.0


def main_latents(train_code: SparseCode, train_y: Tensor, test_code: SparseCode,
                 test_y: Tensor, d_sae: int, cfg: AbsorptionConfig) -> list[list[int]]:
    """Per letter, its main latents (k-sparse probing with the F1-jump rule) from the codes
    ``[N, k]`` of the train and test words."""
    onehot = torch.nn.functional.one_hot(train_y, 26).float()
    w, _ = train_multi_probe(train_code, onehot, epochs=cfg.probe_epochs, lr=cfg.probe_lr,
                             weight_decay=cfg.sparse_weight_decay, batch_size=cfg.batch_size,
                             l1=cfg.sparse_l1, seed=_probe_seed(cfg), width=d_sae)
    train_acts, test_acts = dense_code(train_code, d_sae), dense_code(test_code, d_sae)
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


def encode_words(sae: SAE, train: WordData, test: WordData, k: int
                 ) -> tuple[SparseCode, SparseCode]:
    """The SAE's codes ``[N, k]`` of the train and test residuals."""
    with torch.no_grad():  # not inference_mode: the sparse probe's backward reads the values
        return sae.encode(train.x, k), sae.encode(test.x, k)


def ground_truth_probe(train: WordData, cfg: AbsorptionConfig) -> tuple[Tensor, Tensor]:
    """The 26 first-letter probes on the residual: ``(W [26, d_in], b [26])``."""
    onehot = torch.nn.functional.one_hot(train.letter, 26).float()
    return train_multi_probe(train.x, onehot, epochs=cfg.probe_epochs, lr=cfg.probe_lr,
                             weight_decay=cfg.probe_weight_decay, batch_size=cfg.batch_size,
                             seed=_probe_seed(cfg))


def absorption_at_budget(sae: SAE, k: int, train: WordData, test: WordData,
                         probe: tuple[Tensor, Tensor], probe_f1: list[float],
                         cfg: AbsorptionConfig,
                         codes: tuple[SparseCode, SparseCode] | None = None) -> dict[str, Any]:
    """SAEBench's absorption metrics of ``sae`` at budget ``k`` (see the module docstring).

    ``codes``: the SAE's codes of ``train.x`` and ``test.x`` at a budget ≥ k (their prefixes
    are the codes at k), to encode once for several budgets; encoded here when ``None``.
    """
    w, b = probe
    if codes is None:
        codes = encode_words(sae, train, test, k)
    train_code, test_code = (c.prefix(k) for c in codes)
    d_sae = sae.config.d_sae
    main = main_latents(train_code, train.letter, test_code, test.letter, d_sae, cfg)
    test_acts = dense_code(test_code, d_sae)
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


def split_words(tokenizer: Any, cfg: AbsorptionConfig
                ) -> tuple[list[str], list[str], list[tuple[str, str]], list[tuple[str, str]]]:
    """SAEBench's seeded 80/20 split of the alpha tokens (sampled to ``cfg.n_words``) and each
    word's prompt: ``(train words, test words, train prompts, test prompts)``."""
    rng = random.Random(cfg.seed)
    words = alpha_tokens(tokenizer)
    rng.shuffle(words)
    if cfg.n_words is not None:
        words = words[: cfg.n_words]
    cut = int(len(words) * cfg.train_fraction)
    train, test = words[:cut], words[cut:]
    return train, test, build_prompts(train, cfg, rng), build_prompts(test, cfg, rng)


def prepare_words(lm: LoadedLM, hookpoint: str, cfg: AbsorptionConfig, *, progress: bool = True
                  ) -> tuple[WordData, WordData]:
    """Train and test words with their residuals (SAEBench's 80/20 split of the alpha tokens)."""
    train_w, test_w, train_p, test_p = split_words(lm.tokenizer, cfg)
    out = []
    for words, prompts in ((train_w, train_p), (test_w, test_p)):
        data = word_residuals(lm, hookpoint, words, prompts, cfg, progress=progress)
        if not data.words:
            raise DataError("no word stayed one token inside its prompt",
                            hint="the tokenizer splits the words of its own vocabulary "
                                 "differently")
        out.append(data)
    return out[0], out[1]


def probe_f1(test: WordData, probe: tuple[Tensor, Tensor]) -> list[float]:
    """The ground-truth probe's F1 per letter on the test words."""
    w, b = probe
    pred = (test.x @ w.T + b) > 0  # (N, 26)
    return [_f1(pred[:, i], test.letter == i) for i in range(26)]
