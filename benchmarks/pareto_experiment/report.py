"""Stage 6: the claims' summary numbers, ``table.md`` and ``pareto.png`` from the results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .settings import Settings, sae_specs


def write_report(s: Settings, results: dict[str, Any], out: Path) -> None:
    ks = list(s.eval_ks)
    names = [n for n, _, _ in sae_specs(s) if n in results["fvu"]]
    trained = {n: k for n, _, k in sae_specs(s)}
    fvu = results["fvu"]
    ce = results.get("ce") or {}

    def row(name: str, fmt, key: str) -> str:
        cells = []
        for k in ks:
            if key in ("ce", "kl"):
                value = ce.get("delta" if key == "ce" else "kl", {}).get(f"{name}@{k}")
            elif key.startswith("val:"):
                value = results.get("fvu_val", {}).get(name, {}).get(str(k), {}).get(key[4:])
            else:
                value = fvu[name][str(k)][key]
            text = "–" if value is None else fmt(value)
            cells.append(f"**{text}**" if k == trained[name] else text)
        return f"| {name} | " + " | ".join(cells) + " |"

    head = "| SAE | " + " | ".join(f"k={k}" for k in ks) + " |\n|---|" + "---|" * len(ks)
    lines = ["### FVU on the held-out documents (bold: the budget the SAE was trained at)", "",
             head, *[row(n, lambda v: f"{v:.4f}", "fvu") for n in names], "",
             "### Per-token FVU: mean over eval tokens of ‖x − x̂‖² / ‖x − mean‖²", "",
             head, *[row(n, lambda v: f"{v:.4f}", "fvu_token") for n in names], ""]
    if ce:
        lines += [f"### CE delta (nats/token) with the reconstruction spliced in "
                  f"({ce['tokens']} predicted tokens, "
                  f"{ce['contexts_done']}/{ce['contexts']} contexts, "
                  f"clean CE {ce['clean_ce']:.4f})", "",
                  head, *[row(n, lambda v: f"{v:+.4f}", "ce") for n in names], ""]
        if ce.get("kl"):
            lines += ["### KL(clean ‖ spliced) (nats/token), same tokens", "",
                      head, *[row(n, lambda v: f"{v:.4f}", "kl") for n in names], ""]
    lines += ["### Dead latents (% never firing on the eval part at that budget)", "",
              head, *[row(n, lambda v: f"{v:.1f}", "dead_pct") for n in names], ""]
    if results.get("fvu_val"):
        lines += ["### FVU on the validation documents (what choices are made on)", "",
                  head, *[row(n, lambda v: f"{v:.4f}", "val:fvu") for n in names], ""]
    objective = results.get("objective", {})
    if objective:
        lines += ["### Overfitting check: each SAE's own objective (MSE, raw units) on 16,384 "
                  "tokens of each part", "",
                  "| SAE | train | validation | eval | eval ÷ train | best val. step / steps |",
                  "|---|---|---|---|---|---|"]
        for n in names:
            o, st = objective.get(n, {}), results.get("training", {}).get(n, {})
            if o:
                lines.append(f"| {n} | {o['train']:.1f} | {o['val']:.1f} | {o['eval']:.1f} | "
                             f"{o['eval'] / o['train']:.2f} | {st.get('best_step', '–')} / "
                             f"{st.get('steps', '–')} |")
        lines += [""]
    summary = results["summary"]
    lines += ["### Claims", "", "| quantity | value |", "|---|---|"]
    lines += [f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |"
              for key, value in summary.items()]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    plot(s, results, out / "pareto.png")


def plot(s: Settings, results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(s.eval_ks)
    ce = (results.get("ce") or {}).get("delta", {})
    panels = [("fvu", "FVU (held-out documents)"),
              ("fvu_token", "per-token FVU (mean over tokens)")]
    panels += [("ce", "CE delta (nats/token)")] if ce else []
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.6), squeeze=False)
    colours = plt.get_cmap("viridis")
    specs = sae_specs(s)
    for j, (key, label) in enumerate(panels):
        ax = axes[0, j]
        for i, (name, objective, k_train) in enumerate(specs):
            if name not in results["fvu"]:
                continue
            if key != "ce":
                ys = [results["fvu"][name][str(k)][key] for k in ks]
            else:
                ys = [ce.get(f"{name}@{k}", float("nan")) for k in ks]
            if objective == "hierarchical":
                ax.plot(ks, ys, "o-", color="crimson", lw=2.5, zorder=5,
                        label=f"HierarchicalTopK (k_max={k_train})")
                continue
            colour = colours(0.15 + 0.7 * (i - 1) / max(1, len(specs) - 2))
            ax.plot(ks, ys, "--", color=colour, lw=1.2, marker="." if key != "ce" else "o",
                    label=f"TopK k={k_train} (dashed: read at other k)")
            if k_train in ks:
                ax.plot([k_train], [ys[ks.index(k_train)]], "s", color=colour, ms=9, zorder=6)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        positive = key != "ce" or all(v > 0 for v in ce.values())
        if positive:
            ax.set_yscale("log")
        else:
            ax.set_yscale("symlog", linthresh=0.01)
        ax.set_xlabel("budget k (active latents per token)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"{results['lm']} @ {s.hookpoint}, d_sae={s.d_sae}, "
                 f"{results['train_tokens']:,} training tokens (squares: trained k)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def summarise(s: Settings, fvu: dict, timing: dict[str, float], stats: dict,
              ce: dict | None = None, fvu_val: dict | None = None) -> dict[str, Any]:
    h = f"htopk{s.k_max}"
    out: dict[str, Any] = {}
    for k in s.topk_ks:
        a = (fvu_val or {}).get(h, {}).get(str(k), {}).get("fvu")
        b = (fvu_val or {}).get(f"topk{k}", {}).get(str(k), {}).get("fvu")
        if a is not None and b is not None:
            out[f"validation FVU ratio HTopK/TopK-{k} at k={k}"] = a / b

    def at(name: str, k: int, key: str) -> float | None:
        return fvu.get(name, {}).get(str(k), {}).get(key)

    top = f"topk{max(s.topk_ks)}"
    low = 8 if 8 in s.eval_ks else min(s.eval_ks)
    for key, label in (("fvu", "FVU"), ("fvu_token", "per-token FVU")):
        for k in s.topk_ks:
            a, b = at(h, k, key), at(f"topk{k}", k, key)
            if a is not None and b is not None:
                out[f"{label} ratio HTopK/TopK-{k} at k={k}"] = a / b
        a, b = at(top, low, key), at(h, low, key)
        if a is not None and b is not None:
            out[f"{label} {top} read at k={low} / HTopK at k={low}"] = a / b
    for key, label in (("delta", "CE delta"), ("kl", "KL")):
        values = (ce or {}).get(key, {})
        for k in s.topk_ks:
            a, b = values.get(f"{h}@{k}"), values.get(f"topk{k}@{k}")
            if a is not None and b is not None:
                out[f"{label} HTopK − TopK-{k} at k={k} (nats)"] = a - b
    for name, t in timing.items():
        if name != h:
            out[f"step time HTopK / {name} (interleaved, median)"] = timing[h] / t
    for name, st in stats.items():
        out[f"training s/step {name} (whole run)"] = st["s_per_step"]
    return out
