"""Speed passes on an export directory: ONNX Runtime's fusions, then quantization.

Both come from onnxruntime's own tooling (transformers optimizer, MatMulNBits and dynamic quantizers); gptx picks
the settings (a named preset, measured in docs/quantization.md), makes the few graph edits those tools leave undone,
and records what was done in the manifest so `gptx info` / `verify` can tell. Fusions run first, on the fp32 graph:
the optimizer's patterns look for MatMul + Add, which quantizing would hide behind MatMulNBits.
"""

from __future__ import annotations

import collections
import contextlib
import io
import itertools
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from gptx.runtime.errors import GptxError, InvalidInput
from gptx.runtime.files import atomic_path
from gptx.runtime.io_names import ATTENTION_MASK, LOGITS_INDEX, past_names, present_names
from gptx.runtime.manifest import IN_PLACE, QUANT_SCHEMES, load_manifest, record_files, save_manifest

from gptx.export.convert import WTE, find_tied_head


@dataclass(frozen=True)
class QuantPreset:
    """One quantization recipe, in onnxruntime's MatMulNBitsQuantizer terms (method "dynamic" takes only `bits`)."""

    bits: int
    method: str = "blockwise"  # weight-only MatMulNBits (round to nearest), or "dynamic" (dynamic_int8)
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4  # MatMulNBits compute: 4 = int8 activations (MLAS's fast path), 1 = fp32
    embedding: str = "copy"  # the token lookup: "copy" (quantized_embedding) or "fp32" (keep the fp32 table)
    head_bits: int | None = None  # the tied embedding / LM head at other bits (blockwise, symmetric); None = bits
    wide_layers: int = 0  # the first N transformer layers' matrices at head_bits too (the most sensitive ones)
    # how the head_bits matrices are quantized: "blockwise" or "dynamic" (8 bits only, dynamic_int8: faster than
    # MatMulNBits's 8-bit kernel; the lookup then keeps the fp32 table)
    wide_method: str = "blockwise"
    head_rescore: int = 0  # K > 0: the LM head at `bits`, its K best logits recomputed in fp32 (rescore_head)


# `--quantize` uses the measured winners of benchmarks/quant_sweep.py (docs/quantization.md). int4 keeps layer 0,
# the most sensitive, at 8 bits as dynamic int8, and its 4-bit LM head gets its 64 best logits recomputed in fp32:
# fewer bytes read per token than an 8-bit head, exact logits where sampling looks.
PRESETS = {
    "int8": QuantPreset(8),
    "int8-dynamic": QuantPreset(8, method="dynamic"),
    "int4": QuantPreset(4, block_size=64, symmetric=False, head_bits=8, wide_layers=1, wide_method="dynamic",
                        head_rescore=64),
    "int4-weight-only": QuantPreset(4, block_size=64, symmetric=False, head_bits=8, wide_layers=1),
    "int4-pure": QuantPreset(4, block_size=32),  # every matrix at 4 bits: smallest and fastest, ~91% top-1
}
QUANT_BITS = {name: PRESETS[name].bits for name in QUANT_SCHEMES}  # every scheme the CLI offers has a preset
HEAD_PARTS = 4  # the quantized LM head in 4 column slices (split_lm_head): a lower load-time peak RSS
MATRICES_PER_LAYER = 4  # attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj


@contextlib.contextmanager
def _quiet():
    """onnxruntime's optimizer and quantizers log a line per fusion or node and draw progress bars."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


def fuse(proto, n_head: int, n_embd: int):
    """FastGelu (with its bias), SkipLayerNormalization (residual Add + LayerNorm, with the projection's bias).

    Shape inference is off: ORT's fails on our graph (it merges the mask's length with the past's, then divides by
    the zero-length slice that results), and SkipLayerNorm's use of shapes only guards against broadcasting Adds;
    every Add feeding a LayerNorm in KVStep joins two (batch, seq, n_embd) tensors.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("gpt2")
    options.enable_shape_inference = False
    with _quiet():
        optimized = optimize_model(proto, model_type="gpt2", num_heads=n_head, hidden_size=n_embd,
                                   optimization_options=options, opt_level=0)
        stats = optimized.get_fused_operator_statistics()
    return optimized.model, [f"{op} x{count}" for op, count in sorted(stats.items()) if count]


