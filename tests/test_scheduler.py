"""Continuous batching (gptx/runtime/scheduler.py): a request's tokens do not depend on what else is in the batch,
cancellation frees rows at the next step, queues are bounded, failures stay with their rows."""

from __future__ import annotations

import pytest
from conftest import PoisonedBackend, shakespeare_prompts

from gptx.runtime.errors import GenerationError, InvalidInput, QueueFull
from gptx.runtime.sampler import SamplingParams
from gptx.runtime.scheduler import Request, Scheduler

GREEDY = SamplingParams(temperature=0)


def scheduler_for(engine, backend=None, **kwargs) -> Scheduler:
    return Scheduler(backend or engine.backend, engine.tokenizer, eos_token_id=engine.eos_token_id,
                     vocab_size=engine.vocab_size, **kwargs)


def run(scheduler: Scheduler, arrivals: dict[int, list[Request]] | None = None, max_steps: int = 1000) -> dict:
    """Step until idle (bounded), adding arrivals[step] before that step; per request: tokens, text, reason."""
    arrivals = arrivals or {}
    out: dict[str, dict] = {}
    for step in range(max_steps):
        for request in arrivals.get(step, []):
            scheduler.add_request(request)
        if step > max(arrivals, default=-1) and not scheduler.has_work():
            return out
        for o in scheduler.step():
            r = out.setdefault(o.request_id, {"tokens": [], "text": "", "reason": None, "error": None})
            assert r["reason"] is None, "output after the request finished"
            if o.token_id is not None:
                r["tokens"].append(o.token_id)
            r["text"] += o.text
            if o.finished:
                r["reason"], r["error"] = o.finish_reason, o.error
    raise AssertionError("the scheduler did not finish in time")


def test_greedy_batch_invariance_with_requests_arriving_mid_generation(shakespeare_any):
    """16 greedy requests with different prompts and lengths, 10 of them arriving while others are decoding, give
    exactly the tokens (and text) each gives alone, under either cache contract."""
    shakespeare = shakespeare_any
    prompts = shakespeare_prompts(16)
    max_tokens = [8 + (7 * i) % 33 for i in range(16)]
    requests = [Request(shakespeare.tokenizer.encode(p), n, GREEDY, id=f"r{i}")
                for i, (p, n) in enumerate(zip(prompts, max_tokens))]
    batches = []
    scheduler = scheduler_for(shakespeare, max_batch=8, on_step=lambda kind, s, b: batches.append((kind, b)))
    got = run(scheduler, {0: requests[:6], 3: requests[6:11], 9: requests[11:]})
    assert max(b for kind, b in batches if kind == "decode") == 8  # the batch really was full
    assert sum(kind == "prefill" for kind, _ in batches) >= 3     # joined at several steps
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens)):
        alone = shakespeare.generate_ids(shakespeare.tokenizer.encode(prompt), n, temperature=0)
        assert got[f"r{i}"]["tokens"] == alone, i
        assert got[f"r{i}"]["text"] == shakespeare.generate(prompt, n, temperature=0), i
        eos = alone[-1] == shakespeare.eos_token_id
        assert got[f"r{i}"]["reason"] == ("stop" if eos else "length")


def test_seeded_sampling_is_the_same_alone_and_under_load(shakespeare):
    prompts = shakespeare_prompts(10, seed=1)
    params = [SamplingParams(temperature=0.9, top_k=40 if i % 2 else None, top_p=0.9 if i % 3 else None, seed=100 + i)
              for i in range(10)]
    requests = [Request(shakespeare.tokenizer.encode(p), 24, sp, id=str(i))
                for i, (p, sp) in enumerate(zip(prompts, params))]
    loaded = run(scheduler_for(shakespeare, max_batch=4), {0: requests[:5], 2: requests[5:]})
    for i, (p, sp) in enumerate(zip(prompts, params)):
        alone = run(scheduler_for(shakespeare, max_batch=1), {0: [Request(shakespeare.tokenizer.encode(p), 24, sp)]})
        assert loaded[str(i)]["tokens"] == next(iter(alone.values()))["tokens"]
        # the synchronous API steps the same scheduler: the same tokens
        sync = shakespeare.generate_ids(shakespeare.tokenizer.encode(p), 24, temperature=0.9, top_k=sp.top_k,
                                        top_p=sp.top_p, seed=sp.seed)
        assert loaded[str(i)]["tokens"] == sync


