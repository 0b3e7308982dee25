import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gptx.runtime.sampler import Sampler, SamplingParams, apply_repetition_penalty, candidates, sample, sample_row


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


def kept(logits, **params):
    """candidates() as sorted ids and their weights (exp(logit / T - max))."""
    ids, weights = candidates(np.asarray(logits, np.float32), SamplingParams(**params))
    ids = np.arange(len(logits)) if ids is None else ids
    order = np.argsort(ids)
    return ids[order].tolist(), weights[order]


def test_top_k_keeps_k_best_and_temperature_scales_the_weights():
    ids, weights = kept([1.0, 5.0, 3.0, 4.0, 2.0], temperature=1.0, top_k=2)
    assert ids == [1, 3] and np.allclose(weights, [1.0, np.exp(-1.0)])
    ids, weights = kept([1.0, 5.0, 3.0, 4.0, 2.0], temperature=0.5, top_k=2)
    assert ids == [1, 3] and np.allclose(weights, [1.0, np.exp(-2.0)])
    assert kept([1.0, 3.0, 3.0, 2.0, 3.0], temperature=1.0, top_k=2)[0] == [1, 2, 4]  # ties at the k-th all stay
    ids, weights = kept([0.0, 1.0, 2.0], temperature=1.0)  # no filter: the whole row
    assert ids == [0, 1, 2] and np.allclose(weights, np.exp([-2.0, -1.0, 0.0]))


def test_top_p_keeps_smallest_set_reaching_mass():
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    ids, weights = kept(logits, temperature=1.0, top_p=0.75)
    assert ids == [0, 1] and np.allclose(weights, [1.0, 0.6])
    assert kept(logits, temperature=1.0, top_p=0.1)[0] == [0]  # the top token always stays
    assert kept(logits, temperature=1.0, top_p=0.96)[0] == [0, 1, 2, 3]


def test_top_p_mass_is_relative_to_the_top_k_set():
    """Top-k keeps 0.5, 0.2, 0.2 (a tie at the k-th), 0.9 of the mass; within it the first two hold 0.7 / 0.9 =
    0.78 >= 0.75, so the third goes (measured against the whole row, 0.7 < 0.75, it would stay)."""
    assert kept(np.log([0.5, 0.2, 0.2, 0.1]), temperature=1.0, top_k=2, top_p=0.75)[0] == [0, 1]


def test_top_p_from_the_partitioned_set_and_from_the_whole_row():
    """1000 tokens, the rest ~e^-30 behind. Five likely ones: the top-m partition answers. A hundred tied ones: the
    best TOP_P_CANDIDATES (64) hold 0.64 < 0.905, so the whole row is cut; ties go in index order."""
    x = np.full(1000, -30.0)
    x[[10, 500, 3, 999, 42]] = np.log([0.4, 0.3, 0.2, 0.06, 0.04])
    assert kept(x, temperature=1.0, top_p=0.85)[0] == [3, 10, 500]
    flat = np.full(1000, -30.0)
    flat[::10] = 0.0
    ids, weights = kept(flat, temperature=1.0, top_p=0.905)
    assert ids == list(range(0, 910, 10)) and np.allclose(weights, 1.0)


class FixedDraw:
    """An RNG whose uniform draw is the given number: what inverse-CDF sampling turns into a token."""

    def __init__(self, u):
        self.u = u

    def random(self):
        return self.u


def test_sample_row_inverts_the_cdf_of_the_candidates():
    logits = np.log(np.array([0.1, 0.5, 0.3, 0.1], np.float32))  # top_p 0.75 keeps 1 (0.625) and 2 (0.375)
    params = SamplingParams(temperature=1.0, top_p=0.75)
    assert [sample_row(logits, params, FixedDraw(u)) for u in (0.0, 0.6, 0.63, 0.99)] == [1, 1, 2, 2]
    assert sample_row(np.full(4, np.nan, np.float32), params, FixedDraw(0.5)) == -1


