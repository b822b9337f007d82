"""The code cache: every token's sorted SAE code at ``k_max``, stored once, read by every budget.

Codes are nested prefixes, so the code at budget ``k`` is ``[:k]`` of the stored code and one
cache serves all budgets. :func:`build_cache` runs the LM to the hookpoint (the same pieces as
training and ``eval``: :func:`~hsae_runtime.training.data.read_documents`,
:func:`~hsae_runtime.training.data.iter_contexts`, :func:`~hsae_runtime.lm.capture`) and the SAE
once, and writes ``shard_contexts`` contexts per shard.

Layout of ``DIR/cache/``:

* ``key.json`` — what the codes depend on (SAE file digest, LM, hookpoint, data, context
  length, shard size); written first, so a resumed run can check it continues the same job.
* ``shard_00000.safetensors`` ... — per shard (``N`` tokens, ``C`` contexts, ``k = k_max``):
  ``indices [N, k]`` (uint16 when ``d_sae`` fits, else int32), ``values [N, k]`` float16,
  ``token_ids [N]`` int32, ``counted [N]`` bool (False at BOS / EOS / pad, which statistics
  skip), ``offsets [C + 1]`` int64 (where each context starts in the shard) and
  ``context_ids [C]`` int64 (each context's number in the stream: BOS, then tokens
  ``context_id · (context - 1)`` onwards of the EOS-joined documents, EOS marking their ends).
* ``manifest.json`` — written last: shard and token counts. Present = the cache is complete.

Why safetensors: the project already reads and writes every tensor file with it (model files,
activation caches), it is memory-mappable and never unpickles, and its files are byte-identical
for identical tensors, which makes "resume gives identical files" checkable. Arrow via
``datasets`` would add a large dependency for no gain on fixed-width integer/float columns.

Memory stays bounded: one shard of codes plus one LM batch of activations at a time. A run
that stops early resumes after the last complete shard; shards are written through a temp file
and a rename, and cut on LM-batch boundaries, so the resumed run computes the same batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from hsae_runtime.errors import ConfigError, DataError, ModelFileError
from hsae_runtime.lm import LoadedLM, capture, resolve_hookpoint, special_token_mask
from hsae_runtime.sae import SAE

logger = logging.getLogger(__name__)

CACHE_FOLDER = "cache"
KEY_FILE = "key.json"
MANIFEST_FILE = "manifest.json"
SHARD_TENSORS = ("indices", "values", "token_ids", "counted", "offsets", "context_ids")
FLOAT16_MAX = 65504.0


def portable_name(name: str | Path) -> str:
    """A name for files meant to travel: a local path becomes its file name, anything else
    (hub ids, ``pypi:...``) stays as given."""
    text = str(name)
    path = Path(text).expanduser()
    return path.name if path.exists() or path.is_absolute() else text


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (hex, first 16 characters)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class CacheSpec:
    """What to cache: how many tokens, cut how, run in which batches."""

    tokens: int
    """Tokens to cache (rounded up to whole contexts; BOS included)."""
    context: int = 128
    """Tokens per LM context (BOS first, as in training)."""
    lm_batch: int = 8
    """Contexts per LM forward."""
    shard_contexts: int = 64
    """Contexts per shard; a multiple of ``lm_batch`` (resume restarts on a shard boundary)."""

    def __post_init__(self) -> None:
        for name in ("tokens", "context", "lm_batch", "shard_contexts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"CacheSpec.{name} must be a positive int, got {value!r}")
        if self.context < 2:
            raise ConfigError(f"CacheSpec.context must be at least 2, got {self.context}")
        if self.shard_contexts % self.lm_batch:
            raise ConfigError(
                f"CacheSpec.shard_contexts ({self.shard_contexts}) must be a multiple of "
                f"lm_batch ({self.lm_batch})",
                hint="shards are cut on LM-batch boundaries so a resumed run repeats no batch",
            )

    @property
    def n_contexts(self) -> int:
        return -(-self.tokens // self.context)


class Shard(NamedTuple):
    """One shard read back (``N`` tokens, ``C`` contexts, ``k`` = the cached k_max)."""

    indices: Tensor  # (N, k) int64
    values: Tensor  # (N, k) float32
    token_ids: Tensor  # (N,) int64
    counted: Tensor  # (N,) bool
    offsets: Tensor  # (C + 1,) int64
    context_ids: Tensor  # (C,) int64


@dataclass
class CacheTimes:
    """Seconds spent building a cache (for benchmarks; never written to the cache)."""

    lm_s: float = 0.0
    sae_s: float = 0.0
    write_s: float = 0.0
    resumed_shards: int = 0
    clamped_tokens: int = 0
    """Tokens with a code value beyond float16's range (stored clamped to ±65504)."""
    clamped_counted: int = 0
    """Of those, tokens that statistics count (the rest are BOS / EOS / pad)."""
    extra: dict[str, float] = field(default_factory=dict)


