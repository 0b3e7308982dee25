"""`gptx bench`: time to first token, prefill / decode throughput, per-token latency and peak memory.

Measures the runtime's own generation loop (`Generation.generate_next`; greedy unless sampling is asked for, then
with a fixed seed) on synthetic prompts, so the numbers are what an app embedding gptx sees, sampler included. Torch-free at import: PyTorch is imported only to measure the
torch backend (the backend does that) or CUDA memory (only when torch is already loaded).

Per configuration: `warmup` untimed runs, then `runs` timed runs; scalars are the median over timed runs,
latency percentiles pool every decode token of every timed run.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import GptxError, InvalidInput
from .kv_cache import window_for

PROMPT_SEED = 1234
CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")
DEFAULT_NEW_TOKENS = 128
DRIFT_WINDOW = 100  # first / last N decode tokens, reported when new_tokens >= 2 * DRIFT_WINDOW


# ---------------------------------------------------------------------------------------------- memory
def reset_peak_rss() -> bool:
    """Reset the kernel's VmHWM (peak RSS) to the current RSS; False where that is not possible."""
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib(reset_ok: bool) -> tuple[float, str]:
    """(peak resident set size in MiB, how it was measured)."""
    if reset_ok:
        try:
            for line in STATUS.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024, "VmHWM since config start"
        except OSError:
            pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 1024  # bytes on macOS, KiB on Linux
    return peak * scale, "ru_maxrss since process start"


def _cuda_torch(device: str):
    """torch, when it is already loaded and the config runs on CUDA; never imports it."""
    torch = sys.modules.get("torch")
    if device != "cuda" or torch is None:
        return None
    try:
        return torch if torch.cuda.is_available() else None
    except RuntimeError:  # a CUDA build on a machine whose driver cannot start
        return None


# ---------------------------------------------------------------------------------------------- helpers
def synthetic_prompts(batch: int, prompt_len: int, vocab_size: int, seed: int = PROMPT_SEED) -> list[list[int]]:
    """Fixed-seed prompt ids, all valid vocabulary ids (the last one, <|endoftext|>, left out)."""
    rng = np.random.default_rng(seed)
    high = max(1, min(vocab_size, 50257) - 1)
    return rng.integers(0, high, size=(batch, prompt_len)).tolist()


def _unpack(target):
    """(backend, vocab_size, block_size) from an Engine or a Backend."""
    backend = getattr(target, "backend", target)
    manifest = getattr(target, "manifest", None) or backend.manifest
    vocab = manifest.get("tokenizer", {}).get("vocab_size") or manifest["config"]["vocab_size"]
    return backend, int(vocab), int(backend.capabilities.max_seq)


def _positive_ints(values, name: str) -> list[int]:
    values = list(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in values):
        raise InvalidInput(f"{name} must be integers >= 1, got {values}")
    return [int(v) for v in values]


def default_new_tokens(prompt_lens: Sequence[int], block_size: int) -> tuple[int, str | None]:
    """DEFAULT_NEW_TOKENS, clamped so the longest prompt still fits the context; a notice when clamped."""
    room = block_size - max(prompt_lens)
    if room >= DEFAULT_NEW_TOKENS or room < 1:
        return DEFAULT_NEW_TOKENS, None  # too little room is validate_args' error, with what to pass
    return room, (f"new_tokens set to {room} (not {DEFAULT_NEW_TOKENS}) so prompt {max(prompt_lens)} + new tokens "
                  f"fits the model's block size {block_size}")