def test_sample_mixes_greedy_and_sampled_rows_and_flags_non_finite_ones():
    logits = np.array([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [np.nan, 0.0, 1.0], [0.0, 1.0, 5.0]], np.float32)
    greedy, drawn = SamplingParams(temperature=0), SamplingParams(temperature=1.0)
    rngs = [FixedDraw(0.5)] * 4  # row 1 draws from [0.67, 0.09, 0.24]: 0.5 falls in token 0
    assert sample(logits, [greedy, drawn, greedy, greedy], rngs).tolist() == [1, 0, -1, 2]
    penalised = SamplingParams(temperature=0, repetition_penalty=10.0)  # 5 / 10 < 1: token 1 wins
    seen = [None, None, None, np.array([False, False, True])]
    assert sample(logits, [greedy, greedy, greedy, penalised], rngs, seen).tolist() == [1, 0, -1, 1]


def test_repetition_penalty_direction():
    logits = np.array([[2.0, -2.0, 1.0]])
    seen = np.array([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def draws(sampler, logits, steps):
    return np.stack([sampler(logits) for _ in range(steps)])


def test_sampler_seed_reproducible_and_distribution_right():
    logits = np.log(np.array([[0.7, 0.2, 0.1]]))
    a = draws(Sampler(SamplingParams(temperature=1.0, seed=3), 3), logits, 4000)[:, 0]
    b = draws(Sampler(SamplingParams(temperature=1.0, seed=3), 3), logits, 4000)[:, 0]
    c = draws(Sampler(SamplingParams(temperature=1.0, seed=4), 3), logits, 4000)[:, 0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    freq = np.bincount(a, minlength=3) / len(a)
    assert np.allclose(freq, [0.7, 0.2, 0.1], atol=0.03)


def test_sampler_rows_are_independent():
    """Each row has its own RNG: a row's draws are the same alone or beside other rows (one seed per batch gives
    every row default_rng(seed), so equal rows draw equally)."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 500)).astype(np.float32) * 2
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=11)
    together = draws(Sampler(params, 500), logits, 30)
    for row in range(3):
        alone = draws(Sampler(params, 500), logits[row:row + 1], 30)[:, 0]
        assert np.array_equal(together[:, row], alone)
    same = draws(Sampler(params, 500), np.repeat(logits[:1], 2, axis=0), 30)
    assert np.array_equal(same[:, 0], same[:, 1]) and len(set(same[:, 0])) > 3


def test_top_p_ties_at_the_cut_are_kept_in_index_order():
    """Five equal logits after the top one, p asking for three tokens: the first two tied ids stay, as a stable
    sort would keep them, whether the partitioned set or the whole row answers."""
    from gptx.runtime.sampler import candidates

    for vocab in (10, 5000):
        x = np.full(vocab, -30.0, np.float32)
        x[7], x[[2, 3, 5, 8, 9]] = 2.0, 1.0
        share = np.exp(np.float64(-1.0))  # a tied token's mass relative to the top one
        p = (1 + 1.5 * share) / (1 + 5 * share + (vocab - 6) * np.exp(np.float64(-32.0)))
        ids, weights = candidates(x, SamplingParams(temperature=1.0, top_p=float(p)))
        assert ids.tolist() == [2, 3, 7] and weights.argmax() == 2


@pytest.mark.parametrize("n", [1, 255, 256, 257, 50257])
def test_cumsum_search_matches_a_full_cumsum(n):
    """The two-level search finds what searchsorted over the whole float64 cumsum finds, zero weights included."""
    from gptx.runtime.sampler import cumsum_search

    rng = np.random.default_rng(n)
    weights = (rng.random(n) ** 6).astype(np.float32)
    weights[rng.random(n) < 0.3] = 0.0
    weights[-1] = 1.0
    cdf = np.cumsum(weights, dtype=np.float64)
    for u in [0.0, 0.5, 0.999999, *rng.random(300)]:
        for side in ("left", "right"):
            assert cumsum_search(weights, u, side=side) == np.searchsorted(cdf, u * cdf[-1], side=side)
    assert cumsum_search(weights, 1.5, float(cdf[-1]), side="left") == n  # past the end
    assert cumsum_search(weights[:0], 0.5) == 0


def test_sampler_top_k_draws_only_the_k_best():
    logits = np.array([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    got = draws(Sampler(SamplingParams(temperature=5.0, top_k=2, seed=0), 6), logits, 300)[:, 0]
    assert set(got.tolist()) == {0, 1}


@pytest.mark.parametrize("kwargs", [dict(top_k=2.0), dict(top_k=True), dict(top_k="5"), dict(temperature="1"),
                                    dict(temperature=True), dict(top_p="0.5"), dict(seed=-1), dict(seed=1.5),
                                    dict(seed=True), dict(repetition_penalty=float("nan"))])
def test_sampling_types_are_checked_up_front(kwargs, engine):
    from gptx.runtime.errors import InvalidInput

    with pytest.raises(InvalidInput):
        SamplingParams(**kwargs)
    with pytest.raises(InvalidInput):  # before any work, not mid-generation
        engine.generate("hello", 4, **kwargs)


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
    assert gen.cache.lengths[0] == 2 + 4  # the last sampled token is never fed back


def test_generator_cache_is_written_in_place_and_grows_in_buckets(engine, shakespeare):
    """A fixed batch writes into the same buffers while its window holds the sequence (64 slots here), and a
    longer generation grows the window to the next 64-slot bucket, with the same tokens as one big window."""
    gen = engine.generator([[464, 2068, 7586]], 8, temperature=0, stop_at_eos=False)
    buffers = list(gen.cache.buffers)
    assert len(buffers) == 2 * 2 and buffers[0].shape == (1, 2, 64, 16)
    while not gen.is_done():
        gen.generate_next()
    assert all(a is b for a, b in zip(gen.cache.buffers, buffers))
    assert gen.cache.lengths.tolist() == [3 + 7]

    long = shakespeare.generator([[464, 2068, 7586]], 100, temperature=0, stop_at_eos=False)
    windows = set()
    while not long.is_done():
        long.generate_next()
        windows.add(long.cache.window)
    assert windows == {64, 128}
    # the same tokens as the old fixed layout would give: a row alone in a cache sized up front
    from gptx.runtime.kv_cache import KVCache

    cache = KVCache(shakespeare.backend, 1, 128)
    cache.claim()
    tokens = [int(np.argmax(cache.prefill([0], [[464, 2068, 7586]])[0]))]
    for _ in range(99):
        tokens.append(int(np.argmax(cache.decode(np.array(tokens[-1:]))[0])))
    assert long.tokens[0] == tokens


def test_runtime_works_without_torch(export_dir):
    """The runtime must import and generate in a process where torch cannot be imported."""
    code = textwrap.dedent(f"""
        import importlib.machinery
        import sys

        class NoTorch:  # every `import torch` is recorded and fails (a lookup alone is not an import)
            attempts = []

            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    return importlib.machinery.ModuleSpec(name, self)

            def create_module(self, spec):
                self.attempts.append(spec.name)
                raise ImportError("torch is blocked in this test")

            def exec_module(self, module):
                pass

        sys.meta_path.insert(0, NoTorch())
        import gptx.runtime
        engine = gptx.runtime.load({str(export_dir)!r})
        out = engine.generate(["Hello", "Hi there"], 5, temperature=0, stop_at_eos=False)
        assert isinstance(out, list) and len(out) == 2 and all(out), out
        assert NoTorch.attempts == [] and "torch" not in sys.modules, NoTorch.attempts
        try:
            gptx.runtime.load({str(export_dir)!r}, backend="torch")
        except gptx.runtime.GptxError as e:
            print("torch backend refused:", e)
        print("OK", engine.backend.name)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "OK onnxruntime" in proc.stdout and "torch backend refused" in proc.stdout


def test_cuda_device_without_cuda_is_a_clear_error(export_dir):
    import onnxruntime as ort

    import gptx.runtime

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has onnxruntime-gpu")
    with pytest.raises(gptx.runtime.GptxError, match="CUDA"):
        gptx.runtime.load(export_dir, backend="onnxruntime", device="cuda")


@pytest.mark.gpu
def test_onnxruntime_cuda_io_binding_matches_pytorch(export_dir, gpt):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu (pip install 'gptx[cuda]')")
    from gptx.export.validate import compare

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


# ------------------------------------------------------------------------------------------ slot KV cache
def alone_logits(backend, prompt, fed):
    """Logits of one sequence in its own one-row cache: prefill `prompt`, then decode each token of `fed`."""
    from gptx.runtime.kv_cache import KVCache

    cache = KVCache(backend, 1)
    cache.claim()
    out = [cache.prefill([0], [prompt])[0]]
    for tok in fed:
        out.append(cache.decode(np.array([tok]))[0])
    return out


@pytest.mark.parametrize("fixture", ["engine", "shakespeare", "shakespeare_fused"])
def test_rows_of_different_lengths_decode_as_if_alone(fixture, request):
    """The exported graph takes per-row masks and positions: one decode call over rows of different lengths
    (prefilled together or at different times, moved by free) equals each row alone - no re-export needed."""
    from gptx.runtime.kv_cache import KVCache

    backend = request.getfixturevalue(fixture).backend
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 50000, n).tolist() for n in (3, 9, 17, 5)]
    fed = [[] for _ in prompts]  # tokens decoded so far, per sequence
    checked = []

    def decode(cache, seqs):
        tokens = [int(rng.integers(0, 50000)) for _ in seqs]
        for seq, tok in zip(seqs, tokens):
            fed[seq].append(tok)
        for seq, logits in zip(seqs, cache.decode(np.array(tokens))):
            np.testing.assert_allclose(logits, alone_logits(backend, prompts[seq], fed[seq])[-1], atol=1e-5)
            checked.append(seq)

    cache = KVCache(backend, 4)
    rows = [cache.claim() for _ in range(3)]
    for seq, logits in enumerate(cache.prefill(rows, prompts[:3])):  # one left-padded call
        np.testing.assert_allclose(logits, alone_logits(backend, prompts[seq], [])[0], atol=1e-5)
    decode(cache, [0, 1, 2])
    late = cache.claim()  # a sequence that joins mid-generation
    cache.prefill([late], [prompts[3]])
    decode(cache, [0, 1, 2, 3])
    decode(cache, [0, 1, 2, 3])
    assert cache.lengths.tolist() == [3 + 3, 9 + 3, 17 + 3, 5 + 2]
    # free row 0: the last row (sequence 3) moves into it, and the survivors still decode as if alone
    assert cache.free(0) == 3 and cache.active == 3 and cache.lengths.tolist()[:3] == [5 + 2, 9 + 3, 17 + 3]
    decode(cache, [3, 1, 2])
    assert sorted(set(checked)) == [0, 1, 2, 3] and len(checked) == 14


def test_in_place_prefill_of_rows_in_any_order(shakespeare_fused):
    """In-place graphs prefill a contiguous block of rows in one call; rows in another order one at a time."""
    from gptx.runtime.kv_cache import KVCache

    backend = shakespeare_fused.backend
    assert backend.capabilities.writes_cache
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 50000, n).tolist() for n in (4, 11, 7)]
    cache = KVCache(backend, 3)
    for _ in prompts:
        cache.claim()
    logits = cache.prefill([2, 0], [prompts[2], prompts[0]])
    logits = np.concatenate([logits, cache.prefill([1], [prompts[1]])])
    for got, seq in zip(logits, (2, 0, 1)):
        np.testing.assert_allclose(got, alone_logits(backend, prompts[seq], [])[0], atol=1e-5)
    tokens = [5, 6, 7]
    for row, got in zip((0, 1, 2), cache.decode(np.array(tokens))):
        np.testing.assert_allclose(got, alone_logits(backend, prompts[row], [tokens[row]])[1], atol=1e-5)


