import collections
import gc
import re
import shutil
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from gptx.export.convert import export
from gptx.export.optimize import HEAD_PARTS, QuantPreset, optimize_export
from gptx.export.validate import compare
from gptx.runtime.errors import GptxError, InvalidInput
from gptx.runtime.manifest import load_manifest

N_LAYER = 2  # conftest's tiny model


def graph(directory):
    return onnx.load(str(directory / "model.onnx"), load_external_data=False).graph


def op_counts(directory):
    return collections.Counter(n.op_type for n in graph(directory).node)


def matmulnbits_bits(directory) -> list[int]:
    """Bits of each MatMulNBits in graph order (layer 0's four matrices first, the LM head last)."""
    return [next(helper.get_attribute_value(a) for a in n.attribute if a.name == "bits")
            for n in graph(directory).node if n.op_type == "MatMulNBits"]


@pytest.mark.parametrize("preset,bits", [("int8", 8), ("int4-weight-only", 4)])
def test_weight_only_quantization_includes_lm_head(export_dir, gpt, tmp_path, preset, bits):
    out = tmp_path / preset
    shutil.copytree(export_dir, out)
    manifest = optimize_export(out, preset=preset)
    # 4 matrices per layer (qkv, attn proj, fc, mlp proj) + the LM head, in HEAD_PARTS column slices
    assert op_counts(out)["MatMulNBits"] == 4 * N_LAYER + HEAD_PARTS and op_counts(out)["MatMulInteger"] == 0
    assert manifest["quantization"]["bits"] == bits
    assert load_manifest(out)["quantization"]["quantized_matmuls"] == 9
    report = compare(out, reference_model=gpt, batch_sizes=(1, 2), decode_steps=4, ppl_tokens=48)
    assert report["perplexity"]["ratio"] < (1.05 if bits == 8 else 1.25)
    assert report["top1_agreement"] >= (0.9 if bits == 8 else 0.7)
    assert report["thresholds"]["max_abs_diff"] is None  # quantized: judged on quality, not raw logits


def test_int8_dynamic_quantizes_activations_too(hf_dir, gpt, tmp_path):
    out = tmp_path / "dyn"
    manifest = export(str(hf_dir), out, quantize="int8-dynamic", progress=False)
    ops = op_counts(out)
    # 4 matrices per layer + the LM head: integer GEMMs over activations quantized on every call, after the fusions
    assert ops["MatMulInteger"] == 4 * N_LAYER + 1 and ops["DynamicQuantizeLinear"] == 4 * N_LAYER + 1
    assert ops["MatMul"] == ops["MatMulNBits"] == 0 and ops["GroupQueryAttention"] == N_LAYER
    q = load_manifest(out)["quantization"]
    assert q == manifest["quantization"] and q["preset"] == "int8-dynamic" and q["bits"] == 8
    assert q["quantized_matmuls"] == 4 * N_LAYER + 1 and q["embedding"] == "fp32 Gather"
    report = compare(out, reference_model=gpt, batch_sizes=(1, 2), decode_steps=4, ppl_tokens=48)
    assert report["perplexity"]["ratio"] < 1.05 and report["top1_agreement"] >= 0.9


def test_int4_runs_layer_0_as_integer_gemms_and_rescores_its_4_bit_head(hf_dir, export_dir, gpt, tmp_path):
    out = tmp_path / "q4"
    q = export(str(hf_dir), out, quantize="int4", progress=False)["quantization"]
    # layer 0's four matrices as MatMulInteger over int8 activations, the other layers and the LM head at 4 bits
    ops = op_counts(out)
    # (the head keeps one node: split_lm_head takes only blocks without zero points)
    assert ops["MatMulInteger"] == 4 and matmulnbits_bits(out) == [4] * 4 * (N_LAYER - 1) + [4]
    # the head's 64 best logits recomputed from the fp32 token table, which the lookup keeps too
    assert ops["TopK"] == ops["ScatterElements"] == 1 and q["lm_head_rescored_top_k"] == 64
    assert q["quantized_matmuls"] == 4 * N_LAYER + 1 and q["lm_head_parts"] == 1
    assert q["embedding"] == "fp32 Gather" and q["lm_head_bits"] == 4
    assert "dynamic int8" in q["method"] and q["preset"] == "int4" and q["bits"] == 4
    report = compare(out, reference_model=gpt, batch_sizes=(1, 2), decode_steps=4, ppl_tokens=48)
    assert report["perplexity"]["ratio"] < 1.25 and report["top1_agreement"] >= 0.7

    bad = tmp_path / "bad"
    shutil.copytree(export_dir, bad)
    before = (bad / "model.onnx").read_bytes()
    with pytest.raises(InvalidInput, match="wide_method"):  # dynamic matrices are int8: head_bits must be 8
        optimize_export(bad, preset=QuantPreset(4, wide_layers=1, wide_method="dynamic"))
    assert (bad / "model.onnx").read_bytes() == before


