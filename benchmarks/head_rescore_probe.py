"""A measurement probe, not product code: could a 4-bit LM head, whose top-K candidates are re-scored exactly from
the fp32 token table, replace the `int4` preset's 8-bit head?

The `int4` preset keeps GPT-2's LM head (768 x 50257, the largest matrix) at 8 bits for quality: 4 bits everywhere
measures ~91% top-1 against fp32. Re-scoring would keep the 4-bit head's bytes (about 24 MB a token instead of
39 MB) while the top candidates get exact logits: TopK over the 4-bit logits, Gather their fp32 rows of the tied
embedding, one small MatMul, ScatterElements back. Greedy and top-k/top-p sampling then see exact logits wherever
they look, unless the true best token falls outside the 4-bit top K.

This probe times the head alone, on random GPT-2-shaped weights, batch 1, one position:
  A: the 8-bit head as the `int4` preset runs it (dynamic int8, MatMulInteger)
  B: a 4-bit head (MatMulNBits, blocks of 32, symmetric, int8 compute) with the exact re-score of the top K
  C: the 4-bit head alone
and reports how often B's argmax equals the fp32 argmax over hidden states drawn from the real model's statistics
(here: random, so agreement is a floor; the quality that matters is measured on the trained sample elsewhere).

    python benchmarks/head_rescore_probe.py --k 64 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

VOCAB, WIDTH = 50257, 768


def head_graph(table: np.ndarray) -> onnx.ModelProto:
    """hidden [1, 1, 768] -> logits [1, 1, 50257] with the tied table as the LM head (x @ table.T)."""
    x = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, 1, WIDTH])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, VOCAB])
    w = numpy_helper.from_array(np.ascontiguousarray(table.T), "head_weight")
    graph = helper.make_graph([helper.make_node("MatMul", ["hidden", "head_weight"], ["logits"], name="lm_head")],
                              "head", [x], [y], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def with_rescore(model: onnx.ModelProto, table: np.ndarray, k: int) -> onnx.ModelProto:
    """Rename the head's output to approx_logits and add: TopK -> Gather fp32 rows -> MatMul -> ScatterElements."""
    g = model.graph
    for node in g.node:
        node.output[:] = ["approx_logits" if o == "logits" else o for o in node.output]
    g.initializer.extend([numpy_helper.from_array(table, "token_table"),
                          numpy_helper.from_array(np.array([k], dtype=np.int64), "k")])
    g.node.extend([
        helper.make_node("TopK", ["approx_logits", "k"], ["top_values", "top_ids"], axis=-1),
        helper.make_node("Gather", ["token_table", "top_ids"], ["top_rows"], axis=0),         # [1, 1, K, 768]
        helper.make_node("Unsqueeze", ["hidden", "axis_minus_1"], ["hidden_col"]),           # [1, 1, 768, 1]
        helper.make_node("MatMul", ["top_rows", "hidden_col"], ["exact_col"]),                # [1, 1, K, 1]
        helper.make_node("Squeeze", ["exact_col", "axis_minus_1"], ["exact"]),               # [1, 1, K]
        helper.make_node("ScatterElements", ["approx_logits", "top_ids", "exact"], ["logits"], axis=-1),
    ])
    g.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "axis_minus_1"))
    return model


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
            "A 8-bit dynamic (int4 preset)": session(eight_bit_dynamic(head_graph(table), scratch), scratch, "a"),
            f"B 4-bit + exact top-{args.k}": session(with_rescore(four_bit(head_graph(table)), table, args.k),
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