def test_window_grows_in_buckets_and_matches_a_full_prefill(shakespeare_any, monkeypatch):
    """The window starts at 64 slots and grows (reallocating, keeping the rows) only when a row needs slot 64;
    logits after the growth equal a prefill of the whole sequence. (In-place graphs grow so only when their
    whole-context cache would exceed WHOLE_CONTEXT_BYTES, set to 0 here.)"""
    from gptx.runtime import kv_cache

    monkeypatch.setattr(kv_cache, "WHOLE_CONTEXT_BYTES", 0)
    backend = shakespeare_any.backend
    seq = np.random.default_rng(1).integers(0, 50000, 80).tolist()
    cache = kv_cache.KVCache(backend, 2)
    cache.claim()
    cache.prefill([0], [seq[:60]])
    windows = []
    for tok in seq[60:-1]:
        logits = cache.decode(np.array([tok]))
        windows.append(cache.window)
    assert windows[:4] == [64] * 4 and windows[-1] == 128 and cache.buffers[0].shape[2] == 128
    assert cache.lengths[0] == 79
    np.testing.assert_allclose(logits[0], alone_logits(backend, seq[:79], [])[0], atol=1e-4)


def test_in_place_caches_take_the_whole_context_at_once(shakespeare, shakespeare_fused):
    """In-place graphs read only each row's filled slots, so their cache is the whole context from the start and
    never reallocated; the portable graph, whose attention covers the window, still starts at one bucket."""
    from gptx.runtime.kv_cache import KVCache

    seq = np.random.default_rng(2).integers(0, 50000, 100).tolist()
    cache = KVCache(shakespeare_fused.backend, 2)
    buffers = list(cache.buffers)
    assert cache.window == shakespeare_fused.backend.capabilities.max_seq == 128
    cache.claim()
    cache.prefill([0], [seq[:10]])
    for tok in seq[10:-1]:
        logits = cache.decode(np.array([tok]))
    assert all(a is b for a, b in zip(cache.buffers, buffers)) and cache.lengths[0] == 99
    np.testing.assert_allclose(logits[0], alone_logits(shakespeare.backend, seq[:99], [])[0], atol=1e-4)
    assert KVCache(shakespeare.backend, 2).window == 64