def test_cancellation_frees_the_row_at_the_next_step(shakespeare):
    scheduler = scheduler_for(shakespeare, max_batch=2)
    ids = shakespeare.tokenizer.encode("ROMEO:")
    for name in ("a", "b", "queued"):
        scheduler.add_request(Request(ids, 50, GREEDY, stop_at_eos=False, id=name))
    scheduler.step()
    scheduler.step()
    assert scheduler.stats().active == 2 and scheduler.stats().waiting == 1
    scheduler.remove_request("a")
    scheduler.remove_request("queued")
    outs = scheduler.step()
    by_id = {o.request_id: o for o in outs}
    assert by_id["a"].finished and by_id["a"].finish_reason == "cancelled" and by_id["a"].token_id is None
    assert by_id["queued"].finish_reason == "cancelled"
    assert scheduler.stats().active == 1 and scheduler.stats().waiting == 0 and scheduler.cache.active == 1
    assert by_id["b"].token_id is not None and not by_id["b"].finished
    assert all(o.request_id == "b" for o in scheduler.step())  # nothing more from the cancelled ones
    scheduler.remove_request("a")  # already gone: ignored
    scheduler.remove_request("b")
    scheduler.step()
    assert not scheduler.has_work() and scheduler.cache.active == 0


def test_queue_is_bounded(engine):
    scheduler = scheduler_for(engine, max_batch=1, max_queue=2)
    for i in range(2):
        scheduler.add_request(Request([464, 2068], 4, GREEDY, id=str(i)))
    with pytest.raises(QueueFull, match="queue is full"):
        scheduler.add_request(Request([464], 4, GREEDY))
    scheduler.step()  # one admitted: room again
    scheduler.add_request(Request([464], 4, GREEDY, id="late"))
    with pytest.raises(InvalidInput, match="already in use"):
        scheduler.add_request(Request([464], 4, GREEDY, id="late"))
    assert set(run(scheduler)) == {"0", "1", "late"}


@pytest.mark.parametrize("request_kwargs, match", [
    (dict(prompt_ids=[1] * 60, max_tokens=10), "context"),
    (dict(prompt_ids=[1], max_tokens=0), "max_tokens"),
    (dict(prompt_ids=[1], max_tokens=2.0), "max_tokens"),
    (dict(prompt_ids=[], max_tokens=2), "at least one"),
    (dict(prompt_ids=[1.5], max_tokens=2), "integers"),
    (dict(prompt_ids=[99999], max_tokens=2), "vocabulary"),
    (dict(prompt_ids=[1], max_tokens=2, stop=[None]), "stop"),
])
def test_requests_are_checked_before_queueing(engine, request_kwargs, match):
    scheduler = scheduler_for(engine)
    with pytest.raises(InvalidInput, match=match):
        scheduler.add_request(Request(**request_kwargs))
    assert not scheduler.has_work()


def test_stop_strings_eos_and_context_end_a_request(shakespeare):
    prompt = shakespeare.tokenizer.encode("JULIET:\n")
    full = shakespeare.generate("JULIET:\n", 40, temperature=0, stop_at_eos=False)
    stop = full[10:13]
    got = run(scheduler_for(shakespeare), {0: [
        Request(prompt, 40, GREEDY, stop=(stop, ""), stop_at_eos=False, id="stopped"),
        Request(prompt, 40, GREEDY, stop_at_eos=False, id="full"),
        Request(prompt, None, GREEDY, stop_at_eos=False, id="to-context"),
    ]})
    assert got["stopped"]["text"] == full[: full.find(stop)] and got["stopped"]["reason"] == "stop"
    assert got["full"]["text"] == full and got["full"]["reason"] == "length"
    assert len(got["to-context"]["tokens"]) == 128 - len(prompt) and got["to-context"]["reason"] == "length"


