"""Shared test fixtures: a seed, a tiny random Gemma-2 LM with its tokenizer, and a tiny SAE.

``lm`` and ``sae`` are those two loaded once per session; a module that needs another LM or SAE
under the same name defines its own fixture, which takes precedence.

Everything is built offline in a session-scoped temp folder (no hub access): the LM is a random
``Gemma2ForCausalLM`` (3 layers, hidden 64) saved with ``save_pretrained``, the tokenizer a
byte-level BPE trained on a few sentences and wrapped as a transformers fast tokenizer with
``<bos>``, ``<eos>`` and ``<pad>``. Tests load them back through ``hsae_runtime.lm.load_lm``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on CPU; the variable must be set before anything in
    # the test session imports triton (its own helpers are jitted at import), so set it here.
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_HIDDEN = 64
TINY_LAYERS = 3
TINY_HOOKPOINT = "model.layers.1"

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Sparse autoencoders decompose activations into interpretable latents.",
    "A hierarchical top-k code serves every budget from one encoder pass.",
    "Language models read text one token at a time and predict the next one.",
    "It was the best of times, it was the worst of times.",
    "Numbers like 1, 2, 3, 42 and 1024 appear in text too.",
]


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """Runtime caches (validation splits) go to a session temp folder, never the home folder."""
    old = os.environ.get("HSAE_CACHE_DIR")
    os.environ["HSAE_CACHE_DIR"] = str(tmp_path_factory.mktemp("hsae_cache"))
    yield
    if old is None:
        os.environ.pop("HSAE_CACHE_DIR", None)
    else:
        os.environ["HSAE_CACHE_DIR"] = old


@pytest.fixture(autouse=True)
def seed() -> int:
    """Seed torch, random and numpy before every test; returns the seed."""
    value = 0
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
    return value


def build_tiny_tokenizer(out_dir: Path):
    """A byte-level BPE tokenizer (never emits UNK) with bos/eos/pad, saved to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0, 1, 2, 3 like Gemma's
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    bos_id = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_lm(out_dir: Path, vocab_size: int) -> None:
    """A random 3-layer ``Gemma2ForCausalLM`` (hidden 64) saved with ``save_pretrained``."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=TINY_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=512,
        sliding_window=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(1234)
    model = Gemma2ForCausalLM(config).eval()
    model.save_pretrained(out_dir)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with a tiny random Gemma-2 causal LM and its fast tokenizer."""
    out = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = build_tiny_tokenizer(out)
    build_tiny_lm(out, vocab_size=len(tokenizer))
    return out


@pytest.fixture(scope="session")
def tiny_sae_path(tiny_lm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random HierarchicalTopK SAE file (d_in 64, d_sae 256, k_max 16) for the tiny LM."""
    from hsae_runtime.config import SAEConfig
    from hsae_runtime.sae import SAE

    config = SAEConfig(
        d_in=TINY_HIDDEN,
        d_sae=256,
        k_max=16,
        model_name=str(tiny_lm_dir),
        hookpoint=TINY_HOOKPOINT,
    )
    gen = torch.Generator().manual_seed(4321)
    sae = SAE(config)
    sae.reset_parameters(generator=gen)
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.1, generator=gen)
    path = tmp_path_factory.mktemp("tiny_sae") / "tiny.safetensors"
    sae.save(path)
    return path


@pytest.fixture(scope="session")
def lm(tiny_lm_dir: Path):
    """The tiny LM loaded on CPU (shared; modules that need another define their own ``lm``)."""
    from hsae_runtime.lm import load_lm

    return load_lm(str(tiny_lm_dir), device="cpu")


@pytest.fixture(scope="session")
def sae(tiny_sae_path: Path):
    """The tiny SAE loaded and frozen (shared; modules that need another define their own)."""
    from hsae_runtime.sae import SAE

    return SAE.load(tiny_sae_path).requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small .txt corpus (blank-line separated documents) for training / eval tests."""
    rng = random.Random(7)
    words = " ".join(_CORPUS).replace(".", "").replace(",", "").split()
    docs = []
    for _ in range(60):
        docs.append(" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + ".")
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path