def test_freeing_a_row_moves_only_its_filled_slots(shakespeare_any):
    """The last row moves into the freed one slot by slot up to its length: the rest of a whole-context row
    (pages never written) is not touched, and the moved row decodes as before."""
    from gptx.runtime.kv_cache import KVCache

    backend = shakespeare_any.backend
    cache = KVCache(backend, 2)
    a, b = cache.claim(), cache.claim()
    cache.prefill([a, b], [[464, 2068, 7586], [40, 1101, 257, 1332, 13]])
    for buf in cache.buffers:
        buf[b, :, 5:] = 7.0  # beyond row b's 5 filled slots
    assert cache.free(a) == b
    for buf in cache.buffers:
        assert not (buf[a, :, 5:] == 7.0).any() and np.array_equal(buf[a, :, :5], buf[b, :, :5])
    logits = cache.decode(np.array([11]))
    np.testing.assert_allclose(logits[0], alone_logits(backend, [40, 1101, 257, 1332, 13], [11])[1], atol=1e-4)


def test_growing_the_window_lets_go_of_the_old_one(shakespeare_any, monkeypatch):
    """Each outgrown layer buffer dies as soon as it is copied, and the views last handed to the backend (the
    in-place binding keeps them bound) are emptied, so nothing keeps the old window resident."""
    import weakref

    from gptx.runtime import kv_cache

    monkeypatch.setattr(kv_cache, "WHOLE_CONTEXT_BYTES", 0)  # in-place graphs grow in buckets too
    backend = shakespeare_any.backend
    cache = kv_cache.KVCache(backend, 1)
    cache.claim()
    cache.prefill([0], [list(range(100, 160))])
    cache.decode(np.array([7]))
    handed = cache._handed
    old = [weakref.ref(buf) for buf in cache.buffers]
    for tok in range(8):  # slot 64 and beyond: the window grows to 128
        cache.decode(np.array([tok]))
    assert cache.window == 128 and handed == [] and all(ref() is None for ref in old)


