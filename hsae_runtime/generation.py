"""Generation with the SAE in the loop: the LM writes text while its hookpoint sees the code.

Every position of the prompt and of each new token runs through the LM with the activation at
the hookpoint replaced by :func:`~hsae_runtime.steering.steer_activations` (the reconstruction
of the budget-k code after the request's interventions, plus the error term if asked). Special
tokens (BOS, padding...) keep their clean activation: the SAE was not trained on them.

:class:`GenerationBatch` runs several requests together, one token per :meth:`step`:

* prompts are left-padded into one batch, each row counting positions from its own first
  token, and run once (prefill); then each step feeds one new token per row on the KV cache
  (:func:`~hsae_runtime.lm.forward_cached`), so a step costs one token of LM forward per row;
* ``compare_unsteered`` adds a twin row per steered request (same tokens, no interventions)
  whose log-probabilities come back beside the steered ones;
* a finished or cancelled request leaves the batch before the next step (its KV rows are
  dropped, and cache columns that only its prompt used are trimmed), so a long request does
  not keep the others' cost up;
* :meth:`GenerationBatch.absorb` moves the requests of another batch, once their prompts ran,
  into this one between two steps (continuous batching): the two KV caches are joined with
  left padding (:mod:`hsae_runtime.kv_batch`), and since every row attends only to its own
  tokens at its own positions, a request generates the same tokens whichever batch it joins.

Sampling is greedy at temperature 0, else seeded (``seed``) with top-p; it stops at
``max_new_tokens``, an end-of-sequence token or a stop string.

The request and step types and their checks are in :mod:`hsae_runtime.generation_request`.

Shapes: ``R`` model rows (requests plus twins), ``T`` positions of a forward, ``V`` vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor

from hsae_runtime.errors import InputError
from hsae_runtime.generation_request import FinishReason, GenerationRequest, Step, check_request
from hsae_runtime.kv_batch import join_into, trim_padding
from hsae_runtime.lm import (
    LoadedLM,
    PrefixCache,
    forward_cached,
    hook,
    resolve_hookpoint,
    special_token_mask,
)
from hsae_runtime.sae import SparseCode
from hsae_runtime.steering import (
    SteerableSAE,
    SteerSpec,
    steer_activations,
)


def eos_ids(lm: LoadedLM) -> set[int]:
    """Token ids that end generation (the tokenizer's and the generation config's EOS)."""
    ids: set[int] = set()
    candidates = [getattr(lm.tokenizer, "eos_token_id", None)]
    gen_config = getattr(lm.model, "generation_config", None)
    candidates.append(getattr(gen_config, "eos_token_id", None))
    for value in candidates:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


@dataclass
class _Live:
    """A request still generating: its model rows and its sampler state."""

    request: int
    req: GenerationRequest
    row: int
    twin: int | None
    generator: torch.Generator
    new_ids: list[int] = field(default_factory=list)


class GenerationBatch:
    """Several requests generating together; :meth:`step` adds one token to each."""

    def __init__(
        self,
        lm: LoadedLM,
        sae: SteerableSAE,
        hookpoint: str,
        requests: Sequence[GenerationRequest],
    ) -> None:
        if not requests:
            raise InputError("a generation batch needs at least one request")
        vocab = int(cast(Any, lm.model).get_input_embeddings().num_embeddings)
        for req in requests:
            check_request(req, sae, vocab)
        self.lm, self.sae = lm, sae
        self.hookpoint = resolve_hookpoint(lm.model, hookpoint)
        self.lm_seconds = 0.0
        """Wall time of the LM forwards (the SAE time inside them excluded)."""
        self.sae_seconds = 0.0
        """Wall time of encoding and steering at the hookpoint."""
        self._eos = eos_ids(lm)
        self._specs: list[SteerSpec] = []
        self._live: list[_Live] = []
        for i, req in enumerate(requests):
            twin = None
            self._specs.append(req.steer)
            if req.compare_unsteered and req.steer.interventions:
                twin = len(self._specs)
                self._specs.append(req.steer._replace(interventions=()))
            gen = torch.Generator()
            if req.seed is None:
                gen.seed()
            else:
                gen.manual_seed(int(req.seed))
            self._live.append(_Live(i, req, len(self._specs) - 1 - (twin is not None), twin, gen))
        self._next_id = len(requests)
        self._cache = PrefixCache()
        self._pending: list[int] | None = None  # the tokens the next step feeds, per model row
        self._cancelled: set[int] = set()
        self._codes: list[SparseCode | None] = []

    @property
    def done(self) -> bool:
        """True once every request has finished or been cancelled."""
        return not self._live

    @property
    def active(self) -> list[int]:
        """Indices of the requests still generating."""
        return [live.request for live in self._live]

    def cancel(self, request: int) -> None:
        """Stop ``request``; its rows leave the batch at the next step."""
        self._cancelled.add(request)

    def absorb(self, other: GenerationBatch) -> dict[int, int]:
        """Move ``other``'s live requests into this batch between two steps; their new ids.

        Both batches must have run their prompts (one :meth:`step` each) and this one must not
        be done. ``other``'s KV rows join this batch's cache, the shorter left-padded to the
        longer, so each request continues exactly as it would have alone; ``other`` is empty
        afterwards. Raises :class:`~hsae_runtime.kv_batch.UnsupportedCache`, changing
        nothing, when the LM's cache layers cannot be padded (run the batches apart then).
        """
        same = other.lm is self.lm and other.sae is self.sae and other.hookpoint == self.hookpoint
        if not same:
            raise ValueError("absorb() joins batches of the same LM, SAE and hookpoint only")
        self._drop_cancelled()
        other._drop_cancelled()
        if not other._live:
            return {}
        if self._pending is None or other._pending is None or not self._live:
            raise ValueError("absorb() needs two running batches, each past its first step")
        join_into(self._cache, other._cache)
        offset, ids = len(self._specs), {}
        for live in other._live:
            ids[live.request] = self._next_id
            self._next_id += 1
            live.request, live.row = ids[live.request], live.row + offset
            live.twin = None if live.twin is None else live.twin + offset
            self._live.append(live)
        self._specs += other._specs
        self._pending += other._pending
        other._live, other._specs, other._pending = [], [], None
        other._cache = PrefixCache()
        trim_padding(self._cache)
        return ids

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[Step]:
        """One new token for every live request (the first call runs the prompts)."""
        self._drop_cancelled()
        if not self._live:
            return []
        ids, mask, positions = self._next_inputs()
        logits = self._forward(ids, mask, positions)  # (R, V)
        logp = torch.log_softmax(logits.float(), dim=-1)
        steps, next_tokens, finished = [], [0] * len(self._specs), []
        for live in self._live:
            req = live.req
            token = self._sample(logits[live.row], req, live.generator)
            live.new_ids.append(token)
            step = self._describe(live, req, token, logp)
            step.finish_reason = self._finish_reason(live, req, token)
            if step.finish_reason:
                finished.append(live.request)
            steps.append(step)
            next_tokens[live.row] = token
            if live.twin is not None:
                next_tokens[live.twin] = token
        self._pending = next_tokens
        self._cancelled.update(finished)
        self._drop_cancelled()  # a finished request frees its rows at once
        return steps

    def _next_inputs(self) -> tuple[Tensor, Tensor, Tensor]:
        """``input_ids``, ``attention_mask``, ``positions`` ``[R, T]`` of the next forward."""
        if self._pending is None:  # prefill: left-pad the prompts
            prompts = [list(self._request_at(r).prompt_ids) for r in range(len(self._specs))]
            t = max(len(p) for p in prompts)
            pad = getattr(self.lm.tokenizer, "pad_token_id", None) or 0
            ids = torch.tensor([[pad] * (t - len(p)) + p for p in prompts], dtype=torch.long)
            mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in prompts])
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            return ids, mask, positions
        assert self._cache.mask is not None
        ids = torch.tensor(self._pending, dtype=torch.long)[:, None]  # (R, 1)
        mask = torch.ones_like(ids)
        positions = self._cache.mask.sum(-1, keepdim=True).to(ids.device)  # (R, 1)
        return ids, mask, positions

    def _request_at(self, row: int) -> GenerationRequest:
        for live in self._live:
            if row in (live.row, live.twin):
                return live.req
        raise AssertionError(f"model row {row} has no request")

    def _forward(self, ids: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
        """Run the LM with the steered splice; keeps each row's last-position code."""
        clean = special_token_mask(self.lm.tokenizer, ids) | (mask == 0)  # (R, T)
        spliced = (~clean).to(self.lm.device)
        row_of = spliced.nonzero()[:, 0]  # (N,)
        self._codes = [None] * len(self._specs)
        sae_time = 0.0

        def swap(x: Tensor) -> Tensor | None:  # x (R, T, d_in)
            nonlocal sae_time
            if row_of.numel() == 0:
                return None
            start = time.perf_counter()
            steered = steer_activations(self.sae, x[spliced], self._specs, row_of)
            out = x.clone()
            out[spliced] = steered.activations.to(x.dtype)
            self._keep_last_codes(spliced, steered.code)
            sae_time += time.perf_counter() - start
            return out

        start = time.perf_counter()
        with hook(self.lm.model, self.hookpoint, swap):
            logits = forward_cached(self.lm, ids, mask, self._cache, positions)  # (R, V)
        self.sae_seconds += sae_time
        self.lm_seconds += time.perf_counter() - start - sae_time
        return logits

    def _keep_last_codes(self, spliced: Tensor, code: SparseCode) -> None:
        flat_index = spliced.flatten().cumsum(0).reshape(spliced.shape) - 1  # (R, T)
        for live in self._live:
            if not live.req.return_code or not bool(spliced[live.row, -1]):
                continue
            n = int(flat_index[live.row, -1])
            keep = code.indices[n] >= 0
            self._codes[live.row] = SparseCode(code.values[n][keep], code.indices[n][keep])

    # ------------------------------------------------------------------ per request
    @staticmethod
    def _sample(logits: Tensor, req: GenerationRequest, gen: torch.Generator) -> int:
        """Greedy at temperature 0, else top-p sampling with the request's generator."""
        if req.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / req.temperature, dim=-1)  # (V,)
        if req.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            before = sorted_p.cumsum(0) - sorted_p  # mass of the tokens ranked above
            sorted_p = sorted_p.masked_fill(before >= req.top_p, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs.cpu(), 1, generator=gen))

    def _describe(self, live: _Live, req: GenerationRequest, token: int, logp: Tensor) -> Step:
        row = logp[live.row]
        step = Step(
            request=live.request,
            index=len(live.new_ids) - 1,
            token_id=token,
            token=self.lm.tokenizer.decode([token]),
            logprob=float(row[token]),
            top=_top(row, req.top_logprobs),
            code=self._codes[live.row],
        )
        if req.compare_unsteered:
            other = logp[live.twin] if live.twin is not None else row
            step.unsteered_logprob = float(other[token])
            step.top_unsteered = _top(other, req.top_logprobs)
        return step

    def _finish_reason(self, live: _Live, req: GenerationRequest, token: int) -> FinishReason:
        if token in self._eos:
            return "eos"
        if req.stop:
            text = self.lm.tokenizer.decode(live.new_ids)
            if any(s and s in text for s in req.stop):
                return "stop"
        if len(live.new_ids) >= req.max_new_tokens:
            return "length"
        return ""

    def _drop_cancelled(self) -> None:
        """Remove finished and cancelled requests (and their KV rows) from the batch."""
        if not self._cancelled:
            return
        keep_live = [live for live in self._live if live.request not in self._cancelled]
        self._cancelled.clear()
        if len(keep_live) == len(self._live):
            return
        rows = [r for live in keep_live for r in (live.row, live.twin) if r is not None]
        if self._pending is not None and rows:
            index = torch.tensor(rows, device=self.lm.device)
            self._cache.kv.batch_select_indices(index)
            assert self._cache.mask is not None
            self._cache.mask = self._cache.mask[index]
            self._pending = [self._pending[r] for r in rows]
            trim_padding(self._cache)
        renumber = {old: new for new, old in enumerate(rows)}
        self._specs = [self._specs[r] for r in rows]
        for live in keep_live:
            live.row = renumber[live.row]
            live.twin = None if live.twin is None else renumber[live.twin]
        self._live = keep_live


def _top(logp: Tensor, n: int) -> list[tuple[int, float]]:
    if n == 0:
        return []
    values, ids = logp.topk(n)
    return [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]


def generate(
    lm: LoadedLM,
    sae: SteerableSAE,
    hookpoint: str,
    requests: Sequence[GenerationRequest],
) -> Iterator[list[Step]]:
    """Run ``requests`` to the end as one :class:`GenerationBatch`, yielding each step's tokens."""
    batch = GenerationBatch(lm, sae, hookpoint, requests)
    while not batch.done:
        steps = batch.step()
        if steps:
            yield steps
