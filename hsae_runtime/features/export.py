"""Neuronpedia / SAEDashboard exports: one folder of dashboard batches per budget.

The schema is the batch JSON that SAEDashboard's Neuronpedia runner writes and Neuronpedia
imports (``NeuronpediaDashboardBatch.to_dict`` in ``sae_dashboard/neuronpedia/
neuronpedia_dashboard.py`` of jbloomAus/SAEDashboard, matched at commit
``03a615f7c70a6f6e634845dab4051874698fac5b``): a batch is ``{"model_id", "layer", "sae_set",
"features": [...]}``, written as ``batch-{i}.json``; a feature carries its index, the
logit-lens tokens (``pos_str``/``pos_values``, ``neg_str``/``neg_values``), ``frac_nonzero``,
the activation and logit histograms as bar heights and bar centres, the prompt counts and
``activations``: token windows with per-token values and the bin they were drawn from
(``bin_min = -1, bin_contains = -1`` for the top activations, the quantile interval and its
share otherwise).

Each budget ``b`` is one SAE as far as Neuronpedia is concerned: values count only where the
latent sits at rank ``< b`` in the token's code, and ``sae_set`` names the budget
(``{sae_set}-k{b}``). Fields this runtime does not compute (neuron alignment, activation
correlations, decoder weight distribution) are written as SAEDashboard's defaults: empty lists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hsae_runtime.features.report import write_json

BATCH_SIZE = 128
FEATURE_KEYS = (
    "feature_index", "neuron_alignment_indices", "neuron_alignment_values",
    "neuron_alignment_l1", "correlated_neurons_indices", "correlated_neurons_l1",
    "correlated_neurons_pearson", "correlated_features_indices", "correlated_features_l1",
    "correlated_features_pearson", "neg_str", "neg_values", "pos_str", "pos_values",
    "frac_nonzero", "freq_hist_data_bar_values", "freq_hist_data_bar_heights",
    "logits_hist_data_bar_heights", "logits_hist_data_bar_values", "n_prompts_total",
    "n_tokens_in_prompt", "dataset", "decoder_weights_dist", "activations",
)
ACTIVATION_KEYS = ("bin_min", "bin_max", "bin_contains", "tokens", "values")
BATCH_KEYS = ("model_id", "layer", "sae_set", "features")


def _centres(edges: list[float]) -> list[float]:
    return [round((a + b) / 2, 3) for a, b in zip(edges[:-1], edges[1:])]


def _activation(ctx: dict[str, Any], budget: int, strings: dict[str, str], lo: float, hi: float,
                share: float) -> dict[str, Any]:
    values = [v if 0 <= r < budget else 0.0 for v, r in zip(ctx["v"], ctx["r"])]
    return {"bin_min": lo, "bin_max": hi, "bin_contains": share,
            "tokens": [strings.get(str(t), "") for t in ctx["t"]],
            "values": [round(v, 3) for v in values]}


def neuronpedia_feature(rec: dict[str, Any], b_index: int, budget: int, strings: dict[str, str],
                        *, n_prompts: int, prompt_tokens: int, dataset: str) -> dict[str, Any]:
    """One latent at one budget as a Neuronpedia dashboard feature."""
    lens = rec["lens"]
    max_k = rec["act_hist"]["max"]
    counts = rec["act_hist"]["counts"][b_index]
    bins = len(counts)
    act_edges = [max_k * j / bins for j in range(bins + 1)]
    acts = [_activation(rec["contexts"][j], budget, strings, -1, rec["max"][b_index], -1)
            for j in rec["top"][b_index]]
    for q in rec["quantiles"]:
        for j in q["contexts"]:
            ctx = rec["contexts"][j]
            if 0 <= ctx["r"][ctx["at"]] < budget:
                acts.append(_activation(ctx, budget, strings, q["lo"], q["hi"], q["share"]))
    return {
        "feature_index": rec["id"],
        "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
        "correlated_neurons_indices": [], "correlated_neurons_l1": [],
        "correlated_neurons_pearson": [], "correlated_features_indices": [],
        "correlated_features_l1": [], "correlated_features_pearson": [],
        "neg_str": [strings.get(str(t), "") for t, _ in lens["bottom"]],
        "neg_values": [round(v, 3) for _, v in lens["bottom"]],
        "pos_str": [strings.get(str(t), "") for t, _ in lens["top"]],
        "pos_values": [round(v, 3) for _, v in lens["top"]],
        "frac_nonzero": rec["density"][b_index],
        "freq_hist_data_bar_values": _centres(act_edges),
        "freq_hist_data_bar_heights": [float(c) for c in counts],
        "logits_hist_data_bar_heights": [float(c) for c in lens["hist"]["counts"]],
        "logits_hist_data_bar_values": _centres(lens["hist"]["edges"]),
        "n_prompts_total": n_prompts,
        "n_tokens_in_prompt": prompt_tokens,
        "dataset": dataset,
        "decoder_weights_dist": [],
        "activations": acts,
    }


def write_neuronpedia(out: Path, records: list[dict[str, Any]], strings: dict[str, str],
                      meta: dict[str, Any], *, model_id: str, sae_set: str,
                      batch_size: int = BATCH_SIZE) -> list[Path]:
    """``out/k{b}/batch-{i}.json`` for every budget ``b`` in ``meta["budgets"]``."""
    written = []
    for b_index, budget in enumerate(meta["budgets"]):
        folder = out / f"k{budget}"
        for i, start in enumerate(range(0, len(records), batch_size)):
            features = [
                neuronpedia_feature(rec, b_index, budget, strings, n_prompts=meta["contexts"],
                                    prompt_tokens=meta["context"], dataset=meta["data"])
                for rec in records[start : start + batch_size]
            ]
            batch = {"model_id": model_id, "layer": meta["layer"],
                     "sae_set": f"{sae_set}-k{budget}", "features": features}
            path = folder / f"batch-{i}.json"
            write_json(path, batch)
            written.append(path)
    return written
