"""Logprobs, penalties and the other OpenAI sampling rules: the sampler's pure functions against hand-computed
values, and the graph's logits_index (every prompt position's logits, what echo and prompt logprobs read)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gptx.runtime.errors import InvalidInput
from gptx.runtime.sampler import (
    SamplingParams,
    apply_presence_frequency,
    apply_repetition_penalty,
    process_row,
    sample,
    token_logprobs,
)


# ---------------------------------------------------------------------------------------------- sampler rules
def test_presence_and_frequency_penalties_follow_openai():
    logits = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    counts = np.array([0, 1, 3, 0], np.int32)
    out = apply_presence_frequency(logits, counts, presence=0.5, frequency=0.25)
    # token 1: 2 - 1*0.25 - 0.5 = 1.25; token 2: 3 - 3*0.25 - 0.5 = 1.75; unseen tokens unchanged
    np.testing.assert_allclose(out, [1.0, 1.25, 1.75, 4.0])


def test_logit_bias_and_min_tokens():
    params = SamplingParams(temperature=0, logit_bias={2: -100, 0: 5.5}, min_tokens=2)
    logits = np.array([1.0, 2.0, 3.0, 0.5], np.float32)
    out = process_row(logits, params, generated=1, eos_token_id=3)
    np.testing.assert_allclose(out, [6.5, 2.0, -97.0, -np.inf])
    assert logits[3] == 0.5  # the caller's array is untouched
    assert process_row(logits, params, generated=2, eos_token_id=3)[3] == 0.5  # min_tokens reached: EOS allowed
    assert params.logit_bias == ((0, 5.5), (2, -100))


def test_min_tokens_keeps_eos_out_of_a_greedy_pick():
    params = [SamplingParams(temperature=0, min_tokens=1)]
    logits = np.array([[0.0, 1.0, 9.0]], np.float32)
    assert sample(logits, params, [None], generated=[0], eos_token_id=2).tolist() == [1]
    assert sample(logits, params, [None], generated=[1], eos_token_id=2).tolist() == [2]


@pytest.mark.parametrize("temperature", [1e-40, 1e-6, 5e-324])
def test_tiny_temperatures_are_greedy(temperature):
    logits = np.array([[0.5, 3.0, 2.9, -1.0]], np.float32)
    params = SamplingParams(temperature=temperature)
    assert params.greedy
    assert sample(logits, [params], [np.random.default_rng(0)]).tolist() == [1]


@pytest.mark.parametrize("penalty", [1e-300, 1e-30, 1e300])
def test_extreme_repetition_penalties_stay_finite(penalty):
    logits = np.array([5.0, -3.0, 2.0, 1.0], np.float32)
    seen = np.array([True, True, False, False])
    out = apply_repetition_penalty(logits, seen, penalty)
    assert np.isfinite(out).all()
    params = SamplingParams(temperature=0.7, repetition_penalty=penalty, seed=0)
    token = sample(logits[None], [params], [params.rng()], seen=[seen])
    assert token.tolist()[0] in range(4)  # a real token, not -1 (the non-finite marker)


def test_non_finite_logits_are_still_reported():
    logits = np.array([[np.nan, 1.0, 2.0]], np.float32)
    params = SamplingParams(temperature=0.5, repetition_penalty=1e-300, seed=0)
    assert sample(logits, [params], [params.rng()], seen=[np.ones(3, bool)]).tolist() == [-1]


def test_token_logprobs_against_hand_computed_values():
    logits = np.array([[0.0, math.log(2.0), math.log(5.0), 0.0]], np.float32)  # probabilities 1:2:5:1 of 9
    (lp,) = token_logprobs(logits, [1], top=3)
    assert lp.token_id == 1
    assert lp.logprob == pytest.approx(math.log(2 / 9), abs=1e-6)
    assert [t for t, _ in lp.top] == [2, 1, 0]  # ties (ids 0 and 3) in id order
    np.testing.assert_allclose([v for _, v in lp.top], [math.log(5 / 9), math.log(2 / 9), math.log(1 / 9)],
                               atol=1e-6)
    (only,) = token_logprobs(logits, [3], top=0)
    assert only.top == () and only.logprob == pytest.approx(math.log(1 / 9), abs=1e-6)


@pytest.mark.parametrize("options, seen_every, expected", [
    (dict(temperature=0.8, top_k=40, seed=7), None, [680, 680, 680, 48, 614]),
    (dict(temperature=1.1, top_p=0.9, repetition_penalty=1.3, seed=3), 3, [109, 353, 862, 680, 128]),
])
def test_existing_sampling_is_unchanged_by_the_new_rules(options, seen_every, expected):
    """Seeded draws with only the older parameters pick what they picked before presence/frequency penalties,
    logit_bias, min_tokens and logprobs existed (the ids were drawn by that sampler)."""
    logits = np.random.default_rng(123).normal(0, 3, (1, 1000)).astype(np.float32)
    params = SamplingParams(**options)
    seen = None
    if seen_every:
        seen = np.zeros(1000, bool)
        seen[::seen_every] = True
    gen = params.rng()
    assert [int(sample(logits, [params], [gen], seen=None if seen is None else [seen])[0]) for _ in range(5)] == expected


@pytest.mark.parametrize("bad", [dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(logit_bias={1: 101}),
                                 dict(logit_bias={-1: 1}), dict(min_tokens=-1), dict(logprobs=21)])
def test_out_of_range_values_are_refused(bad):
    with pytest.raises(InvalidInput):
        SamplingParams(**bad)


# ---------------------------------------------------------------------------------------------- the graph
def _score(backend, ids: list[int]) -> np.ndarray:
    """Every position's logits of one prompt, through the backend's logits_index: (T, V)."""
    t = len(ids)
    window = t if backend.capabilities.writes_cache else 0
    past = backend.allocate(1, window)
    logits, _ = backend.run(np.array([ids], np.int64), np.ones((1, t), np.int64), np.arange(t)[None],
                            past, logits_index=np.arange(t)[None])
    return logits[0]


def test_every_position_logits_match_the_torch_model(gpt, engine):
    import torch

    ids = [464, 2068, 7586, 21831, 18045, 625, 262]
    got = _score(engine.backend, ids)
    with torch.no_grad():
        want = gpt(torch.tensor([ids]))[0][0].numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4)
    last, _ = engine.backend.run(np.array([ids]), np.ones((1, len(ids)), np.int64), np.arange(len(ids))[None],
                                 engine.backend.allocate(1, 0))
    assert last.shape == (1, want.shape[-1])  # without logits_index: the last position only, (B, V)
    np.testing.assert_array_equal(last[0], got[-1])


def test_the_fused_in_place_graph_scores_prompts_too(shakespeare, shakespeare_fused):
    ids = shakespeare.tokenizer.encode("ROMEO:\nBut soft, what light")
    assert shakespeare_fused.backend.capabilities.writes_cache
    np.testing.assert_allclose(_score(shakespeare_fused.backend, ids), _score(shakespeare.backend, ids), atol=1e-4)


@pytest.fixture(scope="module")
def old_export(export_dir, tmp_path_factory):
    """The tiny export as gptx wrote it before logits_index: a graph that returns the last position's logits
    only ([B, vocab]) and a manifest without the input."""
    import json
    import shutil

    import onnx
    import torch

    from gptx.export.convert import WEIGHTS_FILE, dynamic_axes
    from gptx.export.kv_step import KVStep
    from gptx.model.gpt import GPT
    from gptx.runtime.io_names import LOGITS_INDEX, input_names, output_names
    from gptx.runtime.manifest import record_files, save_manifest

    out = tmp_path_factory.mktemp("old") / "export"
    shutil.copytree(export_dir, out)
    manifest = json.loads((out / "manifest.json").read_text())
    model = GPT.from_pretrained(manifest["source"]).eval()
    step = KVStep(model)

    class LastOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.step = step

        def forward(self, ids, mask, pos, *past):
            index = torch.zeros_like(ids[:, :1]) + (ids.shape[1] - 1)
            logits, *presents = self.step(ids, mask, pos, index, *past)
            return (logits[:, 0], *presents)

    example = step.example_inputs()
    n_layer = model.config.n_layer
    axes = {k: v for k, v in dynamic_axes(n_layer).items() if k != LOGITS_INDEX}
    axes["logits"] = {0: "batch"}
    raw = out / "raw.onnx"
    with torch.no_grad():
        torch.onnx.export(LastOnly(), (*example[:3], *example[4:]), str(raw), input_names=input_names(n_layer, False),
                          output_names=output_names(n_layer), dynamic_axes=axes, opset_version=17, dynamo=False)
    (out / "model.onnx").unlink()
    (out / WEIGHTS_FILE).unlink()
    onnx.save_model(onnx.load(str(raw)), str(out / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=WEIGHTS_FILE, size_threshold=1024)
    raw.unlink()
    manifest["inputs"] = [s for s in manifest["inputs"] if s["name"] != LOGITS_INDEX]
    manifest["outputs"][0]["shape"] = ["batch", manifest["config"]["vocab_size"]]
    manifest["files"] = {}
    record_files(manifest, out)
    save_manifest(manifest, out)
    return out


def test_older_exports_still_generate_and_refuse_scoring_in_one_line(old_export, engine):
    import gptx.runtime
    from gptx.runtime.errors import GptxError

    old = gptx.runtime.load(old_export, backend="onnxruntime")
    assert not old.backend.capabilities.any_logits and engine.backend.capabilities.any_logits
    prompt = [464, 2068, 7586]
    assert old.generate_ids(prompt, 5, temperature=0) == engine.generate_ids(prompt, 5, temperature=0)
    with pytest.raises(GptxError, match="re-export it") as caught:
        _score(old.backend, prompt)
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------------------------------------- the openai client
@pytest.fixture(scope="module")
def served(shakespeare_dir, tmp_path_factory):
    """`gptx serve` of the bundled trained model (peaked logits: greedy never flips on rounding)."""
    from server_process import ServerProcess

    server = ServerProcess([shakespeare_dir, "--model-name", "bard"], tmp_path_factory.mktemp("serve") / "serve.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(served):
    import openai

    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def bard():
    from gptx.model.weights import load_any

    return load_any("shakespeare").float().eval()


def torch_logprobs(model, ids: list[int]) -> np.ndarray:
    """log_softmax of the PyTorch model's logits at every position, float64: row p scores token p + 1."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0][0].double()
    return torch.log_softmax(logits[:, :50257], -1).numpy()


PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?"


def test_echo_scores_the_prompt_as_the_torch_model_does(client, bard, shakespeare):
    ids = shakespeare.tokenizer.encode(PROMPT)
    out = client.completions.create(model="bard", prompt=PROMPT, max_tokens=0, echo=True, logprobs=2, temperature=0)
    choice = out.choices[0]
    lp = choice.logprobs
    assert choice.text == PROMPT and "".join(lp.tokens) == PROMPT and out.usage.completion_tokens == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = torch_logprobs(bard, ids)
    np.testing.assert_allclose(lp.token_logprobs[1:], [want[p, ids[p + 1]] for p in range(len(ids) - 1)], atol=1e-4)
    for p, top in enumerate(lp.top_logprobs[1:]):
        assert len(top) == 2 and max(top.values()) == pytest.approx(want[p].max(), abs=1e-4)
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(ids))]


def test_generated_tokens_logprobs_with_alternatives(client, bard, shakespeare):
    out = client.completions.create(model="bard", prompt=PROMPT, max_tokens=6, logprobs=3, temperature=0)
    lp = out.choices[0].logprobs
    prompt_ids = shakespeare.tokenizer.encode(PROMPT)
    new_ids = [shakespeare.tokenizer.ranks()[t.encode()] for t in lp.tokens]  # ASCII here: a token's bytes
    assert len(lp.tokens) == 6 and "".join(lp.tokens) == out.choices[0].text
    want = torch_logprobs(bard, prompt_ids + new_ids)
    n = len(prompt_ids)
    np.testing.assert_allclose(lp.token_logprobs, [want[n - 1 + i, t] for i, t in enumerate(new_ids)], atol=1e-4)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and top[token] == pytest.approx(logprob) and logprob == max(top.values())  # greedy
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(6)]  # offsets into the returned text

    zero = client.completions.create(model="bard", prompt=PROMPT, max_tokens=6, logprobs=0, temperature=0)
    assert zero.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs)
    assert zero.choices[0].logprobs.top_logprobs == [None] * 6  # logprobs 0: the chosen tokens' only