def validate_args(batch_sizes: Sequence[int], prompt_lens: Sequence[int], new_tokens: int, runs: int,
                  block_size: int, warmup: int = 0) -> None:
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, (int, np.integer)) or new_tokens < 1:
        raise InvalidInput(f"new_tokens must be an integer >= 1, got {new_tokens!r}")
    if isinstance(runs, bool) or not isinstance(runs, (int, np.integer)) or runs < 1:
        raise InvalidInput(f"runs must be an integer >= 1, got {runs!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, (int, np.integer)) or warmup < 0:
        raise InvalidInput(f"warmup must be an integer >= 0, got {warmup!r}")
    _positive_ints(batch_sizes, "batch sizes")
    longest = max(_positive_ints(prompt_lens, "prompt lengths"))
    if longest >= block_size:
        raise InvalidInput(f"prompt length {longest} leaves no room for new tokens in the model's block size "
                           f"{block_size}: pass --prompt-len {block_size - 1} or less")
    if longest + new_tokens > block_size:
        raise InvalidInput(f"prompt length {longest} + new_tokens {new_tokens} = {longest + new_tokens} exceeds the "
                           f"model's block size {block_size}: pass --new-tokens {block_size - longest} or less "
                           f"(or a shorter --prompt-len)")


def available_memory(device: str) -> int | None:
    """Bytes free for a config's buffers: MemAvailable on CPU, the CUDA allocator's free memory on a GPU."""
    if device == "cuda":
        torch = _cuda_torch(device)
        return int(torch.cuda.mem_get_info()[0]) if torch is not None else None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def estimate_bytes(manifest: dict, batch: int, prompt_len: int, new_tokens: int) -> int:
    """What one config allocates beyond the weights: the KV cache (the runtime's window bucket), the prefill's
    presents, attention scores and MLP activations, and the logits. An estimate, to refuse absurd batches."""
    cfg = manifest["config"]
    n_layer, n_head, n_embd, block = cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["block_size"]
    kv_bytes = 2 if manifest.get("dtype") == "float16" else 4
    window = window_for(prompt_len + new_tokens, block)
    per_slot = 2 * n_layer * n_embd * kv_bytes                       # key + value of every layer
    cache = batch * window * per_slot
    presents = batch * prompt_len * per_slot
    activations = batch * prompt_len * (8 * n_embd + n_head * prompt_len) * 4
    logits = 2 * batch * int(cfg["vocab_size"]) * 4
    return cache + presents + activations + logits


def check_memory(manifest: dict, batch_sizes: Sequence[int], prompt_lens: Sequence[int], new_tokens: int,
                 device: str) -> None:
    """Refuse, before allocating anything, a config that cannot fit in the memory this machine has free."""
    free = available_memory(device)
    if free is None:
        return
    need = max(estimate_bytes(manifest, b, p, new_tokens) for b in batch_sizes for p in prompt_lens)
    if need > free:
        raise InvalidInput(f"batch {max(batch_sizes)} x (prompt {max(prompt_lens)} + {new_tokens} new tokens) needs "
                           f"about {need / 2**30:.1f} GiB for the KV cache and activations, but only "
                           f"{free / 2**30:.1f} GiB is free on {device}: use a smaller --batch-size")


def _percentiles(values_ms: list[float]) -> dict:
    if not values_ms:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "min": None, "max": None}
    a = np.asarray(values_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(a.mean()),
            "min": float(a.min()), "max": float(a.max())}


def _median(values):
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


# ---------------------------------------------------------------------------------------------- one config
def one_run(backend, prompts, new_tokens: int, vocab: int, sampling=None) -> dict:
    """One generation through the runtime's one loop (greedy unless `sampling`, a SamplingParams, says otherwise);
    every token timed, prefill through its on_step hook."""
    from .generation import Generation
    from .sampler import SamplingParams

    timing = {}

    def on_step(kind: str, seconds: float, batch: int) -> None:
        if kind == "prefill":
            timing["prefill"] = timing.get("prefill", 0.0) + seconds

    gen = Generation(backend, None, prompts, new_tokens, sampling or SamplingParams(temperature=0.0),
                     eos_token_id=vocab - 1, vocab_size=vocab, stop_at_eos=False, on_step=on_step)
    clock = time.perf_counter
    t0 = clock()
    gen.generate_next()
    ttft = clock() - t0
    latencies = []
    while not gen.is_done():
        t = clock()
        gen.generate_next()
        latencies.append(clock() - t)
    return {"ttft": ttft, "prefill": timing["prefill"], "decode": float(sum(latencies)), "latencies": latencies,
            "tokens": [len(row) for row in gen.tokens]}


