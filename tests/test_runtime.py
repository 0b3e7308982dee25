import subprocess
import sys
import textwrap

import numpy as np
import pytest

from runtime.sampler import Sampler, SamplingParams, apply_repetition_penalty, top_k_filter, top_p_filter


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(repetition_penalty=0), "repetition_penalty"),
])
def test_invalid_sampling_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_top_k_keeps_k_best():
    logits = np.array([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = top_k_filter(logits, 2)
    assert np.isfinite(out).sum() == 2 and set(np.flatnonzero(np.isfinite(out[0]))) == {1, 3}


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    out = top_p_filter(np.log(probs), 0.75)
    assert list(np.isfinite(out[0])) == [True, True, False, False]
    out = top_p_filter(np.log(probs), 0.1)  # the top token always survives
    assert list(np.isfinite(out[0])) == [True, False, False, False]


def test_repetition_penalty_direction():
    logits = np.array([[2.0, -2.0, 1.0]])
    seen = np.array([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_sampler_seed_reproducible_and_distribution_right():
    logits = np.log(np.array([[0.7, 0.2, 0.1]] * 4000))
    a = Sampler(SamplingParams(temperature=1.0, seed=3), 3)(logits)
    b = Sampler(SamplingParams(temperature=1.0, seed=3), 3)(logits)
    assert np.array_equal(a, b)
    freq = np.bincount(a, minlength=3) / len(a)
    assert np.allclose(freq, [0.7, 0.2, 0.1], atol=0.03)


def test_sampler_never_picks_padded_vocab():
    logits = np.zeros((1, 10))
    logits[0, 8:] = 100.0  # padded ids beyond the tokenizer's vocabulary
    assert Sampler(SamplingParams(temperature=0), 8)(logits)[0] < 8


def test_seeded_generation_is_reproducible(engine):
    a = engine.generate("The meaning of life is", 15, temperature=0.9, top_k=50, seed=123)
    b = engine.generate("The meaning of life is", 15, temperature=0.9, top_k=50, seed=123)
    c = engine.generate("The meaning of life is", 15, temperature=0.9, top_k=50, seed=124)
    assert a == b and a != c


def test_generate_validates_up_front(engine):
    with pytest.raises(ValueError, match="context"):
        engine.generate("hello", max_new_tokens=64)  # tiny model: block_size 64
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate("hello", max_new_tokens=-1)
    with pytest.raises(ValueError, match="temperature"):
        engine.generate("hello", 4, temperature=-1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate_ids([1, 2, 99999], 4)


def test_empty_prompt_starts_from_endoftext(engine):
    from_empty = engine.generate_ids([], 6, temperature=0, stop_at_eos=False)
    from_eot = engine.generate_ids([50256], 6, temperature=0, stop_at_eos=False)
    assert from_empty == from_eot and len(from_empty) == 6


def test_stream_concatenates_to_generate(engine):
    text = engine.generate("Hello", 20, temperature=0.8, seed=7, stop_at_eos=False)
    pieces = list(engine.stream("Hello", 20, temperature=0.8, seed=7, stop_at_eos=False))
    assert "".join(pieces) == text and len(pieces) > 1
    assert all("\ufffd" not in p for p in pieces)


def test_stop_strings_cut_output(engine):
    full = engine.generate("Hello", 30, temperature=0, stop_at_eos=False)
    assert len(full) > 4
    stop = full[3:5]
    cut = engine.generate("Hello", 30, temperature=0, stop=stop, stop_at_eos=False)
    assert cut == full[: full.find(stop)]
    assert "".join(engine.stream("Hello", 30, temperature=0, stop=stop, stop_at_eos=False)) == cut


def test_generator_api_lets_caller_own_the_loop(engine):
    gen = engine.generator([[464, 2068]], 5, temperature=0, stop_at_eos=False)
    seen = []
    while not gen.is_done():
        seen.append(int(gen.generate_next()[0]))
    assert seen == gen.tokens[0] == engine.generate_ids([464, 2068], 5, temperature=0, stop_at_eos=False)
    assert gen.cache.length == 2 + 4  # the last sampled token is never fed back


def test_kv_cache_is_preallocated_and_written_in_place(engine):
    gen = engine.generator([[464, 2068, 7586]], 8, temperature=0, stop_at_eos=False)
    buffers = gen.cache.storage["buffers"]
    ids_before = [id(b) for b in buffers]
    while not gen.is_done():
        gen.generate_next()
    assert [id(b) for b in gen.cache.storage["buffers"]] == ids_before
    assert buffers[0].shape[2] == 3 + 8
    assert np.abs(buffers[0][:, :, : gen.cache.length]).sum() > 0
    assert np.all(buffers[0][:, :, gen.cache.length:] == 0)


def test_runtime_works_without_torch(export_dir):
    """The runtime must import and generate in a process where torch cannot be imported."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import runtime
        engine = runtime.load({str(export_dir)!r})
        out = engine.generate(["Hello", "Hi there"], 5, temperature=0, stop_at_eos=False)
        assert isinstance(out, list) and len(out) == 2 and all(out), out
        assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None and m == "torch"]
        try:
            runtime.load({str(export_dir)!r}, backend="torch")
        except runtime.GptxError as e:
            print("torch backend refused:", e)
        print("OK", engine.backend.name)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "OK onnxruntime" in proc.stdout and "torch backend refused" in proc.stdout


def test_cuda_device_without_cuda_is_a_clear_error(export_dir):
    import onnxruntime as ort

    import runtime

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has onnxruntime-gpu")
    with pytest.raises(runtime.GptxError, match="CUDA"):
        runtime.load(export_dir, backend="onnxruntime", device="cuda")


@pytest.mark.gpu
def test_onnxruntime_cuda_io_binding_matches_pytorch(export_dir, gpt):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu (pip install 'gptx[cuda]')")
    from gpt_export.validate import compare

    report = compare(export_dir, backend="onnxruntime", device="cuda", reference_model=gpt, decode_steps=6)
    assert report["passed"], report["failures"]


def test_stream_holds_back_a_stop_string_arriving_in_pieces(engine):
    """A stop string spread over several tokens must not leak its first part into the stream."""
    full = engine.generate("Hello", 30, temperature=0, stop_at_eos=False)
    ids = engine.tokenizer.encode(full)
    # a stop string that starts inside one token and ends in a later one
    first = engine.tokenizer.decode(ids[:3])
    stop = full[len(first) - 1: len(first) + 2]
    expected = full[: full.find(stop)]
    streamed = "".join(engine.stream("Hello", 30, temperature=0, stop=stop, stop_at_eos=False))
    assert streamed == expected == engine.generate("Hello", 30, temperature=0, stop=stop, stop_at_eos=False)
