"""Validate an exported ONNX graph against the torch SAE it came from.

:func:`validate_onnx` runs the graph in ONNX Runtime (CPU) on random inputs at several batch
sizes and per-row budgets and compares with a float64 torch reference:

- sorted ``values`` against torch's top-k values (compared as values, not raw index order, so
  latents whose pre-activations tie may swap places);
- ``selected``: ORT's values against torch's pre-activations *at ORT's indices*, which proves
  the ids are right without depending on tie order;
- every entry past a row's budget is exactly ``(0, -1)``;
- ``reconstruction`` against torch's sparse decode of ORT's own code, and ``reconstructions``
  (``budgets_out``) against torch's prefix sums.

Errors are relative: ``max |ort − torch| / max |torch|``. Tolerances: 1e-5 for float32 graphs,
1e-2 for float16 ones (whose weights are compared after the same fp16 rounding). The reference
never holds a float64 copy of the whole encoder (column chunks) or decoder (gathered rows).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from hsae_runtime.exporters.onnx_format import NP_DTYPES, OnnxDType, graph_metadata

if TYPE_CHECKING:
    from hsae_runtime.sae import SAE

TOLERANCE = {"float32": 1e-5, "float16": 1e-2}


@dataclass
class ValidationReport:
    """Worst relative errors (``max|ort − torch| / max|torch|``) over all validation cases."""

    values: float = 0.0
    """Sorted code values vs torch's (compared as values: tied latents may swap places)."""
    selected: float = 0.0
    """ORT's values vs torch's pre-activations at ORT's indices (proves the ids are right)."""
    reconstruction: float = 0.0
    """Per-row reconstruction vs torch's sparse decode of the same code."""
    reconstructions: float = 0.0
    """``budgets_out`` reconstructions vs torch (0 when the graph has none)."""
    mask_errors: int = 0
    """Entries past a row's budget that are not exactly (0, -1)."""
    cases: int = 0
    tolerance: float = 0.0

    @property
    def worst(self) -> float:
        return max(self.values, self.selected, self.reconstruction, self.reconstructions)

    @property
    def ok(self) -> bool:
        return self.mask_errors == 0 and self.worst <= self.tolerance

    def summary(self) -> str:
        return (
            f"values {self.values:.2e}, selected {self.selected:.2e}, reconstruction "
            f"{self.reconstruction:.2e}, budgets_out {self.reconstructions:.2e}, "
            f"mask errors {self.mask_errors} over {self.cases} cases (tolerance "
            f"{self.tolerance:.0e})"
        )


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    if a.size == 0:
        return 0.0
    scale = float(np.abs(b).max())
    return float(np.abs(a.astype(np.float64) - b).max()) / max(scale, 1e-30)


def validation_cases(k_max: int, batch_sizes: Sequence[int], seed: int) -> list[np.ndarray]:
    """Per-row budgets to validate with: k_max everywhere, 1 everywhere, random, a ramp."""
    rng = np.random.default_rng(seed)
    cases = []
    for n in batch_sizes:
        cases += [
            np.full(n, k_max, dtype=np.int64),
            np.ones(n, dtype=np.int64),
            rng.integers(1, k_max + 1, size=n, dtype=np.int64),
            (np.arange(n, dtype=np.int64) % k_max) + 1,
        ]
    return cases


def validate_onnx(
    path: str | Path,
    sae: SAE,
    *,
    dtype: OnnxDType = "float32",
    batch_sizes: Sequence[int] = (1, 7, 64),
    seed: int = 0,
    session: object | None = None,
) -> ValidationReport:
    """Run the graph in ONNX Runtime (CPU) against the torch SAE on random inputs.

    Inputs are random mixes of decoder rows plus noise (so codes look like real ones), cast to
    ``dtype``; the torch reference runs in float64 on the same (rounded) input.
    """
    import onnxruntime as ort

    cfg = sae.config
    sess = session or ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]  # type: ignore[attr-defined]
    fixed = tuple(json.loads(graph_metadata(path).get("hsae_budgets_out", "[]")))
    np_dtype = NP_DTYPES[dtype]

    def exact(t: torch.Tensor) -> torch.Tensor:
        """float64 copy of graph weights (fp16-rounded for a float16 graph: like with like)."""
        t = t.detach().cpu()
        return (t.half() if dtype == "float16" else t).double()

    def pre_acts(x: torch.Tensor) -> torch.Tensor:  # (N, d_sae), float64 in column chunks
        x = (x - b_dec) if cfg.apply_b_dec_to_input else x
        cols = range(0, cfg.d_sae, 8192)  # never a float64 copy of the whole encoder
        return torch.cat([x @ exact(sae.W_enc[:, c:c + 8192]) for c in cols], 1) + b_enc

    def dec_rows(idx: torch.Tensor) -> torch.Tensor:  # (..., d_in) float64 decoder rows
        return exact(sae.W_dec.detach()[idx.to(sae.W_dec.device)])

    b_enc, b_dec = exact(sae.b_enc), exact(sae.b_dec)
    gen = torch.Generator().manual_seed(seed)
    report = ValidationReport(tolerance=TOLERANCE[dtype])
    for k_row in validation_cases(cfg.k_max, batch_sizes, seed):
        n = len(k_row)
        mix = torch.randint(0, cfg.d_sae, (n, 8), generator=gen)
        noise = torch.randn(n, cfg.d_in, generator=gen, dtype=torch.float64)
        x = dec_rows(mix).sum(1) + 0.1 * noise + b_dec  # (N, d_in), code-like inputs
        x_np = x.numpy().astype(np_dtype)
        outs = sess.run(None, {"x": x_np, "k": k_row})  # type: ignore[attr-defined]
        got = {name: np.asarray(a) for name, a in zip(out_names, outs)}
        xr = torch.from_numpy(x_np.astype(np.float64))
        pre = pre_acts(xr)  # (N, d_sae)
        ref_top = torch.topk(pre, cfg.k_max, dim=-1).values.clamp_min(0)  # (N, k_max)
        keep = np.arange(cfg.k_max)[None, :] < k_row[:, None]
        values = got["values"].astype(np.float64)
        indices = got["indices"]
        ref_values = np.where(keep, ref_top.numpy(), 0.0)
        report.values = max(report.values, _rel(values, ref_values))
        report.mask_errors += int(((values != 0) & ~keep).sum() + ((indices != -1) & ~keep).sum())
        safe_idx = torch.from_numpy(np.where(keep, indices, 0))
        at_idx = torch.gather(pre, 1, safe_idx).clamp_min(0).numpy()
        report.selected = max(report.selected, _rel(values, np.where(keep, at_idx, 0.0)))
        v = torch.from_numpy(values)
        if "reconstruction" in got:
            ref_recon = (v[..., None] * dec_rows(safe_idx)).sum(1) + b_dec  # (N, d_in)
            report.reconstruction = max(
                report.reconstruction, _rel(got["reconstruction"], ref_recon.numpy())
            )
        if fixed and "reconstructions" in got:
            # The fixed budgets ignore k, so the graph's masked outputs do not give their code:
            # compare with torch's own top-k (random inputs leave no ties at these widths).
            full = torch.topk(pre, fixed[-1], dim=-1)
            rows = dec_rows(full.indices) * full.values.clamp_min(0)[..., None]  # (N, b, d_in)
            csum = rows.cumsum(1)
            ref = torch.stack([csum[:, b - 1] for b in fixed], 1) + b_dec  # (N, n_b, d_in)
            report.reconstructions = max(
                report.reconstructions, _rel(got["reconstructions"], ref.numpy())
            )
        report.cases += 1
    return report
