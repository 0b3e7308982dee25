#!/usr/bin/env python
"""gptx against its peers, in one run on one machine, on one set of GPT-2-124M-shaped random weights.

    python benchmarks/compare_peers.py --llama-src /path/to/llama.cpp      # full run, writes docs/benchmarks.*
    python benchmarks/compare_peers.py --quick                            # smoke run (2 rounds, short generations)

Engines (batch 1, greedy): Hugging Face transformers (SDPA and eager attention), the gptx torch backend, gptx
ONNX Runtime fp32 / int8 / int8-dynamic / int4 (the `--quantize` schemes) and int4-weight-only (a preset),
CTranslate2 fp32 / int8 and llama.cpp f32 / f16 / q8_0 / q4_0 with flash attention off and on, each when
installed. Measured: decode (prompt 32 + 128 new), prefill of a 512-token prompt, batch 8 vs 1, first vs last
100 tokens of 512 + 512, peak RSS and load time (each engine alone in a fresh process), top-1 agreement and
perplexity against each engine's own full-precision model, the machine's memory-read bandwidth (so every decode
rate gets a memory-bound share), and a per-op profile. Like the `gptx` command, the script re-executes itself
with glibc's huge-page tunable (gptx/launcher.py), so every engine's process runs with it (GPTX_HUGE_PAGES=0: without).

Layout: harness.py measures, judge.py holds the targets, report.py writes the markdown and the plot; this file
only decides what to run, in which order, and which numbers the targets read.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H
import judge
import report

from gptx.runtime import benchmark as B
from gptx.runtime.kv_cache import window_for

GPTX_MODES = {"gptx ORT fp32": ("fp32", None), "gptx ORT int8": ("8-bit", "int8"),
              "gptx ORT int8-dynamic": ("8-bit", "int8-dynamic"), "gptx ORT int4": ("4-bit", "int4"),
              "gptx ORT int4-weight-only": ("4-bit", "int4-weight-only")}
LLAMA_MODES = {"f32": "fp32", "f16": "16-bit", "q8_0": "8-bit", "q4_0": "4-bit"}
QUALITY_WINDOWS = {"shakespeare": (64, 128), "random": (8, 128)}  # windows x tokens of the held-out text


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (medians and paired ratios)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="batch size compared with batch 1")
    p.add_argument("--long-prompt", type=int, default=512)
    p.add_argument("--long-new", type=int, default=512)
    p.add_argument("--quick", action="store_true", help="2 rounds, 32 new tokens, 128 + 256 long context, 128 prefill")
    p.add_argument("--seed", type=int, default=0, help="seed of the random:gpt2 weights")
    p.add_argument("--workdir", type=Path, default=None, help="keep weights and exports here (default: a temp dir)")
    p.add_argument("--reuse", action="store_true", help="reuse weights / exports / GGUF files already in --workdir")
    p.add_argument("--skip", default="", help="comma-separated substrings of engine labels to leave out")
    p.add_argument("--llama-src", type=Path, default=None,
                   help="llama.cpp source tree (its convert_hf_to_gguf.py and gguf-py/); without it no llama.cpp")
    p.add_argument("--llama-bin", type=Path, default=None,
                   help="a llama.cpp build's library folder (sets LLAMA_CPP_LIB_PATH for the llama_cpp binding)")
    p.add_argument("--md", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "benchmarks.json")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "benchmarks.png")
    p.add_argument("--preliminary", default="", help="a banner for the markdown (e.g. why the numbers are noisy)")
    p.add_argument("--render-only", action="store_true", help="measure nothing: re-render --md/--plot from --json")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.new_tokens, a.long_prompt, a.long_new, a.prefill_len = 2, 32, 128, 256, 128
    if a.rounds < 1 or a.new_tokens < 2 or a.warmup < 0:
        p.error("--rounds >= 1, --new-tokens >= 2, --warmup >= 0")
    if max(a.long_prompt + a.long_new, a.prompt_len + a.new_tokens, a.prefill_len + 1) > 1024:
        p.error("prompt + new tokens must fit GPT-2's 1024-token context")
    return a


# ---------------------------------------------------------------------------------------------- setup
def prepare(a, work: Path, res: dict) -> dict:
    """Weights, exports and GGUF files; returns {'hf', 'exports', 'sh_exports', 'gguf', 'sh_gguf', 'llama'}."""
    from gptx.model.weights import load_any, random_model

    out = {"hf": work / "hf-gpt2-random", "sh_hf": work / "hf-shakespeare"}
    H.log("shared weights: random:gpt2 -> Hugging Face directory")
    res["weights"] = H.hf_directory(random_model("random:gpt2", a.seed), out["hf"])
    out["exports"], out["sh_exports"] = {}, {}
    for label, (_, quant) in GPTX_MODES.items():
        H.log(f"export {label}")
        name = quant or "fp32"
        H.export_variant(str(out["hf"]), work / f"gptx-{name}", quantize=quant, reuse=a.reuse)
        H.export_variant("shakespeare", work / f"gptx-shakespeare-{name}", quantize=quant, reuse=a.reuse)
        out["exports"][label], out["sh_exports"][label] = work / f"gptx-{name}", work / f"gptx-shakespeare-{name}"
    out["llama"], out["gguf"], out["sh_gguf"] = None, {}, {}
    if a.llama_src is None and a.llama_bin is None:
        res["notes"].append("llama.cpp not measured: pass --llama-src (and --llama-bin or pip install "
                            "llama-cpp-python); see benchmarks/README.md")
        return out
    try:
        llama = H.LlamaCpp(a.llama_src, a.llama_bin)
        H.log(f"llama.cpp {llama.version()}: GGUF conversion and quantization")
        H.hf_directory(load_any("shakespeare").float().eval(), out["sh_hf"])
        out["gguf"] = llama.gguf_files(out["hf"], work / "gguf", reuse=a.reuse)
        out["sh_gguf"] = llama.gguf_files(out["sh_hf"], work / "gguf-shakespeare", types=("f32", "q8_0", "q4_0"),
                                          reuse=a.reuse)
        out["llama"] = llama
        res["settings"]["llama_cpp"] = llama.version()
    except (ImportError, OSError, RuntimeError, FileNotFoundError) as e:
        res["notes"].append(f"llama.cpp not measured: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return out


def load_engines(a, files: dict, res: dict) -> list[H.Engine]:
    """Every engine of the decode table, in its row order, each in a worker process of its own (H.Remote);
    an optional peer that fails to load becomes a 'not available' row, one of ours stops the run."""
    skip = [s.strip() for s in a.skip.split(",") if s.strip()]
    engines = []

    def add(label, family, mode, cls, *args, **kwargs):
        res["engines"][label] = {"family": family, "mode": mode}
        if any(s in label for s in skip):
            res["engines"][label].update(status="skipped", note="--skip")
            return
        try:
            engine = H.Remote(label, family, mode, (cls, (label, *args), kwargs), B.usable_cores())
        except RuntimeError as e:
            if family.startswith("gptx"):
                raise  # ours failing is a bug
            res["engines"][label].update(status="not available", note=str(e)[:300])
            H.log(f"  {label}: not available ({e})")
            return
        res["engines"][label]["status"] = "ok"
        if engine.weight_bytes_per_token:  # weights read in full + the KV cache at the mean decode context
            res["engines"][label]["bytes_per_token"] = (engine.weight_bytes_per_token + engine.kv_bytes_per_slot
                                                        * (a.prompt_len + a.new_tokens / 2))
        engines.append(engine)

    hf = files["hf"]
    add("transformers (sdpa)", "transformers", "fp32", "HFEngine", hf, "sdpa")
    add("transformers (eager attn)", "transformers", "fp32", "HFEngine", hf, "eager")
    add("gptx torch", "gptx torch", "fp32", "GptxEngine", files["exports"]["gptx ORT fp32"], "fp32", "torch")
    for label, (mode, _) in GPTX_MODES.items():
        add(label, "gptx", mode, "GptxEngine", files["exports"][label], mode)
    ct2_dir = files["hf"].parent / "ct2-fp32"
    try:
        import ctranslate2.converters

        if not (ct2_dir / "model.bin").is_file():
            with contextlib.redirect_stdout(sys.stderr):
                ctranslate2.converters.TransformersConverter(str(hf)).convert(str(ct2_dir), force=True)
        add("CTranslate2 fp32", "CTranslate2", "fp32", "CT2Engine", ct2_dir, "float32", "fp32")
        add("CTranslate2 int8", "CTranslate2", "8-bit", "CT2Engine", ct2_dir, "int8", "8-bit")
    except ImportError:
        for label, mode in (("CTranslate2 fp32", "fp32"), ("CTranslate2 int8", "8-bit")):
            res["engines"][label] = {"family": "CTranslate2", "mode": mode, "status": "not available",
                                     "note": "pip install ctranslate2"}
    for ftype, path in files["gguf"].items():
        for fa in (False, True):
            label = f"llama.cpp {ftype}" + (" +FA" if fa else "")
            add(label, "llama.cpp", LLAMA_MODES[ftype], "LlamaCppEngine", path, LLAMA_MODES[ftype], files["llama"], fa)
    return engines


# ---------------------------------------------------------------------------------------------- stages
def quality(files: dict, res: dict) -> None:
    """Top-1 agreement and perplexity ratio of each mode against the same engine's full precision."""
    from gptx.export.validate import text_agreement
    from gptx.runtime.backends import create_backend
    from gptx.runtime.manifest import load_manifest
    from gptx.runtime.tokenizer import Tokenizer

    res["quality"] = {}
    for model, exports, gguf in (("shakespeare", files["sh_exports"], files["sh_gguf"]),
                                 ("random", files["exports"], files["gguf"])):
        windows = H.sample_windows(Tokenizer(), *QUALITY_WINDOWS[model])
        rows = res["quality"][model] = {}
        backend = {k: create_backend("onnxruntime", load_manifest(d), d) for k, d in exports.items()}
        for label in exports:
            if label != "gptx ORT fp32":
                H.log(f"quality ({model}): {label}")
                rows[label] = text_agreement(backend["gptx ORT fp32"], backend[label], windows, H.VOCAB)
        if gguf:
            for ftype, agreement in H.llama_agreement(files["llama"], gguf, windows).items():
                rows[f"llama.cpp {ftype}"] = agreement
        del backend
        gc.collect()


