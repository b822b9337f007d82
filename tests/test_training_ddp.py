"""DDP: ``torchrun --nproc-per-node 2`` (gloo, CPU) trains and agrees with 1 rank on the same
data. The 2-rank run also writes and then re-reads an activation cache (it crosses an epoch)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from hsae_runtime.sae import SAE
from hsae_runtime.training.trainer import TrainConfig, train

SETTINGS = dict(hookpoint="model.layers.1", d_sae=64, k_max=8, tokens=1280, batch_tokens=128,
                context=32, block_contexts=8, lr=3e-3, dead_tokens=1_000_000, seed=3)


@pytest.mark.timeout(300)
def test_two_gloo_ranks_match_one_rank(tiny_lm_dir, tiny_text_file, tmp_path):
    small = tmp_path / "small.txt"  # about 1k tokens: 1280 training tokens need a second pass
    small.write_text("\n\n".join(tiny_text_file.read_text().split("\n\n")[:10]))
    out2 = tmp_path / "ddp.safetensors"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "hsae_runtime.cli", "train", "--lm", str(tiny_lm_dir), "--data", str(small),
         *flags, "--device", "cpu", "--no-progress", "--out", str(out2),
         "--activation-cache", str(tmp_path / "cache"), "--cache-dtype", "float32"],
        capture_output=True, text=True, timeout=280, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch 1 done" in proc.stderr and (tmp_path / "cache" / "manifest.json").is_file()
    one = train(TrainConfig(lm=str(tiny_lm_dir), data=str(small), device="cpu", progress=False,
                            out=str(tmp_path / "one.safetensors"), **SETTINGS))  # type: ignore
    two = SAE.load(out2)
    assert one.steps == 10
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(two, name), getattr(one.sae, name),
                                   rtol=1e-3, atol=1e-4)
