"""Which ONNX graphs TensorRT's ONNX parser can take: a static check that runs anywhere (no TensorRT, no GPU).

`gptx build` runs `check_graph` before handing the file to TensorRT, so an unsupported graph fails in a
second with a readable list instead of minutes into a build with a parser stack trace; the tests run it on
real exports on CPU machines where TensorRT cannot be installed.

Source of SUPPORTED_OPS: onnx/onnx-tensorrt `docs/operators.md`, the "TensorRT 10.15 supports operators in
the inclusive range of opset 9 to opset 24" revision (read 2026; it matches the 10.15 GA changelog entry of
2026-02-02 that added RotaryEmbedding, RMSNormalization and TensorScatter). Every operator marked "Y" there is
listed below; the "N" ones (Sequence*, String*, Optional*, Bitwise*, ConvInteger, MatMulInteger, QLinear*,
DynamicQuantizeLinear, Unique, Det, ...) are not. Per-operator restrictions that matter for GPT-2:
  * `axes` of Squeeze/Unsqueeze/Reduce* must be constants (the TorchScript exporter writes them as constants).
  * If/Loop are parsed but restricted (Loop: no dynamic scan-output length); our export is a straight-line
    graph, so any control flow means something other than `gptx export` wrote the file: we flag it.

Data types (same document, TensorRT 10.x): FLOAT32, FLOAT16, BFLOAT16, INT32, INT64, BOOL, UINT8 (network
I/O only) and the quantized types INT8/INT4/FP8/FP4 (only through Q/DQ). INT64 is a native type since
TensorRT 10 (TensorRT 8.x cast it down to INT32, clamping; tensorrt>=10 is what `gptx[tensorrt]` installs).
DOUBLE has only "limited support": TensorRT casts it down to FLOAT and clamps, silently changing numerics,
so a float64 tensor is reported as a problem. Strings, complex and unsigned 16/32/64-bit ints are not
TensorRT types at all.
"""

from __future__ import annotations

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

# onnx.TensorProto enum values (kept numeric so this module imports without onnx)
_DTYPE_NAMES = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "string", 9: "bool",
    10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 14: "complex64", 15: "complex128", 16: "bfloat16",
    17: "float8e4m3fn", 18: "float8e4m3fnuz", 19: "float8e5m2", 20: "float8e5m2fnuz", 21: "uint4", 22: "int4",
    23: "float4e2m1",
}
FLOAT64 = 11
UNSUPPORTED_DTYPES = frozenset({4, 5, 8, 12, 13, 14, 15})  # uint16, int16, string, uint32, uint64, complex


def dtype_name(code: int) -> str:
    return _DTYPE_NAMES.get(code, f"dtype#{code}")


def _load(onnx_path_or_model):
    import onnx

    if isinstance(onnx_path_or_model, (str, Path)):
        path = Path(onnx_path_or_model)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        # types and op names only: the weights (external data) are not needed
        return onnx.load(str(path), load_external_data=False)
    return onnx_path_or_model


def _walk(graph, where: str = "graph"):
    """(graph, location) for the graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph, where
    for node in graph.node:
        for attr in node.attribute:
            if attr.g is not None and attr.HasField("g"):
                yield from _walk(attr.g, f"{where}/{node.op_type} {node.name or '?'}.{attr.name}")
            for i, sub in enumerate(attr.graphs):
                yield from _walk(sub, f"{where}/{node.op_type} {node.name or '?'}.{attr.name}[{i}]")


def _value_dtypes(graph):
    for kind, values in (("input", graph.input), ("output", graph.output), ("value", graph.value_info)):
        for v in values:
            if v.type.HasField("tensor_type"):
                yield kind, v.name, v.type.tensor_type.elem_type


def check_graph(onnx_path_or_model) -> list[str]:
    """Problems that would stop (or silently change) a TensorRT build of this ONNX graph; [] when none.

    Accepts a path (external weights are not read) or an onnx.ModelProto.
    """
    model = _load(onnx_path_or_model)
    problems: list[str] = []

    for opset in model.opset_import:
        if opset.domain in DEFAULT_DOMAINS and not MIN_OPSET <= opset.version <= MAX_OPSET:
            problems.append(f"opset {opset.version} is outside the range TensorRT parses ({MIN_OPSET}-{MAX_OPSET})")

    unsupported: dict[str, int] = {}
    foreign: dict[str, int] = {}
    control: dict[str, int] = {}
    float64: list[str] = []
    bad_types: list[str] = []
    for graph, where in _walk(model.graph):
        for node in graph.node:
            if node.domain not in DEFAULT_DOMAINS:
                key = f"{node.domain}::{node.op_type}"
                foreign[key] = foreign.get(key, 0) + 1
            elif node.op_type not in SUPPORTED_OPS:
                unsupported[node.op_type] = unsupported.get(node.op_type, 0) + 1
            if node.op_type in CONTROL_FLOW_OPS and node.domain in DEFAULT_DOMAINS:
                control[node.op_type] = control.get(node.op_type, 0) + 1
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT64:
                    float64.append(f"Cast to float64 ({node.name or node.output[0]})")
                if attr.HasField("t") and attr.t.data_type == FLOAT64:
                    float64.append(f"{node.op_type} constant {node.name or node.output[0]}")
        for init in graph.initializer:
            if init.data_type == FLOAT64:
                float64.append(f"initializer {init.name}")
            elif init.data_type in UNSUPPORTED_DTYPES:
                bad_types.append(f"initializer {init.name} is {dtype_name(init.data_type)}")
        for kind, name, code in _value_dtypes(graph):
            if code == FLOAT64:
                float64.append(f"{kind} {name}")
            elif code in UNSUPPORTED_DTYPES:
                bad_types.append(f"{kind} {name} is {dtype_name(code)}")

    for op, n in sorted(unsupported.items()):
        problems.append(f"operator {op} ({n}x) is not supported by TensorRT's ONNX parser")
    for op, n in sorted(foreign.items()):
        problems.append(f"operator {op} ({n}x) is not a standard ONNX operator (an ONNX Runtime fusion or "
                        f"contrib op?): TensorRT cannot parse it; build from an unoptimized export")
    for op, n in sorted(control.items()):
        problems.append(f"control flow {op} ({n}x): gptx exports are straight-line graphs and TensorRT restricts "
                        f"{op} bodies; re-export with `gptx export`")
    if float64:
        shown = ", ".join(float64[:5]) + (f", ... ({len(float64)} in all)" if len(float64) > 5 else "")
        problems.append(f"float64 tensors ({shown}): TensorRT has no float64, it would cast them to float32")
    if bad_types:
        shown = ", ".join(bad_types[:5]) + (f", ... ({len(bad_types)} in all)" if len(bad_types) > 5 else "")
        problems.append(f"tensors of types TensorRT does not have: {shown}")
    return problems
