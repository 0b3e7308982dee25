"""`gptx bench`: time to first token, prefill / decode throughput, per-token latency and peak memory.

Times the runtime's own generation loop (greedy, or sampling with a fixed seed) on synthetic prompts, so the numbers
are what an app embedding gptx sees, sampler included. Torch-free at import: only the torch backend imports PyTorch,
and CUDA memory is read only when torch is already loaded. Per configuration: `warmup` untimed runs, then `runs`
timed runs; scalars are medians over timed runs, latency percentiles pool every decode token of every timed run.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import itertools
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
DEFAULT_NEW_TOKENS = 128
DRIFT_WINDOW = 100  # first / last N decode tokens, reported when new_tokens >= 2 * DRIFT_WINDOW


# ---------------------------------------------------------------------------------------------- memory
def proc_field(path: str, key: str) -> str | None:
    """The value of `key` in a /proc file such as /proc/meminfo ("MemTotal"); None where there is none."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(key)), None)


def proc_kib(path: str, key: str) -> int | None:
    value = proc_field(path, key)
    return int(value.split()[0]) if value else None


def peak_rss_mib(reset_ok: bool) -> tuple[float, str]:
    """(peak resident set size in MiB, how it was measured)."""
    hwm = proc_kib("/proc/self/status", "VmHWM:") if reset_ok else None
    if hwm is not None:
        return hwm / 1024, "VmHWM since config start"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 1024), "ru_maxrss since process start"  # bytes / KiB


def _cuda_torch(device: str):
    """torch, when it is already loaded and the config runs on CUDA; never imports it."""
    torch = sys.modules.get("torch")
    try:
        return torch if device == "cuda" and torch is not None and torch.cuda.is_available() else None
    except RuntimeError:  # a CUDA build on a machine whose driver cannot start
        return None


# ---------------------------------------------------------------------------------------------- arguments
def synthetic_prompts(batch: int, prompt_len: int, vocab_size: int, seed: int = PROMPT_SEED) -> list[list[int]]:
    """Fixed-seed prompt ids, all valid vocabulary ids (the last one, <|endoftext|>, left out)."""
    high = max(1, min(vocab_size, 50257) - 1)
    return np.random.default_rng(seed).integers(0, high, size=(batch, prompt_len)).tolist()