def test_cache_buffers_are_private_zeroed_mappings():
    """The CPU cache lives in anonymous private mappings: zeroed, writable, and copied (not shared) by a fork."""
    from gptx.runtime.backends.onnxruntime_backend import mapped_zeros

    buf = mapped_zeros((2, 3, 4, 5), np.float32)
    assert buf.shape == (2, 3, 4, 5) and buf.dtype == np.float32 and not buf.any() and buf.flags.writeable
    assert mapped_zeros((0, 3, 4, 5), np.float16).shape == (0, 3, 4, 5)
    if not hasattr(os, "fork"):
        return
    pid = os.fork()
    if pid == 0:  # the child writes its copy, then leaves without running the test session's cleanup
        buf[:] = 1.0
        os._exit(0)
    os.waitpid(pid, 0)
    assert not buf.any()


def test_importing_the_runtime_leaves_asyncio_until_serving_is_used():
    code = ("import sys; from gptx import runtime; assert 'asyncio' not in sys.modules and 'ssl' not in sys.modules; "
            "from gptx.runtime import Pool; assert Pool.__module__ == 'gptx.runtime.serving'; runtime.Completion, runtime.Event")
    subprocess.run([sys.executable, "-c", code], check=True)
    import gptx.runtime

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = gptx.runtime.Nope


def test_claim_and_free_keep_rows_contiguous(engine):
    from gptx.runtime.errors import GptxError
    from gptx.runtime.kv_cache import KVCache

    cache = KVCache(engine.backend, 2)
    assert [cache.claim(), cache.claim()] == [0, 1]
    with pytest.raises(GptxError, match="rows are in use"):
        cache.claim()
    assert cache.free(1) is None and cache.active == 1
    assert cache.claim() == 1


