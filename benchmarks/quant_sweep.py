#!/usr/bin/env python
"""Quality x speed of ONNX Runtime quantization recipes: the measurement behind `--quantize`'s presets.

    python benchmarks/quant_sweep.py --llama-src /path/to/llama.cpp     # writes docs/quantization.md / .json

Quality: each recipe quantizes the bundled `shakespeare` model's fp32 export; top-1 agreement and perplexity
ratio against that fp32 export, teacher-forced over 64 x 128 tokens of the bundled text's held-out last 10%
(`gptx.export.validate.text_agreement`). llama.cpp's q8_0 / q4_0 of the same weights are scored the same way
against llama.cpp's own f32. Speed: the same recipe on GPT-2-124M shapes (random weights), batch-1 decode
(prompt 32 + 128 new), interleaved rounds, paired ratio to the default `int4`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H
from render_docs import wrap
from report import pct

from gptx.export.optimize import PRESETS, QuantPreset
from gptx.runtime import benchmark as B
from gptx.runtime.bench_report import fmt

Q = QuantPreset


@dataclass(frozen=True)
class Lab:
    """A recipe only the sweep builds: `preset` with another MatMulNBits algorithm (hqq: half-quadratic, float zero
    points; gptq: calibrated on the bundled text; rtn: Intel Neural Compressor's round-to-nearest) and/or a
    re-scored LM head at `rescore_bits` (2, 4 or 8) instead of the layers' bits."""

    preset: QuantPreset
    algorithm: str = "blockwise"
    rescore_bits: int | None = None

    @property
    def block_size(self) -> int:
        return self.preset.block_size


GPTQ_CALIBRATION = (8, 64)  # windows x tokens of the bundled text's training part
# name -> (recipe, what it tries); BEFORE = int4 as exported before the presets (no fusions, fp32 token table);
# FP16 = a 16-bit export (`--dtype fp16`), the candidate for a 16-bit CPU mode
BEFORE, FP16 = "before", "fp16"
CANDIDATES = {
    "before (b32 sym, no fusions, fp32 table)": (BEFORE, "int4 as exported before these presets"),
    "fp16 weights": (FP16, "--dtype fp16: the 16-bit CPU mode candidate"),
    "int8": (PRESETS["int8"], "the int8 default"),
    "int8-dynamic": (PRESETS["int8-dynamic"], "int8 weights per tensor and int8 activations per call (MatMulInteger)"),
    "int4": (PRESETS["int4"], ("the int4 default: b64 asym; layer 0 as dynamic int8; the LM head 4-bit with its "
                               "64 best logits recomputed from the fp32 table")),
    "int4-weight-only": (PRESETS["int4-weight-only"], "an earlier default: LM head and layer 0 as 8-bit MatMulNBits"),
    "int4-pure (b32 sym)": (PRESETS["int4-pure"], "every matrix 4-bit, the lookup reads the 4-bit head blocks"),
    "b16 sym": (Q(4, block_size=16), "smaller blocks"),
    "b64 sym": (Q(4, block_size=64), "larger blocks"),
    "b32 sym, fp32 accumulate": (Q(4, accuracy_level=1), "accuracy_level 1: fp32 activations"),
    "b32 asym": (Q(4, symmetric=False), "zero points (the token table stays fp32: no sharing with zero points)"),
    "b16 asym": (Q(4, block_size=16, symmetric=False), "zero points, smaller blocks"),
    "HQQ b32": (Lab(Q(4, symmetric=False), "hqq"), "half-quadratic quantization (float zero points)"),
    "GPTQ b32 asym": (Lab(Q(4, symmetric=False), "gptq"), "GPTQ, 8 x 64 calibration tokens of the training text"),
    "RTN b32": (Lab(Q(4), "rtn"), "Intel Neural Compressor's round-to-nearest"),
    "b32 sym, head 8-bit": (Q(4, head_bits=8), "tied embedding / LM head at 8 bits (llama.cpp's q4_0 does too)"),
    "b32 asym, head 8-bit": (Q(4, symmetric=False, head_bits=8), ""),
    "b16 asym, head 8-bit": (Q(4, block_size=16, symmetric=False, head_bits=8), ""),
    "HQQ b32, head 8-bit": (Lab(Q(4, symmetric=False, head_bits=8), "hqq"), ""),
    "b32 sym, head + layer 0 8-bit": (Q(4, head_bits=8, wide_layers=1), ""),
    "b64 asym, head + layer 0 8-bit": (Q(4, block_size=64, symmetric=False, head_bits=8, wide_layers=1), ""),
    "b32 asym, head + layers 0-1 8-bit": (Q(4, symmetric=False, head_bits=8, wide_layers=2), ""),
    "int4 with the head 8-bit": (Q(4, block_size=64, symmetric=False, head_bits=8, wide_layers=1,
                                   wide_method="dynamic"),
                                 "the LM head as dynamic int8 instead of 4-bit + exact top-64"),
    "int4 with exact top-16": (Q(4, block_size=64, symmetric=False, head_bits=8, wide_layers=1,
                                 wide_method="dynamic", head_rescore=16), "16 best logits recomputed instead of 64"),
    "int4, head 2-bit, exact top-64": (Lab(PRESETS["int4"], rescore_bits=2),
                                       "the re-scored head at 2 bits: 10 MB less a token; the tail logits stay 2-bit"),
    "int4, head 2-bit, exact top-256": (Lab(replace(PRESETS["int4"], head_rescore=256), rescore_bits=2), ""),
    "int4, layers b128": (replace(PRESETS["int4"], block_size=128), "larger blocks: fewer scales to read and apply"),
    "int4, layers b256": (replace(PRESETS["int4"], block_size=256), ""),
    "int4, layers b128 sym": (replace(PRESETS["int4"], block_size=128, symmetric=True), ""),
    "int4, layers b128, layers 0-1 dynamic": (replace(PRESETS["int4"], block_size=128, wide_layers=2), ""),
    "int4, layers b256, layers 0-1 dynamic": (replace(PRESETS["int4"], block_size=256, wide_layers=2), ""),
}
QUALITY_WINDOWS = (64, 128)


class Calibration:
    """GPTQ's calibration inputs: prefill calls (empty past) on windows of the bundled text's training part."""

    def __init__(self, manifest: dict, graph_inputs: list[str]):
        from gptx.runtime import io_names as io
        from gptx.runtime.tokenizer import Tokenizer

        windows, length = GPTQ_CALIBRATION
        cfg = manifest["config"]
        length = min(length, cfg["block_size"])
        ids = H.sample_windows(Tokenizer(), windows, length, held_out=False)
        empty = np.zeros((1, cfg["n_head"], 0, cfg["n_embd"] // cfg["n_head"]), np.float32)
        feeds = [{io.INPUT_IDS: row[None], io.ATTENTION_MASK: np.ones((1, length), np.int64),
                  io.POSITION_IDS: np.arange(length, dtype=np.int64)[None],
                  getattr(io, "LOGITS_INDEX", None): np.array([[length - 1]], np.int64),  # where the graph has it
                  **dict.fromkeys(io.past_names(cfg["n_layer"]), empty)} for row in ids]
        self.feeds = [{k: v for k, v in f.items() if k in graph_inputs} for f in feeds]

    def __iter__(self):
        return iter(self.feeds)

    def get_next(self):  # the CalibrationDataReader protocol, for tools that call it directly
        return self.feeds.pop(0) if self.feeds else None


def lab_quantize(proto, recipe: Lab, manifest: dict):
    """quantize_weights for a Lab recipe, from optimize.py's own steps: (model, the manifest's quantization)."""
    from onnx import helper
    from onnxruntime.quantization import matmul_nbits_quantizer as q

    from gptx.export import optimize as O

    p = recipe.preset
    configs = {"blockwise": lambda: None, "rtn": q.RTNWeightOnlyQuantConfig,
               "hqq": lambda: q.HQQWeightOnlyQuantConfig(block_size=p.block_size, bits=p.bits),
               "gptq": lambda: q.GPTQWeightOnlyQuantConfig(calibration_data_reader=Calibration(
                   manifest, [i.name for i in proto.graph.input]), block_size=128)}
    lm_head, wide = O.wide_matmuls(proto, p)
    lm_head_bits = (recipe.rescore_bits or p.bits) if p.head_rescore else (p.head_bits or p.bits)
    apart = [lm_head] if p.head_rescore and lm_head_bits != p.bits else []  # the re-scored head in its own pass
    model = proto
    if wide and p.wide_method == "dynamic":
        model, wide = O.dynamic_int8(proto, wide), []
    model = O.matmul_nbits(model, p, wide + apart, configs[recipe.algorithm]())
    if wide:
        model = O.matmul_nbits(model, Q(p.head_bits or p.bits, accuracy_level=p.accuracy_level), apart)
    if apart:
        model = O.matmul_nbits(model, replace(p, bits=lm_head_bits))
    for node in model.graph.node:  # HQQ / GPTQ / RTN do not write the accuracy level
        if node.op_type == "MatMulNBits" and p.accuracy_level:
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, helper.make_attribute("accuracy_level", p.accuracy_level)])
    model, info = O.weight_only_info(model, p, lm_head, lm_head_bits)
    info["method"] = info["method"].replace("blockwise", recipe.algorithm, 1)
    return model, {**info, "preset": "custom"}


def make_export(fp32_dir: Path, out: Path, recipe, source: str) -> dict:
    """A copy of the fp32 export quantized with `recipe` (a QuantPreset or a Lab recipe), the pre-preset int4
    pipeline, or an fp16 export."""
    import onnx

    from gptx.export.convert import export
    from gptx.export.optimize import optimize_export, quantize_weights, save_graph
    from gptx.runtime.manifest import load_manifest

    shutil.rmtree(out, ignore_errors=True)
    if recipe == FP16:
        return export(source, out, dtype="fp16", force=True, progress=False, validate=False)
    shutil.copytree(fp32_dir, out)
    if isinstance(recipe, QuantPreset):
        return optimize_export(out, preset=recipe)
    if isinstance(recipe, Lab):
        optimize_export(out)  # the fusions, as for every preset
    manifest = load_manifest(out)
    proto = onnx.load(str(out / manifest["model_file"]))
    if recipe == BEFORE:
        proto, manifest["quantization"] = quantize_weights(proto, Q(4, embedding="fp32"))
    else:
        proto, manifest["quantization"] = lab_quantize(proto, recipe, manifest)
    save_graph(proto, out, manifest)
    return manifest


def quality(work: Path, names, llama: H.LlamaCpp | None) -> tuple[dict, int]:
    """(name -> agreement with the fp32 export, the sample model's n_embd)."""
    from gptx.export.validate import text_agreement
    from gptx.runtime.backends import create_backend
    from gptx.runtime.manifest import load_manifest
    from gptx.runtime.tokenizer import Tokenizer

    fp32 = work / "shakespeare-fp32"
    H.export_variant("shakespeare", fp32)
    manifest = load_manifest(fp32)
    ref = create_backend("onnxruntime", manifest, fp32)
    windows = H.sample_windows(Tokenizer(), *QUALITY_WINDOWS)
    out = {}
    for name in names:
        d = work / f"shakespeare-{slug(name)}"
        make_export(fp32, d, CANDIDATES[name][0], "shakespeare")
        out[name] = text_agreement(ref, create_backend("onnxruntime", load_manifest(d), d), windows, H.VOCAB)
        H.log(f"quality {name}: top-1 {out[name]['top1_agreement']:.4f}, ppl ratio {out[name]['perplexity_ratio']:.4f}")
    if llama is not None:
        from gptx.model.weights import load_any

        H.hf_directory(load_any("shakespeare").float().eval(), work / "hf-shakespeare")
        gguf = llama.gguf_files(work / "hf-shakespeare", work / "gguf-shakespeare", types=("f32", "q8_0", "q4_0"))
        for t, agreement in H.llama_agreement(llama, gguf, windows).items():
            out[f"llama.cpp {t} (vs llama.cpp f32)"] = agreement
    return out, manifest["config"]["n_embd"]


def speed(work: Path, names, rounds: int) -> dict:
    fp32 = work / "gpt2-fp32"
    H.export_variant("random:gpt2", fp32)
    engines, dirs = [], {}
    for name in names:
        dirs[name] = d = work / f"gpt2-{slug(name)}"
        make_export(fp32, d, CANDIDATES[name][0], "random:gpt2")
    for name, d in dirs.items():  # each in its own process, like compare_peers.py
        engines.append(H.Remote(name, "gptx", "?", ("GptxEngine", (name, d, "?"), {}), B.usable_cores()))
    prompts = B.synthetic_prompts(1, 32, H.VOCAB)
    try:
        got = H.interleaved(engines, H.decode_task(prompts, 128), rounds, warmup=1)
    finally:
        for e in engines:
            e.close()
    base = got.raw["int4"]
    return {"others_cpu": got.others_cpu, "results": {
        e.label: {"rate": H.median_rate(got.raw[e.label]), "vs_int4": H.paired_ratio(got.raw[e.label], base),
                  "mb_per_token": e.weight_bytes_per_token / 1e6,
                  "file_mb": sum(f.stat().st_size for f in dirs[e.label].glob("*.onnx*")) / 1e6}
        for e in engines}}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def render_markdown(res: dict) -> str:
    """The whole of docs/quantization.md (render_docs block "quantization") from the sweep's results."""
    q, s = res["quality"], res.get("speed", {}).get("results", {})
    L = ["# Quantization: quality x speed\n",
         "Generated by `benchmarks/quant_sweep.py` (raw numbers in `docs/quantization.json`); do not edit by hand.\n",
         f"- **Run:** {res['started']}, {res['machine']['cpu']}, {res['machine']['cores']} cores; load average "
         f"{', '.join(f'{x:.2f}' for x in res['loadavg'])}; other processes' CPU share per speed round: "
         + ", ".join(pct(x) for x in res.get("speed", {}).get("others_cpu", []))
         + f"; GLIBC_TUNABLES={res['machine'].get('glibc_tunables') or '(unset)'}",
         (f"- **Quality:** the bundled `shakespeare` model; top-1 agreement and perplexity ratio against its fp32 "
          f"export, teacher-forced over {QUALITY_WINDOWS[0]} x {QUALITY_WINDOWS[1]} tokens of the held-out last 10% "
          "of the bundled text. Target: top-1 >= 97%, perplexity ratio <= 1.01. That model is 4 layers of width 64 "
          "(MLP down: 256), so blocks of 64 or more are one block per column of most of its matrices: the quality "
          "of b128 / b256 and of 'layers 0-1' (half its layers) does not carry over to GPT-2's 768- and 3072-wide "
          "matrices in 12 layers, which no real checkpoint here can measure (the Hub is unreachable); their speed "
          "is measured on GPT-2's shapes."),
         ("- **Speed:** the same recipe on GPT-2-124M shapes (random weights), batch-1 greedy decode, prompt 32 + 128 "
          f"new, {res['rounds']} interleaved rounds; 'vs int4' is the median of per-round ratios to the default."),
         ("- **Method names:** blockwise = onnxruntime's default MatMulNBits quantizer (per-block min/max, round to "
          "nearest); sym = no zero points; head 8-bit = the tied embedding / LM head at 8 bits (the token lookup, a "
          "GatherBlockQuantized, reads a copy of the head's blocks unless they have zero points, in which case the "
          "fp32 table stays); layer 0 8-bit = the first block's four matrices too; dynamic int8 = onnxruntime's "
          "quantize_dynamic (int8 weights per tensor, activations quantized to int8 on every call, MatMulInteger), "
          "for every matrix (int8-dynamic) or only layer 0 (int4; its LM head too in 'int4 with the head 8-bit'); "
          "exact top-K = the 4-bit LM head's K best logits recomputed from the fp32 token table (rescore_head)."),
         f"- **Reproduce:** `{res['command']}`\n",
         "| recipe | top-1 | perplexity ratio | decode tok/s | vs int4 | MB read / token | weights MB | note |",
         "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in q.items():
        sp = s.get(name, {})
        note = CANDIDATES[name][1] if name in CANDIDATES else "the same weights in GGUF, llama.cpp's own quantizer"
        L.append(f"| {name} | {pct(r['top1_agreement'], '.2f')} | {fmt(r['perplexity_ratio'], '.4f')} | "
                 f"{fmt(sp.get('rate'))} | {fmt(sp.get('vs_int4'), '.2f', '×')} | "
                 f"{fmt(sp.get('mb_per_token'), '.0f')} | "
                 f"{fmt(sp.get('file_mb'), '.0f')} | {note} |")
    L += ["", "## Findings (computed from the table)\n", *[f"- {n}" for n in findings(res)]]
    L += [*[f"- {n}" for n in res.get("notes", [])]]
    return "\n".join(L) + "\n"


def findings(res: dict) -> list[str]:
    q, s = res["quality"], res.get("speed", {}).get("results", {})
    width = res.get("quality_model_width")
    # blocks longer than the sample's rows are capped at its width there, so their quality says nothing of GPT-2's
    unmeasured = {n for n in q if n in CANDIDATES and isinstance(CANDIDATES[n][0], (QuantPreset, Lab))
                  and width and CANDIDATES[n][0].block_size > width}
    ok = [n for n, r in q.items() if n in CANDIDATES and CANDIDATES[n][0] != FP16 and n not in unmeasured
          and r["top1_agreement"] >= 0.97 and r["perplexity_ratio"] <= 1.01]
    out = [f"Recipes meeting top-1 >= 97% and perplexity ratio <= 1.01: {', '.join(ok) or 'none'}."]
    timed = [n for n in ok if s.get(n, {}).get("vs_int4")]
    if timed:
        best = max(timed, key=lambda n: s[n]["vs_int4"])
        out.append(f"Fastest of them: {best} ({s[best]['vs_int4']:.2f}x the default's decode rate).")
    if unmeasured:
        named = sorted(unmeasured, key=lambda n: -(s.get(n, {}).get("vs_int4") or 0))
        out.append(f"Blocks longer than the sample model's width ({width}), so quality unmeasured for GPT-2 and not "
                   "offered: " + ", ".join(f"{n} ({s[n]['vs_int4']:.2f}x)" if s.get(n, {}).get("vs_int4") else n
                                           for n in named) + ".")
    tail = [n for n, r in q.items() if n in CANDIDATES and r["top1_agreement"] >= 0.97 and r["perplexity_ratio"] > 1.01]
    if tail:
        low_head = any(isinstance(CANDIDATES[n][0], Lab) and CANDIDATES[n][0].rescore_bits for n in tail)
        why = (" (a low-bit head's re-score makes its K best logits exact, but perplexity also reads the true "
               "token's logit where it falls outside them, and there the head's error stays)") if low_head else ""
        out.append(f"Top-1 met, perplexity ratio above 1.01: {', '.join(tail)}{why}.")
    slow = [n for n, r in s.items() if r.get("vs_int4") and r["vs_int4"] < 0.5]
    causes = {"fp16": "an fp16 MatMul runs no faster than fp32 here, as this CPU has no AVX512-FP16",
              "HQQ": "HQQ's float zero points leave MatMulNBits's int8 fast path"}
    if slow:
        known = [text for key, text in causes.items() if any(key in n for n in slow)]
        out.append(f"Less than half the default's speed: {', '.join(slow)}"
                   + (f" ({'; '.join(known)})" if known else "")
                   + ".")
    llama = [n for n in q if n.startswith("llama.cpp q4_0")]
    if llama and "int4" in q:
        out.append(f"Same weights, same text: gptx int4 top-1 {q['int4']['top1_agreement']:.2%} vs "
                   f"{llama[0]} {q[llama[0]]['top1_agreement']:.2%}.")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--only", default="", help="semicolon-separated recipe names (default: all; names hold commas)")
    p.add_argument("--no-speed", action="store_true", help="quality only")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--llama-src", type=Path, default=None, help="llama.cpp source tree, for its q4_0 / q8_0 rows")
    p.add_argument("--llama-bin", type=Path, default=None)
    p.add_argument("--md", type=Path, default=H.ROOT / "docs" / "quantization.md")
    p.add_argument("--json", type=Path, default=H.ROOT / "docs" / "quantization.json")
    a = p.parse_args(argv)
    names = [n.strip() for n in a.only.split(";") if n.strip()] or list(CANDIDATES)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        p.error(f"unknown recipes {unknown}; known: {', '.join(CANDIDATES)}")
    if "int4" not in names:
        names.insert(0, "int4")  # the speed baseline
    llama = H.LlamaCpp(a.llama_src, a.llama_bin) if a.llama_src else None
    res = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": B.machine_info(), "rounds": a.rounds,
           "command": "python benchmarks/quant_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "notes": []}
    with H.scratch_dir(a.workdir) as work:
        res["quality"], res["quality_model_width"] = quality(work, names, llama)
        if not a.no_speed:
            res["speed"] = speed(work, names, a.rounds)
    res["loadavg"] = list(os.getloadavg())
    a.json.write_text(json.dumps(res, indent=2, default=str) + "\n")
    a.md.write_text(wrap("quantization", render_markdown(res)))
    H.log(f"wrote {a.md} and {a.json}")
    return 0


if __name__ == "__main__":
    from gptx import launcher

    launcher.reexec_with_huge_pages()  # measured as under the `gptx` command (gptx/launcher.py)
    raise SystemExit(main())