def fewer_ops(proto, n_embd: int) -> list[str]:
    """A graph edit ORT's optimizer does not make: the attention scale 1/sqrt(head_dim) moves from the scores
    (a Mul per layer and step) into the query columns of the qkv projection, done on the fp32 weights before
    any quantization (exact when head_dim is a power of two)."""
    from onnx import numpy_helper
    from onnxruntime.transformers.onnx_model import OnnxModel

    g = proto.graph
    graph = OnnxModel(proto)
    inits = {t.name: t for t in g.initializer}
    producer, consumers = graph.output_name_to_node(), graph.input_name_to_nodes()

    def scalar(name):
        value = graph.get_constant_value(name)
        return value.item() if value is not None and value.size == 1 else None

    muls = [n for n in g.node if n.op_type == "Mul" and n.input[0] in producer
            and producer[n.input[0]].op_type == "Concat" and scalar(n.input[1]) is not None]
    qkv = [n for n in g.node if n.op_type == "MatMul" and n.input[1] in inits
           and list(inits[n.input[1]].dims) == [n_embd, 3 * n_embd]]
    scales = {scalar(m.input[1]) for m in muls}
    adds = [consumers.get(matmul.output[0], []) for matmul in qkv]
    if not muls or len(muls) != len(qkv) or len(scales) != 1 or any(len(a) != 1 or a[0].op_type != "Add" for a in adds):
        return []  # not the graph this pass knows: leave it alone
    scale = scales.pop()
    for m in muls:  # the scores feed the mask directly
        graph.replace_input_of_all_nodes(m.output[0], m.input[0])
        g.node.remove(m)
    for matmul, (add,) in zip(qkv, adds):
        w = numpy_helper.to_array(inits[matmul.input[1]]).copy()
        w[:, :n_embd] *= scale
        inits[matmul.input[1]].CopyFrom(numpy_helper.from_array(w, matmul.input[1]))
        k = next(j for j, i in enumerate(add.input) if i != matmul.output[0])
        source = add.input[k] if add.input[k] in inits else producer[add.input[k]].input[0]  # exporter's Identity
        bias = numpy_helper.to_array(inits[source]).copy()
        bias[:n_embd] *= scale
        scaled = numpy_helper.from_array(bias, f"{matmul.name}/scaled_bias")  # own copy: biases may be shared
        g.initializer.append(scaled)
        add.input[k] = scaled.name
    return [f"attention scale folded into the query x{len(qkv)}"]


