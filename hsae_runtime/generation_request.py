"""What a generation request asks for and what each step gives back, and the check that a
request can run (:class:`~hsae_runtime.generation.GenerationBatch` runs them).

Shapes: a prompt is ``[T]`` token ids; a step's code is ``[k']`` (empty entries dropped).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from hsae_runtime.errors import InputError
from hsae_runtime.sae import SparseCode
from hsae_runtime.steering import SteerableSAE, SteerSpec, check_budget, check_interventions

FinishReason = Literal["", "length", "stop", "eos", "cancelled"]
MAX_TOP_LOGPROBS = 20
"""Most alternatives a step may report."""


@dataclass
class GenerationRequest:
    """One prompt to continue and how."""

    prompt_ids: Sequence[int]
    """The prompt's token ids ``[T]`` as the LM expects them (BOS included)."""
    steer: SteerSpec
    """Budget, interventions and whether to keep the SAE's error term."""
    max_new_tokens: int = 20
    """Most tokens to generate."""
    temperature: float = 0.0
    """0 = greedy; above 0, sample from ``softmax(logits / temperature)``."""
    top_p: float = 1.0
    """Sample from the smallest set of tokens whose probability reaches ``top_p``."""
    seed: int | None = None
    """Seed of this request's sampler (``None``: a fresh random one)."""
    stop: Sequence[str] = ()
    """Stop once the generated text contains one of these."""
    top_logprobs: int = 5
    """How many alternatives each step reports (0..:data:`MAX_TOP_LOGPROBS`)."""
    compare_unsteered: bool = False
    """Also report each step's alternatives without the interventions (one more LM row)."""
    return_code: bool = False
    """Report the steered code at the position that produced each token."""


@dataclass
class Step:
    """One generated token of one request."""

    request: int
    """Id of the request in its batch: its index in the batch's constructor list, or the id
    :meth:`GenerationBatch.absorb` gave it."""
    index: int
    """0 for the first new token."""
    token_id: int
    token: str
    logprob: float
    """Log-probability of the token under the steered model (before temperature)."""
    top: list[tuple[int, float]]
    """The most likely tokens and their log-probabilities, steered."""
    unsteered_logprob: float | None = None
    top_unsteered: list[tuple[int, float]] = field(default_factory=list)
    """The same without the interventions (``compare_unsteered`` only)."""
    code: SparseCode | None = None
    """``[k']`` steered code (empty entries dropped) of the position that produced the token."""
    finish_reason: FinishReason = ""
    """Set on a request's last step."""


def check_request(req: GenerationRequest, sae: SteerableSAE, vocab: int) -> None:
    """Raise :class:`InputError` (with a hint) for anything the batch cannot run."""
    ids = list(req.prompt_ids)
    if not ids:
        raise InputError("the prompt is empty", hint="send text or at least one token id")
    bad = [i for i in ids if isinstance(i, bool) or not 0 <= int(i) < vocab]
    if bad:
        raise InputError(f"prompt token ids {bad[:5]} out of range 0..{vocab - 1}")
    check_budget(sae.config, req.steer.budget)
    check_interventions(sae.config, req.steer.interventions)
    if isinstance(req.max_new_tokens, bool) or req.max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {req.max_new_tokens}")
    if not math.isfinite(req.temperature) or req.temperature < 0:
        raise InputError(f"temperature must be finite and >= 0, got {req.temperature}")
    if not (math.isfinite(req.top_p) and 0 < req.top_p <= 1):
        raise InputError(f"top_p must lie in (0, 1], got {req.top_p}")
    if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InputError(f"top_logprobs must lie in 0..{MAX_TOP_LOGPROBS}, got {req.top_logprobs}")