def greedy_check(engines: list[H.Engine], a, res: dict) -> None:
    """Same weights, same math: gptx ORT fp32 and llama.cpp f32 greedy tokens should be identical."""
    by = {e.label: e for e in engines}
    pair = [k for k in ("gptx ORT fp32", "llama.cpp f32") if k in by]
    if len(pair) < 2:
        return
    prompt = B.synthetic_prompts(1, a.prompt_len, H.VOCAB)[0]
    x, y = (list(by[k].greedy(prompt, a.new_tokens)) for k in pair)
    diff = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), None)
    res["greedy_check"] = {"a": pair[0], "b": pair[1], "tokens": a.new_tokens, "identical": diff is None and x == y,
                           "first_difference": diff}


def memory_probes(files: dict, res: dict) -> None:
    """Load time and peak RSS of each gptx and llama.cpp mode, alone in a fresh process."""
    specs = {label: {"kind": "gptx", "dir": str(d)} for label, d in files["exports"].items()}
    for ftype, path in files["gguf"].items():
        specs[f"llama.cpp {ftype}"] = {"kind": "llama.cpp", "gguf": str(path), "flash_attn": False,
                                      "n_ctx": 640}  # the probe runs 32 + 128, then 512
    for label, spec in specs.items():
        if res["engines"].get(label, {}).get("status") != "ok":
            continue
        H.log(f"memory probe: {label}")
        out = H.probe(spec)
        entry = res["engines"][label]
        if "error" in out:
            entry["probe_error"] = out["error"]
            continue
        entry.update(out)
        path = Path(spec.get("gguf") or spec["dir"])
        entry["file_mb"] = (path.stat().st_size if path.is_file() else
                            sum(f.stat().st_size for f in path.glob("*.onnx*"))) / 1e6


