import collections

import onnx
import pytest

from gpt_export.export import export
from gpt_export.validate import compare
from runtime.manifest import load_manifest


def op_counts(directory):
    graph = onnx.load(str(directory / "model.onnx"), load_external_data=False).graph
    return collections.Counter(n.op_type for n in graph.node)


@pytest.mark.parametrize("scheme,bits", [("int8", 8), ("int4", 4)])
def test_weight_only_quantization_includes_lm_head(hf_dir, gpt, tmp_path, scheme, bits):
    out = tmp_path / scheme
    manifest = export(str(hf_dir), out, quantize=scheme, progress=False)
    ops = op_counts(out)
    # 4 matrices per layer (qkv, attn proj, fc, mlp proj) + the LM head
    assert ops["MatMulNBits"] == 4 * 2 + 1
    assert manifest["quantization"]["bits"] == bits
    assert load_manifest(out)["quantization"]["quantized_matmuls"] == 9
    report = compare(out, reference_model=gpt, batch_sizes=(1, 2), decode_steps=4, ppl_tokens=48)
    assert report["perplexity"]["ratio"] < (1.05 if bits == 8 else 1.25)
    assert report["top1_agreement"] >= (0.9 if bits == 8 else 0.7)
    assert report["thresholds"]["max_abs_diff"] is None  # quantized: judged on quality, not raw logits


def test_quantized_weights_are_smaller(hf_dir, export_dir, tmp_path):
    out = tmp_path / "q4"
    export(str(hf_dir), out, quantize="int4", progress=False)
    fp32_size = (export_dir / "model.onnx.data").stat().st_size
    q4_size = (out / "model.onnx.data").stat().st_size
    # fp32 keeps one tied copy of the embedding; int4 keeps the fp32 embedding for lookups plus a
    # 4-bit LM head, and shrinks every other matrix 8x
    assert q4_size < fp32_size * 1.25


def test_optimize_fuses_gelu_and_records_it(hf_dir, gpt, tmp_path):
    out = tmp_path / "opt"
    manifest = export(str(hf_dir), out, optimize=True, progress=False)
    assert op_counts(out)["FastGelu"] == 2
    assert any(o.startswith("FastGelu") for o in manifest["optimizations"])
    report = compare(out, reference_model=gpt, batch_sizes=(2,), decode_steps=4, ppl_tokens=0)
    assert report["passed"] and report["max_abs_diff"] < 1e-4


def test_bad_quantize_value(tmp_path):
    from runtime.errors import GptxError

    with pytest.raises(GptxError, match="int8, int4"):
        export("random:gpt2", tmp_path / "x", quantize="int2", progress=False)
    assert not (tmp_path / "x").exists()
