"""``hsae-runtime features``: cache the codes, compute the statistics, write report and exports.

:func:`build_features` is the whole pipeline; each step is its own module (``cache``,
``stats``, ``lens``, ``records``, ``report``, ``export``). The LM runs only to fill the cache;
with a complete cache, the statistics read the cache, and the LM contributes its tokenizer,
final norm and unembedding (no forward pass).

Output folder ``DIR``: ``cache/`` (the code cache), ``index.html`` + ``assets/`` + ``data/``
(the report), ``neuronpedia/k{b}/`` (exports), ``stats.json`` (corpus summary per budget).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsae_runtime.errors import ConfigError
from hsae_runtime.features.cache import (
    CACHE_FOLDER,
    CacheSpec,
    CacheTimes,
    CodeCache,
    build_cache,
    cache_key,
    portable_name,
)
from hsae_runtime.features.stats import StatsSpec, model_budgets
from hsae_runtime.lm import LoadedLM, resolve_hookpoint
from hsae_runtime.sae import SAE

logger = logging.getLogger(__name__)


@dataclass
class FeatureTimes:
    """Wall-clock seconds per step (for benchmarks and logs; never written into ``DIR``)."""

    cache: CacheTimes = field(default_factory=CacheTimes)
    stats_s: float = 0.0
    lens_s: float = 0.0
    records_s: float = 0.0
    write_s: float = 0.0


def resolve_budgets(sae: SAE, budgets: list[int] | None) -> tuple[int, ...]:
    """The requested budgets (checked against k_max), or the model's (:func:`model_budgets`)."""
    if budgets:
        return tuple(sorted(set(sae.check_budgets(budgets))))
    return model_budgets(sae.config.trained_budgets, sae.config.k_max)


def build_features(
    model_path: str | Path,
    sae: SAE,
    lm: LoadedLM,
    data: str | Path,
    out: str | Path,
    spec: CacheSpec,
    *,
    budgets: list[int] | None = None,
    top_n: int = 10,
    hookpoint: str | None = None,
    export: bool = True,
    model_id: str | None = None,
    progress: bool = True,
) -> FeatureTimes:
    """Build (or resume) the cache in ``out/cache``, then the statistics, report and exports."""
    from hsae_runtime.features.export import write_neuronpedia
    from hsae_runtime.features.lens import (
        decoder_neighbours,
        final_norm_and_unembedding,
        logit_lens,
    )
    from hsae_runtime.features.records import build_records, token_strings, used_token_ids
    from hsae_runtime.features.report import examples, write_json, write_report
    from hsae_runtime.features.stats import compute_stats, summary_dict

    out = Path(out)
    hp_name = hookpoint or sae.config.hookpoint
    if hp_name is None:
        raise ConfigError("the SAE file names no hookpoint", hint="pass --hookpoint")
    hp = resolve_hookpoint(lm.model, hp_name)
    wanted = resolve_budgets(sae, budgets)  # bad budgets fail before any LM work
    times = FeatureTimes()
    key = cache_key(model_path, sae, lm, hp_name, data, spec)
    cache = CodeCache(out / CACHE_FOLDER)
    times.cache = build_cache(cache.folder, sae, lm, data, spec, key=key, hookpoint=hp_name,
                              progress=progress)

    t0 = time.perf_counter()
    stats = compute_stats(cache, StatsSpec(budgets=wanted, top_n=top_n), progress=progress)
    t1 = time.perf_counter()
    norm, w_u = final_norm_and_unembedding(lm)
    lens = logit_lens(sae.W_dec.detach(), norm, w_u)
    neighbours = decoder_neighbours(sae.W_dec.detach())
    t2 = time.perf_counter()
    records = build_records(cache, stats, lens, neighbours)
    example_texts = examples(cache)
    ids = used_token_ids(records) | {t for ex in example_texts for t in ex["t"]}
    strings = token_strings(lm.tokenizer, ids)
    t3 = time.perf_counter()
    manifest = cache.manifest()
    meta: dict[str, Any] = {
        "sae": key["sae"], "lm": key["lm"], "hookpoint": hp_name, "layer": hp.layer,
        "data": key["data"], "d_sae": sae.config.d_sae, "k": sae.config.k_max,
        "context": spec.context, "contexts": -(-int(manifest["tokens"]) // spec.context),
        "cached_tokens": int(manifest["tokens"]), **summary_dict(stats),
    }
    write_report(out, meta, records, strings, example_texts)
    write_json(out / "stats.json", meta)
    if export:
        write_neuronpedia(out / "neuronpedia", records, strings, meta,
                          model_id=model_id or _model_id(key["lm"]),
                          sae_set=Path(key["sae"]).stem)
    t4 = time.perf_counter()
    times.stats_s, times.lens_s, times.records_s, times.write_s = t1 - t0, t2 - t1, t3 - t2, t4 - t3
    logger.info("features: report in %s (%d latents, budgets %s)", out / "index.html",
                sae.config.d_sae, ",".join(map(str, wanted)))
    return times


def _model_id(lm_name: str) -> str:
    """A Neuronpedia-style model id from the LM name (``pypi:gemma3-270m-...`` ->
    ``gemma3-270m-...``, ``google/gemma-2-2b`` -> ``gemma-2-2b``)."""
    name = portable_name(lm_name).split(":")[-1].split("/")[-1]
    return name.removesuffix(".gguf").lower()
