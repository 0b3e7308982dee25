"""Which ONNX graphs TensorRT's ONNX parser can take: a static check that runs anywhere (no TensorRT, no GPU).

`gptx build` runs `check_graph` first, so an unsupported graph fails in a second with a readable list instead of
minutes into a build; the tests run it on real exports where TensorRT cannot be installed.

SUPPORTED_OPS: every operator marked "Y" in onnx/onnx-tensorrt `docs/operators.md` for TensorRT 10.15 (opset 9-24;
the 10.15 GA changelog added RotaryEmbedding, RMSNormalization, TensorScatter); not the "N" ones (Sequence*,
MatMulInteger, QLinear*, DynamicQuantizeLinear, ...). If/Loop/Scan parse but are restricted, and gptx exports are
straight-line graphs. Types (same document): INT64 is native since TensorRT 10; DOUBLE is cast to FLOAT and clamped
(silently changing numerics: reported); strings, complex and unsigned 16/32/64-bit ints are not TensorRT types.
"""

from __future__ import annotations

import collections
from pathlib import Path

SOURCE = "onnx/onnx-tensorrt docs/operators.md (TensorRT 10.15, opset 9-24)"
MIN_OPSET, MAX_OPSET = 9, 24

SUPPORTED_OPS: frozenset[str] = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "Attention",
    "AveragePool", "BatchNormalization", "BlackmanWindow", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat",
    "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DeformConv", "DepthToSpace",
    "DequantizeLinear", "Div", "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten",
    "Floor", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalLpPool",
    "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample", "GroupNormalization", "GRU", "HammingWindow",
    "HannWindow", "HardSigmoid", "HardSwish", "Hardmax", "Identity", "If", "ImageScaler", "InstanceNormalization",
    "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LRN",
    "LSTM", "LpNormalization", "LpPool", "MatMul", "Max", "MaxPool", "Mean", "MeanVarianceNormalization", "Min",
    "Mish", "Mod", "Mul", "Neg", "NonMaxSuppression", "NonZero", "Not", "OneHot", "Or", "Pad", "ParametricSoftplus",
    "Pow", "PRelu", "QuantizeLinear", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
    "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence",
    "RMSNormalization", "RNN", "RoiAlign", "RotaryEmbedding", "Round", "STFT", "ScaledTanh", "Scan", "Scatter",
    "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice",
    "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh",
    "TensorScatter", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where",
    "Xor",
})

CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})
DEFAULT_DOMAINS = ("", "ai.onnx")

FLOAT64 = 11  # onnx.TensorProto enum values, numeric so this module imports without onnx
UNSUPPORTED_DTYPES = {4: "uint16", 5: "int16", 8: "string", 12: "uint32", 13: "uint64", 14: "complex64",
                      15: "complex128"}


def _walk(graph):
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _walk(attr.g)
            for sub in attr.graphs:
                yield from _walk(sub)


def _tensor_dtypes(graph):
    """(what, dtype code) of each initializer and typed input, output and value of `graph`."""
    for init in graph.initializer:
        yield f"initializer {init.name}", init.data_type
    for kind, values in (("input", graph.input), ("output", graph.output), ("value", graph.value_info)):
        for v in values:
            if v.type.HasField("tensor_type"):
                yield f"{kind} {v.name}", v.type.tensor_type.elem_type


def check_graph(onnx_path_or_model) -> list[str]:
    """Problems that would stop (or silently change) a TensorRT build of this ONNX graph; [] when none.
    Takes a path (external weights are not read) or an onnx.ModelProto."""
    model = onnx_path_or_model
    if isinstance(model, (str, Path)):
        import onnx

        if not Path(model).is_file():
            raise FileNotFoundError(f"{model} does not exist")
        model = onnx.load(str(model), load_external_data=False)  # types and op names only: no weights
    problems: list[str] = []

    for opset in model.opset_import:
        if opset.domain in DEFAULT_DOMAINS and not MIN_OPSET <= opset.version <= MAX_OPSET:
            problems.append(f"opset {opset.version} is outside the range TensorRT parses ({MIN_OPSET}-{MAX_OPSET})")

    ops = collections.Counter()  # op_type, or domain::op_type outside the standard domains
    float64: list[str] = []
    bad_types: list[str] = []
    for graph in _walk(model.graph):
        for node in graph.node:
            ops[node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}"] += 1
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT64:
                    float64.append(f"Cast to float64 ({node.name or node.output[0]})")
                if attr.HasField("t") and attr.t.data_type == FLOAT64:
                    float64.append(f"{node.op_type} constant {node.name or node.output[0]}")
        for what, code in _tensor_dtypes(graph):
            if code == FLOAT64:
                float64.append(what)
            elif code in UNSUPPORTED_DTYPES:
                bad_types.append(f"{what} is {UNSUPPORTED_DTYPES[code]}")

    ops = sorted(ops.items())
    problems += [f"operator {op} ({n}x) is not supported by TensorRT's ONNX parser" for op, n in ops
                 if "::" not in op and op not in SUPPORTED_OPS]
    problems += [f"operator {op} ({n}x) is not a standard ONNX operator (an ONNX Runtime fusion or contrib op?): "
                 f"TensorRT cannot parse it; build from an unoptimized export" for op, n in ops if "::" in op]
    problems += [f"control flow {op} ({n}x): gptx exports are straight-line graphs and TensorRT restricts {op} "
                 f"bodies; re-export with `gptx export`" for op, n in ops if op in CONTROL_FLOW_OPS]
    if float64:
        shown = ", ".join(float64[:5]) + (f", ... ({len(float64)} in all)" if len(float64) > 5 else "")
        problems.append(f"float64 tensors ({shown}): TensorRT has no float64, it would cast them to float32")
    if bad_types:
        shown = ", ".join(bad_types[:5]) + (f", ... ({len(bad_types)} in all)" if len(bad_types) > 5 else "")
        problems.append(f"tensors of types TensorRT does not have: {shown}")
    return problems
