"""A measurement probe, not product code: the one that led the `int4` preset to a 4-bit LM head whose top-K
candidates are re-scored exactly from the fp32 token table (gptx.export.optimize.rescore_head), instead of its
former 8-bit head.

An LM head at 4 bits alone costs quality (GPT-2's 768 x 50257 head, the largest matrix: ~91% top-1 against fp32
with every matrix at 4 bits). Re-scoring keeps the 4-bit head's bytes (about 24 MB a token instead of 39 MB)
while the top candidates get exact logits: TopK over the 4-bit logits, Gather their fp32 rows of the tied
embedding, one small MatMul, ScatterElements back. Greedy decoding and top-k sampling with k <= K then see exact
logits, unless the true best token falls outside the 4-bit top K.

This probe times the head alone, on random GPT-2-shaped weights, batch 1, one position:
  A: the 8-bit head as the `int4` preset ran it until 2026-12-06 (dynamic int8, MatMulInteger)
  B: a 4-bit head (MatMulNBits, blocks of 32, symmetric, int8 compute) with the exact re-score of the top K
  C: the 4-bit head alone
and reports how often each argmax equals the fp32 argmax over random hidden states (the quality that matters is
measured on the trained sample by quant_sweep.py). Figures: benchmarks/README.md.

    python benchmarks/head_rescore_probe.py --k 64 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gptx.export.convert import WTE
from gptx.export.optimize import rescore_head

VOCAB, WIDTH = 50257, 768


def head_graph(table: np.ndarray) -> onnx.ModelProto:
    """hidden [1, 1, 768] -> logits [1, 1, 50257] with the tied table as the LM head (x @ table.T)."""
    x = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, 1, WIDTH])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, VOCAB])
    w = numpy_helper.from_array(np.ascontiguousarray(table.T), "head_weight")
    graph = helper.make_graph([helper.make_node("MatMul", ["hidden", "head_weight"], ["logits"], name="lm_head")],
                              "head", [x], [y], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def four_bit(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4)
    q = MatMulNBitsQuantizer(model, algo_config=config)
    q.process()
    return q.model.model


def eight_bit_dynamic(model: onnx.ModelProto, scratch: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, out = scratch / "fp32.onnx", scratch / "dyn.onnx"
    onnx.save(model, src)
    quantize_dynamic(src, out, op_types_to_quantize=["MatMul"], per_channel=False, reduce_range=False,
                     weight_type=QuantType.QInt8)
    return onnx.load(str(out))


def rescored(model: onnx.ModelProto, table: np.ndarray, k: int) -> onnx.ModelProto:
    """The product's own re-score (rescore_head) after the 4-bit head, reading the token table as an export's."""
    model.graph.initializer.append(numpy_helper.from_array(table, WTE))
    if rescore_head(model, "logits", k) != k:
        raise SystemExit("rescore_head did not apply to the probe's graph")
    return model


def session(model: onnx.ModelProto, scratch: Path, name: str) -> ort.InferenceSession:
    path = scratch / f"{name}.onnx"
    onnx.save(model, path, save_as_external_data=True, location=f"{name}.data")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def ms_per_call(sess: ort.InferenceSession, xs: list[np.ndarray]) -> float:
    start = time.perf_counter()
    for x in xs:
        sess.run(["logits"], {"hidden": x})
    return (time.perf_counter() - start) * 1e3 / len(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=64, help="candidates re-scored exactly")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=100, help="calls per round and variant")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    table = rng.normal(0, 0.02, (VOCAB, WIDTH)).astype(np.float32)
    xs = [rng.normal(0, 1, (1, 1, WIDTH)).astype(np.float32) for _ in range(args.calls)]
    with tempfile.TemporaryDirectory(prefix="head-probe-") as tmp:
        scratch = Path(tmp)
        sessions = {
            "A 8-bit dynamic (former int4 head)": session(eight_bit_dynamic(head_graph(table), scratch), scratch, "a"),
            f"B 4-bit + exact top-{args.k}": session(rescored(four_bit(head_graph(table)), table, args.k),
                                                    scratch, "b"),
            "C 4-bit alone": session(four_bit(head_graph(table)), scratch, "c"),
        }
        exact = [int(np.argmax(x[0, 0] @ table.T)) for x in xs]
        for label, sess in sessions.items():
            agree = np.mean([int(np.argmax(sess.run(["logits"], {"hidden": x})[0])) == e for x, e in zip(xs, exact)])
            print(f"{label}: argmax equals fp32 on {agree:.1%} of {len(xs)} random hidden states")
        times = {label: [] for label in sessions}
        order = list(sessions)
        for _ in range(args.rounds):
            rng.shuffle(order)
            for label in order:
                sessions[label].run(["logits"], {"hidden": xs[0]})  # warm
                times[label].append(ms_per_call(sessions[label], xs))
        base = times[next(iter(sessions))]
        for label, ts in times.items():
            ratio = statistics.median(b / t for b, t in zip(base, ts))
            print(f"{label}: {statistics.median(ts):.3f} ms per call (rounds {min(ts):.3f}-{max(ts):.3f}), "
                  f"A / this {ratio:.2f}x")


if __name__ == "__main__":
    main()
