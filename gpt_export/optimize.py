"""Speed passes on an export directory: ONNX Runtime's GPT-2 fusions and weight-only quantization.

Both come from onnxruntime's own tooling (transformers optimizer, MatMulNBits quantizer); gptx only
chooses the settings and records what was done in the manifest so `gptx info` / `verify` can tell.
"""

from __future__ import annotations

import collections
import contextlib
import io
from pathlib import Path

from runtime.errors import GptxError
from runtime.manifest import load_manifest, save_manifest

QUANT_BITS = {"int8": 8, "int4": 4}
BLOCK_SIZE = 32  # per-block scales: 32 keeps int4 quality close to fp32 on GPT-2
ACCURACY_LEVEL = 4  # MatMulNBits computes with int8 activations on CPU: the fast path of MLAS


def fuse(proto, n_head: int, n_embd: int):
    """FastGelu, SkipLayerNormalization (residual Add + LayerNorm) and friends, for CPU and CUDA alike."""
    import logging

    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    # The optimizer logs every fusion, and prints a notice when its symbolic shape inference gives up
    # (it does on our Reshape(x, [0, 0, -1, D]) targets; only the SkipLayerNormalization fusion needs it).
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            optimized = optimize_model(proto, model_type="gpt2", num_heads=n_head, hidden_size=n_embd,
                                       optimization_options=FusionOptions("gpt2"), opt_level=0)
        stats = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    finally:
        logging.disable(logging.NOTSET)
    return optimized.model, [f"{op} x{count}" for op, count in sorted(stats.items())]


def quantize_weights(proto, scheme: str):
    """Weight-only int8/int4 for every MatMul with constant weights, the LM head included."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    bits = QUANT_BITS[scheme]
    quantizer = MatMulNBitsQuantizer(proto, bits=bits, block_size=BLOCK_SIZE, is_symmetric=True,
                                     accuracy_level=ACCURACY_LEVEL, op_types_to_quantize=("MatMul",))
    logging.disable(logging.INFO)  # one INFO line per graph node otherwise
    try:
        quantizer.process()
    finally:
        logging.disable(logging.NOTSET)
    model = quantizer.model.model
    counts = collections.Counter(n.op_type for n in model.graph.node)
    if counts["MatMulNBits"] == 0:
        raise GptxError("quantization found no MatMul weights to quantize")
    info = {"method": "MatMulNBits (weight-only, symmetric)", "bits": bits, "block_size": BLOCK_SIZE,
            "accuracy_level": ACCURACY_LEVEL, "quantized_matmuls": counts["MatMulNBits"],
            "remaining_fp32_matmuls": counts["MatMul"]}
    return model, info


def optimize_export(directory: str | Path, fuse_graph: bool = True, quantize: str | None = None) -> dict:
    import onnx

    if quantize is not None and quantize not in QUANT_BITS:
        raise GptxError(f"--quantize must be one of {', '.join(QUANT_BITS)}, got {quantize!r}")
    directory = Path(directory)
    manifest = load_manifest(directory)
    model_path = directory / manifest["model_file"]
    proto = onnx.load(str(model_path))
    cfg = manifest["config"]
    if fuse_graph:
        proto, fused = fuse(proto, cfg["n_head"], cfg["n_embd"])
        manifest["optimizations"] = [*manifest.get("optimizations", []), *fused]
    if quantize:
        proto, manifest["quantization"] = quantize_weights(proto, quantize)
    data_file = directory / manifest["weights_file"]
    tmp_model = model_path.with_name(model_path.name + ".new")
    tmp_data = data_file.name + ".new"
    onnx.save_model(proto, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=tmp_data, size_threshold=1024)
    # re-point the model at the final data file name, then swap both into place
    proto = onnx.load(str(tmp_model), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data_file.name
    (directory / tmp_data).replace(data_file)
    onnx.save_model(proto, str(model_path))
    tmp_model.unlink()
    save_manifest(manifest, directory)
    return manifest