def test_prefill_spends_at_most_the_token_budget_per_step(engine):
    """25 prompt tokens a step: two 10-token prompts share a call, the third gets a 5-token chunk and finishes
    in the next step, whose budget the next prompts share."""
    calls = []
    scheduler = scheduler_for(engine, max_batch=8, prefill_chunk=25,
                              on_step=lambda kind, s, b: calls.append((scheduler.steps, kind, b)))
    requests = [Request(list(range(100, 110)), 3, GREEDY) for _ in range(5)]  # 10 tokens each
    got = run(scheduler, {0: requests})
    prefills = [(step, b) for step, kind, b in calls if kind == "prefill"]
    assert prefills == [(0, 2), (0, 1), (1, 1), (1, 2)]
    assert scheduler.stats().prefilled_prompt_tokens == 50
    assert len(got) == 5 and all(r["reason"] == "length" for r in got.values())


def test_failures_stay_with_their_rows(engine):
    """NaN logits fail only that request (GenerationError); a graph call that raises fails the requests in it;
    the scheduler goes on serving the others."""
    poisoned = PoisonedBackend(engine.backend)
    scheduler = scheduler_for(engine, backend=poisoned, max_batch=4)
    got = run(scheduler, {
        0: [Request([464, 2068], 6, GREEDY, id="ok"), Request([464, poisoned.nan_token], 6, GREEDY, id="nan")],
        2: [Request([464, poisoned.boom_token], 6, GREEDY, id="boom")],
        4: [Request([464, 2068], 6, GREEDY, id="after")],
    })
    assert got["nan"]["reason"] == "error" and isinstance(got["nan"]["error"], GenerationError)
    assert got["boom"]["reason"] == "error" and "fell over" in str(got["boom"]["error"])
    alone = engine.generate_ids([464, 2068], 6, temperature=0)
    assert got["ok"]["tokens"] == got["after"]["tokens"] == alone
    assert scheduler.cache.active == 0


# ---------------------------------------------------------------------------------------------- chunked prefill
def test_a_prompt_prefilled_in_chunks_gives_the_logits_of_one_call(shakespeare_any):
    """The graph's past/new contract: 100 prompt tokens in chunks of 7 over the row's own past give the logits
    of one call, under either cache contract, beside a row that decodes meanwhile."""
    import numpy as np

    from gptx.runtime.kv_cache import KVCache

    backend = shakespeare_any.backend
    prompt = np.random.default_rng(4).integers(0, 50000, 100).tolist()
    whole = KVCache(backend, 1)
    whole.claim()
    expected = whole.prefill([0], [prompt])[0]
    cache = KVCache(backend, 2)
    other, row = cache.claim(), cache.claim()
    cache.prefill([other], [[464, 2068]])
    for start in range(0, 100, 7):
        logits = cache.extend(row, prompt[start:start + 7])
        # the other row decodes between chunks; the chunked row rides along without taking a token
        cache.decode(np.array([11, 0]), live=np.array([True, False]))
    assert cache.lengths.tolist() == [2 + 15, 100]
    np.testing.assert_allclose(logits[0], expected, atol=1e-4)
    # and the next token decodes as after one call
    follow = cache.decode(np.array([11, 13]))[1]
    whole_next = whole.decode(np.array([13]))[0]
    np.testing.assert_allclose(follow, whole_next, atol=1e-4)


def shared_prefix_requests(shakespeare, n: int, prefix_tokens: int = 70):
    """n greedy requests whose prompts share their first `prefix_tokens` tokens, then differ."""
    text = shakespeare_prompts(1, seed=5)[0] * 8
    prefix = shakespeare.tokenizer.encode(text)[:prefix_tokens]
    tails = [shakespeare.tokenizer.encode(p)[: 3 + 2 * i] for i, p in enumerate(shakespeare_prompts(n, seed=6))]
    return [Request(prefix + tail, 6 + i, GREEDY, id=f"s{i}") for i, tail in enumerate(tails)]