def test_n_samples_share_a_seed_reproducibly(client):
    ask = dict(model="bard", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=11)
    first = client.completions.create(n=2, **ask)
    again = client.completions.create(n=2, **ask)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.choices[0].text != first.choices[1].text
    # sample j draws as a single request seeded seed + j
    assert client.completions.create(n=1, **{**ask, "seed": 12}).choices[0].text == first.choices[1].text


def test_best_of_returns_the_likeliest_sample(client):
    ask = dict(model="bard", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=5, logprobs=0)
    every = client.completions.create(n=3, **ask)
    best = client.completions.create(n=1, best_of=3, **ask)
    totals = [sum(c.logprobs.token_logprobs) for c in every.choices]
    assert len(best.choices) == 1
    assert best.choices[0].text == every.choices[int(np.argmax(totals))].text


def test_chat_top_logprobs(client):
    out = client.chat.completions.create(model="bard", messages=[{"role": "user", "content": "Speak, friend"}],
                                         max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 5
    for entry in content:
        values = [t.logprob for t in entry.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True) and entry.logprob == values[0]
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    assert out.choices[0].message.content == "".join(e.token for e in content).lstrip()


def test_streamed_chunks_carry_their_tokens_logprobs(client):
    whole = client.completions.create(model="bard", prompt=PROMPT, max_tokens=6, logprobs=1, temperature=0)
    chunks = list(client.completions.create(model="bard", prompt=PROMPT, max_tokens=6, logprobs=1, temperature=0,
                                            stream=True))
    streamed = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(whole.choices[0].logprobs.token_logprobs)


def test_logit_bias_and_tiny_temperature(client, shakespeare):
    forced = shakespeare.tokenizer.encode(" night")
    assert len(forced) == 1
    out = client.completions.create(model="bard", prompt=PROMPT, max_tokens=3, temperature=0,
                                    logit_bias={str(forced[0]): 100})
    assert out.choices[0].text == " night" * 3
    greedy = client.completions.create(model="bard", prompt=PROMPT, max_tokens=6, temperature=0)
    tiny = client.completions.create(model="bard", prompt=PROMPT, max_tokens=6, temperature=1e-40)
    assert tiny.choices[0].text == greedy.choices[0].text


def test_an_older_export_refuses_echo_in_one_line(old_export, tmp_path):
    import openai
    from server_process import ServerProcess

    server = ServerProcess([old_export, "--model-name", "old"], tmp_path / "serve.log")
    try:
        old = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="re-export the model") as caught:
            old.completions.create(model="old", prompt="Hello", max_tokens=1, echo=True, logprobs=1)
        assert "\n" not in caught.value.body["message"]
        assert old.completions.create(model="old", prompt="Hello", max_tokens=2, logprobs=1).choices[0].logprobs
    finally:
        server.stop()


def test_min_tokens_holds_stop_strings_back(client):
    greedy = client.completions.create(model="bard", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=0)
    first = greedy.choices[0].logprobs.tokens[0]
    stopped = client.completions.create(model="bard", prompt=PROMPT, max_tokens=8, temperature=0, stop=[first])
    assert stopped.choices[0].text == "" and stopped.usage.completion_tokens == 1
    held = client.completions.create(model="bard", prompt=PROMPT, max_tokens=8, temperature=0, stop=[first],
                                     extra_body={"min_tokens": 3})
    assert held.usage.completion_tokens >= 3
    assert held.choices[0].text.startswith(first)


def test_echo_without_logprobs_puts_the_prompt_first(client):
    greedy = client.completions.create(model="bard", prompt=PROMPT, max_tokens=4, temperature=0)
    echoed = client.completions.create(model="bard", prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + greedy.choices[0].text and echoed.choices[0].logprobs is None
