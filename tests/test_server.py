"""`gptx serve` over HTTP: the real openai client against the server running as a subprocess (where `import torch`
fails), on a free 127.0.0.1 port. Completions, streaming, chat, stop strings, seeds, errors as the client's own
exception types, batch invariance under concurrent load, cancellation, overload, SIGTERM, and a failing request
that leaves the server serving. Every wait is bounded; every process is stopped by its fixture."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time

import httpx
import openai
import pytest
from conftest import PoisonedBackend, shakespeare_prompts
from server_process import ServerProcess

KEY = "test-key"
TIMEOUT = 60  # seconds: every client call and wait below is bounded by it
CHAT = "\nUser:"  # the default template's stop string


@pytest.fixture(scope="module")
def server(shakespeare_dir, tmp_path_factory):
    """The trained sample model (context 128): peaked logits, so greedy text is stable across batch shapes."""
    proc = ServerProcess([shakespeare_dir, "--api-key", KEY, "--max-batch", "4", "--max-queue", "32",
                          "--max-tokens-limit", "126", "--max-body-bytes", "20000", "--model-name", "bard"],
                         tmp_path_factory.mktemp("server") / "serve.log")
    yield proc
    assert proc.stop() == 0, proc.output()


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory):
    """A small random GPT with a 1024-token context, ~3 ms a token here: a long request runs for seconds, so a test
    can act on it mid-generation with a wide margin."""
    import torch

    from gptx.export.convert import export
    from gptx.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=256, block_size=1024, vocab_size=50257)).eval()
    out = tmp_path_factory.mktemp("exports") / "long"
    export(model, out, validate=False, progress=False)
    return out


@pytest.fixture(scope="module")
def busy_server(long_dir, tmp_path_factory):
    """Two rows and a queue of two: easy to fill."""
    proc = ServerProcess([long_dir, "--max-batch", "2", "--max-queue", "2"],
                         tmp_path_factory.mktemp("busy") / "serve.log")
    yield proc
    assert proc.stop() == 0, proc.output()


def client(server, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=TIMEOUT)


def async_client(server, key=KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=TIMEOUT)


def bounded(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


def until(condition, what: str, timeout: float = TIMEOUT, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------------------------------------- the API
def test_completions_streaming_stop_seed_and_models(server, shakespeare):
    api = client(server)
    assert [m.id for m in api.models.list()] == ["bard"]

    done = api.completions.create(model="bard", prompt="ROMEO:", max_tokens=30, temperature=0)
    expected = shakespeare.generate("ROMEO:", 30, temperature=0)
    assert done.choices[0].text == expected and done.choices[0].finish_reason == "length"
    assert done.usage.prompt_tokens == len(shakespeare.tokenizer.encode("ROMEO:"))
    assert done.usage.completion_tokens == 30 and done.usage.total_tokens == done.usage.prompt_tokens + 30
    assert done.id.startswith("cmpl-") and done.model == "bard"

    chunks = list(api.completions.create(model="bard", prompt="ROMEO:", max_tokens=30, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert len(chunks) > 10 and "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30

    # a stop string: the text is cut before it, finish_reason "stop"
    stop = expected[12:16]
    cut = api.completions.create(model="bard", prompt="ROMEO:", max_tokens=30, temperature=0, stop=[stop, "zzz"])
    assert cut.choices[0].text == expected[: expected.index(stop)] and cut.choices[0].finish_reason == "stop"

    # a seed: the same text every time, the runtime's own; top_k and repetition_penalty as extensions
    seeded = [api.completions.create(model="bard", prompt="JULIET:", max_tokens=25, temperature=0.9, seed=7,
                                     extra_body={"top_k": 50, "repetition_penalty": 1.1}).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1] == shakespeare.generate("JULIET:", 25, temperature=0.9, seed=7, top_k=50,
                                                          repetition_penalty=1.1)
    other = api.completions.create(model="bard", prompt="JULIET:", max_tokens=25, temperature=0.9, seed=8,
                                   extra_body={"top_k": 50, "repetition_penalty": 1.1})
    assert other.choices[0].text != seeded[0]

    # several prompts (text and token ids): one choice each, in order
    ids = shakespeare.tokenizer.encode("KING HENRY:")
    many = api.completions.create(model="bard", prompt=[ids, [ids[0]]], max_tokens=12, temperature=0)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == shakespeare.generate("KING HENRY:", 12, temperature=0)
    assert many.usage.prompt_tokens == len(ids) + 1 and many.usage.completion_tokens == 24


def test_chat(server, shakespeare):
    api = client(server)
    messages = [{"role": "system", "content": "A play."}, {"role": "user", "content": "Who goes there?"}]
    prompt = "A play.\n\nUser: Who goes there?\nAssistant:"
    expected = shakespeare.generate(prompt, 40, temperature=0, stop=[CHAT]).lstrip()
    done = api.chat.completions.create(model="bard", messages=messages, max_tokens=40, temperature=0)
    assert done.choices[0].message.role == "assistant" and done.choices[0].message.content == expected
    assert done.usage.prompt_tokens == len(shakespeare.tokenizer.encode(prompt))
    assert done.choices[0].finish_reason == ("stop" if done.usage.completion_tokens < 40 else "length")

    chunks = list(api.chat.completions.create(model="bard", messages=messages, max_tokens=40, temperature=0,
                                              stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason


def test_errors_are_the_clients_exception_types(server):
    api = client(server)
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").completions.create(model="bard", prompt="x", max_tokens=2)
    bad_requests = [
        dict(prompt="x", temperature=5),                                 # out of OpenAI's range
        dict(prompt="x", extra_body={"max_tokens": "5"}),                # a string for a number
        dict(prompt="x", max_tokens=127),                                # over --max-tokens-limit
        dict(prompt="x " * 200, max_tokens=5),                           # cannot fit the context (128)
        dict(prompt="x", max_tokens=100, extra_body={"top_k": -1}),
        dict(prompt="x", n=2, best_of=1),                                # best_of below n
        dict(prompt=[50257]),                                            # not a vocabulary id
        dict(prompt="x", extra_body={"response_format": {"type": "json_object"}}),  # would change the output
        dict(prompt="x", presence_penalty=2.5),                          # outside OpenAI's [-2, 2]
    ]
    for kwargs in bad_requests:
        with pytest.raises(openai.BadRequestError) as caught:
            api.completions.create(model="bard", **kwargs)
        assert caught.value.body["message"] and "param" in caught.value.body, kwargs
    with pytest.raises(openai.BadRequestError, match="context"):
        api.chat.completions.create(model="bard", messages=[{"role": "user", "content": "x " * 200}])
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="gpt-4", prompt="x")
    assert api.models.retrieve("bard").id == "bard"
    with pytest.raises(openai.NotFoundError) as caught:
        api.models.retrieve("gpt-4")
    assert caught.value.body["code"] == "model_not_found"

    # what the client cannot send: no key, malformed JSON, a body over --max-body-bytes
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = f"{server.url}/v1/completions"
    no_key = httpx.post(url, json={"prompt": "x"}, timeout=TIMEOUT)
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    broken = httpx.post(url, content=b'{"prompt": "x", ', headers=headers, timeout=TIMEOUT)
    assert broken.status_code == 400 and set(broken.json()["error"]) == {"message", "type", "param", "code"}
    assert "JSON" in broken.json()["error"]["message"]
    unknown = httpx.post(url, json={"prompt": "x", "max_tokens": 1, "colour": "red"}, headers=headers,
                         timeout=TIMEOUT)
    assert unknown.status_code == 200 and unknown.headers["x-gptx-ignored-fields"] == "colour"
    not_an_object = httpx.post(url, json=["x"], headers=headers, timeout=TIMEOUT)
    assert not_an_object.status_code == 400 and "JSON object" in not_an_object.json()["error"]["message"]
    across = httpx.post(url, json={"prompt": "x", "stream_options": {"include_usage": True}}, headers=headers,
                        timeout=TIMEOUT)
    assert across.status_code == 400 and across.json()["error"]["message"].startswith("stream_options")
    huge = httpx.post(url, content=json.dumps({"prompt": "x" * 30000}).encode(), headers=headers, timeout=TIMEOUT)
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"
    # open without a key: readiness and metrics; every response names its replica
    health = httpx.get(f"{server.url}/health", timeout=TIMEOUT)
    assert health.status_code == 200 and health.headers["x-gptx-replica"]
    samples = server.metrics()
    assert samples['gptx_http_requests_total{endpoint="/v1/completions",status="400"}'] >= len(bad_requests) + 3
    assert samples['gptx_http_requests_total{endpoint="/v1/completions",status="401"}'] >= 2
    assert samples['gptx_http_requests_total{endpoint="/v1/completions",status="413"}'] >= 1


# ---------------------------------------------------------------------------------------------- under load
def test_batch_invariance_over_http(server):
    """16 concurrent requests (4 rows): greedy ones give exactly the text each gives alone, seeded sampled ones
    too. Four long streams start first; as soon as each has sent two chunks, three more requests go out, so they
    arrive while it is mid-generation (checked: it finishes after they were sent)."""
    prompts = shakespeare_prompts(12, seed=5)
    requests = [dict(prompt=p, max_tokens=8 + 3 * i, temperature=0) for i, p in enumerate(prompts)]
    for i in (2, 5, 9):
        requests[i].update(temperature=0.8, seed=100 + i)
    early = [dict(prompt=[464], max_tokens=126, temperature=0, extra_body={"ignore_eos": True})] * 4

    async def alone(api, r):
        return (await api.completions.create(model="bard", **r)).choices[0].text

    async def early_then_three(api, k):
        """Stream early[k]; after its second chunk send requests[3k:3k+3]; return both and the times."""
        pieces, later = [], None
        async for chunk in await api.completions.create(model="bard", stream=True, **early[k]):
            pieces.append(chunk.choices[0].text)
            if len(pieces) == 2:
                sent = time.monotonic()
                later = asyncio.gather(*(alone(api, r) for r in requests[3 * k: 3 * k + 3]))
        return "".join(pieces), await later, sent, time.monotonic()

    async def under_load():
        api = async_client(server)  # a client per event loop (asyncio.run makes a new one)
        return await asyncio.gather(*(early_then_three(api, k) for k in range(4)))

    async def sequentially():
        api = async_client(server)
        return [await alone(api, early[0])] + [await alone(api, r) for r in requests]

    alone_texts = bounded(sequentially())
    before = server.metrics()
    results = bounded(under_load())
    for k, (early_text, later_texts, sent, finished) in enumerate(results):
        assert early_text == alone_texts[0]
        assert later_texts == alone_texts[1 + 3 * k: 4 + 3 * k]
        assert finished > sent, "the long stream ended before the requests sent mid-way arrived"
    after = server.metrics()
    decode = 'gptx_step_batch_size_count{kind="decode"}'
    single = 'gptx_step_batch_size_bucket{kind="decode",le="1.0"}'
    batched_steps = (after[decode] - after[single]) - (before[decode] - before[single])
    assert batched_steps > 20  # requests shared decode calls, joining and leaving a running batch


def test_closing_a_stream_frees_its_row(busy_server):
    api = client(busy_server, key="unused")
    before = busy_server.metrics().get('gptx_completions_total{finish_reason="cancelled"}', 0.0)
    stream = api.completions.create(model="long", prompt="Once", max_tokens=1000, temperature=0, stream=True,
                                    extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(2), stream):
        pass
    assert busy_server.metrics()["gptx_active_rows"] == 1
    stream.close()

    def freed():
        samples = busy_server.metrics()
        return (samples["gptx_active_rows"] == 0 and
                samples.get('gptx_completions_total{finish_reason="cancelled"}', 0.0) == before + 1)

    until(freed, "the closed stream's row to be freed")
    assert busy_server.metrics()["gptx_completion_tokens_total"] < 1000


def test_a_client_that_gives_up_on_a_whole_completion_frees_its_row(busy_server):
    before = busy_server.metrics().get('gptx_completions_total{finish_reason="cancelled"}', 0.0)
    body = json.dumps({"prompt": "Once", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", busy_server.port), timeout=TIMEOUT) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        until(lambda: busy_server.metrics()["gptx_active_rows"] == 1, "the request to run", interval=0.01)
    # the connection is closed while the (non-streaming) completion runs

    def freed():
        samples = busy_server.metrics()
        return (samples["gptx_active_rows"] == 0 and
                samples.get('gptx_completions_total{finish_reason="cancelled"}', 0.0) == before + 1)

    until(freed, "the abandoned request's row to be freed")


def test_flood_past_the_queue_gets_429_and_the_rest_succeeds(busy_server):
    async def one(api, i):
        try:
            done = await api.completions.create(model="long", prompt=f"request {i}", max_tokens=150,
                                                temperature=0, extra_body={"ignore_eos": True})
            return done.choices[0].finish_reason
        except openai.RateLimitError as e:
            assert e.response.headers["Retry-After"] == "1"
            return 429

    async def flood():
        api = async_client(busy_server, key="unused")
        return await asyncio.gather(*(one(api, i) for i in range(12)))

    outcomes = bounded(flood())
    assert 429 in outcomes and outcomes.count("length") >= 2 and set(outcomes) == {429, "length"}, outcomes
    until(lambda: busy_server.metrics()["gptx_queue_waiting"] == 0, "an empty queue")
    assert busy_server.metrics()['gptx_http_requests_total{endpoint="/v1/completions",status="429"}'] >= 1


def test_sigterm_mid_stream_finishes_in_flight_work_and_exits_0(long_dir, tmp_path):
    """While draining, the listener stays open: /health and new requests answer 503; the stream in flight runs to
    its end."""
    proc = ServerProcess([long_dir, "--shutdown-timeout", "20"], tmp_path / "serve.log")
    try:
        api = client(proc, key="unused")
        # the whole context (seconds of decoding): the stream must outlive the checks below on a busy machine too
        stream = api.completions.create(model="long", prompt="Once", max_tokens=1000, temperature=0, stream=True,
                                        extra_body={"ignore_eos": True})
        chunks = [next(stream), next(stream)]
        proc.proc.send_signal(signal.SIGTERM)
        until(lambda: httpx.get(f"{proc.url}/health", timeout=5).status_code == 503, "/health to answer 503")
        assert httpx.get(f"{proc.url}/health", timeout=5).json()["status"] == "draining"
        with pytest.raises(openai.InternalServerError) as caught:  # 503: openai's client maps 5xx to this type
            client(proc, key="unused").completions.create(model="long", prompt="x", max_tokens=2)
        assert caught.value.status_code == 503 and caught.value.body["code"] == "shutting_down"
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert proc.proc.wait(30) == 0
    finally:
        proc.stop()
    assert "Traceback" not in proc.output()


def test_sigterm_ends_what_outlives_the_deadline_with_an_error_event_and_exits_0(long_dir, tmp_path):
    """Streams still running at --shutdown-timeout end with the `shutting_down` error event and [DONE] (not a cut
    body), /health answers 503 meanwhile, the log has no traceback, and the process exits 0."""
    proc = ServerProcess([long_dir, "--shutdown-timeout", "1"], tmp_path / "serve.log")
    bodies: list[list[str]] = [[] for _ in range(6)]
    try:
        body = {"prompt": "Once", "max_tokens": 1000, "temperature": 0, "stream": True, "ignore_eos": True}

        async def one(lines):
            async with httpx.AsyncClient(timeout=TIMEOUT) as http:
                async with http.stream("POST", f"{proc.url}/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line:
                            lines.append(line)

        async def all_streams():
            tasks = [asyncio.create_task(one(lines)) for lines in bodies]
            while not all(len(lines) >= 3 for lines in bodies):
                await asyncio.sleep(0.05)
            proc.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            async with httpx.AsyncClient(timeout=5) as http:
                assert (await http.get(f"{proc.url}/health")).status_code == 503
            await asyncio.gather(*tasks)

        started = time.monotonic()
        bounded(all_streams())
        assert proc.proc.wait(30) == 0
        assert time.monotonic() - started < 20
    finally:
        proc.stop()
    for lines in bodies:
        assert lines[-1] == "data: [DONE]", lines[-3:]
        assert json.loads(lines[-2][6:])["error"]["code"] == "shutting_down"
        assert len(lines) < 1000
    log = proc.output()
    assert "Traceback" not in log and "CancelledError" not in log, log


# ---------------------------------------------------------------------------------------------- failures
def test_a_failing_request_gets_500_and_the_server_keeps_serving(shakespeare_dir):
    """In-process (Starlette's TestClient runs the lifespan): a graph call that raises and a row with NaN logits
    fail only their own requests, with OpenAI's error body; the next request is served."""
    from fastapi.testclient import TestClient

    import gptx.runtime
    from gptx.runtime.server.app import ServerConfig, create_app

    engine = gptx.runtime.load(shakespeare_dir, backend="onnxruntime")
    engine.backend = PoisonedBackend(engine.backend, nan_token=50000, boom_token=50001)
    with TestClient(create_app(engine, ServerConfig("bard")), raise_server_exceptions=False) as http:
        boom = http.post("/v1/completions", json={"prompt": [464, 50001], "max_tokens": 5})
        assert boom.status_code == 500 and boom.json()["error"]["type"] == "server_error"
        nan = http.post("/v1/completions", json={"prompt": [464, 50000], "max_tokens": 5})
        assert nan.status_code == 500 and "non-finite" in nan.json()["error"]["message"]
        with http.stream("POST", "/v1/completions", json={"prompt": [50001], "max_tokens": 5, "stream": True}) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert r.status_code == 200 and "error" in json.loads(events[-1][6:])
        ok = http.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 5, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == engine.generate("ROMEO:", 5,
                                                                                            temperature=0)
        metrics = http.get("/metrics").text
        assert 'gptx_completions_total{finish_reason="error"} 3.0' in metrics
