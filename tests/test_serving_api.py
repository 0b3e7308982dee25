"""The embeddable async pool (gptx/runtime/serving.py): generate / stream / events over continuous batching, with
cancellation, bounded queues, observers and a clean shutdown. Plain asyncio.run: no async test plugin needed."""

from __future__ import annotations

import asyncio
import gc
import threading
import time

import pytest
from conftest import PoisonedBackend, shakespeare_prompts

from gptx.runtime.errors import GenerationError, GptxError, InvalidInput, QueueFull
from gptx.runtime.serving import Completion

TIMEOUT = 60  # seconds; every wait below is bounded by it


def serve(engine, body, **pool_options):
    """Run `body(pool)` inside `async with engine.serving(...)`, bounded in time; returns what body returns."""
    async def main():
        async with engine.serving(**pool_options) as pool:
            return await asyncio.wait_for(body(pool), TIMEOUT)

    return asyncio.run(main())


async def until(condition, what: str):
    for _ in range(TIMEOUT * 100):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def scheduler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "gptx-scheduler"]


def test_concurrent_generate_equals_each_alone(shakespeare):
    prompts = shakespeare_prompts(12, seed=2)
    lengths = [5 + 3 * i for i in range(12)]

    async def body(pool):
        return await asyncio.gather(*(pool.generate(p, max_tokens=n, temperature=0) for p, n in zip(prompts, lengths)))

    results = serve(shakespeare, body, max_batch=4)
    for prompt, n, got in zip(prompts, lengths, results):
        ids = shakespeare.generate_ids(shakespeare.tokenizer.encode(prompt), n, temperature=0)
        assert isinstance(got, Completion)
        assert got.token_ids == ids and got.text == shakespeare.generate(prompt, n, temperature=0)
        assert got.prompt_tokens == len(shakespeare.tokenizer.encode(prompt)) and got.completion_tokens == len(ids)
        assert got.finish_reason == ("stop" if ids[-1] == shakespeare.eos_token_id else "length")
    assert scheduler_threads() == []


def test_stream_and_events(shakespeare):
    async def body(pool):
        pieces = [p async for p in pool.stream("ROMEO:", max_tokens=30, temperature=0.8, seed=3)]
        events = [e async for e in pool.events("ROMEO:", max_tokens=30, temperature=0.8, seed=3)]
        done = await pool.generate("ROMEO:", max_tokens=30, temperature=0.8, seed=3)
        return pieces, events, done

    pieces, events, done = serve(shakespeare, body)
    assert len(pieces) > 1 and "".join(pieces) == done.text
    assert "".join(e.text for e in events) == done.text
    assert [t for e in events for t in e.token_ids] == done.token_ids and all(len(e.token_ids) == 1 for e in events)
    assert [e.finish_reason for e in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1].finish_reason == done.finish_reason
    assert done.text == shakespeare.generate("ROMEO:", 30, temperature=0.8, seed=3)


def test_arguments_and_queue_bound_are_checked_when_called(shakespeare):
    async def body(pool):
        with pytest.raises(InvalidInput, match="context"):
            pool.events("hello", max_tokens=1000)
        with pytest.raises(InvalidInput, match="top_k"):
            pool.stream("hello", top_k=2.0)
        accepted, refused = [], 0
        for _ in range(3):  # one row, a queue of one: at most two fit
            try:
                accepted.append(pool.events("hello", max_tokens=20, temperature=0))
            except QueueFull:
                refused += 1
        assert refused >= 1 and len(accepted) == 3 - refused
        finished = []
        for s in accepted:  # (an async comprehension nested in a plain one needs Python 3.11)
            finished.append([e async for e in s][-1].finish_reason)
        return finished

    assert serve(shakespeare, body, max_batch=1, max_queue=1) in (["length"], ["length", "length"])


