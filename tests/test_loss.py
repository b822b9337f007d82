"""The HierarchicalTopK loss: every implementation matches the cumulative-sum reference.

Covers float64 gradcheck on small shapes, values and gradients on random shapes (K not a power of
two, d_in not a multiple of 64), custom budget subsets, masked (-1) entries, dispatch and errors.
The Triton kernel is checked in ``test_kernels_loss.py`` (interpreter mode).
"""

from __future__ import annotations

import pytest
import torch

from hsae_runtime import InputError, hierarchical_topk_loss, topk_loss
from hsae_runtime.kernels import hierarchical_cpu
from hsae_runtime.loss import hierarchical_topk_loss_reference

IMPLS = [
    "flat",
    pytest.param(
        "cpu", marks=pytest.mark.skipif(not hierarchical_cpu.available(), reason="needs numba")
    ),
]


def make_problem(n: int, k: int, d: int, d_sae: int, *, dtype=torch.float64, masked: bool = False):
    """Random sorted code and decoder; returns leaf tensors (x, values, indices, W_dec, b_dec)."""
    x = torch.randn(n, d, dtype=dtype)
    values = torch.rand(n, k, dtype=dtype).sort(dim=1, descending=True).values
    indices = torch.stack([torch.randperm(d_sae)[:k] for _ in range(n)])  # (N, K), distinct
    if masked:  # per-row budgets: tails masked with value 0, index -1
        keep = torch.arange(k) < torch.randint(1, k + 1, (n,))[:, None]
        values = values.masked_fill(~keep, 0.0)
        indices = indices.masked_fill(~keep, -1)
    W_dec = torch.randn(d_sae, d, dtype=dtype) / d**0.5
    b_dec = torch.randn(d, dtype=dtype) * 0.1
    return [t.requires_grad_() if t.is_floating_point() else t
            for t in (x, values, indices, W_dec, b_dec)]


def loss_and_grads(impl: str, problem, budgets=None):
    x, values, indices, W_dec, b_dec = problem
    loss = hierarchical_topk_loss(x, values, indices, W_dec, b_dec, budgets, impl=impl)
    grads = torch.autograd.grad(loss, (x, values, W_dec, b_dec))
    return (loss, *grads)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("budgets", [None, [1, 3, 5]])
def test_gradcheck_float64(impl: str, budgets) -> None:
    x, values, indices, W_dec, b_dec = make_problem(3, 5, 7, 9)

    def fn(x, values, W_dec, b_dec):
        return hierarchical_topk_loss(x, values, indices, W_dec, b_dec, budgets, impl=impl)

    assert torch.autograd.gradcheck(fn, (x, values, W_dec, b_dec))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("n", "k", "d", "d_sae"), [(1, 1, 1, 1), (17, 7, 70, 50), (33, 12, 129, 40)]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(impl: str, n: int, k: int, d: int, d_sae: int, dtype) -> None:
    problem = make_problem(n, k, d, d_sae, dtype=dtype)
    for got, want in zip(loss_and_grads(impl, problem), loss_and_grads("reference", problem)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("budgets", [[4], [1, 2, 8], [8, 2, 2], list(range(1, 9))])
def test_budget_subsets(impl: str, budgets: list[int]) -> None:
    problem = make_problem(11, 8, 30, 20)
    for got, want in zip(
        loss_and_grads(impl, problem, budgets), loss_and_grads("reference", problem, budgets)
    ):
        torch.testing.assert_close(got, want)


def test_default_budgets_are_all_prefixes() -> None:
    problem = make_problem(5, 6, 10, 12)
    a = hierarchical_topk_loss(*problem, impl="reference")
    b = hierarchical_topk_loss(*problem, budgets=range(1, 7), impl="reference")
    torch.testing.assert_close(a, b)


def test_single_budget_k_is_topk_loss() -> None:
    x, values, indices, W_dec, b_dec = make_problem(9, 6, 10, 12)
    hier = hierarchical_topk_loss(x, values, indices, W_dec, b_dec, budgets=[6])
    torch.testing.assert_close(hier, topk_loss(x, values, indices, W_dec, b_dec))


@pytest.mark.parametrize("impl", ["reference", *IMPLS])
def test_masked_entries(impl: str) -> None:
    problem = make_problem(13, 9, 21, 30, masked=True)
    x, values, indices, W_dec, b_dec = problem
    got = loss_and_grads(impl, problem)
    # masked entries contribute nothing: same as those entries with value 0 at a real index
    unmasked = [x, values, indices.clamp_min(0), W_dec, b_dec]
    want = loss_and_grads("reference", unmasked)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(got[3], want[3])
    torch.testing.assert_close(got[4], want[4])
    mask = indices < 0
    assert (got[2][mask] == 0).all()  # no value-gradient through masked entries
    torch.testing.assert_close(got[2][~mask], want[2][~mask])


def test_topk_loss_masked_matches_dense() -> None:
    x, values, indices, W_dec, b_dec = make_problem(6, 5, 8, 10, masked=True)
    dense = torch.zeros(6, 10, dtype=values.dtype)
    dense.scatter_add_(1, indices.clamp_min(0), values.masked_fill(indices < 0, 0.0))
    want = (dense @ W_dec + b_dec - x).pow(2).mean()
    torch.testing.assert_close(topk_loss(x, values, indices, W_dec, b_dec), want)


def test_auto_dispatch_on_cpu() -> None:
    problem = make_problem(4, 3, 5, 6, dtype=torch.float32)
    auto = hierarchical_topk_loss(*problem)
    torch.testing.assert_close(auto, hierarchical_topk_loss_reference(*problem))
    x = problem[0]
    expected = "cpu" if hierarchical_cpu.supports(x) else "flat"
    from hsae_runtime.loss import _auto_impl

    assert _auto_impl(x) == expected


def test_no_grad_inputs() -> None:
    x, values, indices, W_dec, b_dec = (t.detach() for t in make_problem(4, 3, 5, 6))
    W_dec.requires_grad_()
    for impl in ("flat", "cpu") if hierarchical_cpu.available() else ("flat",):
        loss = hierarchical_topk_loss(x, values, indices, W_dec, b_dec, impl=impl)
        (grad,) = torch.autograd.grad(loss, W_dec)
        assert grad.shape == W_dec.shape


@pytest.mark.parametrize(
    ("budgets", "match"), [([0], "1..K"), ([7], "1..K"), ([], "must not be empty")]
)
def test_bad_budgets(budgets, match: str) -> None:
    problem = make_problem(2, 6, 4, 8)
    with pytest.raises(InputError, match=match):
        hierarchical_topk_loss(*problem, budgets=budgets)


def test_bad_shapes_and_impl() -> None:
    x, values, indices, W_dec, b_dec = make_problem(2, 3, 4, 8)
    with pytest.raises(InputError, match="values/indices"):
        hierarchical_topk_loss(x, values[:, :2], indices, W_dec, b_dec)
    with pytest.raises(InputError, match="W_dec"):
        hierarchical_topk_loss(x, values, indices, W_dec[:, :3], b_dec)
    with pytest.raises(InputError, match="integers"):
        hierarchical_topk_loss(x, values, indices.double(), W_dec, b_dec)
    with pytest.raises(ValueError, match="impl"):
        hierarchical_topk_loss(x, values, indices, W_dec, b_dec, impl="nope")  # type: ignore[arg-type]
