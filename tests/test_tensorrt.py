"""TensorRT path: what can be checked on CPU (op support of real exports, profiles, manifest entries,
compatibility messages, the CLI's error without TensorRT, the masked-dummy-past trick on ONNX Runtime, the
backend's binding and cache logic against a fake TensorRT), plus `-m gpu` tests that build a real engine and
compare it with PyTorch (skipped without TensorRT + CUDA)."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from gptx.export.convert import export
from gptx.model.gpt import GPT, GPTConfig
from gptx.export.tensorrt_build import (
    BuildError,
    add_engine_entry,
    build_engine,
    check_precision,
    engine_entry,
    profiles_from_manifest,
)
from gptx.export.trt_support import SUPPORTED_OPS, check_graph
from gptx.runtime.backends.tensorrt_backend import TensorRTBackend, check_engine_compat, normalize_cc
from gptx.runtime.errors import GptxError
from gptx.runtime.manifest import load_manifest, record_files, save_manifest

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50257)


def tiny_model(seed: int = 0) -> GPT:
    import torch

    torch.manual_seed(seed)
    return GPT(GPTConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """One fp32 and one fp16 export of the same tiny random GPT (a few seconds on 2 cores)."""
    root = tmp_path_factory.mktemp("trt")
    out = {}
    for dtype in ("fp32", "fp16"):
        out[dtype] = root / dtype
        export(tiny_model(), out[dtype], dtype=dtype, validate=False, progress=False)
    return out


def fresh_copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------ op support
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_real_export_is_parseable_by_tensorrt(exports, dtype):
    model_file = exports[dtype] / load_manifest(exports[dtype])["model_file"]
    assert check_graph(model_file) == []
    # and the check really looked at the graph: every op it has is in the list
    ops = {n.op_type for n in onnx.load(str(model_file), load_external_data=False).graph.node}
    assert {"MatMul", "Softmax", "LayerNormalization"} <= ops
    assert ops <= SUPPORTED_OPS


def _graph(nodes, inputs, outputs, initializers=(), opset=17, domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    imports = [helper.make_opsetid("", opset), *[helper.make_opsetid(d, 1) for d in domains]]
    return helper.make_model(graph, opset_imports=imports)


def test_unsupported_op_is_flagged(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [])
    model = _graph([helper.make_node("Det", ["x"], ["y"])], [x], [y])
    problems = check_graph(model)
    assert len(problems) == 1 and "Det" in problems[0] and "not supported" in problems[0]
    path = tmp_path / "det.onnx"  # and from a file path
    onnx.save(model, str(path))
    assert check_graph(path) == problems


def test_float64_control_flow_and_contrib_ops_are_flagged():
    x = helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2])
    y = helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2])
    problems = check_graph(_graph([helper.make_node("Relu", ["x"], ["y"])], [x], [y]))
    assert any("float64" in p for p in problems)

    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    out = helper.make_tensor_value_info("o", TensorProto.FLOAT, [1])
    branch = lambda v: helper.make_graph(  # noqa: E731
        [helper.make_node("Constant", [], ["o" + v], value=helper.make_tensor("t" + v, TensorProto.FLOAT, [1], [1.0]))],
        "b" + v, [], [helper.make_tensor_value_info("o" + v, TensorProto.FLOAT, [1])])
    model = _graph([helper.make_node("If", ["c"], ["o"], then_branch=branch("a"), else_branch=branch("b"))],
                   [cond], [out])
    assert any("control flow If" in p for p in check_graph(model))

    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 4])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 4])
    fused = _graph([helper.make_node("FastGelu", ["a"], ["b"], domain="com.microsoft")], [a], [b],
                   domains=["com.microsoft"])
    assert any("com.microsoft::FastGelu" in p for p in check_graph(fused))
    assert check_graph(_graph([helper.make_node("Relu", ["a"], ["b"])], [a], [b], opset=8))  # opset too old


# -------------------------------------------------------------------------------------------- profiles
def test_profiles_prefill_and_decode_shapes(exports):
    manifest = load_manifest(exports["fp32"])
    profiles = profiles_from_manifest(manifest, max_batch=4, max_seq=32, opt_batch=2)
    assert [p["name"] for p in profiles] == ["prefill", "decode"] and [p["index"] for p in profiles] == [0, 1]
    names = {spec["name"] for spec in manifest["inputs"]}
    pre, dec = (p["shapes"] for p in profiles)
    assert set(pre) == names and set(dec) == names
    kv = "past_key_values.0.key"
    # prefill: T in 1..32, a single (masked) past slot, mask = 1 + T
    assert pre["input_ids"] == {"min": [1, 1], "opt": [2, 16], "max": [4, 32]}
    assert pre["attention_mask"] == {"min": [1, 2], "opt": [2, 17], "max": [4, 33]}
    assert pre[kv] == {"min": [1, 2, 1, 16], "opt": [2, 2, 1, 16], "max": [4, 2, 1, 16]}
    # decode: T = 1, the whole cache (1..32 slots) as past, mask = P + 1
    assert dec["position_ids"] == {"min": [1, 1], "opt": [2, 1], "max": [4, 1]}
    assert dec[kv] == {"min": [1, 2, 1, 16], "opt": [2, 2, 16, 16], "max": [4, 2, 32, 16]}
    assert dec["attention_mask"] == {"min": [1, 2], "opt": [2, 17], "max": [4, 33]}
    for prof in profiles:
        for s in prof["shapes"].values():
            assert all(lo <= mid <= hi for lo, mid, hi in zip(s["min"], s["opt"], s["max"]))
            assert min(s["min"]) >= 1  # TensorRT profiles cannot hold a 0-length dimension


@pytest.mark.parametrize("kwargs, words", [
    (dict(max_batch=4, max_seq=65, opt_batch=1), "block_size"),
    (dict(max_batch=2, max_seq=32, opt_batch=3), "--opt-batch"),
    (dict(max_batch=0, max_seq=32, opt_batch=1), "--max-batch"),
    (dict(max_batch=2, max_seq=-1, opt_batch=1), "--max-seq"),
    (dict(max_batch=2, max_seq=32, opt_batch=1, opt_seq=33), "opt_seq"),
])
def test_profile_arguments_are_validated(exports, kwargs, words):
    with pytest.raises((ValueError, GptxError), match=words):
        profiles_from_manifest(load_manifest(exports["fp32"]), **kwargs)


def test_masked_dummy_past_matches_empty_past_on_onnxruntime(exports):
    """The prefill profile's trick, checked on the real graph: a 1-slot past whose mask column is 0 gives the
    same logits and presents as a 0-length past (left padding included); decode over a whole buffer matches too."""
    import onnxruntime as ort

    directory = exports["fp32"]
    manifest = load_manifest(directory)
    sess = ort.InferenceSession(str(directory / manifest["model_file"]), providers=["CPUExecutionProvider"])
    past_names = [i["name"] for i in manifest["inputs"]][4:]
    outputs = [o["name"] for o in manifest["outputs"]]
    last = {"logits_index": np.full((2, 1), 4, np.int64)}
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50257, (2, 5)).astype(np.int64)
    mask = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], np.int64)  # second row left-padded
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    empty = np.zeros((2, 2, 0, 16), np.float32)
    ref = sess.run(outputs, {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **last,
                             **{n: empty for n in past_names}})
    dummy = rng.standard_normal((2, 2, 1, 16)).astype(np.float32)  # garbage: must be ignored
    got = sess.run(outputs, {"input_ids": ids, "attention_mask": np.concatenate([np.zeros((2, 1), np.int64), mask], 1),
                             "position_ids": pos, **last, **{n: dummy for n in past_names}})
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g, r, atol=1e-5)

    # decode: the whole 8-slot buffer as past, slots 5..7 unfilled (garbage) and masked out
    cache = [np.concatenate([p, rng.standard_normal((2, 2, 3, 16)).astype(np.float32)], 2) for p in ref[1:]]
    nxt = rng.integers(0, 50257, (2, 1)).astype(np.int64)
    dec_mask = np.concatenate([mask, np.zeros((2, 3), np.int64), np.ones((2, 1), np.int64)], 1)
    dec = sess.run(outputs, {"input_ids": nxt, "attention_mask": dec_mask, "position_ids": pos[:, -1:] + 1,
                             "logits_index": np.zeros((2, 1), np.int64), **dict(zip(past_names, cache))})
    full = sess.run(outputs, {"input_ids": np.concatenate([ids, nxt], 1),
                              "attention_mask": np.concatenate([mask, np.ones((2, 1), np.int64)], 1),
                              "position_ids": np.concatenate([pos, pos[:, -1:] + 1], 1),
                              "logits_index": np.full((2, 1), 5, np.int64), **{n: empty for n in past_names}})
    np.testing.assert_allclose(dec[0], full[0], atol=1e-4)


# ------------------------------------------------------------------------------ manifest & compatibility
def fabricated_entry(manifest, **overrides):
    entry = engine_entry("engine.plan", "10.15.1.29", "NVIDIA H100 80GB HBM3", (9, 0), "fp16",
                         profiles_from_manifest(manifest, 8, 64, 1), 8, 64, 123.456, opt_batch=1)
    entry.update(overrides)
    return entry


def test_engine_entry_round_trips_through_the_manifest(exports, tmp_path):
    directory = fresh_copy(exports["fp16"], tmp_path / "x")
    manifest = load_manifest(directory)
    entry = fabricated_entry(manifest)
    assert entry["compute_capability"] == "9.0" and entry["build_seconds"] == 123.46
    for key in ("file", "tensorrt_version", "gpu_name", "compute_capability", "precision", "profiles", "max_batch",
                "max_seq", "build_seconds", "built_at"):
        assert key in entry
    save_manifest(add_engine_entry(manifest, entry), directory)
    loaded = load_manifest(directory)
    assert loaded["engines"] == [entry]
    # rebuilding the same file replaces its entry; another file is appended
    save_manifest(add_engine_entry(loaded, fabricated_entry(loaded, build_seconds=5.0)), directory)
    save_manifest(add_engine_entry(load_manifest(directory), fabricated_entry(loaded, file="other.plan")), directory)
    engines = load_manifest(directory)["engines"]
    assert [(e["file"], e["build_seconds"]) for e in engines] == [("engine.plan", 5.0), ("other.plan", 123.46)]


def test_compatibility_messages(exports):
    entry = fabricated_entry(load_manifest(exports["fp16"]))
    assert check_engine_compat(entry, "10.15.1.29", "NVIDIA H100 80GB HBM3", (9, 0)) is None
    assert check_engine_compat(entry, "10.15.1.29", "NVIDIA H100 80GB HBM3", "sm_90") is None

    msg = check_engine_compat(entry, "10.16.0.5", "NVIDIA H100 80GB HBM3", "9.0", directory="gpt2-fp16")
    assert "TensorRT 10.15.1.29" in msg and "10.16.0.5" in msg and "compute capability" not in msg
    assert "gptx build gpt2-fp16 --precision fp16 --max-batch 8 --max-seq 64" in msg and "\n" not in msg

    msg = check_engine_compat(entry, "10.15.1.29", "NVIDIA A100-SXM4-80GB", (8, 0))
    assert "compute capability 9.0 (this GPU is 8.0)" in msg and "NVIDIA A100-SXM4-80GB" in msg
    assert "gptx build DIR" in msg
    assert normalize_cc("sm_89") == normalize_cc((8, 9)) == normalize_cc("8.9") == "8.9"


def test_precision_must_match_the_export(exports):
    fp32, fp16 = load_manifest(exports["fp32"]), load_manifest(exports["fp16"])
    check_precision(fp16, "fp16")
    check_precision(fp32, "fp32")
    with pytest.raises(BuildError, match="strongly typed.*--dtype fp16"):
        check_precision(fp32, "fp16")
    with pytest.raises(BuildError, match="--precision fp16"):
        check_precision(fp16, "fp32")
    with pytest.raises(BuildError, match="bf16"):
        check_precision(fp16, "bf16")
    with pytest.raises(ValueError, match="--precision must be one of"):
        check_precision(fp16, "int8")


# --------------------------------------------------------------------------- no TensorRT on this machine
def _trt_and_gpu() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    import torch

    return torch.cuda.is_available()


def _cli_build(directory: Path, *args: str):
    from typer.testing import CliRunner

    from gptx.cli import app

    return CliRunner().invoke(app, ["build", str(directory), *args])


def _assert_one_clean_line(result, *words):
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    text = result.output.strip()
    assert len(text.splitlines()) == 1, text
    assert "Traceback" not in text
    for word in words:
        assert word in text, text


def test_cli_build_without_tensorrt_is_one_clear_line(exports, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError, GPU or not
    result = _cli_build(exports["fp16"], "--precision", "fp16", "--max-batch", "2", "--max-seq", "32")
    # cli.fail() prints through rich markup, which currently swallows "[tensorrt]"; the library's own message
    # carries the full hint (checked below), the CLI line at least the start of it
    _assert_one_clean_line(result, "TensorRT", "CUDA GPU", "pip install 'gptx")
    with pytest.raises(GptxError, match=r"needs TensorRT and a CUDA GPU.*pip install 'gptx\[tensorrt\]'"):
        build_engine(exports["fp16"], precision="fp16", max_batch=2, max_seq=32, progress=False)
    assert "engine.plan" not in [p.name for p in exports["fp16"].iterdir()]
    assert load_manifest(exports["fp16"])["engines"] == []


@pytest.mark.skipif(_trt_and_gpu(), reason="TensorRT and a CUDA GPU are present: the build would really run")
def test_cli_build_on_this_machine_fails_cleanly(exports):
    result = _cli_build(exports["fp16"], "--max-seq", "32")  # default precision fp16
    _assert_one_clean_line(result, "TensorRT", "pip install 'gptx")
    # and as a real process, as a user would run it
    proc = subprocess.run([sys.executable, "-m", "gptx.cli", "build", str(exports["fp16"]), "--max-seq", "32"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "TensorRT" in proc.stderr and "pip install 'gptx" in proc.stderr


def test_cli_build_reports_argument_errors_before_needing_tensorrt(exports):
    _assert_one_clean_line(_cli_build(exports["fp16"], "--max-seq", "1000"), "block_size")
    _assert_one_clean_line(_cli_build(exports["fp32"], "--precision", "fp16", "--max-seq", "32"), "--dtype fp16")
    _assert_one_clean_line(_cli_build(exports["fp16"], "--precision", "bf16", "--max-seq", "32"), "bf16")


def test_build_refuses_a_graph_tensorrt_cannot_parse(exports, tmp_path):
    directory = fresh_copy(exports["fp32"], tmp_path / "bad")
    manifest = load_manifest(directory)
    model = onnx.load(str(directory / manifest["model_file"]), load_external_data=False)
    model.graph.node[-1].op_type = "Unique"  # any op TensorRT's parser lacks
    onnx.save(model, str(directory / manifest["model_file"]))
    save_manifest(record_files(manifest, directory), directory)  # as if exported so: checksums match
    with pytest.raises(BuildError, match="Unique"):
        build_engine(directory, precision="fp32", max_batch=2, max_seq=32)


def test_backend_errors_without_engine_or_tensorrt(exports, monkeypatch):
    directory = exports["fp16"]
    manifest = copy.deepcopy(load_manifest(directory))
    with pytest.raises(GptxError, match="--device cuda"):
        TensorRTBackend(manifest, directory, "cpu")
    with pytest.raises(GptxError, match=r"run `gptx build .*` first"):
        TensorRTBackend(manifest, directory, "cuda")
    add_engine_entry(manifest, fabricated_entry(manifest))
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(GptxError, match=r"gptx\[tensorrt\]"):
        TensorRTBackend(manifest, directory, "cuda")


def test_backend_module_imports_without_torch_or_tensorrt():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['tensorrt'] = None\n"
            "import gptx.runtime.backends.tensorrt_backend as m; print(m.TensorRTBackend.name)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "tensorrt"


# ------------------------------------------------------------------- the backend against a fake TensorRT
class FakeContext:
    """A TensorRT execution context that runs the ONNX graph with ONNX Runtime, reading its inputs from and writing
    its outputs to the raw addresses the backend bound (CPU tensors stand in for CUDA ones), and refusing shapes
    outside the optimization profile it was set to."""

    def __init__(self, fake):
        self.fake, self.shapes, self.addresses, self.profile = fake, {}, {}, None

    def set_optimization_profile_async(self, index, stream):
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        s = self.fake.profiles[self.profile]["shapes"][name]
        return len(shape) == len(s["min"]) and all(lo <= d <= hi for lo, d, hi in zip(s["min"], shape, s["max"]))

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def get_tensor_shape(self, name):
        return (self.shapes["input_ids"][0], self.shapes["logits_index"][1], self.fake.vocab)

    def view(self, name, shape):
        import ctypes

        dt = np.dtype(self.fake.dtypes[name])
        raw = (ctypes.c_byte * (int(np.prod(shape)) * dt.itemsize)).from_address(self.addresses[name])
        return np.frombuffer(raw, dtype=dt).reshape(shape)

    def execute_async_v3(self, stream):
        feeds = {n: self.view(n, self.shapes[n]).copy() for n in self.fake.inputs}
        self.fake.calls.append((self.profile, {n: v.shape for n, v in feeds.items()}))
        for name, value in zip(self.fake.outputs, self.fake.session.run(self.fake.outputs, feeds)):
            self.view(name, value.shape)[...] = value
        return True


def fake_tensorrt(session, profiles):
    """Just enough of the `tensorrt` module for TensorRTBackend: the engine is `session` (ONNX Runtime)."""
    from types import SimpleNamespace

    types = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}
    dtypes = {t.name: types[t.type] for t in [*session.get_inputs(), *session.get_outputs()]}
    inputs, outputs = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    names = [*inputs, *outputs]
    engine = SimpleNamespace(num_optimization_profiles=len(profiles), num_io_tensors=len(names),
                             get_tensor_name=names.__getitem__, get_tensor_dtype=dtypes.__getitem__,
                             get_tensor_mode=lambda n: "input" if n in inputs else "output",
                             create_execution_context=lambda: FakeContext(fake))
    fake = SimpleNamespace(
        __version__="10.99.0", float32="float32", float16="float16", int32="int32", int64="int64", bool="bool",
        TensorIOMode=SimpleNamespace(INPUT="input", OUTPUT="output"),
        Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
        Runtime=lambda logger: SimpleNamespace(deserialize_cuda_engine=lambda data: engine),
        session=session, profiles=profiles, dtypes=dtypes, inputs=inputs, outputs=outputs,
        vocab=session.get_outputs()[0].shape[-1], calls=[],  # (profile index, {input: shape}) per execute
    )
    return fake


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda says a GPU is there; tensors asked for on 'cuda' are made on the CPU."""
    from types import SimpleNamespace

    import torch

    class CpuForCuda(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if kwargs.get("device") == "cuda":
                kwargs["device"] = "cpu"
            return func(*args, **kwargs)

    stream = SimpleNamespace(cuda_stream=0, synchronize=lambda: None)
    fakes = dict(is_available=lambda: True, current_stream=lambda: stream, get_device_capability=lambda i=0: (9, 0),
                 get_device_name=lambda i=0: "Fake GPU")
    for name, fn in fakes.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    with CpuForCuda():
        yield


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_backend_plumbing_against_fake_tensorrt(exports, tmp_path, monkeypatch, fake_gpu, dtype):
    """Prefill on the masked dummy past (min_past), decode over the active rows' window, presents written into the
    cache at each row's offset (by kv_cache.py), checked against PyTorch through gptx verify's own comparison and
    against ONNX Runtime slot by slot."""
    import onnxruntime as ort

    from gptx.export.validate import compare
    from gptx.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from gptx.runtime.kv_cache import KVCache

    directory = fresh_copy(exports[dtype], tmp_path / dtype)
    manifest = load_manifest(directory)
    profiles = profiles_from_manifest(manifest, max_batch=4, max_seq=64, opt_batch=1)
    add_engine_entry(manifest, engine_entry("engine.plan", "10.99.0", "Fake GPU", (9, 0), dtype, profiles, 4, 64, 1.0))
    (directory / "engine.plan").write_bytes(b"not a real engine")
    fake = fake_tensorrt(ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"]),
                         profiles)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)

    backend = TensorRTBackend(manifest, directory, "cuda")
    assert backend.capabilities.min_past == 1 and backend.capabilities.max_batch == 4
    report = compare(directory, reference_model=tiny_model(), candidate=backend, batch_sizes=(1, 3), decode_steps=4,
                     ppl_tokens=16)
    assert report["passed"], report["failures"]
    prefill = [shapes for index, shapes in fake.calls if index == 0]
    decode = [shapes for index, shapes in fake.calls if index == 1]
    assert prefill and decode
    assert all(s["past_key_values.0.key"][2] == 1 and s["attention_mask"][1] == s["input_ids"][1] + 1 for s in prefill)
    assert all(s["input_ids"][1] == 1 for s in decode)

    # rows of different lengths, one joining later: logits and every filled cache slot as on ONNX Runtime
    caches = [KVCache(b, 3) for b in (backend, OnnxRuntimeBackend(manifest, directory, "cpu"))]
    outs = []
    for cache in caches:
        cache.claim(), cache.claim()
        out = [cache.prefill([0, 1], [[1, 2, 3], [4, 5]])]
        out.append(cache.decode(np.array([6, 7])))
        cache.prefill([cache.claim()], [[8, 9, 10, 11]])
        out.append(cache.decode(np.array([12, 13, 14])))
        outs.append(out)
    for mine, ref in zip(*outs):
        np.testing.assert_allclose(mine, ref, atol=1e-3)
    assert caches[0].lengths.tolist() == caches[1].lengths.tolist() == [5, 4, 5]
    for mine, ref in zip(caches[0].buffers, caches[1].buffers):
        for row, length in enumerate(caches[1].lengths):
            np.testing.assert_allclose(mine[row, :, :length].float().numpy(), ref[row, :, :length].astype(np.float32),
                                       atol=1e-3)

    past = caches[0].buffers
    with pytest.raises(GptxError, match="only onto an empty cache"):
        backend.run(np.ones((1, 3), np.int64), np.ones((1, 67), np.int64), np.ones((1, 3), np.int64),
                    [b[:1] for b in past])
    with pytest.raises(GptxError, match="--max-batch"):
        KVCache(backend, 5)

    # an engine from another TensorRT is refused with the rebuild command
    manifest["engines"][-1]["tensorrt_version"] = "10.3.0"
    with pytest.raises(GptxError, match=r"TensorRT 10\.3\.0 \(this machine has 10\.99\.0\).*gptx build"):
        TensorRTBackend(manifest, directory, "cuda")