def test_chunked_and_prefix_reused_requests_are_batch_invariant(shakespeare_any):
    """Prompts prefilled 9 tokens a step and starting with cached blocks, joining while others decode, give the
    tokens and text each gives alone (computed in one call, no cache); later ones really took cached blocks."""
    shakespeare = shakespeare_any
    requests = shared_prefix_requests(shakespeare, 8)
    alone = {r.id: shakespeare.generate_ids(list(r.prompt_ids), r.max_tokens, temperature=0, stop_at_eos=False)
             for r in requests}
    for r in requests:
        r.stop_at_eos = False
    calls = []
    scheduler = scheduler_for(shakespeare, max_batch=3, prefill_chunk=9, prefix_cache_mb=4,
                              on_step=lambda kind, s, b: calls.append((kind, b)))
    got = run(scheduler, {0: requests[:2], 4: requests[2:5], 11: requests[5:]})
    for r in requests:
        assert got[r.id]["tokens"] == alone[r.id], r.id
        assert got[r.id]["text"] == shakespeare.tokenizer.decode(alone[r.id])
    # the first request computed the 70-token prefix (2 blocks of 32 cached); at least the last 5 reused them
    assert scheduler.stats().cached_prompt_tokens >= 5 * 64
    assert max(b for kind, b in calls if kind == "decode") == 3


def test_prefix_reuse_is_exact_across_rows_and_bounded(shakespeare):
    """A warm request landing in another row gives what a cold run gives; the cache holds at most its budget
    and keys by the export (another export's chain root differs)."""
    from gptx.runtime.prefix_cache import export_identity

    first, second = shared_prefix_requests(shakespeare, 2)
    scheduler = scheduler_for(shakespeare, max_batch=2, prefix_cache_mb=1)
    blocker = Request([464, 2068], 30, GREEDY, id="blocker", stop_at_eos=False)
    out = run(scheduler, {0: [blocker, first], 1: [second]})
    assert scheduler.stats().cached_prompt_tokens == 64  # second reused both blocks of the shared 70 tokens
    cold = run(scheduler_for(shakespeare, max_batch=1), {0: [Request(second.prompt_ids, second.max_tokens, GREEDY)]})
    assert out["s1"]["tokens"] == next(iter(cold.values()))["tokens"]
    cache = scheduler.prefixes
    assert 0 < cache.bytes <= 1 << 20 and len(cache) >= 2
    block = cache.bytes // len(cache)
    small = scheduler_for(shakespeare, max_batch=1, prefix_cache_mb=2.5 * block / 2**20)
    run(small, {0: [Request(list(range(100, 200)), 2, GREEDY)]})  # 3 full blocks, room for 2
    assert len(small.prefixes) == 2 and small.prefixes.bytes <= 2.5 * block
    other = dict(shakespeare.manifest, files=[])
    assert export_identity(other) != export_identity(shakespeare.manifest)


# ---------------------------------------------------------------------------------------------- fair admission
def test_admission_round_robins_between_request_groups(engine):
    """A request carrying 10 prompts (one group) cannot push single requests to the back: singles arriving
    after it are admitted between its prompts; one group holds at most half the queue."""
    scheduler = scheduler_for(engine, max_batch=1, max_queue=24)
    for i in range(10):
        scheduler.add_request(Request([464, 2068], 2, GREEDY, id=f"g{i}", group="big"))
    for i in range(2):
        scheduler.add_request(Request([464], 2, GREEDY, id=f"single{i}"))
    with pytest.raises(QueueFull, match="at most 12"):
        for i in range(10, 13):
            scheduler.add_request(Request([464], 2, GREEDY, id=f"g{i}", group="big"))
    assert scheduler.stats().waiting == 14
    order = []
    for _ in range(100):
        if not scheduler.has_work():
            break
        for o in scheduler.step():
            if o.request_id not in order:
                order.append(o.request_id)
    assert order[:5] == ["g0", "single0", "single1", "g1", "g2"]  # each group one turn per round
    assert len(order) == 14