# ------------------------------------------------------------------------------------------ generation
def test_generation_stops_at_end_of_text(eos_dir):
    """Default settings (stop_at_eos on): the token stream ends with <|endoftext|> and the text stops before it."""
    import gptx.runtime

    engine = gptx.runtime.load(eos_dir)
    ids = engine.generate_ids([464], 40, temperature=1.0, seed=0)
    assert ids[-1] == engine.eos_token_id and 2 < len(ids) < 40 and engine.eos_token_id not in ids[:-1]
    text = engine.generate("The", 40, temperature=1.0, seed=0)
    assert text == engine.tokenizer.decode(ids[:-1]) and text.startswith("The") and "<|endoftext|>" not in text
    assert "".join(engine.stream("The", 40, temperature=1.0, seed=0)) == text
    # the same seed without stopping runs to the end, through the end-of-text token
    longer = engine.generate_ids([464], 40, temperature=1.0, seed=0, stop_at_eos=False)
    assert len(longer) == 40 and longer[: len(ids)] == ids


def test_repetition_penalty_through_generator(engine):
    prompt = [464, 2068, 7586]
    plain = engine.generate_ids(prompt, 40, temperature=0, stop_at_eos=False)
    assert len(set(plain)) < len(plain)  # this tiny random model loops when greedy
    gen = engine.generator([prompt, prompt[:1]], 40, temperature=0, repetition_penalty=1e6, stop_at_eos=False)
    while not gen.is_done():
        gen.generate_next()
    for row, p in enumerate([prompt, prompt[:1]]):
        assert len(set(gen.tokens[row])) == 40 and not set(gen.tokens[row]) & set(p)


def test_onnxruntime_threads_option(export_dir, engine):
    import gptx.runtime
    from gptx.runtime.errors import InvalidInput

    one = gptx.runtime.load(export_dir, backend="onnxruntime", threads=1)
    assert one.backend.session.get_session_options().intra_op_num_threads == 1
    assert one.generate("Hello", 8, temperature=0) == engine.generate("Hello", 8, temperature=0)
    with pytest.raises(InvalidInput, match="threads"):
        gptx.runtime.load(export_dir, backend="onnxruntime", threads="two")


def test_stop_string_in_one_row_while_the_others_go_on(engine):
    prompts = ["Hello", "The weather today"]
    full = engine.generate(prompts, 30, temperature=0, stop_at_eos=False)
    stop = full[0][4:7]
    assert stop not in full[1]
    cut = engine.generate(prompts, 30, temperature=0, stop=stop, stop_at_eos=False)
    assert cut == [full[0][: full[0].find(stop)], full[1]]


def test_empty_stop_string_is_ignored(engine):
    full = engine.generate("Hello", 10, temperature=0, stop_at_eos=False)
    assert engine.generate("Hello", 10, temperature=0, stop="", stop_at_eos=False) == full
    assert engine.generate("Hello", 10, temperature=0, stop=["", "zzzz"], stop_at_eos=False) == full
    assert "".join(engine.stream("Hello", 10, temperature=0, stop="", stop_at_eos=False)) == full


def test_max_length_counts_the_prompt(engine, shakespeare):
    from gptx.runtime.errors import InvalidInput

    prompt = [464, 2068, 7586]
    by_length = engine.generate_ids(prompt, max_length=10, temperature=0, stop_at_eos=False)
    assert by_length == engine.generate_ids(prompt, 7, temperature=0, stop_at_eos=False) and len(by_length) == 7
    text = engine.generate("Hello", max_length=9, temperature=0, stop_at_eos=False)
    assert text == engine.generate("Hello", 8, temperature=0, stop_at_eos=False)  # "Hello" is one token
    assert len(shakespeare.generate_ids([1, 2], stop_at_eos=False)) == 64  # neither given: 64 new tokens
    for kwargs, match in [(dict(max_new_tokens=4, max_length=10), "not both"), (dict(max_length=65), "context"),
                          (dict(max_length=2), "shorter than the prompt"), (dict(max_length=2.5), "max_length")]:
        with pytest.raises(InvalidInput, match=match):
            engine.generate_ids(prompt, **kwargs)
        with pytest.raises(InvalidInput, match=match):
            engine.stream("Hello there you", **kwargs)