def decode_rounds(engines, a, res: dict) -> None:
    prompts = B.synthetic_prompts(1, a.prompt_len, H.VOCAB)
    H.log(f"decode: batch 1, prompt {a.prompt_len} + {a.new_tokens}, {len(engines)} engines, {a.rounds} rounds")
    rounds = H.interleaved(engines, H.decode_task(prompts, a.new_tokens), a.rounds, a.warmup,
                           probe=lambda: H.read_bandwidth_gbs(B.usable_cores(), repeats=3))
    res["bandwidth_per_round"] = [b["gb_per_s"] for b in rounds.probes]
    results = {}
    for e in engines:
        raw = rounds.raw[e.label]
        r = B.summarize_runs(raw, 1, a.prompt_len, a.new_tokens, a.warmup)
        r["rate"] = r["decode_tokens_per_s"]
        r["per_round"] = [H._rate(x) for x in raw]
        results[e.label] = r
    hf = [k for k in ("transformers (sdpa)", "transformers (eager attn)") if k in results]
    hf_ref = max(hf, key=lambda k: results[k]["rate"]) if hf else None
    pairs = {}
    for e in engines:
        if hf_ref:
            pairs[f"{e.label}/transformers"] = H.paired_ratio(rounds.raw[e.label], rounds.raw[hf_ref])
        for other in engines:
            if e.family == "gptx" and other.family in ("llama.cpp", "gptx torch"):
                pairs[f"{e.label}/{other.label}"] = H.paired_ratio(rounds.raw[e.label], rounds.raw[other.label])
    res["decode"] = {"results": results, "pairs": pairs, "transformers_reference": hf_ref,
                     "others_cpu": rounds.others_cpu, "loadavg": rounds.loadavg}