def bench_config(backend, batch: int, prompt_len: int, new_tokens: int, runs: int, warmup: int = 1,
                 sampling=None) -> dict:
    """Benchmark one (batch, prompt_len) configuration; `backend` is an Engine or a runtime Backend; `sampling` a
    SamplingParams (None: greedy)."""
    backend, vocab, block_size = _unpack(backend)
    validate_args([batch], [prompt_len], new_tokens, runs, block_size, warmup)
    check_memory(backend.manifest, [batch], [prompt_len], new_tokens, backend.device)
    prompts = synthetic_prompts(batch, prompt_len, vocab)
    cuda = _cuda_torch(backend.device)
    gc.collect()
    reset_ok = reset_peak_rss()
    if cuda is not None:
        cuda.cuda.reset_peak_memory_stats()
    load_before = os.getloadavg()
    for _ in range(warmup):
        one_run(backend, prompts, new_tokens, vocab, sampling)
    measured = []
    gc_was_enabled = gc.isenabled()
    try:
        for _ in range(runs):
            gc.collect()
            gc.disable()  # a collection in the middle of a token is noise, not the engine
            try:
                measured.append(one_run(backend, prompts, new_tokens, vocab, sampling))
            finally:
                if gc_was_enabled:
                    gc.enable()
    finally:
        if gc_was_enabled:
            gc.enable()
    peak, method = peak_rss_mib(reset_ok)
    cuda_peak = cuda.cuda.max_memory_allocated() / 2**20 if cuda is not None else None
    result = {"backend": backend.describe(), "backend_name": backend.name, "device": backend.device}
    result.update(summarize_runs(measured, batch, prompt_len, new_tokens, warmup))
    result.update(peak_rss_mib=peak, peak_rss_method=method, cuda_peak_mib=cuda_peak,
                  loadavg_before=list(load_before), loadavg_after=list(os.getloadavg()))
    return result


def summarize_runs(measured: list[dict], batch: int, prompt_len: int, new_tokens: int, warmup: int = 0) -> dict:
    """Medians, pooled latency percentiles and first/last-window latencies from raw runs.

    Each raw run is {"ttft", "prefill", "decode" (seconds), "latencies" (seconds per decode token), "tokens"
    (tokens generated per row)}, as `one_run` returns; other engines (benchmarks/compare_peers.py) produce the same.
    """
    decode_per_row = new_tokens - 1
    per_run = []
    for m in measured:
        per_run.append({
            "ttft_ms": m["ttft"] * 1e3,
            "prefill_ms": m["prefill"] * 1e3,
            "decode_ms": m["decode"] * 1e3,
            "prefill_tokens_per_s": batch * prompt_len / m["prefill"] if m["prefill"] > 0 else None,
            "decode_tokens_per_s": batch * decode_per_row / m["decode"] if decode_per_row and m["decode"] > 0 else None,
            "total_ms": (m["ttft"] + m["decode"]) * 1e3,
        })
    runs = len(measured)
    result = {
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "runs": runs,
        "warmup": warmup,
        "tokens_generated_per_row": min(min(m["tokens"]) for m in measured),
        "decode_tokens_per_row": decode_per_row,
        "decode_tokens": batch * decode_per_row,
        "prefill_tokens": batch * prompt_len,
    }
    for key in ("ttft_ms", "prefill_ms", "decode_ms", "total_ms", "prefill_tokens_per_s", "decode_tokens_per_s"):
        result[key] = _median([r[key] for r in per_run])
    pooled = [lat * 1e3 for m in measured for lat in m["latencies"]]
    result["latency_ms"] = _percentiles(pooled)
    if decode_per_row >= 2 * DRIFT_WINDOW:
        first = _median([float(np.mean(m["latencies"][:DRIFT_WINDOW])) * 1e3 for m in measured])
        last = _median([float(np.mean(m["latencies"][-DRIFT_WINDOW:])) * 1e3 for m in measured])
        result.update(first100_ms=first, last100_ms=last, last100_over_first100=last / first if first else None)
    else:
        result.update(first100_ms=None, last100_ms=None, last100_over_first100=None)
    result["per_run"] = per_run
    return result


# ---------------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def library_versions() -> dict:
    """numpy and onnxruntime always (the runtime's own deps); torch only if already loaded."""
    out = {"python": platform.python_version(), "numpy": np.__version__}
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    if "torch" in sys.modules:
        out["torch"] = getattr(sys.modules["torch"], "__version__", "?")
    from importlib.metadata import PackageNotFoundError, version

    try:
        out["gptx"] = version("gptx")
    except PackageNotFoundError:  # run from a source tree that was never installed
        pass
    return out