def test_an_unknown_method_is_refused_before_writing(export_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(export_dir, bad)
    before = (bad / "model.onnx").read_bytes()
    with pytest.raises(InvalidInput, match="method 'hqq'"):  # the sweep's algorithms are not product presets
        optimize_export(bad, preset=QuantPreset(4, method="hqq"))
    assert (bad / "model.onnx").read_bytes() == before


def test_int4_weight_only_keeps_the_sensitive_matrices_at_8_bits(export_dir, tmp_path):
    out = tmp_path / "q4"
    shutil.copytree(export_dir, out)
    optimize_export(out, quantize="int4", preset="int4-weight-only")
    # layer 0's four matrices and the (tied) LM head's slices at 8 bits, everything else at 4
    assert matmulnbits_bits(out) == [8, 8, 8, 8, 4, 4, 4, 4] + [8] * HEAD_PARTS
    assert load_manifest(out)["quantization"]["preset"] == "int4-weight-only"


def test_the_token_lookup_reads_the_lm_head_blocks(hf_dir, export_dir, tmp_path):
    from onnx import numpy_helper

    out = tmp_path / "q8"
    export(str(hf_dir), out, quantize="int8", progress=False)
    model = onnx.load(str(out / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert "gpt.transformer.wte.weight" not in inits  # no fp32 token table left
    lookup = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    head = [n for n in model.graph.node if n.op_type == "MatMulNBits"][-HEAD_PARTS:]
    # its own copy of the head's blocks (only looked-up rows become resident), byte for byte the same as the
    # head's column slices (split so that loading holds only one slice twice), which one Concat joins
    assert lookup.input[0] not in {n.input[1] for n in head}
    assert np.array_equal(inits[lookup.input[0]], np.concatenate([inits[n.input[1]] for n in head]))
    concat = next(n for n in model.graph.node if n.op_type == "Concat" and n.input[0] == head[0].output[0])
    assert list(concat.input) == [n.output[0] for n in head]
    shaped = next(n for n in model.graph.node if n.op_type == "Reshape" and n.input[0] == concat.output[0])
    assert shaped.output[0] == "logits"  # [B * K, vocab] -> [B, K, vocab]
    assert load_manifest(out)["quantization"]["lm_head_parts"] == HEAD_PARTS
    assert (out / "model.onnx.data").stat().st_size < (export_dir / "model.onnx.data").stat().st_size * 0.6


def test_quantized_exports_get_the_fusions_too(hf_dir, tmp_path):
    out = tmp_path / "q8"
    manifest = export(str(hf_dir), out, quantize="int8", progress=False)  # no --optimize
    ops = op_counts(out)
    assert ops["SkipLayerNormalization"] == 2 * N_LAYER and ops["FastGelu"] == N_LAYER
    assert any(o.startswith("SkipLayerNormalization") for o in manifest["optimizations"])
    # the qkv projection's bias rides in MatMulNBits (input 5) instead of a separate Add
    assert manifest["quantization"]["biases_folded"] >= N_LAYER
    assert sum(1 for n in graph(out).node if n.op_type == "MatMulNBits" and len(n.input) == 6) >= N_LAYER


def test_optimize_and_quantize_together(hf_dir, gpt, tmp_path):
    out = tmp_path / "both"
    manifest = export(str(hf_dir), out, optimize=True, quantize="int8", progress=False)
    assert op_counts(out)["MatMulNBits"] == 4 * N_LAYER + HEAD_PARTS and manifest["quantization"]["bits"] == 8
    report = compare(out, reference_model=gpt, batch_sizes=(2,), decode_steps=4, ppl_tokens=32)
    assert report["passed"], report["failures"]


def test_optimize_fuses_gelu_and_layernorm_and_records_it(hf_dir, gpt, tmp_path):
    out = tmp_path / "opt"
    manifest = export(str(hf_dir), out, optimize=True, progress=False)
    ops = op_counts(out)
    assert ops["FastGelu"] == N_LAYER and ops["SkipLayerNormalization"] == 2 * N_LAYER
    assert any(o.startswith("FastGelu") for o in manifest["optimizations"])
    # the attention scale lives in the query weights; each layer's attention is one in-place op over the cache
    assert ops["Mul"] == 0
    assert ops["GroupQueryAttention"] == N_LAYER and ops["Softmax"] == 0 and ops["Where"] == 0
    assert manifest["kv_cache"]["present"] == "in_place"
    assert all(o["shape"][2] == "past_sequence" for o in manifest["outputs"][1:])
    # batches of different prompt lengths (right-padded prefill, per-row decode) match PyTorch
    report = compare(out, reference_model=gpt, batch_sizes=(1, 3), decode_steps=6, ppl_tokens=0)
    assert report["passed"] and report["max_abs_diff"] < 1e-4 and report["greedy_identical"]


def test_in_place_graphs_refuse_cuda_and_bad_contracts(hf_dir, tmp_path):
    import json

    from gptx.runtime.backends import create_backend
    from gptx.runtime.errors import ManifestError

    out = tmp_path / "opt"
    export(str(hf_dir), out, optimize=True, progress=False)
    with pytest.raises(GptxError, match="CPU only"):
        create_backend("onnxruntime", load_manifest(out), out, "cuda")
    raw = json.loads((out / "manifest.json").read_text())
    raw["kv_cache"]["present"] = "sideways"
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="kv_cache.present"):
        load_manifest(out)


def test_a_quantized_fp32_export_with_a_tied_gemm_head(export_dir, tmp_path):
    """fp32 exports read the tied embedding through Gemm(transB=1); quantizing one in place still covers the head."""
    assert op_counts(export_dir)["Gemm"] == 1
    out = tmp_path / "inplace"
    shutil.copytree(export_dir, out)
    optimize_export(out, quantize="int4", preset="int4-pure")
    assert matmulnbits_bits(out) == [4] * (4 * N_LAYER + HEAD_PARTS)
    assert op_counts(out)["Gemm"] == 0 and op_counts(out)["GatherBlockQuantized"] == 1


def test_custom_preset_and_asymmetric_blocks_keep_the_fp32_table(export_dir, tmp_path):
    out = tmp_path / "asym"
    shutil.copytree(export_dir, out)
    manifest = optimize_export(out, preset=QuantPreset(4, block_size=16, symmetric=False))
    q = manifest["quantization"]
    assert q["preset"] == "custom" and q["block_size"] == 16 and "asymmetric" in q["method"]
    assert q["embedding"].startswith("fp32 Gather")  # zero points: the lookup cannot share the head's blocks
    assert op_counts(out)["GatherBlockQuantized"] == 0


@pytest.mark.parametrize("quantize, preset, message", [
    ("int2", None, "int8, int8-dynamic, int4"),
    (None, "int4-nope", "unknown quantization preset"),
    ("int8", "int4-pure", "4-bit"),
])
def test_bad_quantize_or_preset(export_dir, tmp_path, quantize, preset, message):
    out = tmp_path / "x"
    shutil.copytree(export_dir, out)
    before = (out / "model.onnx").read_bytes()
    with pytest.raises(InvalidInput, match=message):
        optimize_export(out, quantize=quantize, preset=preset)
    assert (out / "model.onnx").read_bytes() == before  # nothing written


def test_bad_quantize_value_leaves_nothing(tmp_path):
    with pytest.raises(GptxError, match="int8, int8-dynamic, int4"):
        export("random:gpt2", tmp_path / "x", quantize="int2", progress=False)
    assert not (tmp_path / "x").exists()


def smaps_values(path, key: str) -> list[list[str]]:
    """The `key` line's values (e.g. "Rss:", "VmFlags:") of each of this process's mappings of `path`."""
    values, current = [], None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if re.match(r"^[0-9a-f]+-[0-9a-f]+$", fields[0]):
                current = fields[5] if len(fields) > 5 else None
            elif fields[0] == key and current == str(path):
                values.append(fields[1:])
    return values


def mapped_kib(path) -> int:
    """How much of `path` this process has resident through its mappings (smaps Rss), KiB."""
    return sum(int(rss[0]) for rss in smaps_values(path, "Rss:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-cache behaviour of Linux (smaps, fadvise)")
def test_token_lookups_make_only_their_rows_resident(tmp_path):
    """A CPU load first evicts the weights file from the page cache (page_cache.drop_cached_pages). Pages that a read()
    brought in from disk sit there as large folios, and the session's mapping would make a whole folio resident
    for each token it looks up: on Linux 6.18 / ext4, 48 lookups then made 18 of the 37 MB table resident."""
    from gptx.model import GPT, GPTConfig
    from gptx.runtime import load
    from gptx.runtime.page_cache import drop_cached_pages

    torch.manual_seed(0)
    out = tmp_path / "q8"
    export(GPT(GPTConfig(n_layer=1, n_head=12, n_embd=768, block_size=64, vocab_size=50257)), out,
           quantize="int8", progress=False, validate=False)
    gc.collect()  # no session of the export's may still map the file
    data = out / load_manifest(out)["weights_file"]
    drop_cached_pages(data)
    data.read_bytes()  # from disk, as a checksum or a copy does: large folios where the kernel makes them
    engine = load(out)
    loaded = mapped_kib(data)
    engine.generate_ids(np.random.default_rng(0).integers(0, 50257, 48).tolist(), max_new_tokens=2)
    table_kib = 50257 * 768 // 1024
    assert mapped_kib(data) - loaded < table_kib / 4  # 48 rows of 768 bytes, and their neighbours
    drop_cached_pages(out / "missing.data")  # no error: a missing file is for the caller's own open to report


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/smaps are Linux's")
def test_a_cpu_session_reads_its_weights_file_without_readahead(export_dir, tmp_path):
    """After loading, the file is read only by token id (lookup, re-score): every mapping of it is advised random
    (smaps VmFlags "rr"), so a miss brings in one page, not a readahead window (page_cache.advise_random_access)."""
    from gptx.runtime import load
    from gptx.runtime.page_cache import advise_random_access

    out = tmp_path / "q4"
    shutil.copytree(export_dir, out)
    optimize_export(out, quantize="int4")
    gc.collect()
    engine = load(out, "onnxruntime")
    flags = smaps_values((out / load_manifest(out)["weights_file"]).resolve(), "VmFlags:")
    assert flags and all("rr" in f for f in flags)  # ONNX Runtime maps the file, and every mapping took the advice
    assert advise_random_access(tmp_path / "not mapped") == 0
    assert engine.generate_ids([1, 2, 3], max_new_tokens=2)


def test_rescore_head_makes_the_top_k_logits_exact(tmp_path):
    """A 4-bit head on its own: after rescore_head, its K best logits are the fp32 products, the rest untouched."""
    import onnxruntime as ort
    from onnx import TensorProto, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from gptx.export.convert import WTE
    from gptx.export.optimize import rescore_head

    vocab, width, k = 300, 64, 8
    rng = np.random.default_rng(0)
    table = rng.normal(0, 1, (vocab, width)).astype(np.float32)
    head = helper.make_node("MatMul", ["hidden", "head_t"], ["logits"], name="head")
    model = helper.make_model(helper.make_graph(
        [head], "head", [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", vocab])],
        [numpy_helper.from_array(np.ascontiguousarray(table.T), "head_t"), numpy_helper.from_array(table, WTE)]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=True)
    quantizer.process()
    model = quantizer.model.model
    if WTE not in {t.name for t in model.graph.initializer}:  # the quantizer drops initializers no node reads
        model.graph.initializer.append(numpy_helper.from_array(table, WTE))
    x = rng.normal(0, 1, (3, width)).astype(np.float32)

    def run(m):
        path = tmp_path / f"{len(m.graph.node)}.onnx"
        onnx.save(m, str(path))
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"hidden": x})[0]

    approx = run(model)
    assert rescore_head(model, "logits", k) == k
    rescored, exact = run(model), x @ table.T
    top = np.argsort(-approx, axis=-1)[:, :k]
    assert np.abs(approx - exact).max() > 1e-2  # 4 bits are visibly off, so the test can fail
    np.testing.assert_allclose(np.take_along_axis(rescored, top, -1), np.take_along_axis(exact, top, -1), rtol=1e-5,
                               atol=1e-4)
    rest = np.ones_like(approx, dtype=bool)
    np.put_along_axis(rest, top, False, -1)
    assert np.array_equal(rescored[rest], approx[rest])
    assert rescore_head(model, "no such output", k) == 0