def index_dtype(d_sae: int) -> torch.dtype:
    """uint16 when every latent id fits, else int32."""
    return torch.uint16 if d_sae <= 1 << 16 else torch.int32


def cache_key(sae_path: str | Path, sae: SAE, lm: LoadedLM, hookpoint: str, data: str | Path,
              spec: CacheSpec) -> dict[str, Any]:
    """What the cached codes depend on; portable (file names and digests, no machine paths)."""
    data_path = Path(data).expanduser()
    return {
        "sae": portable_name(sae_path),
        "sae_digest": file_digest(sae_path),
        "d_sae": sae.config.d_sae,
        "k": sae.config.k_max,
        "lm": portable_name(lm.name),
        "hookpoint": hookpoint,
        "data": portable_name(data),
        "data_digest": file_digest(data_path) if data_path.is_file() else "",
        **asdict(spec),
        # Refined codes have other values; an encoder-readout key stays as it always was.
        **({"readout": sae.readout} if sae.readout != "encoder" else {}),
    }


class CodeCache:
    """A cache folder: its key, shards and manifest."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def shard_path(self, index: int) -> Path:
        return self.folder / f"shard_{index:05d}.safetensors"

    def read_key(self) -> dict[str, Any] | None:
        return _read_json(self.folder / KEY_FILE)

    def manifest(self) -> dict[str, Any]:
        """The manifest of a complete cache; :class:`DataError` when there is none."""
        data = _read_json(self.folder / MANIFEST_FILE)
        if data is None:
            raise DataError(
                f"no complete code cache in {self.folder}",
                hint="build it with `hsae-runtime features MODEL --data ... --out DIR` "
                     "(an interrupted run resumes where it stopped)",
            )
        return data

    @property
    def complete(self) -> bool:
        return (self.folder / MANIFEST_FILE).is_file()

    def read_shard(self, index: int) -> Shard:
        """Shard ``index`` with indices widened to int64 and values to float32."""
        from safetensors import safe_open

        path = self.shard_path(index)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                t = {name: f.get_tensor(name) for name in SHARD_TENSORS}
        except Exception as err:  # safetensors raises its own types for bad files
            raise ModelFileError(f"{path}: not a readable code-cache shard ({err})",
                                 hint="delete the folder's manifest.json and rerun to rebuild"
                                 ) from err
        return Shard(t["indices"].to(torch.int64), t["values"].float(),
                     t["token_ids"].to(torch.int64), t["counted"], t["offsets"],
                     t["context_ids"])

    def shards(self) -> Iterator[Shard]:
        """Every shard of a complete cache, in order (one in memory at a time)."""
        for index in range(int(self.manifest()["shards"])):
            yield self.read_shard(index)

    def _valid_shards(self, digest: str) -> int:
        """How many leading shards exist and belong to the key with ``digest``."""
        from safetensors import safe_open

        n = 0
        while self.shard_path(n).is_file():
            try:
                with safe_open(str(self.shard_path(n)), framework="pt") as f:
                    if (f.metadata() or {}).get("digest") != digest:
                        break
            except Exception:  # a damaged shard is recomputed
                break
            n += 1
        return n


def build_cache(
    folder: str | Path,
    sae: SAE,
    lm: LoadedLM,
    data: str | Path,
    spec: CacheSpec,
    *,
    key: dict[str, Any],
    hookpoint: str | None = None,
    progress: bool = True,
) -> CacheTimes:
    """Write (or finish) the code cache of ``sae`` on ``spec.tokens`` tokens of ``data``.

    A folder holding a cache with the same ``key`` is resumed after its last complete shard
    (a complete one is left alone); a folder holding another key is a :class:`ConfigError`.
    """
    from tqdm.auto import tqdm

    from hsae_runtime.format import atomic_save_tensors
    from hsae_runtime.training.data import iter_contexts, read_documents

    cache = CodeCache(folder)
    hp = resolve_hookpoint(lm.model, hookpoint or sae.config.hookpoint or "")
    if lm.d_model != sae.config.d_in:
        raise ConfigError(f"the LM's width {lm.d_model} does not match the SAE's d_in "
                          f"{sae.config.d_in}", hint="pass the LM the SAE was trained on (--lm)")
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    old = cache.read_key()
    if old is not None and old != key:
        changed = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
        raise ConfigError(f"{cache.folder} holds a cache for other settings ({changed})",
                          hint="use another --out folder, or delete this one to rebuild")
    times = CacheTimes()
    if old is not None and cache.complete:
        logger.info("code cache in %s is complete; reusing it", cache.folder)
        return times
    cache.folder.mkdir(parents=True, exist_ok=True)
    _write_json(cache.folder / KEY_FILE, key)
    done = cache._valid_shards(digest)
    times.resumed_shards = done
    n_shards = -(-spec.n_contexts // spec.shard_contexts)
    if done:
        logger.info("resuming the code cache after %d of %d shards", done, n_shards)
    contexts = iter_contexts(read_documents(data), lm.tokenizer, spec.context)
    skip = done * spec.shard_contexts
    for _ in islice(contexts, skip):  # tokenising only: no LM work for shards already written
        pass
    idx_dtype = index_dtype(sae.config.d_sae)
    k = sae.config.k_max
    bar = tqdm(total=spec.n_contexts * spec.context, initial=skip * spec.context, unit="tok",
               unit_scale=True, desc="features: cache", disable=not progress)
    shard = done
    try:
        while shard < n_shards:
            want = min(spec.shard_contexts, spec.n_contexts - shard * spec.shard_contexts)
            batch = list(islice(contexts, want))
            if not batch:
                break
            tensors = _encode_shard(batch, shard * spec.shard_contexts, sae, lm, hp, spec,
                                    k, times)
            tensors["indices"] = tensors["indices"].to(idx_dtype)
            t0 = time.perf_counter()
            atomic_save_tensors(tensors, cache.shard_path(shard), {"digest": digest})
            times.write_s += time.perf_counter() - t0
            bar.update(len(tensors["token_ids"]))
            shard += 1
    finally:
        bar.close()
    if times.clamped_tokens:
        logger.warning("%d tokens had code values beyond float16's range, stored clamped to "
                       "±%g (%d of them counted; the rest are special tokens such as BOS)",
                       times.clamped_tokens, FLOAT16_MAX, times.clamped_counted)
    if shard == 0:
        raise DataError(f"no tokens in {portable_name(data)}",
                        hint=f"need at least {spec.context} tokens of text")
    n_tokens = sum(_shard_tokens(cache.shard_path(i)) for i in range(shard))
    _write_json(cache.folder / MANIFEST_FILE, {"digest": digest, "shards": shard,
                                                "tokens": n_tokens, "k": k,
                                                "d_sae": sae.config.d_sae})
    logger.info("code cache complete: %d shards, %d tokens in %s", shard, n_tokens, cache.folder)
    return times


def _encode_shard(batch: list[Tensor], first_context: int, sae: SAE, lm: LoadedLM, hp: Any,
                  spec: CacheSpec, k: int, times: CacheTimes) -> dict[str, Tensor]:
    """Codes of one shard's contexts, LM batch by LM batch."""
    values, indices, ids, counted = [], [], [], []
    for start in range(0, len(batch), spec.lm_batch):
        chunk = torch.stack(batch[start : start + spec.lm_batch])  # (B, T)
        t0 = time.perf_counter()
        acts = capture(lm, hp, chunk)  # (B, T, d_in)
        t1 = time.perf_counter()
        with torch.inference_mode():
            code = sae.encode(acts.reshape(-1, acts.shape[-1]), k)  # (B·T, k)
        times.lm_s += t1 - t0
        times.sae_s += time.perf_counter() - t1
        special = special_token_mask(lm.tokenizer, chunk).reshape(-1)  # (B·T,)
        over = (code.values.abs() > FLOAT16_MAX).any(1).cpu()  # (B·T,)
        times.clamped_tokens += int(over.sum())
        times.clamped_counted += int((over & ~special).sum())
        values.append(code.values.clamp(-FLOAT16_MAX, FLOAT16_MAX).to(torch.float16).cpu())
        indices.append(code.indices.cpu())
        ids.append(chunk.reshape(-1))
        counted.append(~special)
    lengths = torch.tensor([len(c) for c in batch], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return {
        "indices": torch.cat(indices),
        "values": torch.cat(values),
        "token_ids": torch.cat(ids).to(torch.int32),
        "counted": torch.cat(counted),
        "offsets": offsets,
        "context_ids": torch.arange(first_context, first_context + len(batch)),
    }


def _shard_tokens(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return int(f.get_slice("token_ids").get_shape()[0])


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
