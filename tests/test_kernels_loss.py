"""The Triton HierarchicalTopK kernels match the reference (interpreter mode on CPU).

``TRITON_INTERPRET=1`` must be set before triton itself is imported (its own helpers such as the
reductions are jitted at import), which a shared pytest process cannot guarantee. So
``test_interpreted_in_subprocess`` re-runs this file in a fresh process with the variable set,
where the ``interpreted`` tests run. On a CUDA machine the comparison also runs compiled.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_loss import loss_and_grads, make_problem

triton = pytest.importorskip("triton", reason="triton does not install on this platform")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(
    not INTERPRETED, reason="runs inside test_interpreted_in_subprocess (TRITON_INTERPRET=1)"
)


@pytest.mark.skipif(INTERPRETED, reason="already interpreted")
def test_interpreted_in_subprocess() -> None:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
         "-k", "interpreted and not subprocess"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.split("\n")[-2]


@pytest.mark.parametrize(("n", "k", "d"), [(3, 5, 7), (6, 7, 300)])
@pytest.mark.parametrize("budgets", [None, [2, 5]])
@interpreted
def test_triton_interpreted_matches_reference(n: int, k: int, d: int, budgets) -> None:
    problem = make_problem(n, k, d, 11, masked=True)  # d=300: two column blocks, one partial
    got = loss_and_grads("triton", problem, budgets)
    want = loss_and_grads("flat", problem, budgets)  # flat == reference (test_loss.py)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@interpreted
def test_triton_gradcheck_interpreted() -> None:
    x, values, indices, W_dec, b_dec = make_problem(2, 3, 5, 4)
    from hsae_runtime import hierarchical_topk_loss

    def fn(x, values, W_dec, b_dec):
        return hierarchical_topk_loss(x, values, indices, W_dec, b_dec, impl="triton")

    assert torch.autograd.gradcheck(fn, (x, values, W_dec, b_dec))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_cuda_matches_reference(dtype) -> None:
    problem = [t.cuda().detach().requires_grad_(t.requires_grad)
               for t in make_problem(64, 24, 2304 + 40, 500, dtype=dtype, masked=True)]
    got = loss_and_grads("auto", problem)
    want = loss_and_grads("reference", problem)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