def test_token_ids_must_be_integers(engine):
    from gptx.runtime.errors import InvalidInput

    for bad in ([1.5], [1, 2.0], [True], ["3"]):
        with pytest.raises(InvalidInput, match="integers"):
            engine.generate_ids(bad, 2)
    assert engine.generate_ids(np.array([464, 2068]), 3, temperature=0) == engine.generate_ids([464, 2068], 3,
                                                                                                 temperature=0)


def test_stream_checks_arguments_when_called(engine):
    """Before the first piece (so the CLI can refuse before echoing the prompt)."""
    from gptx.runtime.errors import InvalidInput

    with pytest.raises(InvalidInput, match="max_new_tokens"):
        engine.stream("Hello", max_new_tokens=-1)
    with pytest.raises(InvalidInput, match="top_k"):
        engine.stream("Hello", 4, top_k=2.5)
    with pytest.raises(InvalidInput, match="stop"):
        engine.stream("Hello", 4, stop=[3])
    with pytest.raises(InvalidInput, match="context"):
        engine.stream_ids([1] * 60, 10)


def test_non_finite_logits_raise_a_clear_error(tmp_path):
    """A model with NaN in its weights (e.g. corrupt weights) stops with GenerationError instead of printing
    `!!!!` (token 0) as if all were well."""
    import torch

    import gptx.runtime
    from gptx.export.convert import export
    from gptx.model.gpt import GPT, GPTConfig
    from gptx.runtime.errors import GenerationError, GptxError

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=50257)).eval()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    export(model, tmp_path / "nan", validate=False, progress=False)
    engine = gptx.runtime.load(tmp_path / "nan")
    for temperature in (0, 0.8):
        with pytest.raises(GenerationError, match="non-finite logits"):
            engine.generate("Hello", 5, temperature=temperature)
        with pytest.raises(GptxError, match="non-finite"):
            list(engine.stream("Hello", 5, temperature=temperature, top_p=0.9))


def test_verify_rejects_decode_steps_that_do_not_fit(export_dir):
    from gptx.export.validate import compare
    from gptx.runtime.errors import InvalidInput

    for steps in (500, 63, 0, 2.0):
        with pytest.raises(InvalidInput, match="decode_steps must be an integer from 1 to 62"):
            compare(export_dir, decode_steps=steps)


# ------------------------------------------------------------------------------------------ bench arguments
def test_bench_refuses_a_batch_that_cannot_fit_in_memory(shakespeare_dir):
    from gptx.runtime import benchmark
    from gptx.runtime.errors import InvalidInput

    with pytest.raises(InvalidInput, match=r"needs about [\d.]+ GiB .* use a smaller --batch-size"):
        benchmark.run_bench_command(shakespeare_dir, backend="onnxruntime", batch_sizes=[1000000], prompt_lens=[4],
                                    new_tokens=4, runs=1, compare="none")
    # a sane batch is estimated far below what is free
    assert benchmark.estimate_bytes(runtime_manifest(shakespeare_dir), 8, 32, 96) < 64 * 2**20


def runtime_manifest(directory):
    from gptx.runtime.manifest import load_manifest

    return load_manifest(directory)


def test_bench_defaults_fit_a_short_context(shakespeare_dir):
    """prompt 32 + the default 128 new tokens do not fit a 128-token model: the default is clamped, with a note;
    an explicit --new-tokens that does not fit says what to pass."""
    from gptx.runtime import benchmark
    from gptx.runtime.errors import InvalidInput

    report = benchmark.run_bench_command(shakespeare_dir, backend="onnxruntime", prompt_lens=[32], runs=1, warmup=0,
                                         compare="none")
    assert report["settings"]["new_tokens"] == 96 and report["results"][0]["tokens_generated_per_row"] == 96
    assert any("new_tokens set to 96" in note for note in report["notes"])
    with pytest.raises(InvalidInput, match="pass --new-tokens 96 or less"):
        benchmark.run_bench_command(shakespeare_dir, prompt_lens=[32], new_tokens=128, runs=1, compare="none")
    with pytest.raises(InvalidInput, match="pass --prompt-len 127 or less"):
        benchmark.run_bench_command(shakespeare_dir, prompt_lens=[128], runs=1, compare="none")

