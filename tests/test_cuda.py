"""The SAE end to end on a CUDA card (Triton top-k, prefix decode and loss) vs the same SAE on CPU.

Skipped without CUDA; run on a GPU machine with ``pytest -m cuda``.
"""

from __future__ import annotations

import pytest
import torch

from hsae_runtime import SAE, SAEConfig, hierarchical_topk_loss

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _pair(d_in: int = 96, d_sae: int = 1000, k_max: int = 24) -> tuple[SAE, SAE]:
    torch.manual_seed(0)
    cpu = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, k_max=k_max))
    with torch.no_grad():
        cpu.b_enc.normal_(0, 0.1)
        cpu.b_dec.normal_(0, 0.1)
    gpu = SAE(cpu.config)
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.cuda()


def test_inference_matches_cpu() -> None:
    cpu, gpu = _pair()
    x = torch.randn(37, cpu.config.d_in)
    k_rows = torch.randint(1, cpu.config.k_max + 1, (37,))
    with torch.inference_mode():
        for k in (1, 7, cpu.config.k_max):
            a, b = cpu.encode(x, k), gpu.encode(x.cuda(), k)
            torch.testing.assert_close(b.values.cpu(), a.values, rtol=1e-4, atol=1e-5)
            assert torch.equal(b.indices.cpu(), a.indices)
        a, b = cpu.encode(x, k_rows), gpu.encode(x.cuda(), k_rows.cuda())
        torch.testing.assert_close(b.values.cpu(), a.values, rtol=1e-4, atol=1e-5)
        assert torch.equal(b.indices.cpu(), a.indices)
        budgets = [1, 4, 16, 24]
        torch.testing.assert_close(gpu.reconstruct(x.cuda(), budgets).cpu(),
                                   cpu.reconstruct(x, budgets), rtol=1e-4, atol=1e-4)


def test_training_step_matches_cpu() -> None:
    cpu, gpu = _pair()
    x = torch.randn(64, cpu.config.d_in)
    losses, grads = [], []
    for sae, xs in ((cpu, x), (gpu, x.cuda())):
        values, indices = sae.encode_for_training(xs, sae.config.k_max)
        loss = hierarchical_topk_loss(xs, values, indices, sae.W_dec, sae.b_dec)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.cpu() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)])
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    for g_gpu, g_cpu in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(g_gpu, g_cpu, rtol=1e-3, atol=1e-5)