def fuse_attention(proto, n_layer: int, n_head: int, scale: float) -> list[str]:
    """Each layer's attention (split, head reshapes, score and value matmuls, mask, softmax, merge) becomes one
    com.microsoft GroupQueryAttention over the packed qkv, which reads the cache and writes the new keys/values into
    it in place (the `in_place` contract, gptx/runtime/manifest.py): no ORT fusion targets our cache contract. On
    GPT-2 int4 238 of 350 nodes go, and attention reads only each row's filled slots (docs/benchmarks.md). `scale`:
    the score scale (1.0 when fewer_ops folded it). Returns what was done; [] (graph untouched) for unknown graphs.
    """
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.transformers.onnx_model import OnnxModel

    g = proto.graph
    produced = {o for n in g.node for o in n.output}
    pasts, presents = past_names(n_layer), present_names(n_layer)
    layers = []
    for i in range(n_layer):
        split = next((n for n in g.node if n.op_type == "Split" and n.name.startswith(f"/h.{i}/attn/")), None)
        c_proj = next((n for n in g.node if n.name.startswith(f"/h.{i}/attn/c_proj/")
                       and n.op_type in ("MatMul", "MatMulNBits")), None)
        if split is None or c_proj is None or presents[2 * i] not in produced:
            return []
        layers.append((split.input[0], c_proj.input[0]))
    if not any(i.name == LOGITS_INDEX for i in g.input):
        return []  # the runtime finds each row's last real token through logits_index
    # rows are prefixes: row b holds sum(mask[b]) tokens, the new one(s) included
    g.initializer.extend([numpy_helper.from_array(np.array([1], np.int64), "gqa/axis1"),
                          numpy_helper.from_array(np.array([1], np.int32), "gqa/one32")])
    prelude = [
        helper.make_node("Cast", [ATTENTION_MASK], ["gqa/mask32"], to=TensorProto.INT32, name="gqa/Cast"),
        helper.make_node("ReduceSum", ["gqa/mask32", "gqa/axis1"], ["gqa/lengths"], keepdims=0, name="gqa/Lengths"),
        helper.make_node("Sub", ["gqa/lengths", "gqa/one32"], ["gqa/seqlens_k"], name="gqa/SeqlensK"),
        helper.make_node("ReduceMax", ["gqa/lengths"], ["gqa/total"], keepdims=0, name="gqa/Total"),
    ]
    replaced = {*(out for _, out in layers), *presents}  # what the old attention nodes produced
    for n in list(g.node):
        if set(n.output) & replaced:
            g.node.remove(n)
    for n in reversed(prelude):
        g.node.insert(0, n)
    for i, (qkv, out) in enumerate(layers):
        node = helper.make_node("GroupQueryAttention", [qkv, "", "", pasts[2 * i], pasts[2 * i + 1], "gqa/seqlens_k",
                                                        "gqa/total"], [out, presents[2 * i], presents[2 * i + 1]],
                                name=f"/h.{i}/attn/GroupQueryAttention", domain="com.microsoft", num_heads=n_head,
                                kv_num_heads=n_head, scale=scale)
        g.node.insert(next(k for k, n in enumerate(g.node) if out in n.input), node)
    if not any(op.domain == "com.microsoft" for op in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    count = len(g.node)
    with _quiet():  # the old attention's dead nodes and weights
        OnnxModel(proto).prune_graph(allow_remove_graph_inputs=False)
    for out in g.output:  # present.i.* now have the past's shape: the whole buffer
        if out.name in presents:
            dims = out.type.tensor_type.shape.dim
            dims[2].Clear()
            dims[2].dim_param = "past_sequence"
    return [f"GroupQueryAttention (in-place cache) x{n_layer}, {count - len(g.node)} nodes removed"]


def resolve_preset(quantize: str | None, preset: str | QuantPreset | None) -> tuple[str, QuantPreset] | None:
    """(name, preset) for `quantize` (one of QUANT_SCHEMES) and/or a preset (a PRESETS name or a QuantPreset);
    None when nothing is quantized."""
    if quantize is not None and quantize not in QUANT_SCHEMES:
        raise InvalidInput(f"--quantize must be one of {', '.join(QUANT_SCHEMES)}, got {quantize!r}")
    if preset is None:
        return (quantize, PRESETS[quantize]) if quantize else None
    if isinstance(preset, QuantPreset):
        name, settings = "custom", preset
    elif preset in PRESETS:
        name, settings = preset, PRESETS[preset]
    else:
        raise InvalidInput(f"unknown quantization preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if quantize is not None and settings.bits != PRESETS[quantize].bits:
        raise InvalidInput(f"preset {name!r} is {settings.bits}-bit, but --quantize {quantize} was asked for")
    return name, settings


def untie_lm_head(proto) -> str | None:
    """Gemm(x, wte, transB=1) (how fp32 exports share the tied embedding) back to MatMul(x, wte^T): the weight-only
    quantizers only take MatMul. The new MatMul's name, or None when there was no such Gemm."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    for node in list(proto.graph.node):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] != WTE or len(node.input) > 2 or attrs.get("transB") != 1
                or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0):
            continue
        weight = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(inits[WTE]).T), WTE + ".T")
        proto.graph.initializer.append(weight)
        matmul = helper.make_node("MatMul", [node.input[0], weight.name], list(node.output), name=node.name + "_untied")
        proto.graph.node.insert(list(proto.graph.node).index(node), matmul)
        proto.graph.node.remove(node)
        return matmul.name
    return None


def dynamic_int8(proto, nodes: list[str] | None = None):
    """int8 weights (per tensor) and int8 activations quantized on every call for the MatMuls named in `nodes`
    (None: every MatMul with constant weights), by onnxruntime's quantize_dynamic (MatMulInteger). MLAS's integer
    GEMM beats MatMulNBits's 8-bit kernel here, for slightly lower agreement with fp32 (docs/quantization.md);
    per-channel weights measured far worse (docs/experiments.md)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="gptx-quantize-") as scratch:
        out = Path(scratch) / "model.onnx"
        with _quiet():  # the input proto may exceed 2 GB: quantize_dynamic saves it with external data itself
            quantize_dynamic(proto, out, op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes,
                             per_channel=False, reduce_range=False, weight_type=QuantType.QInt8,
                             use_external_data_format=True,
                             extra_options={"MatMulConstBOnly": True,
                                            # contrib ops (GroupQueryAttention...) carry no type information
                                            "DefaultTensorType": onnx.TensorProto.FLOAT})
        return onnx.load(str(out))


def matmul_nbits(model, settings: QuantPreset, exclude: list[str] = (), algo_config=None):
    """Every MatMul with constant weights not named in `exclude` as a weight-only MatMulNBits, by onnxruntime's
    MatMulNBitsQuantizer (`algo_config` None: its default blockwise round-to-nearest with `settings`)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as q

    quantizer = q.MatMulNBitsQuantizer(model, bits=settings.bits, block_size=settings.block_size,
                                       is_symmetric=settings.symmetric, accuracy_level=settings.accuracy_level,
                                       nodes_to_exclude=list(exclude), op_types_to_quantize=("MatMul",),
                                       algo_config=algo_config)
    with _quiet():
        quantizer.process()
    return quantizer.model.model


def wide_matmuls(proto, preset: QuantPreset) -> tuple[str | None, list[str]]:
    """(the LM head's MatMul, the MatMuls quantized at head_bits instead of bits): the first wide_layers layers'
    four matrices, and the head unless it is re-scored (then it goes with the layers). Unties the head."""
    lm_head = untie_lm_head(proto)
    if lm_head is None and (tied := find_tied_head(proto)):
        lm_head = tied[0].name
    inits = {t.name for t in proto.graph.initializer}
    layer_matmuls = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits
                     and n.name != lm_head]  # in graph order: layer 0's four matrices first
    wide = layer_matmuls[:MATRICES_PER_LAYER * preset.wide_layers]
    if lm_head and (preset.head_bits or preset.bits) != preset.bits and not preset.head_rescore:
        wide.append(lm_head)
    return lm_head, wide


def quantize_weights(proto, preset: QuantPreset):
    """int8/int4 for every MatMul with constant weights, the LM head included: weight-only (MatMulNBits), or
    dynamic int8 when the preset says so (the token lookup then keeps the fp32 table, mapped from the file)."""
    if preset.method == "dynamic":
        untie_lm_head(proto)
        model = dynamic_int8(proto)
        counts = collections.Counter(n.op_type for n in model.graph.node)
        if counts["MatMulInteger"] == 0:
            raise GptxError("quantization found no MatMul weights to quantize")
        return model, {"method": "dynamic int8 (int8 weights per tensor, int8 activations per call: MatMulInteger)",
                       "bits": preset.bits, "lm_head_bits": preset.bits, "quantized_matmuls": counts["MatMulInteger"],
                       "remaining_fp32_matmuls": counts["MatMul"], "embedding": "fp32 Gather",
                       "preset_settings": asdict(preset)}
    if preset.method != "blockwise":
        raise InvalidInput(f"unknown quantization method {preset.method!r}: 'blockwise' or 'dynamic'")
    head_bits = preset.head_bits or preset.bits
    if preset.wide_method not in ("blockwise", "dynamic") or (preset.wide_method == "dynamic" and head_bits != 8):
        raise InvalidInput(f"wide_method must be 'blockwise' or (with head_bits=8) 'dynamic', got "
                           f"{preset.wide_method!r} with head_bits={head_bits}")
    lm_head, wide = wide_matmuls(proto, preset)
    model = proto
    if wide and preset.wide_method == "dynamic":  # they become MatMulInteger, which MatMulNBitsQuantizer skips
        model, wide = dynamic_int8(proto, wide), []
    model = matmul_nbits(model, preset, wide)
    if wide:
        model = matmul_nbits(model, QuantPreset(head_bits, accuracy_level=preset.accuracy_level))
    return weight_only_info(model, preset, lm_head, preset.bits if preset.head_rescore else head_bits)


def weight_only_info(model, preset: QuantPreset, lm_head: str | None, lm_head_bits: int):
    """The graph edits after MatMulNBitsQuantizer (biases folded, the token lookup, the head's re-score and
    slices) and what the manifest records of them: (model, info)."""
    folded = fold_bias(model)
    counts = collections.Counter(n.op_type for n in model.graph.node)
    if counts["MatMulNBits"] == 0:
        raise GptxError("quantization found no MatMul weights to quantize")
    head = lm_head + f"_Q{lm_head_bits}" if lm_head else None
    embedding = "fp32 Gather"
    if preset.embedding != "fp32" and head and not preset.head_rescore:  # the re-score reads the fp32 table
        embedding = quantized_embedding(model, head, lm_head_bits)
    head_output = next((n.output[0] for n in model.graph.node if n.name == head), None)
    rescored = rescore_head(model, head_output, preset.head_rescore) if preset.head_rescore and head_output else 0
    head_parts = split_lm_head(model, head, HEAD_PARTS) if head else 1  # slices the head that feeds the re-score
    method = f"MatMulNBits (weight-only, {preset.method}, {'symmetric' if preset.symmetric else 'asymmetric'})"
    if counts["MatMulInteger"]:
        dynamic = [] if rescored else ["the LM head"]
        dynamic += [f"the first {preset.wide_layers} layer(s)"] if preset.wide_layers else []
        method += f"; {' and '.join(dynamic)} as dynamic int8 (MatMulInteger)"
    if rescored:
        method += f"; the LM head's {rescored} best logits recomputed from the fp32 token table"
    info = {"method": method, "bits": preset.bits, "lm_head_bits": lm_head_bits, "block_size": preset.block_size,
            "accuracy_level": preset.accuracy_level,
            "quantized_matmuls": counts["MatMulNBits"] + counts["MatMulInteger"],
            "remaining_fp32_matmuls": counts["MatMul"], "biases_folded": folded, "embedding": embedding,
            "lm_head_parts": head_parts, "lm_head_rescored_top_k": rescored, "preset_settings": asdict(preset)}
    return model, info


def rescore_head(model, logits: str, k: int) -> int:
    """Recompute the K best of the quantized LM head's logits exactly from the fp32 token table (GPT-2's head is
    tied to it): TopK -> Gather the K rows -> one [K, n_embd] x [n_embd] product -> ScatterElements into the row.

    Our own edit: at 4 bits alone the head's argmax leaves fp32's too often (~91% top-1), and an 8-bit head reads
    15 MB more per token on GPT-2. Re-scored, every logit sampling looks at is exact unless the true best token
    falls outside the 4-bit top K, for K rows per logits position (docs/quantization.md). Call it before
    split_lm_head. Returns K, or 0 when no MatMulNBits computes `logits` or the fp32 table is gone."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    head = next((n for n in model.graph.node if n.op_type == "MatMulNBits" and n.output[0] == logits), None)
    if head is None or WTE not in inits or k < 1:
        return 0
    k = min(k, inits[WTE].dims[0])  # TopK fails on fewer candidates than K
    approx, p = logits + "/approx", logits + "/rescore"
    head.output[0] = approx
    model.graph.initializer.extend([numpy_helper.from_array(np.array([-1], np.int64), f"{p}/axis"),
                                    numpy_helper.from_array(np.array([k], np.int64), f"{p}/k")])
    nodes = [
        helper.make_node("TopK", [approx, f"{p}/k"], [f"{p}/values", f"{p}/ids"], axis=-1, name=f"{p}/TopK"),
        helper.make_node("Gather", [WTE, f"{p}/ids"], [f"{p}/rows"], axis=0, name=f"{p}/Gather"),
        helper.make_node("Unsqueeze", [head.input[0], f"{p}/axis"], [f"{p}/column"], name=f"{p}/Unsqueeze"),
        # [B, K, n_embd] x [B, n_embd, 1]
        helper.make_node("MatMul", [f"{p}/rows", f"{p}/column"], [f"{p}/exact_column"], name=f"{p}/MatMul"),
        helper.make_node("Squeeze", [f"{p}/exact_column", f"{p}/axis"], [f"{p}/exact"], name=f"{p}/Squeeze"),
        helper.make_node("ScatterElements", [approx, f"{p}/ids", f"{p}/exact"], [logits], axis=-1,
                         name=f"{p}/ScatterElements"),
    ]
    position = list(model.graph.node).index(head) + 1
    for offset, node in enumerate(nodes):
        model.graph.node.insert(position + offset, node)
    return k


def fold_bias(model) -> int:
    """MatMulNBits -> Add(constant bias) becomes one MatMulNBits with its optional bias input (input 5)."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    inits = {t.name: t for t in model.graph.initializer}
    consumers = OnnxModel(model).input_name_to_nodes()
    folded = 0
    for node in list(model.graph.node):
        if node.op_type != "MatMulNBits" or len(node.input) > 5 or len(consumers.get(node.output[0], [])) != 1:
            continue
        add = consumers[node.output[0]][0]
        bias = next((i for i in add.input if i != node.output[0]), None)
        n = next(a.i for a in node.attribute if a.name == "N")
        if add.op_type != "Add" or bias not in inits or list(inits[bias].dims) != [n]:
            continue
        node.input.extend([""] * (5 - len(node.input)) + [bias])
        node.output[0] = add.output[0]
        model.graph.node.remove(add)
        folded += 1
    return folded


def quantized_embedding(model, lm_head: str, bits: int) -> str:
    """Replace the fp32 token lookup by a GatherBlockQuantized over a copy of the LM head's quantized blocks.

    The head's MatMulNBits holds wte^T as (vocab, k_blocks, block bytes): row v is token v's embedding, what
    GatherBlockQuantized reads. Only symmetric blocks qualify (both ops put the implicit zero point at
    2^(bits-1)); otherwise the fp32 table stays and the manifest says so. A copy, because ONNX Runtime reads all
    of the head's pages to prepack them, and they would stay resident; a copy only the lookup reads starts paged
    out and only looked-up rows become resident (the CPU backend evicts cached pages: drop_cached_pages).
    """
    from onnx import helper, numpy_helper

    head = next((n for n in model.graph.node if n.name == lm_head and n.op_type == "MatMulNBits"), None)
    gather = next((n for n in model.graph.node if n.op_type == "Gather" and n.input[0] == WTE), None)
    if head is None or gather is None:
        return "fp32 Gather"
    inits = {t.name: t for t in model.graph.initializer}
    scales = numpy_helper.to_array(inits[head.input[2]])
    if (len(head.input) > 3 and head.input[3]) or scales.dtype != np.float32:  # zero points
        return "fp32 Gather (the LM head's blocks have zero points or non-fp32 scales)"
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    vocab, k_blocks = attrs["N"], -(-attrs["K"] // attrs["block_size"])
    gather_scales = numpy_helper.from_array(scales.reshape(vocab, k_blocks, 1), head.input[2] + "_gather")
    copy = numpy_helper.from_array(numpy_helper.to_array(inits[head.input[1]]), head.input[1] + "_gather")
    model.graph.initializer.append(copy)
    rows = gather.output[0] + "_blocks"
    lookup = helper.make_node("GatherBlockQuantized", [copy.name, gather.input[1], gather_scales.name], [rows],
                              name="wte/GatherBlockQuantized", domain="com.microsoft", gather_axis=0,
                              quantize_axis=2, block_size=attrs["block_size"], bits=bits)
    shape = numpy_helper.from_array(np.array([0, 0, -1], np.int64), rows + "_shape")
    flatten = helper.make_node("Reshape", [rows, shape.name], [gather.output[0]], name="wte/Reshape")
    position = list(model.graph.node).index(gather)
    model.graph.node.remove(gather)
    model.graph.node.insert(position, flatten)
    model.graph.node.insert(position, lookup)
    model.graph.initializer.extend([gather_scales, shape])
    model.graph.initializer.remove(inits[WTE])
    return f"GatherBlockQuantized over a copy of the LM head's {bits}-bit blocks"


def split_lm_head(model, lm_head: str, parts: int) -> int:
    """The LM head's MatMulNBits becomes `parts` slices of its vocabulary columns and one Concat of their logits.

    ONNX Runtime prepacks each MatMulNBits weight and frees the original only once that node is packed, so the
    largest matrix (GPT-2's 8-bit head, 43 MB) sets the load-time peak RSS; in slices only a part is held twice.
    A step pays one Concat of a (batch, 1, vocab) row. Returns the number of head nodes (1: left as it is)."""
    from onnx import helper, numpy_helper

    head = next((n for n in model.graph.node if n.name == lm_head and n.op_type == "MatMulNBits"), None)
    if head is None or len(head.input) != 3 or parts < 2:
        return 1
    if any(head.input[1] in n.input for n in model.graph.node if n is not head):
        return 1  # something else reads the head's blocks: slices would hold them twice
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    inits = {t.name: t for t in model.graph.initializer}
    data, scales = (numpy_helper.to_array(inits[name]) for name in head.input[1:3])
    n = attrs["N"]
    scales = scales.reshape(n, data.shape[1])
    bounds = np.linspace(0, n, parts + 1).astype(int)
    position = list(model.graph.node).index(head)
    outputs = []
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        names = [f"{head.input[1]}_part{i}", f"{head.input[2]}_part{i}"]
        model.graph.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(data[lo:hi]), names[0]),
                                        numpy_helper.from_array(scales[lo:hi].reshape(-1), names[1])])
        outputs.append(f"{head.output[0]}_part{i}")
        part = helper.make_node("MatMulNBits", [head.input[0], *names], [outputs[-1]], name=f"{head.name}_part{i}",
                                domain=head.domain, **{**attrs, "N": int(hi - lo)})
        model.graph.node.insert(position + i, part)
    concat = helper.make_node("Concat", outputs, [head.output[0]], axis=-1, name=f"{head.name}_concat")
    model.graph.node.insert(position + parts, concat)
    model.graph.node.remove(head)
    for name in head.input[1:3]:
        if not any(name in node.input for node in model.graph.node):
            model.graph.initializer.remove(inits[name])
    return parts


def optimize_export(directory: str | Path, fuse_graph: bool = True, quantize: str | None = None,
                    preset: str | QuantPreset | None = None) -> dict:
    """Fuse (and quantize) an export in place. `quantize` is one of QUANT_SCHEMES (the measured default presets);
    `preset` picks another recipe: a PRESETS name (e.g. "int4-pure") or a QuantPreset (docs/quantization.md)."""
    import onnx

    chosen = resolve_preset(quantize, preset)
    directory = Path(directory)
    manifest = load_manifest(directory)
    proto = onnx.load(str(directory / manifest["model_file"]))
    cfg = manifest["config"]
    if fuse_graph or chosen:  # quantized exports get the fusions too: they must run on the fp32 MatMuls
        proto, fused = fuse(proto, cfg["n_head"], cfg["n_embd"])
        fewer = fewer_ops(proto, cfg["n_embd"])
        scale = 1.0 if fewer else (cfg["n_embd"] // cfg["n_head"]) ** -0.5
        attention = fuse_attention(proto, cfg["n_layer"], cfg["n_head"], scale)
        if attention:  # the in-place cache contract of fuse_attention's graph: presents are the whole past buffers
            for spec in manifest["outputs"]:
                if spec["name"] != "logits":
                    spec["shape"][2] = "past_sequence"
            manifest["kv_cache"] = {
                "layout": "batch, n_head, past_sequence, head_dim",
                "present": IN_PLACE,
                "note": "present.i.* are the past buffers, written in place by the graph at each row's length (bind "
                        "both names to one array); each row's tokens are a prefix of its slots, marked by "
                        "attention_mask; prompts are right-padded",
            }
        manifest["optimizations"] = [*manifest.get("optimizations", []), *fused, *fewer, *attention]
    if chosen:
        name, settings = chosen
        proto, manifest["quantization"] = quantize_weights(proto, settings)
        manifest["quantization"]["preset"] = name
    save_graph(proto, directory, manifest)
    return manifest


def save_graph(proto, directory: Path, manifest: dict) -> None:
    """Write the graph and its weights next to the old ones, then swap both into place, and the manifest."""
    import onnx

    model_path = directory / manifest["model_file"]
    data_file = directory / manifest["weights_file"]
    # gptx's own temporary names (.NAME.tmp-PID): removed on failure, and by the next run after a crash
    with atomic_path(data_file) as tmp_data, atomic_path(model_path) as tmp_model:
        onnx.save_model(proto, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=tmp_data.name, size_threshold=1024)
        # re-point the model at the final data file name; both swap into place as the blocks end
        proto = onnx.load(str(tmp_model), load_external_data=False)
        for tensor in proto.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = data_file.name
        onnx.save_model(proto, str(tmp_model))
    if manifest.get("files"):  # the manifest records sizes and hashes: the rewritten files get new ones
        record_files(manifest, directory, [model_path.name, data_file.name])
    save_manifest(manifest, directory)