def _is_int(value, low: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= low


def _positive_ints(values, name: str) -> list[int]:
    values = list(values)
    if not values or not all(_is_int(v, 1) for v in values):
        raise InvalidInput(f"{name} must be integers >= 1, got {values}")
    return [int(v) for v in values]


def validate_args(batch_sizes: Sequence[int], prompt_lens: Sequence[int], new_tokens: int, runs: int,
                  block_size: int, warmup: int = 0) -> None:
    for name, value, low in (("new_tokens", new_tokens, 1), ("runs", runs, 1), ("warmup", warmup, 0)):
        if not _is_int(value, low):
            raise InvalidInput(f"{name} must be an integer >= {low}, got {value!r}")
    _positive_ints(batch_sizes, "batch sizes")
    longest = max(_positive_ints(prompt_lens, "prompt lengths"))
    if longest >= block_size:
        raise InvalidInput(f"prompt length {longest} leaves no room for new tokens in the model's block size "
                           f"{block_size}: pass --prompt-len {block_size - 1} or less")
    if longest + new_tokens > block_size:
        raise InvalidInput(f"prompt length {longest} + new_tokens {new_tokens} = {longest + new_tokens} exceeds the "
                           f"model's block size {block_size}: pass --new-tokens {block_size - longest} or less "
                           f"(or a shorter --prompt-len)")


def estimate_bytes(manifest: dict, batch: int, prompt_len: int, new_tokens: int) -> int:
    """What one config allocates beyond the weights: the KV cache (the runtime's window bucket), the prefill's
    presents, attention scores and MLP activations, and the logits. An estimate, to refuse absurd batches."""
    cfg = manifest["config"]
    n_layer, n_head, n_embd, block = cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["block_size"]
    per_slot = 2 * n_layer * n_embd * (2 if manifest.get("dtype") == "float16" else 4)  # key + value of every layer
    cache = batch * window_for(prompt_len + new_tokens, block) * per_slot
    presents = batch * prompt_len * per_slot
    activations = batch * prompt_len * (8 * n_embd + n_head * prompt_len) * 4
    logits = 2 * batch * int(cfg["vocab_size"]) * 4
    return cache + presents + activations + logits


def check_memory(manifest: dict, batch_sizes: Sequence[int], prompt_lens: Sequence[int], new_tokens: int,
                 device: str) -> None:
    """Refuse, before allocating anything, a config that cannot fit in the memory this machine has free:
    MemAvailable on CPU, the CUDA allocator's free memory on a GPU."""
    if device == "cuda":
        torch = _cuda_torch(device)
        free = int(torch.cuda.mem_get_info()[0]) if torch is not None else None
    else:
        free = proc_kib("/proc/meminfo", "MemAvailable:")
        free = None if free is None else free * 1024
    need = max(estimate_bytes(manifest, b, p, new_tokens) for b in batch_sizes for p in prompt_lens)
    if free is not None and need > free:
        raise InvalidInput(f"batch {max(batch_sizes)} x (prompt {max(prompt_lens)} + {new_tokens} new tokens) needs "
                           f"about {need / 2**30:.1f} GiB for the KV cache and activations, but only "
                           f"{free / 2**30:.1f} GiB is free on {device}: use a smaller --batch-size")


# ---------------------------------------------------------------------------------------------- one config
def one_run(backend, prompts, new_tokens: int, vocab: int, sampling=None) -> dict:
    """One generation through the runtime's one loop (greedy unless `sampling`, a SamplingParams, says otherwise);
    every token timed, prefill through its on_step hook."""
    from .generation import Generation
    from .sampler import SamplingParams

    prefill = []
    gen = Generation(backend, None, prompts, new_tokens, sampling or SamplingParams(temperature=0.0),
                     eos_token_id=vocab - 1, vocab_size=vocab, stop_at_eos=False,
                     on_step=lambda kind, seconds, batch: prefill.append(seconds) if kind == "prefill" else None)
    clock = time.perf_counter
    t0 = clock()
    gen.generate_next()
    ttft = clock() - t0
    latencies = []
    while not gen.is_done():
        t = clock()
        gen.generate_next()
        latencies.append(clock() - t)
    return {"ttft": ttft, "prefill": sum(prefill), "decode": float(sum(latencies)), "latencies": latencies,
            "tokens": [len(row) for row in gen.tokens]}


def bench_config(target, batch: int, prompt_len: int, new_tokens: int, runs: int, warmup: int = 1,
                 sampling=None) -> dict:
    """Benchmark one (batch, prompt_len) configuration; `target` is an Engine or a runtime Backend; `sampling` a
    SamplingParams (None: greedy)."""
    backend = getattr(target, "backend", target)
    manifest = getattr(target, "manifest", None) or backend.manifest
    vocab = int(manifest.get("tokenizer", {}).get("vocab_size") or manifest["config"]["vocab_size"])
    validate_args([batch], [prompt_len], new_tokens, runs, int(backend.capabilities.max_seq), warmup)
    check_memory(manifest, [batch], [prompt_len], new_tokens, backend.device)
    prompts = synthetic_prompts(batch, prompt_len, vocab)
    cuda = _cuda_torch(backend.device)
    gc.collect()
    try:  # the kernel's VmHWM (peak RSS) back to the current RSS, so the peak is this config's
        reset_ok = Path("/proc/self/clear_refs").write_text("5") > 0
    except OSError:
        reset_ok = False
    if cuda is not None:
        cuda.cuda.reset_peak_memory_stats()
    load_before = os.getloadavg()
    for _ in range(warmup):
        one_run(backend, prompts, new_tokens, vocab, sampling)
    measured = []
    gc_was_enabled = gc.isenabled()
    for _ in range(runs):
        gc.collect()
        gc.disable()  # a collection in the middle of a token is noise, not the engine
        try:
            measured.append(one_run(backend, prompts, new_tokens, vocab, sampling))
        finally:
            if gc_was_enabled:
                gc.enable()
    peak, method = peak_rss_mib(reset_ok)
    return {"backend": backend.describe(), "backend_name": backend.name, "device": backend.device,
            **summarize_runs(measured, batch, prompt_len, new_tokens, warmup),
            "peak_rss_mib": peak, "peak_rss_method": method,
            "cuda_peak_mib": cuda.cuda.max_memory_allocated() / 2**20 if cuda is not None else None,
            "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg())}


def _median(values):
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def summarize_runs(measured: list[dict], batch: int, prompt_len: int, new_tokens: int, warmup: int = 0) -> dict:
    """Medians, pooled latency percentiles and first/last-window latencies from raw runs: {"ttft", "prefill",
    "decode" (seconds), "latencies" (seconds per decode token), "tokens" (tokens generated per row)}, as `one_run`
    returns them; other engines (benchmarks/compare_peers.py) produce the same."""
    decode_per_row = new_tokens - 1
    per_run = []
    for m in measured:
        decode_rate = batch * decode_per_row / m["decode"] if decode_per_row and m["decode"] > 0 else None
        per_run.append({"ttft_ms": m["ttft"] * 1e3, "prefill_ms": m["prefill"] * 1e3, "decode_ms": m["decode"] * 1e3,
                        "prefill_tokens_per_s": batch * prompt_len / m["prefill"] if m["prefill"] > 0 else None,
                        "decode_tokens_per_s": decode_rate, "total_ms": (m["ttft"] + m["decode"]) * 1e3})
    result = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "runs": len(measured),
              "warmup": warmup, "tokens_generated_per_row": min(min(m["tokens"]) for m in measured),
              "decode_tokens_per_row": decode_per_row, "decode_tokens": batch * decode_per_row,
              "prefill_tokens": batch * prompt_len}
    for key in ("ttft_ms", "prefill_ms", "decode_ms", "total_ms", "prefill_tokens_per_s", "decode_tokens_per_s"):
        result[key] = _median([r[key] for r in per_run])
    pooled = np.asarray([lat * 1e3 for m in measured for lat in m["latencies"]], dtype=np.float64)
    stats = [*np.percentile(pooled, [50, 90, 99]), pooled.mean(), pooled.min(), pooled.max()] if pooled.size else []
    keys = ("p50", "p90", "p99", "mean", "min", "max")
    result["latency_ms"] = dict(zip(keys, map(float, stats))) if stats else dict.fromkeys(keys)
    first = last = None
    if decode_per_row >= 2 * DRIFT_WINDOW:
        first = _median([float(np.mean(m["latencies"][:DRIFT_WINDOW])) * 1e3 for m in measured])
        last = _median([float(np.mean(m["latencies"][-DRIFT_WINDOW:])) * 1e3 for m in measured])
    result.update(first100_ms=first, last100_ms=last, last100_over_first100=last / first if first else None)
    result["per_run"] = per_run
    return result


# ---------------------------------------------------------------------------------------------- machine
def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def library_versions() -> dict:
    """numpy and onnxruntime always (the runtime's own deps); torch only if already loaded."""
    from .. import __version__

    out = {"python": platform.python_version(), "gptx": __version__, "numpy": np.__version__}
    with contextlib.suppress(ImportError):
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    if "torch" in sys.modules:
        out["torch"] = getattr(sys.modules["torch"], "__version__", "?")
    return out


def machine_info() -> dict:
    ram_kib = proc_kib("/proc/meminfo", "MemTotal:")
    info = {"cpu": proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
            "cores": usable_cores(), "logical_cpus": os.cpu_count(),
            "ram_gib": None if ram_kib is None else ram_kib / 2**20, "loadavg": list(os.getloadavg()),
            "platform": platform.platform(), "versions": library_versions(),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}  # huge pages for the weights: gptx/launcher.py
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    if (torch := _cuda_torch("cuda")) is not None:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ---------------------------------------------------------------------------------------------- command
def sampling_summary(sampling) -> str:
    """'greedy', or the sampling settings a run used, as the report and its table title show them."""
    if sampling is None or sampling.greedy:
        return "greedy"
    top_k = f"top-k {sampling.top_k}, " if sampling.top_k else ""
    top_p = f"top-p {sampling.top_p:g}, " if sampling.top_p is not None and sampling.top_p < 1 else ""
    return f"temperature {sampling.temperature:g}, {top_k}{top_p}seed {sampling.seed}"


def run_bench_command(directory, backend: str = "auto", device: str = "cpu", batch_sizes: Sequence[int] = (1,),
                      prompt_lens: Sequence[int] = (32,), new_tokens: int | None = None, runs: int = 3,
                      compare: str | None = None, plot_path: Path | None = None, console=None, warmup: int = 1,
                      sampling=None) -> dict:
    """Benchmark every (batch, prompt_len) on `backend` and, in the same process, on `compare` (default: torch when
    installed); `sampling` is a SamplingParams (None: greedy). Progress and the table go to `console` (rich).

    new_tokens None: DEFAULT_NEW_TOKENS, clamped (with a note) where the longest prompt leaves less room."""
    from rich.console import Console

    from .backends import BACKENDS, resolve
    from .bench_report import add_ratios, require_matplotlib, results_table, write_plot
    from .engine import load
    from .manifest import load_manifest

    console = console or Console(quiet=True)
    manifest = load_manifest(directory)
    block_size = int(manifest["config"]["block_size"])
    batch_sizes, prompt_lens = _positive_ints(batch_sizes, "batch sizes"), _positive_ints(prompt_lens, "prompt lengths")
    notes = []
    if new_tokens is None:
        room = block_size - max(prompt_lens)
        new_tokens = room if 1 <= room < DEFAULT_NEW_TOKENS else DEFAULT_NEW_TOKENS  # no room: validate_args' error
        if new_tokens != DEFAULT_NEW_TOKENS:
            notes.append(f"new_tokens set to {room} (not {DEFAULT_NEW_TOKENS}) so prompt {max(prompt_lens)} + new "
                         f"tokens fits the model's block size {block_size}")
    validate_args(batch_sizes, prompt_lens, new_tokens, runs, block_size, warmup)
    check_memory(manifest, batch_sizes, prompt_lens, new_tokens, device)
    shown = len(notes)  # argument notes are shown before the runs, the others after the table
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    primary = resolve(backend, manifest, device)
    default = "torch" if primary != "torch" and importlib.util.find_spec("torch") is not None else "none"
    compare_name = (compare or default).strip().lower()
    if compare_name not in ("none", "auto", *BACKENDS):
        raise InvalidInput(f"--compare must be none or one of {', '.join(BACKENDS)}, got {compare!r}")
    compare_name = "none" if compare_name == "none" else resolve(compare_name, manifest, device)
    if compare_name == primary:
        compare_name = "none"
    if plot_path is not None:
        require_matplotlib()

    results = []
    for name, required in ((primary, True), (compare_name, compare is not None)):
        if name == "none":
            continue
        try:
            engine = load(directory, name, device)
        except GptxError as e:
            if required:
                raise
            notes.append(f"compare backend {name} skipped: {e}")
            continue
        for batch, prompt_len in itertools.product(batch_sizes, prompt_lens):
            console.print(f"[dim]{engine.backend.describe()}: batch {batch}, prompt {prompt_len}, "
                          f"{new_tokens} new tokens x {runs} runs...[/dim]", highlight=False)
            results.append(bench_config(engine, batch, prompt_len, new_tokens, runs, warmup, sampling))
        del engine
        gc.collect()

    add_ratios(results)
    summary = {key: manifest.get(key) for key in ("source", "config", "dtype", "quantization")}
    report = {"directory": str(directory), "machine": machine_info(),
              "manifest": summary | {"optimizations": manifest.get("optimizations", [])},
              "settings": {"backend": primary, "compare": compare_name, "device": device, "batch_sizes": batch_sizes,
                           "prompt_lens": prompt_lens, "new_tokens": new_tokens, "runs": runs, "warmup": warmup,
                           "prompt_seed": PROMPT_SEED, "sampling": sampling_summary(sampling)},
              "results": results, "notes": notes}
    console.print(results_table(results, report))
    for note in notes[shown:]:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    if plot_path is not None:
        write_plot(results, Path(plot_path), title=f"gptx decode throughput ({manifest.get('source')})")
        console.print(f"wrote {plot_path}", highlight=False)
    return report