# ----------------------------------------------------------------------------------------- GPU only
def _require_trt_gpu():
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'gptx[tensorrt]')")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    return trt


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_engine_matches_pytorch(tmp_path, dtype):
    _require_trt_gpu()
    from gptx.export.validate import compare

    directory = tmp_path / dtype
    export(tiny_model(), directory, dtype=dtype, validate=False, progress=False)
    entry = build_engine(directory, precision=dtype, max_batch=4, max_seq=64, opt_batch=1, workspace_gib=1.0,
                         timing_cache=tmp_path / "timing.cache", progress=False)
    assert (directory / entry["file"]).is_file() and (tmp_path / "timing.cache").is_file()
    assert load_manifest(directory)["engines"][-1]["file"] == entry["file"]
    report = compare(directory, backend="tensorrt", device="cuda", reference_model=tiny_model(), ppl_tokens=32)
    assert report["passed"], report["failures"]
    assert report["backend"].startswith("tensorrt")


@pytest.mark.gpu
def test_engine_backend_prefill_decode_and_limits(tmp_path):
    _require_trt_gpu()
    from gptx.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from gptx.runtime.kv_cache import KVCache

    directory = tmp_path / "x"
    export(tiny_model(), directory, dtype="fp32", validate=False, progress=False)
    build_engine(directory, precision="fp32", max_batch=2, max_seq=16, progress=False)
    manifest = load_manifest(directory)
    trt_b, ort_b = TensorRTBackend(manifest, directory, "cuda"), OnnxRuntimeBackend(manifest, directory, "cpu")
    assert trt_b.capabilities.max_seq == 16
    caches = [KVCache(b, 2) for b in (trt_b, ort_b)]
    outs = []
    for cache in caches:
        rows = [cache.claim(), cache.claim()]
        assert cache.window == 16  # the window never exceeds the engine's --max-seq
        out = [cache.prefill(rows, [[11, 12, 13, 14], [21, 22]])]
        out += [cache.decode(np.array([5 + t, 8 + t])) for t in range(3)]
        outs.append(out)
    for mine, ref in zip(*outs):
        np.testing.assert_allclose(mine, ref, atol=1e-3)
    got = caches[0].buffers[0][0, :, :7].float().cpu().numpy()
    np.testing.assert_allclose(got, caches[1].buffers[0][0, :, :7], atol=1e-3)
    with pytest.raises(GptxError, match="--max-seq"):
        trt_b.allocate(1, 17)
    with pytest.raises(GptxError, match="--max-batch"):
        KVCache(trt_b, 3)