def prefill_rounds(engines, a, res: dict) -> None:
    chosen = [e for e in engines if e.family in ("gptx", "llama.cpp")]
    prompt = B.synthetic_prompts(1, a.prefill_len, H.VOCAB)[0]
    H.log(f"prefill: one {a.prefill_len}-token prompt, {len(chosen)} engines, {a.rounds} rounds")
    rounds = H.interleaved(chosen, H.prefill_task(prompt), a.rounds, a.warmup)
    results = {}
    for e in chosen:
        raw = rounds.raw[e.label]
        rate = H.median_rate(raw)
        results[e.label] = {"rate": rate, "ms": a.prefill_len / rate * 1e3 if rate else None,
                            "per_round": [x["rate"] for x in raw]}
    pairs = {f"{g.label}/{o.label}": H.paired_ratio(rounds.raw[g.label], rounds.raw[o.label])
             for g in chosen if g.family == "gptx" for o in chosen if o.family == "llama.cpp"}
    res["prefill"] = {"prompt_len": a.prefill_len, "results": results, "pairs": pairs,
                      "others_cpu": rounds.others_cpu}


def scaling(engines, a, res: dict) -> None:
    by = {e.label: e for e in engines}
    if "gptx ORT fp32" in by:
        e = by["gptx ORT fp32"]
        H.log(f"batch {a.batch} vs 1 ({e.label})")
        b1 = B.synthetic_prompts(1, a.prompt_len, H.VOCAB)
        bn = B.synthetic_prompts(a.batch, a.prompt_len, H.VOCAB)
        runs = {1: [], a.batch: []}
        for _ in range(a.warmup):
            e.run(b1, a.new_tokens), e.run(bn, a.new_tokens)
        for _ in range(a.rounds):  # paired by round, like the engines
            runs[1].append(H.decode_task(b1, a.new_tokens)(e))
            runs[a.batch].append(H.decode_task(bn, a.new_tokens)(e))
        summary = {b: B.summarize_runs(r, b, a.prompt_len, a.new_tokens, a.warmup) for b, r in runs.items()}
        res["batch"] = {"engine": e.label, "batch": a.batch, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                        "b1": summary[1], "bn": summary[a.batch], "ratio": H.paired_ratio(runs[a.batch], runs[1])}
    long_engines = [by[k] for k in ("gptx ORT fp32", "gptx ORT int4") if k in by]
    if long_engines:
        H.log(f"long context: prompt {a.long_prompt} + {a.long_new} ({', '.join(e.label for e in long_engines)})")
        prompts = B.synthetic_prompts(1, a.long_prompt, H.VOCAB)
        rounds = H.interleaved(long_engines, H.decode_task(prompts, a.long_new), max(1, a.rounds // 2),
                               min(a.warmup, 1))
        res["long"] = {e.label: B.summarize_runs(rounds.raw[e.label], 1, a.long_prompt, a.long_new)
                       for e in long_engines}


def profiles(files: dict, a, res: dict, work: Path) -> None:
    res["profiles"] = {}
    for label in ("gptx ORT int4", "gptx ORT fp32"):
        if res["engines"].get(label, {}).get("status") != "ok":
            continue
        H.log(f"ORT profile: {label}")
        try:
            # past = the runtime's window bucket holding the mean decode context
            past = window_for(a.prompt_len + a.new_tokens // 2, 1024)
            p = H.ort_op_profile(files["exports"][label], past, workdir=work)
        except Exception as e:  # noqa: BLE001  a profile is a diagnostic: the run goes on without it
            res["profiles"][label] = {"error": f"{type(e).__name__}: {e}"[:300]}
            traceback.print_exc()
            continue
        loop = res["decode"]["results"].get(label, {}).get("latency_ms", {}).get("p50")
        p["loop_ms"] = loop
        res["profiles"][label] = p


# ---------------------------------------------------------------------------------------------- metrics
def add_bounds(res: dict) -> None:
    """Memory-bound tok/s (measured bandwidth / bytes read per token) and each engine's share of it."""
    bw = res["bandwidth"]["gb_per_s"] * 1e9
    for label, r in res.get("decode", {}).get("results", {}).items():
        per_token = res["engines"][label].get("bytes_per_token")
        if per_token:
            r["bytes_per_token"], r["bound_rate"] = per_token, bw / per_token
            r["bound_share"] = r["rate"] / r["bound_rate"] if r["rate"] else None


def metrics(res: dict) -> dict:
    """The flat numbers the targets read (judge.TARGETS names them)."""
    m = {}
    dec, pre, eng = res.get("decode", {}), res.get("prefill", {}), res["engines"]
    for label in GPTX_MODES:
        m[f"decode_ratio:{label}/transformers"] = dec.get("pairs", {}).get(f"{label}/transformers")
        m[f"bound_share:{label}"] = dec.get("results", {}).get(label, {}).get("bound_share")
        for model, rows in res.get("quality", {}).items():
            q = rows.get(label, {})
            m[f"top1:{model}:{label}"] = q.get("top1_agreement")
            m[f"ppl_ratio:{model}:{label}"] = q.get("perplexity_ratio")
        if (res.get("long") or {}).get(label):
            m[f"drift:{label}"] = res["long"][label]["last100_over_first100"]
    m["decode_ratio:gptx ORT fp32/gptx torch"] = dec.get("pairs", {}).get("gptx ORT fp32/gptx torch")
    m["batch_ratio:gptx ORT fp32"] = (res.get("batch") or {}).get("ratio")
    for label, (mode, _) in GPTX_MODES.items():
        ftype = next(f for f, md in LLAMA_MODES.items() if md == mode)
        best_dec = report.best_of(res, "llama.cpp", mode)
        best_pre = report.best_of(res, "llama.cpp", mode, "prefill")
        m[f"decode_ratio:{label}/llama.cpp {ftype}"] = dec.get("pairs", {}).get(f"{label}/{best_dec}")
        m[f"prefill_ratio:{label}/llama.cpp {ftype}"] = pre.get("pairs", {}).get(f"{label}/{best_pre}")
        rss = eng.get(label, {}).get("peak_rss_mib"), eng.get(f"llama.cpp {ftype}", {}).get("peak_rss_mib")
        m[f"rss_ratio:{label}/llama.cpp {ftype}"] = rss[0] / rss[1] if all(rss) else None
    return m


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    a = parse_args(argv)
    if a.render_only:
        res = json.loads(a.json.read_text())
        report.write_markdown(res, a.md, a.json)
        with contextlib.suppress(ImportError):  # matplotlib is optional for re-rendering
            report.write_plot(res, a.plot)
        print(a.md.read_text())
        return 0
    import torch

    threads = B.usable_cores()
    torch.set_num_threads(threads)
    started = time.time()
    argv_text = " ".join(shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))
    res = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
           "command": f"python benchmarks/compare_peers.py {argv_text}".strip(),
           "preliminary": a.preliminary, "loadavg_start": list(os.getloadavg()), "notes": [], "engines": {},
           "settings": {"rounds": a.rounds, "warmup": a.warmup, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                        "prefill_len": a.prefill_len, "batch": a.batch, "long_prompt": a.long_prompt,
                        "long_new": a.long_new, "seed": a.seed, "threads": threads, "quick": a.quick}}
    with H.scratch_dir(a.workdir) as work:
        res["bandwidth"] = H.read_bandwidth_gbs(threads)
        files = prepare(a, work, res)
        quality(files, res)
        engines = load_engines(a, files, res)
        res["machine"] = B.machine_info()
        res["machine"]["versions"].update({name: getattr(sys.modules[name], "__version__", "?")
                                           for name in ("transformers", "ctranslate2") if name in sys.modules})
        if files["llama"]:
            res["machine"]["versions"]["llama_cpp"] = files["llama"].version()
        greedy_check(engines, a, res)
        decode_rounds(engines, a, res)
        prefill_rounds(engines, a, res)
        scaling(engines, a, res)
        for e in engines:
            e.close()
        del engines
        gc.collect()
        memory_probes(files, res)
        profiles(files, a, res, work)
        again = H.read_bandwidth_gbs(threads)  # the machine's bandwidth drifts: the bound uses the highest reading
        per_round = res.get("bandwidth_per_round", [])
        res["notes"].append(f"read bandwidth, GB/s: {res['bandwidth']['gb_per_s']:.1f} at start, "
                            f"{', '.join(f'{x:.1f}' for x in per_round)} at the start of each decode round, "
                            f"{again['gb_per_s']:.1f} at end; the highest is the bound")
        if again["gb_per_s"] > res["bandwidth"]["gb_per_s"]:
            res["bandwidth"] = again
        if per_round and max(per_round) > res["bandwidth"]["gb_per_s"]:
            res["bandwidth"] = dict(res["bandwidth"], gb_per_s=max(per_round))
        add_bounds(res)
    res["loadavg_end"] = list(os.getloadavg())
    res["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    res["wall_s"] = time.time() - started
    res["metrics"] = metrics(res)
    res["targets"] = judge.judge(res["metrics"])
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=2, default=str) + "\n")
    report.write_markdown(res, a.md, a.json)
    report.write_plot(res, a.plot)
    H.log(f"wrote {a.md}, {a.json} and {a.plot}")
    return 0


if __name__ == "__main__":
    from gptx import launcher

    launcher.reexec_with_huge_pages()  # every engine's process runs as under the `gptx` command (gptx/launcher.py)
    raise SystemExit(main())
