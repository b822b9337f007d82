"""Continuous batching: requests joining and leaving a running generation batch.

Oracle: the same request generated alone (its own :class:`GenerationBatch`, no padding). A
request that joins a running batch - shorter or longer than the batch's cache, past the tiny
Gemma-2's sliding window of 64 or not, with or without an intervention - must produce,
greedy, the same tokens and log-probabilities; so must the requests already running.
"""

from __future__ import annotations

import copy

import pytest
import torch

from hsae_runtime.generation import GenerationBatch, GenerationRequest, Step, generate
from hsae_runtime.kv_batch import join_into, trim_padding
from hsae_runtime.lm import PrefixCache, forward_cached
from hsae_runtime.serving.errors import CancelledError
from hsae_runtime.serving.generate import GenerateJob, GenerationScheduler
from hsae_runtime.steering import Intervention, SteerSpec
from tests.conftest import _CORPUS, TINY_HOOKPOINT

SHORT = "The quick brown fox"
MEDIUM = "Sparse autoencoders decompose activations into"
LONG = " ".join(_CORPUS)  # more tokens than the sliding window


def ids_of(lm, text: str) -> list[int]:
    return lm.tokenizer(text)["input_ids"]


def request(lm, text: str, steer: SteerSpec | None = None, n: int = 8, **kw) -> GenerationRequest:
    return GenerationRequest(ids_of(lm, text), steer or SteerSpec(4), max_new_tokens=n, **kw)


def alone(lm, sae, req: GenerationRequest) -> list[Step]:
    return [s for steps in generate(lm, sae, TINY_HOOKPOINT, [req]) for s in steps]


def assert_same(got: list[Step], want: list[Step]) -> None:
    assert [s.token_id for s in got] == [s.token_id for s in want]
    assert [s.finish_reason for s in got] == [s.finish_reason for s in want]
    for g, w in zip(got, want, strict=True):
        assert g.logprob == pytest.approx(w.logprob, abs=1e-4)
        assert g.unsteered_logprob == pytest.approx(w.unsteered_logprob, abs=1e-4)


def clamp(lm, sae) -> SteerSpec:
    """A clamp on the top latent of the short prompt's last token (it fires, so it matters)."""
    from hsae_runtime.lm import capture

    x = capture(lm, TINY_HOOKPOINT, torch.tensor([ids_of(lm, SHORT)]))[0, -1]
    latent = int(sae.encode(x[None], 4).indices[0, 0])
    return SteerSpec(4, (Intervention(latent, "set", 30.0),))


class Collector:
    """Steps by request id, following the ids :meth:`GenerationBatch.absorb` hands out."""

    def __init__(self) -> None:
        self.steps: dict[str, list[Step]] = {}
        self.name_of: dict[int, str] = {}

    def add(self, steps: list[Step]) -> None:
        for s in steps:
            self.steps.setdefault(self.name_of[s.request], []).append(s)


def test_kv_join_then_select_and_trim_gives_each_cache_back(lm):
    """Joined caches, cut back to one side's rows and trimmed, equal that side's own cache."""
    caches = []
    for texts in ([SHORT, MEDIUM], [LONG]):
        prompts = [ids_of(lm, t) for t in texts]
        t = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (t - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in prompts])
        cache = PrefixCache()
        forward_cached(lm, ids, mask, cache, (mask.cumsum(-1) - 1).clamp_min(0))
        caches.append(cache)
    assert caches[1].length > 64  # past the sliding window: sliding layers keep 63 columns
    kinds = {type(layer).__name__ for layer in caches[1].kv.layers}
    assert kinds == {"DynamicLayer", "DynamicSlidingWindowLayer"}
    before = [[(la.keys.clone(), la.values.clone()) for la in c.kv.layers] for c in caches]
    masks = [c.mask.clone() for c in caches]
    short, long_ = caches
    join_into(short, long_)
    assert short.mask.shape == (3, masks[1].shape[1])
    for rows, which in (([0, 1], 0), ([2], 1)):
        cut = PrefixCache(kv=copy.deepcopy(short.kv), mask=short.mask[rows])
        cut.kv.batch_select_indices(torch.tensor(rows))
        dropped = trim_padding(cut)
        assert dropped == masks[1].shape[1] - masks[which].shape[1]
        assert torch.equal(cut.mask, masks[which])
        for layer, (k, v) in zip(cut.kv.layers, before[which], strict=True):
            assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
            assert layer.get_seq_length() == masks[which].shape[1]


@pytest.mark.parametrize(
    ("running", "newcomer"),
    [(SHORT, LONG), (LONG, MEDIUM), (MEDIUM, SHORT)],
    ids=["newcomer-longer-past-window", "running-past-window", "both-short"],
)
@pytest.mark.parametrize("steered", [False, True], ids=["plain", "clamp"])
def test_request_joining_a_running_batch_generates_as_alone(lm, sae, running, newcomer, steered):
    spec = clamp(lm, sae) if steered else None
    first = request(lm, running, spec, n=10, compare_unsteered=steered)
    later = request(lm, newcomer, spec, n=8, compare_unsteered=steered)
    want = {"first": alone(lm, sae, first), "later": alone(lm, sae, later)}
    assert len(want["first"]) > 3, "the running request must outlast the join"

    got = Collector()
    got.name_of[0] = "first"
    batch = GenerationBatch(lm, sae, TINY_HOOKPOINT, [first])
    for _ in range(3):  # prompt + two tokens, then the newcomer arrives
        got.add(batch.step())
    joining = GenerationBatch(lm, sae, TINY_HOOKPOINT, [later])
    got.name_of[-1] = "later"
    steps = joining.step()  # its prompt runs alone
    got.add([Step(**{**s.__dict__, "request": -1}) for s in steps])
    ids = batch.absorb(joining)
    assert joining.done and set(ids) == {0}
    got.name_of[ids[0]] = "later"
    rows = 2 * (1 + steered)  # twins with compare_unsteered
    assert batch._cache.mask is not None and batch._cache.mask.shape[0] == rows
    while not batch.done:
        got.add(batch.step())
    assert_same(got.steps["first"], want["first"])
    assert_same(got.steps["later"], want["later"])