def machine_info() -> dict:
    info = {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "logical_cpus": os.cpu_count(),
        "ram_gib": ram_gib(),
        "loadavg": list(os.getloadavg()),
        "platform": platform.platform(),
        "versions": library_versions(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),  # huge pages for the weights: gptx/launcher.py
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        try:
            if torch.cuda.is_available():
                info["gpu"] = torch.cuda.get_device_name(0)
        except RuntimeError:  # a CUDA build on a machine whose driver cannot start
            pass
    return info


def manifest_summary(manifest: dict) -> dict:
    return {
        "source": manifest.get("source"),
        "config": manifest.get("config"),
        "dtype": manifest.get("dtype"),
        "quantization": manifest.get("quantization"),
        "optimizations": manifest.get("optimizations", []),
    }


# ---------------------------------------------------------------------------------------------- command
def sampling_summary(sampling) -> str:
    """'greedy', or the sampling settings a run used, as the report and its table title show them."""
    if sampling is None or sampling.greedy:
        return "greedy"
    parts = [f"temperature {sampling.temperature:g}"]
    parts += [f"top-k {sampling.top_k}"] if sampling.top_k else []
    parts += [f"top-p {sampling.top_p:g}"] if sampling.top_p is not None and sampling.top_p < 1 else []
    return ", ".join(parts) + f", seed {sampling.seed}"


def _default_compare(primary: str) -> str:
    if primary != "torch" and importlib.util.find_spec("torch") is not None:
        return "torch"
    return "none"


def run_bench_command(directory, backend: str = "auto", device: str = "cpu", batch_sizes: Sequence[int] = (1,),
                      prompt_lens: Sequence[int] = (32,), new_tokens: int | None = None, runs: int = 3,
                      compare: str | None = None, json_path: Path | None = None, plot_path: Path | None = None,
                      console=None, warmup: int = 1, sampling=None) -> dict:
    """Benchmark every (batch, prompt_len) on `backend` and, in the same process, on `compare`; `sampling` is a
    SamplingParams (None: greedy).

    new_tokens None: DEFAULT_NEW_TOKENS, clamped (with a note) where the longest prompt leaves less room."""
    from .backends import BACKENDS, resolve
    from .bench_report import add_ratios, require_matplotlib, results_table, write_plot
    from .engine import load
    from .manifest import load_manifest

    directory = Path(directory)
    manifest = load_manifest(directory)
    block_size = int(manifest["config"]["block_size"])
    batch_sizes, prompt_lens = _positive_ints(batch_sizes, "batch sizes"), _positive_ints(prompt_lens, "prompt lengths")
    notes = []
    if new_tokens is None:
        new_tokens, note = default_new_tokens(prompt_lens, block_size)
        notes += [note] if note else []
    validate_args(batch_sizes, prompt_lens, new_tokens, runs, block_size, warmup)
    check_memory(manifest, batch_sizes, prompt_lens, new_tokens, device)
    shown = len(notes)  # argument notes are shown before the runs, the others after the table
    if console is not None:
        for note in notes:
            console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    primary = resolve(backend, manifest, device)
    explicit = compare is not None
    compare_name = (compare or _default_compare(primary)).strip().lower()
    if compare_name not in ("none", "auto", *BACKENDS):
        raise ValueError(f"--compare must be none or one of {', '.join(BACKENDS)}, got {compare!r}")
    compare_name = "none" if compare_name == "none" else resolve(compare_name, manifest, device)
    if compare_name == primary:
        compare_name = "none"
    if plot_path is not None:
        require_matplotlib()

    configs = [(b, p) for b in batch_sizes for p in prompt_lens]
    results = []
    for name, required in ((primary, True), (compare_name, explicit)):
        if name == "none":
            continue
        try:
            engine = load(directory, name, device)
        except GptxError as e:
            if required:
                raise
            notes.append(f"compare backend {name} skipped: {e}")
            continue
        for batch, prompt_len in configs:
            if console is not None:
                console.print(f"[dim]{engine.backend.describe()}: batch {batch}, prompt {prompt_len}, "
                              f"{new_tokens} new tokens x {runs} runs...[/dim]", highlight=False)
            results.append(bench_config(engine, batch, prompt_len, new_tokens, runs, warmup, sampling))
        del engine
        gc.collect()

    add_ratios(results)
    report = {
        "directory": str(directory),
        "machine": machine_info(),
        "manifest": manifest_summary(manifest),
        "settings": {"backend": primary, "compare": compare_name, "device": device, "batch_sizes": batch_sizes,
                     "prompt_lens": prompt_lens, "new_tokens": new_tokens, "runs": runs, "warmup": warmup,
                     "prompt_seed": PROMPT_SEED, "sampling": sampling_summary(sampling)},
        "results": results,
        "notes": notes,
    }
    if console is not None:
        console.print(results_table(results, report))
        for note in notes[shown:]:
            console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    if json_path is not None:
        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        if console is not None:
            console.print(f"wrote {json_path}", highlight=False)
    if plot_path is not None:
        write_plot(results, Path(plot_path), title=f"gptx decode throughput ({manifest.get('source')})")
        if console is not None:
            console.print(f"wrote {plot_path}", highlight=False)
    return report