def test_a_caller_that_stops_iterating_frees_its_row(shakespeare):
    decode_batches = []  # rows in each decode call, in order

    def on_step(kind, seconds, batch):
        if kind == "decode":
            decode_batches.append(batch)
            time.sleep(0.01)  # the worker thread paces itself, so no request ends while the test looks on

    async def body(pool):
        other = asyncio.ensure_future(pool.generate("KING:", max_tokens=120, temperature=0, stop_at_eos=False))
        stream = pool.stream("ROMEO:", max_tokens=120, temperature=0, stop_at_eos=False)
        got = []
        async for piece in stream:
            got.append(piece)
            if len(got) == 2:
                break
        # the broken-off stream still holds its row...
        await until(lambda: 2 in decode_batches and pool.stats().active == 2, "both rows decoding")
        at_close = len(decode_batches)
        await stream.aclose()  # ...until it is closed (or dropped: see below)
        await until(lambda: pool.stats().active == 1, "the row to be freed")
        await until(lambda: len(decode_batches) >= at_close + 2, "two more decode steps")
        # the step in flight at the close may still carry the row; the one after it decodes without it
        freed_by = decode_batches[at_close + 1]
        done = await other
        # a task cancelled while awaiting also frees its row
        task = asyncio.ensure_future(pool.generate("QUEEN:", max_tokens=100, temperature=0, stop_at_eos=False))
        await until(lambda: pool.stats().active == 1, "the task's row")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: pool.stats().active == 0, "the cancelled task's row")
        # an events iterator that is simply dropped is cancelled by the garbage collector
        events = pool.events("HAMLET:", max_tokens=100, temperature=0, stop_at_eos=False)
        await events.__anext__()
        del events
        gc.collect()
        await until(lambda: pool.stats().active == 0 and pool.stats().waiting == 0, "the dropped row")
        return freed_by, done

    freed_by, done = serve(shakespeare, body, on_step=on_step)
    assert freed_by == 1
    assert done.completion_tokens == 120 and done.finish_reason == "length"


def test_leaving_the_context_cancels_in_flight_requests_and_joins_the_thread(shakespeare):
    async def main():
        async with shakespeare.serving(max_batch=2) as pool:
            tasks = [asyncio.ensure_future(pool.generate(f"{name}:", max_tokens=100, temperature=0, stop_at_eos=False))
                     for name in ("ROMEO", "JULIET", "KING")]
            await until(lambda: pool.stats().active == 2, "two busy rows")
        results = await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
        with pytest.raises(GptxError, match="not running"):
            pool.events("late")
        return results

    results = asyncio.run(main())
    assert [r.finish_reason for r in results] == ["cancelled"] * 3
    assert all(r.completion_tokens < 100 for r in results)
    assert scheduler_threads() == []


def test_observer_and_stats(shakespeare):
    seen = []

    async def body(pool):
        assert pool.stats().active == 0 and pool.stats().max_batch == 3 and pool.stats().max_queue == 5
        await asyncio.gather(*(pool.generate(p, max_tokens=6, temperature=0) for p in ("A", "B:", "C D")))
        return pool.stats()

    stats = serve(shakespeare, body, max_batch=3, max_queue=5,
                  on_step=lambda kind, seconds, batch: seen.append((kind, seconds, batch)))
    assert {kind for kind, _, _ in seen} == {"prefill", "decode"}
    assert all(s > 0 and 1 <= b <= 3 for _, s, b in seen)
    assert sum(b for kind, _, b in seen if kind == "prefill") == 3
    assert stats.steps >= 6 and stats.active == 0 and stats.waiting == 0


def test_a_failing_request_does_not_take_the_pool_down(engine):
    from gptx.runtime.engine import Engine

    poisoned = PoisonedBackend(engine.backend)
    sick = Engine(poisoned, engine.tokenizer, engine.manifest)

    async def body(pool):
        bad = pool.generate([464, poisoned.nan_token], max_tokens=5, temperature=0)
        good = pool.generate([464, 2068], max_tokens=5, temperature=0)
        results = await asyncio.gather(bad, good, return_exceptions=True)
        again = await pool.generate([464, 2068], max_tokens=5, temperature=0)
        return results, again

    (bad, good), again = serve(sick, body)
    assert isinstance(bad, GenerationError)
    assert good.token_ids == again.token_ids == engine.generate_ids([464, 2068], 5, temperature=0)


def test_shared_prefix_is_reused_and_one_request_holds_half_the_queue(shakespeare):
    """A request starting with an earlier one's 70 tokens gets 64 of them (two blocks) from the prefix cache and
    the tokens of a cold run; the prompts of one group may hold at most half the queue."""
    prefix = shakespeare.tokenizer.encode(shakespeare_prompts(1, seed=7)[0] * 6)[:70]
    second = prefix + shakespeare.tokenizer.encode(" KING:")

    async def body(pool):
        await pool.generate(prefix + [13], max_tokens=4, temperature=0)
        events = [e async for e in pool.events(second, max_tokens=8, temperature=0)]
        busy = pool.events([464], max_tokens=120, stop_at_eos=False)  # holds the one row: the rest wait
        await busy.__anext__()
        held = [pool.events([464], max_tokens=2, group="many") for _ in range(4)]
        with pytest.raises(QueueFull, match="at most 4"):
            pool.events([464], max_tokens=2, group="many")
        alone = pool.events([464], max_tokens=2)  # another request still finds room
        for stream in (busy, *held, alone):
            stream.cancel()
        return events, pool.stats()

    events, stats = serve(shakespeare, body, max_batch=1, max_queue=8)
    assert events[0].cached_tokens == 64 and stats.cached_prompt_tokens == 64
    assert [t for e in events for t in e.token_ids] == shakespeare.generate_ids(second, 8, temperature=0)