def test_batch_keeps_serving_through_joins_leaves_and_cancels(lm, sae):
    reqs = {
        "long": request(lm, LONG, n=12),
        "short": request(lm, SHORT, n=12),
        "medium": request(lm, MEDIUM, clamp(lm, sae), n=6),
        "late": request(lm, SHORT, n=4),
    }
    want = {name: alone(lm, sae, r) for name, r in reqs.items()}
    got = Collector()
    batch = GenerationBatch(lm, sae, TINY_HOOKPOINT, [reqs["long"], reqs["short"]])
    got.name_of.update({0: "long", 1: "short"})
    got.add(batch.step())
    got.add(batch.step())

    def join(name: str) -> None:
        newcomer = GenerationBatch(lm, sae, TINY_HOOKPOINT, [reqs[name]])
        got.name_of[-1] = name
        got.add([Step(**{**s.__dict__, "request": -1}) for s in newcomer.step()])
        got.name_of[batch.absorb(newcomer)[0]] = name

    join("medium")
    got.add(batch.step())
    width = batch._cache.length
    batch.cancel(0)  # the long request leaves: the columns only its prompt used go
    got.add(batch.step())
    assert batch._cache.mask is not None and batch._cache.mask.shape[0] == 2
    assert batch._cache.length < width - 40
    join("late")
    while not batch.done:
        got.add(batch.step())
    assert len(got.steps["long"]) == 3
    assert_same(got.steps["long"], want["long"][:3])
    for name in ("short", "medium", "late"):
        assert_same(got.steps[name], want[name])


def drain(job: GenerateJob) -> list[Step]:
    out = []
    while not job.out.empty():
        item = job.out.get()
        if isinstance(item, Step):
            out.append(item)
    return out


def test_scheduler_merges_newcomers_into_the_running_batch(lm, sae):
    scheduler = GenerationScheduler(lm, sae, TINY_HOOKPOINT, max_generations=8)
    reqs = [request(lm, SHORT, n=10), request(lm, LONG, n=6), request(lm, MEDIUM, n=6)]
    jobs = [GenerateJob(r) for r in reqs]
    scheduler.submit(jobs[0])
    scheduler.turn()  # prompt of the first
    scheduler.turn()  # its second token
    scheduler.submit(jobs[1])
    scheduler.submit(jobs[2])
    scheduler.turn()  # the newcomers' prompts, merged in
    assert scheduler.running_batches == 1 and scheduler.live == 3
    scheduler.turn()  # one step of all three
    jobs[2].cancel()
    turns = 0
    while scheduler.has_work():
        scheduler.turn()
        turns += 1
    assert scheduler.live == 0 and scheduler.running_batches == 0
    assert turns <= 10
    for job, req in zip(jobs[:2], reqs[:2], strict=True):
        assert_same(drain(job), alone(lm, sae, req))
    cut = drain(jobs[2])
    assert 1 <= len(cut) < 6 and not cut[-1].finish_reason
    with pytest.raises(CancelledError):
        list(jobs[2].steps(poll_s=0.01))


def test_scheduler_alternates_prompts_and_steps_under_steady_arrivals(lm, sae):
    """Newcomers every turn do not starve the running requests: they step every other turn."""
    scheduler = GenerationScheduler(lm, sae, TINY_HOOKPOINT, max_generations=16)
    first = GenerateJob(request(lm, SHORT, n=6))
    scheduler.submit(first)
    scheduler.turn()
    counts = []
    for _ in range(4):
        scheduler.submit(GenerateJob(request(lm, MEDIUM, n=20)))
        scheduler.turn()
        counts.append(first.out.qsize())
    assert counts[-1] >= 3  # the prompt's token, then a step at least every other turn
    assert scheduler.running_batches == 1


@pytest.mark.parametrize("failure", ["unsupported", "bug"])
def test_scheduler_without_a_merge_still_serves(lm, sae, monkeypatch, failure):
    """A cache that cannot be joined keeps the newcomers apart (batches take turns); a merge
    that breaks fails only the newcomers. Either way the running request finishes as alone."""
    from hsae_runtime.kv_batch import UnsupportedCache

    def refuse(self, other):
        raise UnsupportedCache("test") if failure == "unsupported" else RuntimeError("test bug")

    monkeypatch.setattr(GenerationBatch, "absorb", refuse)
    scheduler = GenerationScheduler(lm, sae, TINY_HOOKPOINT, max_generations=8)
    reqs = [request(lm, SHORT, n=6), request(lm, MEDIUM, n=5)]
    jobs = [GenerateJob(r) for r in reqs]
    scheduler.submit(jobs[0])
    scheduler.turn()
    scheduler.submit(jobs[1])
    scheduler.turn()  # a step of the first (the turn after a prompt turn)
    scheduler.turn()  # the newcomer's prompt; the merge is refused
    assert scheduler.running_batches == (2 if failure == "unsupported" else 1)
    while scheduler.has_work():
        scheduler.turn()
    assert scheduler.live == 0
    assert_same(drain(jobs[0]), alone(lm, sae, reqs[0]))
    if failure == "unsupported":
        assert_same(drain(jobs[1]), alone(lm, sae, reqs[1]))
    else:
        with pytest.raises(RuntimeError, match="test bug"):
            list(jobs[1].steps(poll_s=0.01))
