"""The Pareto comparison on text that is not WikiText: HTopK ÷ each dedicated TopK SAE.

Run from the repository root, after ``make pareto`` (or on any folder of its models)::

    .venv/bin/python benchmarks/other_text.py --models runs/pareto/layer9-4096/models
    .venv/bin/python benchmarks/other_text.py --models DIR --ce-tokens 2048   # + CE / KL

The corpus is built from what this machine has, so nothing of it is in the repository: every
Markdown file over 4 KB that the virtual environment's packages install (READMEs, templates,
agent skills: code blocks, tables, lists), then the Apache-2.0, GPL-3 and MPL-2.0 texts from
``/usr/share/common-licenses`` where present. The file list is printed. Each readout
(``encoder``, ``refine``) is one ``hsae-runtime eval`` run over every model on the same tokens;
the table gives HTopK ÷ TopK-k at each TopK's own k for the defaults (encoder ÷ encoder), the
refine readout against the encoder one, and both refined. Results in ``docs/pareto.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

LICENSES = ("Apache-2.0", "GPL-3", "MPL-2.0")


def build_corpus(out: Path) -> list[Path]:
    site = Path(sysconfig.get_paths()["purelib"])
    files = sorted((p for p in site.rglob("*.md") if p.stat().st_size > 4096),
                   key=lambda p: p.relative_to(site).as_posix())
    files += [p for name in LICENSES if (p := Path("/usr/share/common-licenses") / name).is_file()]
    out.write_text("\n\n".join(p.read_text(errors="replace") for p in files), encoding="utf-8")
    return files


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=Path, required=True, help="folder with htopk64, topk{k}")
    p.add_argument("--out", type=Path, default=Path("runs/other_text"))
    p.add_argument("--ks", default="8,16,32,64")
    p.add_argument("--ce-tokens", type=int, default=0)
    a = p.parse_args()
    ks = [int(k) for k in a.ks.split(",")]
    a.out.mkdir(parents=True, exist_ok=True)
    text = a.out / "other.txt"
    for f in build_corpus(text):
        print(f"# corpus: {f}")
    models = [a.models / f"htopk{max(ks)}.safetensors"] + [a.models / f"topk{k}.safetensors"
                                                          for k in ks]
    res = {}
    for readout in ("encoder", "refine"):
        out = a.out / f"{readout}.json"
        cmd = [sys.executable, "-m", "hsae_runtime.cli", "eval", str(models[0]),
               *[x for m in models[1:] for x in ("--compare", str(m))], "--data", str(text),
               "--budgets", a.ks, "--tokens", "1000000", "--ce-tokens", str(a.ce_tokens),
               "--context", "1024", "--lm-batch", "4", "--readout", readout, "--json", str(out)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        res[readout] = json.loads(out.read_text())["models"]
    h = f"htopk{max(ks)}"
    metrics = ["fvu", "fvu_token"] + (["ce_delta", "kl"] if a.ce_tokens else [])
    print(f"tokens {res['encoder'][h]['tokens']}; ratios for FVU, differences (nats) for CE/KL")
    print("| metric, comparison | " + " | ".join(f"k={k}" for k in ks) + " |")
    print("|---" * (len(ks) + 1) + "|")
    for metric in metrics:
        for label, ra, rb in (("defaults", "encoder", "encoder"),
                              ("HTopK refine vs TopK encoder", "refine", "encoder"),
                              ("both refined", "refine", "refine")):
            cells = []
            for k in ks:
                x = res[ra][h]["budgets"][str(k)][metric]
                y = res[rb][f"topk{k}"]["budgets"][str(k)][metric]
                cells.append(f"{x / y:.3f}" if metric.startswith("fvu") else f"{x - y:+.3f}")
            print(f"| {metric}, {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
