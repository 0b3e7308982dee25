#!/usr/bin/env python
"""gptx against its peers, in one run on one machine, on one set of GPT-2-124M-shaped random weights.

    python benchmarks/compare_peers.py            # full run (~10-15 min on 2 CPU cores)
    python benchmarks/compare_peers.py --quick    # smoke run (1 timed run, short generations)

Engines (batch 1, prompt 32, 128 new tokens, greedy): Hugging Face transformers `generate` (eager PyTorch, KV
cache, fp32; SDPA and eager attention), the gptx torch backend, gptx ONNX Runtime fp32 / optimized / int8 / int4
(the last three when the export supports them), CTranslate2 fp32 / int8 when installed. Also batch 8 vs batch 1,
prompt 512 + 512 new tokens (first 100 vs last 100 decode-token latency), top-1 agreement of the quantized
exports, and an ONNX Runtime per-op profile of decode. Timed runs of the engines are *interleaved* (run i of
every engine, then run i + 1), so background load on a shared machine hits all engines alike; each engine's
numbers are the median over its timed runs, after warm-up.

Writes docs/benchmarks.md (everything in it comes from this run) and docs/benchmarks.json (raw results).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime import benchmark as B  # noqa: E402

TARGETS = {
    "ort_vs_torch": 1.3,
    "ort_vs_hf": 1.3,
    "quant_vs_hf": 2.0,
    "quant_top1": 0.95,
    "drift": 1.5,
    "batch_scaling": 4.0,
}


def log(msg: str) -> None:
    load = os.getloadavg()[0]
    print(f"[{time.strftime('%H:%M:%S')} load {load:.2f}] {msg}", flush=True)


def rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


# ---------------------------------------------------------------------------------------------- weights
def hf_vocab() -> dict[str, int]:
    """GPT-2's vocab.json (token spelled with GPT-2's byte map -> id), from the bundled ranks."""
    import tempfile

    from runtime.tokenizer import Tokenizer, save_hf_vocab

    with tempfile.TemporaryDirectory() as tmp:
        return json.loads((save_hf_vocab(Tokenizer(), tmp) / "vocab.json").read_text())


def build_shared_weights(hf_dir: Path, seed: int) -> dict:
    """random:gpt2 (gptx's seeded init) -> a local HF GPT2LMHeadModel directory, checked logit-for-logit."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt_export.weights import CONV1D_WEIGHTS, random_model

    gpt = random_model("random:gpt2", seed)
    cfg = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                     activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=50256, eos_token_id=50256)
    hf = GPT2LMHeadModel(cfg).eval()
    state = {k: (v.t() if k.endswith(CONV1D_WEIGHTS) else v) for k, v in gpt.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise RuntimeError(f"HF <- gptx weight mapping failed: missing {missing[:4]}, unexpected {unexpected[:4]}")
    hf_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(hf_dir)
    # a tokenizer beside the weights, for converters that read one (CTranslate2 takes its vocabulary from it)
    from runtime.tokenizer import Tokenizer, save_hf_vocab

    save_hf_vocab(Tokenizer(), hf_dir)
    with contextlib.suppress(Exception):
        from transformers import GPT2Tokenizer

        GPT2Tokenizer.from_pretrained(str(hf_dir)).save_pretrained(hf_dir)
    ids = torch.randint(0, 50000, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = float((hf(ids).logits[:, -1] - gpt(ids)[0][:, -1]).abs().max())
    return {"hf_dir": str(hf_dir), "seed": seed, "hf_vs_gptx_max_abs_logit_diff": diff}


# ---------------------------------------------------------------------------------------------- exports
def export_variant(source: str, out_dir: Path, optimize: bool, quantize: str | None, reuse: bool) -> dict:
    """Export; returns {'status': 'ok', 'dir', 'manifest'} or {'status': 'not available', 'note'}."""
    from gpt_export.export import export
    from runtime.manifest import load_manifest

    if reuse and (out_dir / "manifest.json").is_file():
        return {"status": "ok", "dir": str(out_dir), "manifest": load_manifest(out_dir), "reused": True}
    t = time.perf_counter()
    try:
        # the quantized graphs are judged below by top-1 agreement, not by the export's fp32-tight check
        manifest = export(source, out_dir, optimize=optimize, quantize=quantize, force=True,
                          validate=not (optimize or quantize), progress=False)
    except Exception as e:  # optimize.py not there yet, int4 unsupported, ...
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return {"status": "not available", "note": msg[:300]}
    return {"status": "ok", "dir": str(out_dir), "manifest": manifest, "export_s": time.perf_counter() - t}


# ---------------------------------------------------------------------------------------------- engines
class Runner:
    """One engine: `warmup()` then `run()` -> a raw run for runtime.benchmark.summarize_runs."""

    label = "?"

    def run(self, prompts: list[list[int]], new_tokens: int) -> dict:
        raise NotImplementedError

    def close(self) -> None:
        pass


class GptxRunner(Runner):
    def __init__(self, label: str, directory: str, backend: str):
        from runtime.engine import load

        self.label = label
        self.engine = load(directory, backend)
        self.vocab = self.engine.vocab_size

    def run(self, prompts, new_tokens):
        return B.one_run(self.engine.backend, prompts, new_tokens, self.vocab)


class StampProcessor:
    """A logits processor that only records when each step's logits arrive (after that step's forward)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


class HFRunner(Runner):
    def __init__(self, label: str, hf_dir: str, attn: str):
        import torch
        from transformers import GPT2LMHeadModel

        self.torch = torch
        self.label = label
        self.model = GPT2LMHeadModel.from_pretrained(hf_dir, attn_implementation=attn, dtype=torch.float32).eval()
        self.attn = self.model.config._attn_implementation

    def run(self, prompts, new_tokens):
        from transformers import LogitsProcessorList

        torch = self.torch
        ids = torch.tensor(prompts, dtype=torch.long)
        stamp = StampProcessor()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, use_cache=True, num_beams=1,
                                      pad_token_id=50256, logits_processor=LogitsProcessorList([stamp]))
        end = time.perf_counter()
        times = stamp.times
        # the first stamp follows prefill (TTFT); the selection of the last token follows the last stamp
        lat = list(np.diff(times))
        if lat:
            lat[-1] += end - times[-1]
        ttft = times[0] - t0
        return {"ttft": ttft, "prefill": ttft, "decode": float(sum(lat)), "latencies": lat,
                "tokens": [out.shape[1] - ids.shape[1]] * ids.shape[0]}


class CT2Runner(Runner):
    def __init__(self, label: str, ct2_dir: str, compute_type: str, threads: int):
        import ctranslate2  # noqa: F401  (the converter needs it; ImportError -> not available)

        self.label = label
        self.generator = ctranslate2.Generator(ct2_dir, device="cpu", compute_type=compute_type, intra_threads=threads)
        self.inv = {v: k for k, v in hf_vocab().items()}

    def run(self, prompts, new_tokens):
        tokens = [[self.inv[t] for t in p] for p in prompts]
        stamps, count = [], [0] * len(prompts)
        t0 = time.perf_counter()
        for step in self.generator.generate_tokens(tokens[0] if len(tokens) == 1 else tokens, max_length=new_tokens,
                                                   min_length=new_tokens, sampling_topk=1):
            stamps.append(time.perf_counter())
            count[getattr(step, "batch_id", 0)] += 1
        ttft = stamps[0] - t0
        lat = list(np.diff(stamps))
        return {"ttft": ttft, "prefill": ttft, "decode": float(sum(lat)), "latencies": lat, "tokens": count}


def interleaved(runners: list[Runner], prompts, new_tokens: int, runs: int, warmup: int) -> dict[str, dict]:
    """Warm every engine up, then run i of each engine in turn; returns label -> summarize_runs(...).

    `prompts`: one batch for every engine, or {label: batch}."""
    per = prompts if isinstance(prompts, dict) else {r.label: prompts for r in runners}
    raw = {r.label: [] for r in runners}
    load = {r.label: [] for r in runners}
    for r in runners:
        for _ in range(warmup):
            r.run(per[r.label], new_tokens)
    for i in range(runs):
        for r in runners:
            gc.collect()
            gc.disable()
            before = os.getloadavg()[0]
            try:
                raw[r.label].append(r.run(per[r.label], new_tokens))
            finally:
                gc.enable()
            load[r.label].append(before)
        log(f"  round {i + 1}/{runs}: " + ", ".join(
            f"{r.label} {len(per[r.label]) * (new_tokens - 1) / raw[r.label][-1]['decode']:.1f} tok/s" for r in runners
            if raw[r.label][-1]["decode"] > 0))
    out = {}
    for r in runners:
        s = B.summarize_runs(raw[r.label], len(per[r.label]), len(per[r.label][0]), new_tokens, warmup)
        s["loadavg_1min_during_runs"] = load[r.label]
        out[r.label] = s
    return out


# ---------------------------------------------------------------------------------------------- quality
def reference_cases(directory: str, reference_model, decode_steps: int, batch_sizes=(1, 3)) -> list[dict]:
    """fp32 PyTorch greedy continuations and their teacher-forced logits, computed once for every candidate.

    Same procedure as `gpt_export.validate.compare` (its prompts, greedy, run_sequence), minus the parts
    that would recompute the reference for each export."""
    from gpt_export.validate import PROMPTS, greedy, reference_backend, run_sequence
    from runtime.manifest import load_manifest
    from runtime.tokenizer import Tokenizer

    manifest = load_manifest(directory)
    tok = Tokenizer(Path(directory) / manifest["tokenizer"]["file"])
    vocab, pad = manifest["tokenizer"]["vocab_size"], manifest["tokenizer"]["eot_token"]
    ref = reference_backend(Path(directory), manifest, reference_model)
    cases = []
    for b in batch_sizes:
        prompts = [tok.encode(PROMPTS[(i + b) % len(PROMPTS)]) for i in range(b)]
        expected = greedy(ref, prompts, decode_steps, pad)
        cases.append({"prompts": prompts, "expected": expected, "logits": run_sequence(ref, prompts, expected, pad),
                      "pad": pad, "vocab": vocab})
    return cases


def top1(directory: str, cases: list[dict]) -> dict:
    """Top-1 agreement and max |logit diff| of an export against the reference cases."""
    from gpt_export.validate import greedy, run_sequence
    from runtime.backends import create_backend
    from runtime.manifest import load_manifest

    cand = create_backend("onnxruntime", load_manifest(directory), Path(directory), "cpu")
    agree, diffs, identical = [], [], True
    for c in cases:
        vocab = c["vocab"]
        got = run_sequence(cand, c["prompts"], c["expected"], c["pad"])
        for r, g in zip(c["logits"], got):
            agree.append(np.argmax(r[:, :vocab], -1) == np.argmax(g[:, :vocab], -1))
            diffs.append(float(np.max(np.abs(r[:, :vocab] - g[:, :vocab]))))
        steps = c["expected"].shape[1]
        identical &= bool(np.array_equal(c["expected"], greedy(cand, c["prompts"], steps, c["pad"])))
    flat = np.concatenate(agree)
    return {"top1_agreement": float(flat.mean()), "max_abs_diff": max(diffs), "greedy_identical": identical,
            "positions": int(flat.size)}


# ---------------------------------------------------------------------------------------------- profile
def ort_profile(directory: str, prompt_len: int, new_tokens: int, workdir: Path) -> dict:
    """Per-op time of ONNX Runtime decode (b1) + how much of each token is spent outside session.run."""
    import onnxruntime as ort

    from runtime.backends.onnxruntime_backend import session_options
    from runtime.engine import load

    engine = load(directory, "onnxruntime")
    backend = engine.backend
    opts = session_options()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(workdir / f"ort_profile_{Path(directory).name}")
    backend.session = ort.InferenceSession(str(Path(directory) / engine.manifest["model_file"]), opts,
                                           providers=["CPUExecutionProvider"])
    session_run = backend.session.run
    spent = []

    def timed_run(*a, **k):
        t = time.perf_counter()
        out = session_run(*a, **k)
        spent.append(time.perf_counter() - t)
        return out

    backend.session.run = timed_run
    prompts = B.synthetic_prompts(1, prompt_len, engine.vocab_size)
    B.one_run(backend, prompts, 8, engine.vocab_size)  # warm-up
    spent.clear()
    raw = B.one_run(backend, prompts, new_tokens, engine.vocab_size)
    decode_wall = raw["decode"]
    decode_session = float(sum(spent[1:]))  # spent[0] is prefill
    profile_file = backend.session.end_profiling()
    events = json.loads(Path(profile_file).read_text())
    by_op: dict[str, float] = {}
    total = 0.0
    runs_dur = []
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            op = ev.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + ev["dur"]
            total += ev["dur"]
        elif ev.get("cat") == "Session" and ev.get("name") == "model_run":
            runs_dur.append(ev["dur"])
    with contextlib.suppress(OSError):
        Path(profile_file).unlink()
    ops = sorted(by_op.items(), key=lambda kv: -kv[1])
    n_runs = max(1, len(runs_dur))
    return {
        "directory": directory,
        "decode_tokens": new_tokens - 1,
        "decode_ms_per_token_wall": decode_wall / max(1, new_tokens - 1) * 1e3,
        "session_run_ms_per_token": decode_session / max(1, new_tokens - 1) * 1e3,
        "outside_session_share": 1 - decode_session / decode_wall if decode_wall else None,
        "kernel_ms_per_run": total / 1e3 / n_runs,
        "top_ops": [{"op": op, "share": us / total if total else 0.0, "ms_per_run": us / 1e3 / n_runs}
                    for op, us in ops[:10]],
        "node_count": sum(1 for ev in events if ev.get("cat") == "Node") // max(1, n_runs) // 3,
    }


class OrtThreadsRunner(GptxRunner):
    """gptx ORT with other session threading settings (to show what contention does to the default pool)."""

    def __init__(self, label: str, directory: str, threads: int | None, spinning: bool):
        import onnxruntime as ort

        from runtime.backends.onnxruntime_backend import session_options

        super().__init__(label, directory, "onnxruntime")
        opts = session_options(threads)
        if not spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.engine.backend.session = ort.InferenceSession(
            str(Path(directory) / self.engine.manifest["model_file"]), opts, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------- report
def fmt(v, spec=".1f", suffix=""):
    return "—" if v is None else f"{v:{spec}}{suffix}"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**MET**" if ok else "**MISSED**")


def evaluate_targets(res: dict) -> list[dict]:
    main = res["main"]
    rate = {k: v.get("decode_tokens_per_s") for k, v in main.items() if v.get("status") == "ok"}
    hf_best_label = res.get("hf_reference")
    hf = rate.get(hf_best_label)
    torch_rate = rate.get("gptx torch")
    ort = rate.get("gptx ORT fp32")
    out = []

    def add(name, ok, measured):
        out.append({"target": name, "met": ok, "measured": measured})

    add(f"gptx ORT fp32 decode ≥ {TARGETS['ort_vs_torch']}× gptx torch backend",
        None if not (ort and torch_rate) else ort / torch_rate >= TARGETS["ort_vs_torch"],
        f"{fmt(ort)} vs {fmt(torch_rate)} tok/s = {fmt(ort / torch_rate if ort and torch_rate else None, '.2f', '×')}")
    add(f"gptx ORT fp32 decode ≥ {TARGETS['ort_vs_hf']}× transformers ({hf_best_label})",
        None if not (ort and hf) else ort / hf >= TARGETS["ort_vs_hf"],
        f"{fmt(ort)} vs {fmt(hf)} tok/s = {fmt(ort / hf if ort and hf else None, '.2f', '×')}")
    best = res.get("best_quantized")
    if best:
        q = main[best]
        agree = res["quality"].get(best, {})
        t1 = agree.get("shakespeare", {}).get("top1_agreement")
        t1_src = "shakespeare sample model"
        if t1 is None:
            t1 = agree.get("random", {}).get("top1_agreement")
            t1_src = "random weights"
        ratio = q["decode_tokens_per_s"] / hf if hf else None
        ok = None if ratio is None or t1 is None else (ratio >= TARGETS["quant_vs_hf"] and t1 >= TARGETS["quant_top1"])
        add(f"best quantized ({best}) ≥ {TARGETS['quant_vs_hf']}× transformers with top-1 ≥ {TARGETS['quant_top1']:.0%}",
            ok, f"{fmt(q['decode_tokens_per_s'])} tok/s = {fmt(ratio, '.2f', '×')} transformers; top-1 "
                f"{fmt(t1 * 100 if t1 is not None else None, '.1f', '%')} ({t1_src})")
    else:
        add(f"best quantized ≥ {TARGETS['quant_vs_hf']}× transformers with top-1 ≥ {TARGETS['quant_top1']:.0%}", False,
            "no quantized export available: " + "; ".join(
                f"{k}: {v.get('note')}" for k, v in main.items() if "int" in k and v.get("status") != "ok"))
    for label, r in res.get("long", {}).items():
        d = r.get("last100_over_first100")
        add(f"{label}, prompt {r['prompt_len']} + {r['new_tokens']} new: last-100 ≤ {TARGETS['drift']}× first-100 "
            f"decode latency", None if d is None else d <= TARGETS["drift"],
            f"{fmt(r.get('first100_ms'), '.2f')} → {fmt(r.get('last100_ms'), '.2f')} ms/token = {fmt(d, '.2f', '×')}")
    b = res.get("batch", {})
    if b.get("ratio") is not None:
        add(f"gptx ORT fp32 batch {b['batch']} decode ≥ {TARGETS['batch_scaling']}× batch 1 decode tok/s",
            b["ratio"] >= TARGETS["batch_scaling"],
            f"{fmt(b['b_n']['decode_tokens_per_s'])} vs {fmt(b['b1']['decode_tokens_per_s'])} tok/s = "
            f"{fmt(b['ratio'], '.2f', '×')}")
    return out


def observations(res: dict) -> list[str]:
    """Plain statements computed from the results (no hand-written numbers)."""
    out = []
    m = res["machine"]
    during = [x for r in res.get("main", {}).values() for x in r.get("loadavg_1min_during_runs", [])]
    load = max([res["loadavg_start"][0], res["loadavg_end"][0], *during])
    if load > m["cores"]:
        out.append(f"1-minute load average reached {load:.2f} on {m['cores']} cores: other processes competed for "
                   "the CPUs throughout, so every engine ran below its idle-machine speed and run-to-run spread "
                   "is large (see the per-run column).")
    th = res.get("ort_threads") or {}
    rates = {k: v["decode_tokens_per_s"] for k, v in th.items() if v.get("decode_tokens_per_s")}
    if len(rates) >= 2:
        best = max(rates, key=rates.get)
        default = next(iter(rates))
        if best != default and rates[best] > 1.05 * rates[default]:
            out.append(f"ONNX Runtime fp32 with '{best}' decoded {rates[best]:.1f} tok/s vs {rates[default]:.1f} "
                       f"with the '{default}' the main table uses ({rates[best] / rates[default]:.2f}×): on a "
                       "contended machine ORT's spinning intra-op pool loses its time slices, so the ORT rows of the "
                       "main table understate ORT on this machine; the backend's session options are worth revisiting.")
    for label, p in (res.get("profiles") or {}).items():
        if "top_ops" in p:
            gemm = sum(o["share"] for o in p["top_ops"] if "MatMul" in o["op"] or o["op"] == "Gemm")
            out.append(f"{label}: matrix products (MatMul / FusedMatMul / Gemm / MatMulNBits) take {gemm * 100:.0f}% "
                       f"of kernel time and the Python loop {p['outside_session_share'] * 100:.1f}% of each token: "
                       "b1 decode is bound by streaming the weights, not by runtime overhead.")
    return out


def write_markdown(res: dict, path: Path) -> None:
    m = res["machine"]
    s = res["settings"]
    L = []
    L.append("# gptx benchmarks: CPU, against peers\n")
    L.append("Generated by `benchmarks/compare_peers.py`; every number below comes from the run recorded in "
             "`docs/benchmarks.json` (same run, same machine). Re-run to refresh; do not edit by hand.\n")
    L.append(f"- **Run:** {res['started']} → {res['finished']} ({res['wall_s'] / 60:.1f} min)")
    L.append(f"- **Machine:** {m['cpu']}, {m['cores']} cores usable ({m['logical_cpus']} logical), "
             f"{fmt(m.get('ram_gib'), '.1f')} GiB RAM, {m['platform']}")
    L.append(f"- **Load average (1/5/15 min):** at start {', '.join(f'{x:.2f}' for x in res['loadavg_start'])}; "
             f"at end {', '.join(f'{x:.2f}' for x in res['loadavg_end'])}. "
             + ("The load was above the core count (other jobs shared the machine), so absolute numbers are "
                "noisy; " if max(res["loadavg_start"][0], res["loadavg_end"][0]) > m["cores"] else
                "The load average includes the benchmark itself; CPU time on this virtual machine still varies "
                "from minute to minute, so ")
             + "engines were interleaved run by run: ratios are fairer than absolutes.")
    L.append("- **Versions:** " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    L.append(f"- **Threads:** torch.set_num_threads({s['torch_threads']}); ONNX Runtime default intra-op threads; "
             f"CTranslate2 intra_threads={s['torch_threads']}")
    L.append(f"- **Model:** GPT-2-124M shapes (12 layers, 12 heads, 768 wide, vocab 50257), random weights "
             f"(gptx `random:gpt2`, seed {s['seed']}) saved once as a Hugging Face GPT2LMHeadModel directory that "
             f"every engine loads; HF vs gptx max |logit diff| {res['weights']['hf_vs_gptx_max_abs_logit_diff']:.2e}.")
    L.append(f"- **Workload:** greedy; synthetic prompt ids (fixed seed); warm-up {s['warmup']} run(s), then median of "
             f"{s['runs']} timed runs per engine, engines interleaved run by run. Decode tok/s = batch × (new tokens − 1) "
             f"/ time from first to last token; TTFT = prefill + first token.")
    L.append(f"- **Reproduce:** `{res['command']}`\n")

    L.append(f"## Decode throughput: batch 1, prompt {s['prompt_len']}, {s['new_tokens']} new tokens\n")
    hf_ref = res.get("hf_reference")
    L.append(f"Ratios use the faster transformers attention implementation (`{hf_ref}`) and the gptx torch backend "
             "as baselines.\n")
    L.append("| engine | decode tok/s | ratio vs transformers | ratio vs gptx-torch | TTFT ms | p50 / p90 / p99 ms "
             "| decode tok/s of each run |")
    L.append("|---|---:|---:|---:|---:|---:|---:|")
    main = res["main"]
    hf = main.get(hf_ref, {}).get("decode_tokens_per_s")
    tr = main.get("gptx torch", {}).get("decode_tokens_per_s")
    for label, r in main.items():
        if r.get("status") != "ok":
            L.append(f"| {label} | not available: {r.get('note', '')} | | | | | |")
            continue
        d = r["decode_tokens_per_s"]
        lat = r["latency_ms"]
        L.append(f"| {label} | {fmt(d)} | {fmt(d / hf if hf else None, '.2f', '×')} | "
                 f"{fmt(d / tr if tr else None, '.2f', '×')} | {fmt(r['ttft_ms'])} | "
                 f"{fmt(lat['p50'], '.1f')} / {fmt(lat['p90'], '.1f')} / {fmt(lat['p99'], '.1f')} | "
                 + ", ".join(fmt(x.get("decode_tokens_per_s")) for x in r.get("per_run", [])) + " |")
    L.append("")

    L.append("## Targets\n")
    L.append("| target | verdict | measured |")
    L.append("|---|---|---|")
    for t in res["targets"]:
        L.append(f"| {t['target']} | {verdict(t['met'])} | {t['measured']} |")
    L.append("")

    b = res.get("batch", {})
    if b:
        L.append(f"## Batch {b['batch']} vs batch 1 (gptx ORT fp32, prompt {s['prompt_len']}, {s['new_tokens']} new)\n")
        L.append("| batch | decode tok/s (all rows) | TTFT ms | p50 ms per step |")
        L.append("|---:|---:|---:|---:|")
        for key in ("b1", "b_n"):
            r = b[key]
            L.append(f"| {r['batch']} | {fmt(r['decode_tokens_per_s'])} | {fmt(r['ttft_ms'])} | "
                     f"{fmt(r['latency_ms']['p50'], '.2f')} |")
        L.append(f"\nBatch {b['batch']} / batch 1 decode throughput: **{fmt(b['ratio'], '.2f', '×')}**.\n")

    if res.get("long"):
        L.append("## Long context: first 100 vs last 100 decode tokens\n")
        L.append("| engine | prompt + new | TTFT ms | decode tok/s | first-100 ms/token | last-100 ms/token | last/first |")
        L.append("|---|---|---:|---:|---:|---:|---:|")
        for label, r in res["long"].items():
            L.append(f"| {label} | {r['prompt_len']} + {r['new_tokens']} | {fmt(r['ttft_ms'])} | "
                     f"{fmt(r['decode_tokens_per_s'])} | {fmt(r['first100_ms'], '.2f')} | {fmt(r['last100_ms'], '.2f')} | "
                     f"{fmt(r['last100_over_first100'], '.2f', '×')} |")
        L.append("")

    L.append("## Quality of the optimized / quantized exports (top-1 agreement with fp32 PyTorch)\n")
    L.append("Teacher-forced on the fp32 PyTorch reference's greedy continuation of `gpt_export.validate`'s prompts "
             f"(batches 1 and 3, {s['quality_steps']} decode steps; its greedy / run_sequence helpers). "
             "On random weights the logits are nearly flat, so top-1 is a harsh test there; the trained sample model "
             "is the meaningful one when it is present.\n")
    L.append("| export | model | top-1 agreement | positions | max abs logit diff | greedy identical |")
    L.append("|---|---|---:|---:|---:|---|")
    for label, q in res["quality"].items():
        for model, r in q.items():
            if "top1_agreement" in r:
                L.append(f"| {label} | {model} | {r['top1_agreement'] * 100:.1f}% | {r['positions']} | "
                         f"{r['max_abs_diff']:.3g} | {r['greedy_identical']} |")
            else:
                L.append(f"| {label} | {model} | {r.get('note', 'not available')} | | | |")
    L.append("")

    if res.get("ort_threads"):
        L.append("## ONNX Runtime fp32 threading (batch 1, same run)\n")
        L.append("| session threads | decode tok/s | p50 ms | TTFT ms |")
        L.append("|---|---:|---:|---:|")
        for k, v in res["ort_threads"].items():
            L.append(f"| {k} | {fmt(v['decode_tokens_per_s'])} | {fmt(v['p50_ms'], '.1f')} | {fmt(v['ttft_ms'])} |")
        L.append("")
    if res.get("profiles"):
        L.append("## Where decode time goes (ONNX Runtime profile, batch 1)\n")
        for label, p in res["profiles"].items():
            if "error" in p:
                L.append(f"- {label}: profiling failed: {p['error']}")
                continue
            L.append(f"**{label}**: {p['decode_ms_per_token_wall']:.2f} ms/token wall (profiling on), of which "
                     f"{p['session_run_ms_per_token']:.2f} ms in `session.run` "
                     f"({fmt(p['outside_session_share'] * 100 if p['outside_session_share'] is not None else None, '.1f')}% "
                     f"in the Python loop: cache writes, mask, sampling). Kernel time summed over threads, averaged over all "
                     f"profiled calls (warm-up and prefill included): {p['kernel_ms_per_run']:.2f} ms per call.\n")
            L.append("| op | share of kernel time | ms per call |")
            L.append("|---|---:|---:|")
            for op in p["top_ops"]:
                L.append(f"| {op['op']} | {op['share'] * 100:.1f}% | {op['ms_per_run']:.3f} |")
            L.append("")

    obs = observations(res)
    if obs:
        L.append("## Observations (derived from the numbers above)\n")
        L.extend(f"- {o}" for o in obs)
        L.append("")
    if res.get("notes"):
        L.append("## Notes\n")
        for n in res["notes"]:
            L.append(f"- {n}")
        L.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(L) + "\n")


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="timed runs per engine (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--batch", type=int, default=8, help="batch size compared with batch 1")
    p.add_argument("--long-prompt", type=int, default=512)
    p.add_argument("--long-new", type=int, default=512)
    p.add_argument("--quick", action="store_true", help="1 timed run, 32 new tokens, 128 + 256 long context")
    p.add_argument("--seed", type=int, default=0, help="seed of the random:gpt2 weights")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gptx-compare-peers",
                   help="where the shared weights and exports go")
    p.add_argument("--reuse-exports", action="store_true", help="keep exports already in --workdir")
    p.add_argument("--skip", default="", help="comma-separated engine labels (or substrings) to skip")
    p.add_argument("--md", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "benchmarks.json")
    p.add_argument("--render-only", action="store_true",
                   help="measure nothing: rewrite --md from the results already in --json")
    a = p.parse_args(argv)
    if a.render_only:
        res = json.loads(a.json.read_text())
        res["command"] = res["command"].strip()
        write_markdown(res, a.md)
        print(a.md.read_text())
        return 0
    if a.quick:
        a.runs, a.new_tokens, a.long_prompt, a.long_new = 1, 32, 128, 256
    if a.runs < 1 or a.new_tokens < 2 or a.warmup < 0:
        p.error("--runs >= 1, --new-tokens >= 2, --warmup >= 0")
    if a.long_prompt + a.long_new > 1024 or a.prompt_len + a.new_tokens > 1024:
        p.error("prompt + new tokens must fit GPT-2's 1024-token context")

    import torch

    cores = B.usable_cores()
    torch.set_num_threads(cores)
    skip = [s.strip() for s in a.skip.split(",") if s.strip()]
    skipped = lambda label: any(s in label for s in skip)  # noqa: E731
    started = time.time()
    res: dict = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "command": ("python benchmarks/compare_peers.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))).strip(),
        "loadavg_start": list(os.getloadavg()),
        "settings": {"runs": a.runs, "warmup": a.warmup, "new_tokens": a.new_tokens, "prompt_len": a.prompt_len,
                     "batch": a.batch, "long_prompt": a.long_prompt, "long_new": a.long_new, "seed": a.seed,
                     "torch_threads": cores, "quick": a.quick, "quality_steps": 8 if a.quick else 32},
        "notes": [],
    }
    work = a.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)

    log("building shared random GPT-2-124M weights")
    hf_dir = work / "hf-gpt2-random"
    res["weights"] = build_shared_weights(hf_dir, a.seed)
    from gpt_export.weights import load_any

    reference = load_any(str(hf_dir))  # the fp32 PyTorch model every export is judged against

    variants = {  # label -> (optimize, quantize)
        "gptx ORT fp32": (False, None),
        "gptx ORT optimized": (True, None),
        "gptx ORT int8": (True, "int8"),
        "gptx ORT int4": (True, "int4"),
    }
    exports = {}
    for label, (opt, quant) in variants.items():
        if skipped(label) and label != "gptx ORT fp32":
            exports[label] = {"status": "not available", "note": "skipped (--skip)"}
            continue
        log(f"export {label}")
        exports[label] = export_variant(str(hf_dir), work / label.split()[-1], opt, quant, a.reuse_exports)
        if exports[label]["status"] != "ok":
            log(f"  {label}: {exports[label]['note']}")
    if exports["gptx ORT fp32"]["status"] != "ok":
        raise SystemExit(f"the fp32 export failed: {exports['gptx ORT fp32']['note']}")
    res["exports"] = {k: {kk: vv for kk, vv in v.items() if kk != "manifest"} |
                      ({"optimizations": v["manifest"].get("optimizations"),
                        "quantization": v["manifest"].get("quantization")} if v.get("manifest") else {})
                      for k, v in exports.items()}

    # ---- quality
    log("top-1 agreement of the optimized / quantized exports")
    res["quality"] = {}
    steps = 8 if a.quick else 32
    shakespeare = ROOT / "gpt_export" / "data" / "shakespeare.pt"
    ref_cases = reference_cases(exports["gptx ORT fp32"]["dir"], reference, steps)
    shakespeare_cases = None
    for label, ex in exports.items():
        if label == "gptx ORT fp32":
            continue
        q = res["quality"][label] = {}
        if ex["status"] != "ok":
            q["random"] = {"note": "not available"}
            continue
        try:
            q["random"] = top1(ex["dir"], ref_cases)
        except Exception as e:
            q["random"] = {"note": f"compare failed: {type(e).__name__}: {e}"[:200]}
        if shakespeare.is_file():
            opt, quant = variants[label]
            ex_s = export_variant("shakespeare", work / f"shakespeare-{label.split()[-1]}", opt, quant, a.reuse_exports)
            if ex_s["status"] == "ok":
                try:
                    if shakespeare_cases is None:
                        shakespeare_cases = reference_cases(ex_s["dir"], None, steps)
                    q["shakespeare"] = top1(ex_s["dir"], shakespeare_cases)
                except Exception as e:
                    q["shakespeare"] = {"note": f"compare failed: {type(e).__name__}: {e}"[:200]}
            else:
                q["shakespeare"] = {"note": ex_s["note"]}
        else:
            q["shakespeare"] = {"note": "gpt_export/data/shakespeare.pt not present"}
        log(f"  {label}: " + ", ".join(f"{k} {v.get('top1_agreement', v.get('note'))}" for k, v in q.items()))

    # ---- main table
    log("loading engines")
    runners, main_res = [], {}

    def add_runner(label, factory):
        if skipped(label):
            main_res[label] = {"status": "not available", "note": "skipped (--skip)"}
            return
        gc.collect()
        before = rss_mib()
        try:
            r = factory()
        except Exception as e:
            note = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            main_res[label] = {"status": "not available", "note": note}
            log(f"  {label}: not available ({note})")
            return
        gc.collect()
        main_res[label] = {"status": "ok", "rss_added_mib": rss_mib() - before}
        runners.append(r)

    import transformers

    add_runner("transformers (sdpa)", lambda: HFRunner("transformers (sdpa)", str(hf_dir), "sdpa"))
    add_runner("transformers (eager attn)", lambda: HFRunner("transformers (eager attn)", str(hf_dir), "eager"))
    add_runner("gptx torch", lambda: GptxRunner("gptx torch", exports["gptx ORT fp32"]["dir"], "torch"))
    for label, ex in exports.items():
        if ex["status"] == "ok":
            add_runner(label, lambda label=label, ex=ex: GptxRunner(label, ex["dir"], "onnxruntime"))
        else:
            main_res[label] = {"status": "not available", "note": ex["note"]}
    try:
        import ctranslate2  # noqa: F401  (the converter needs it; ImportError -> not available)
        from ctranslate2.converters import TransformersConverter

        ct2_dir = work / "ct2-fp32"
        if not (a.reuse_exports and (ct2_dir / "model.bin").is_file()):
            log("CTranslate2: converting the HF directory")
            with contextlib.redirect_stdout(sys.stderr):
                TransformersConverter(str(hf_dir)).convert(str(ct2_dir), force=True)
        add_runner("CTranslate2 fp32", lambda: CT2Runner("CTranslate2 fp32", str(ct2_dir), "float32", cores))
        add_runner("CTranslate2 int8", lambda: CT2Runner("CTranslate2 int8", str(ct2_dir), "int8", cores))
    except ImportError:
        for label in ("CTranslate2 fp32", "CTranslate2 int8"):
            main_res[label] = {"status": "not available", "note": "ctranslate2 not installed (pip install ctranslate2)"}
    except Exception as e:
        for label in ("CTranslate2 fp32", "CTranslate2 int8"):
            main_res[label] = {"status": "not available", "note": f"conversion failed: {type(e).__name__}: {e}"[:300]}
    res["machine"] = B.machine_info()  # after the imports, so torch / transformers / ctranslate2 versions appear

    log(f"main table: batch 1, prompt {a.prompt_len}, {a.new_tokens} new tokens, {a.runs} interleaved runs, "
        f"engines: {', '.join(r.label for r in runners)}")
    prompts = B.synthetic_prompts(1, a.prompt_len, 50257)
    measured = interleaved(runners, prompts, a.new_tokens, a.runs, a.warmup)
    for label, r in measured.items():
        main_res[label].update(r)
        if r["tokens_generated_per_row"] != a.new_tokens:
            res["notes"].append(f"{label} generated {r['tokens_generated_per_row']} tokens, not {a.new_tokens}")
    order = ["transformers (sdpa)", "transformers (eager attn)", "gptx torch", *variants,
             "CTranslate2 fp32", "CTranslate2 int8"]
    res["main"] = {k: main_res[k] for k in order if k in main_res}
    hf_rates = {k: res["main"][k].get("decode_tokens_per_s") for k in order[:2]
                if res["main"].get(k, {}).get("status") == "ok"}
    res["hf_reference"] = max(hf_rates, key=hf_rates.get) if hf_rates else None

    # best quantized: the fastest quantized export whose top-1 meets the target, else the fastest one
    quant_ok = [k for k in ("gptx ORT int8", "gptx ORT int4") if res["main"].get(k, {}).get("status") == "ok"]

    def q_top1(k):
        q = res["quality"].get(k, {})
        return q.get("shakespeare", {}).get("top1_agreement", q.get("random", {}).get("top1_agreement"))

    good = [k for k in quant_ok if (q_top1(k) or 0) >= TARGETS["quant_top1"]]
    pool = good or quant_ok
    res["best_quantized"] = max(pool, key=lambda k: res["main"][k]["decode_tokens_per_s"]) if pool else None
    keep = {"gptx ORT fp32", "gptx torch", res["best_quantized"]}
    for r in [r for r in runners if r.label not in keep]:
        r.close()
    runners = [r for r in runners if r.label in keep]
    gc.collect()
    by_label = {r.label: r for r in runners}

    # ---- batch scaling
    log(f"batch {a.batch} vs batch 1 (gptx ORT fp32)")
    ort_runner = by_label["gptx ORT fp32"]

    class Batched(Runner):
        def __init__(self, n):
            self.label = f"b{n}"

        def run(self, batch_prompts, new_tokens):
            return ort_runner.run(batch_prompts, new_tokens)

    bprompts = {"b1": prompts, f"b{a.batch}": B.synthetic_prompts(a.batch, a.prompt_len, 50257)}
    bres = interleaved([Batched(1), Batched(a.batch)], bprompts, a.new_tokens, a.runs, a.warmup)
    b1, bn = bres["b1"], bres[f"b{a.batch}"]
    res["batch"] = {"batch": a.batch, "b1": b1, "b_n": bn,
                    "ratio": bn["decode_tokens_per_s"] / b1["decode_tokens_per_s"] if b1["decode_tokens_per_s"] else None}

    # ---- long context
    long_labels = ["gptx ORT fp32"] + ([res["best_quantized"]] if res["best_quantized"] else [])
    log(f"long context: prompt {a.long_prompt} + {a.long_new} new ({', '.join(long_labels)})")
    long_prompts = B.synthetic_prompts(1, a.long_prompt, 50257)
    lres = interleaved([by_label[k] for k in long_labels], long_prompts, a.long_new, a.runs, min(a.warmup, 1))
    res["long"] = lres

    # ---- ORT threading under load
    log("ORT fp32 threading settings")
    fp32_dir = exports["gptx ORT fp32"]["dir"]
    trs = [OrtThreadsRunner("default pool (spinning)", fp32_dir, None, True),
           OrtThreadsRunner(f"{cores} threads, no spinning", fp32_dir, cores, False),
           OrtThreadsRunner("1 thread", fp32_dir, 1, False)]
    tres = interleaved(trs, prompts, min(a.new_tokens, 64), a.runs, a.warmup)
    res["ort_threads"] = {k: {"decode_tokens_per_s": v["decode_tokens_per_s"], "ttft_ms": v["ttft_ms"],
                              "p50_ms": v["latency_ms"]["p50"], "new_tokens": v["new_tokens"]} for k, v in tres.items()}
    del trs

    # ---- profiles
    res["profiles"] = {}
    for label in long_labels:
        log(f"ORT profile: {label}")
        try:
            res["profiles"][label] = ort_profile(exports[label]["dir"], a.prompt_len, min(a.new_tokens, 64), work)
        except Exception as e:
            res["profiles"][label] = {"error": f"{type(e).__name__}: {e}"[:300]}
            traceback.print_exc()

    res["loadavg_end"] = list(os.getloadavg())
    res["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    res["wall_s"] = time.time() - started
    res["targets"] = evaluate_targets(res)
    res["settings"]["transformers"] = transformers.__version__
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=2, default=str) + "\n")
    write_markdown(res, a.md)
    log(f"wrote {a.md} and {a.json}")
    print(a.md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
