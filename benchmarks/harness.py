"""The measuring half of the peer benchmarks: shared weights, engines behind one small interface, interleaved
rounds with the machine's other load noted, memory probes in fresh processes, and the machine's read bandwidth.

Nothing here judges or formats; `judge.py` and `report.py` do. Every engine is measured the way an app would
use it: greedy decode of synthetic prompt ids, one token at a time, argmax over the logits on the host.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gptx.runtime import benchmark as B

VOCAB = 50257  # GPT-2's tokenizer; exports may pad the embedding beyond it


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {msg}", flush=True)


def sample_windows(tokenizer, windows: int, length: int, held_out: bool = True) -> np.ndarray:
    """(windows, length) consecutive token windows of the bundled Shakespeare text: from its last 10% (the part
    `gptx train`'s default val_fraction holds out) by default, from the start with held_out=False (calibration)."""
    from gptx.export.validate import SAMPLE_TEXT
    from gptx.runtime.errors import InvalidInput

    tokens = tokenizer.encode(SAMPLE_TEXT.read_text(encoding="utf-8"))
    start = len(tokens) - len(tokens) // 10 if held_out else 0
    need = windows * length
    if start + need > len(tokens):
        raise InvalidInput(f"the sample text holds {len(tokens) - start} tokens there, {need} asked for")
    return np.asarray(tokens[start:start + need], dtype=np.int64).reshape(windows, length)


# ---------------------------------------------------------------------------------------------- weights
def hf_directory(gpt, hf_dir: Path) -> dict:
    """A gptx GPT saved as a Hugging Face GPT2LMHeadModel directory (with the GPT-2 tokenizer files and the
    `n_ctx` key llama.cpp's converter still reads), checked logit-for-logit against the GPT itself."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    from gptx.model.weights import CONV1D_WEIGHTS
    from gptx.runtime.tokenizer import Tokenizer, save_hf_vocab

    c = gpt.config
    cfg = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                     n_head=c.n_head, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=50256, eos_token_id=50256)
    hf = GPT2LMHeadModel(cfg).eval()
    state = {k: (v.t() if k.endswith(CONV1D_WEIGHTS) else v) for k, v in gpt.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise RuntimeError(f"HF <- gptx weight mapping failed: missing {missing[:4]}, unexpected {unexpected[:4]}")
    hf_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(hf_dir)
    save_hf_vocab(Tokenizer(), hf_dir)
    GPT2Tokenizer.from_pretrained(str(hf_dir)).save_pretrained(hf_dir)  # merges.txt / tokenizer.json too
    config = json.loads((hf_dir / "config.json").read_text())
    config["n_ctx"] = c.block_size  # transformers 5 no longer writes it; convert_hf_to_gguf.py needs it
    (hf_dir / "config.json").write_text(json.dumps(config, indent=2))
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = float((hf(ids).logits[:, -1] - gpt(ids)[0][:, -1]).abs().max())
    return {"hf_dir": str(hf_dir), "hf_vs_gptx_max_abs_logit_diff": diff}


def export_variant(source: str, out_dir: Path, quantize: str | None = None, reuse: bool = False) -> dict:
    """An fp32 export of `source`, then (in place, with quantize: a gptx.export.optimize.PRESETS name) gptx's own
    fuse + quantize pass; the manifest. With reuse, an export already in out_dir is kept."""
    from gptx.export.convert import export
    from gptx.export.optimize import optimize_export
    from gptx.runtime.manifest import load_manifest

    if reuse and (out_dir / "manifest.json").is_file():
        return load_manifest(out_dir)
    manifest = export(source, out_dir, force=True, progress=False, validate=False)
    if quantize:
        manifest = optimize_export(out_dir, fuse_graph=True, preset=quantize)
    return manifest


# ---------------------------------------------------------------------------------------------- llama.cpp
@dataclass
class LlamaCpp:
    """Where llama.cpp lives: the Python binding (pip install llama-cpp-python, or LLAMA_CPP_LIB_PATH pointing at
    a build's libraries; `bin_dir` sets it), and a source tree for convert_hf_to_gguf.py and its gguf-py."""

    src_dir: Path | None
    bin_dir: Path | None = None

    def __post_init__(self):
        if self.bin_dir is not None:
            os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(self.bin_dir))

    def binding(self):
        import llama_cpp

        return llama_cpp

    def version(self) -> str:
        return getattr(self.binding(), "__version__", "?")

    def convert(self, hf_dir: Path, out: Path) -> Path:
        """HF directory -> f32 GGUF with llama.cpp's own converter."""
        if self.src_dir is None or not (self.src_dir / "convert_hf_to_gguf.py").is_file():
            raise FileNotFoundError("--llama-src must be a llama.cpp source tree holding convert_hf_to_gguf.py")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(self.src_dir / "gguf-py"),
                                                           os.environ.get("PYTHONPATH", "")]))
        subprocess.run([sys.executable, str(self.src_dir / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", "f32",
                        "--outfile", str(out)], check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return out

    def quantize(self, f32: Path, out: Path, ftype: str) -> Path:
        """f16 / q8_0 / q4_0 with llama.cpp's own quantizer (its defaults: the tied embedding stays at higher bits)."""
        llama_cpp = self.binding()
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = {"f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16, "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
                        "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[ftype]
        params.nthread = B.usable_cores()
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params) != 0:
            raise RuntimeError(f"llama_model_quantize to {ftype} failed")
        return out

    def gguf_files(self, hf_dir: Path, out_dir: Path, types=("f32", "f16", "q8_0", "q4_0"), reuse=False) -> dict:
        out_dir.mkdir(parents=True, exist_ok=True)
        f32 = out_dir / "model-f32.gguf"
        if not (reuse and f32.is_file()):
            self.convert(hf_dir, f32)
        files = {"f32": f32}
        for t in types:
            if t != "f32":
                path = out_dir / f"model-{t}.gguf"
                files[t] = path if reuse and path.is_file() else self.quantize(f32, path, t)
        return files


# ---------------------------------------------------------------------------------------------- engines
class Engine:
    """One engine under test. `run` is one greedy generation (a raw run for gptx.runtime.benchmark.summarize_runs);
    `prefill` times one prompt's forward; `logits` (optional) gives every position's logits for quality."""

    label = "?"
    family = "?"   # gptx | llama.cpp | transformers | CTranslate2
    mode = "?"     # fp32 | 16-bit | 8-bit | 4-bit
    weight_bytes_per_token: float | None = None  # bytes of weights read per decode token (memory-bound model)
    kv_bytes_per_slot: float | None = None       # KV-cache bytes per cached token, all layers

    def run(self, prompts: list[list[int]], new_tokens: int) -> dict:
        raise NotImplementedError

    def prefill(self, prompt: list[int]) -> float:
        return self.run([prompt], 1)["prefill"]

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def onnx_weight_bytes(directory: Path, manifest: dict) -> float:
    """Bytes of the initializers a decode step reads in full: everything but tables only gathered from (the
    position embedding, an fp32 token table beside a quantized LM head)."""
    import onnx

    graph = onnx.load(str(directory / manifest["model_file"]), load_external_data=False).graph
    gathered_only = {i for n in graph.node for i in n.input[:1] if n.op_type in ("Gather", "GatherBlockQuantized")}
    read = {i for n in graph.node if n.op_type not in ("Gather", "GatherBlockQuantized") for i in n.input}
    total = 0
    for t in graph.initializer:
        if t.name in gathered_only and t.name not in read:
            continue
        length = next((int(e.value) for e in t.external_data if e.key == "length"), None)
        total += length if length is not None else len(t.raw_data)
    return float(total)


class GptxEngine(Engine):
    family = "gptx"

    def __init__(self, label: str, directory: Path, mode: str, backend: str = "onnxruntime", **backend_options):
        from gptx.runtime.engine import load

        self.label, self.mode, self.directory = label, mode, Path(directory)
        self.engine = load(directory, backend, **backend_options)
        self.vocab = self.engine.vocab_size
        cfg = self.engine.manifest["config"]
        kv_dtype = 2 if self.engine.manifest["dtype"] == "float16" else 4
        self.kv_bytes_per_slot = 2.0 * cfg["n_layer"] * cfg["n_embd"] * kv_dtype

    @functools.cached_property
    def weight_bytes_per_token(self) -> float:
        # computed on first use: it imports onnx (~15 MiB), which must not count in a memory probe's peak RSS
        return onnx_weight_bytes(self.directory, self.engine.manifest)

    def run(self, prompts, new_tokens):
        return B.one_run(self.engine.backend, prompts, new_tokens, self.vocab)

    def greedy(self, prompt, new_tokens):
        return self.engine.generate_ids(prompt, new_tokens, temperature=0, stop_at_eos=False)


class StampProcessor:
    """A logits processor that only records when each step's logits arrive (after that step's forward)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


class HFEngine(Engine):
    family, mode = "transformers", "fp32"

    def __init__(self, label: str, hf_dir: Path, attn: str):
        import torch
        from transformers import GPT2LMHeadModel

        self.torch, self.label = torch, label
        self.model = GPT2LMHeadModel.from_pretrained(hf_dir, attn_implementation=attn, dtype=torch.float32).eval()

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
        # the first stamp follows prefill (TTFT); the selection of the last token follows the last stamp
        lat = list(np.diff(stamp.times))
        if lat:
            lat[-1] += end - stamp.times[-1]
        ttft = stamp.times[0] - t0
        return {"ttft": ttft, "prefill": ttft, "decode": float(sum(lat)), "latencies": lat,
                "tokens": [out.shape[1] - ids.shape[1]] * ids.shape[0]}


class CT2Engine(Engine):
    family = "CTranslate2"

    def __init__(self, label: str, ct2_dir: Path, compute_type: str, mode: str):
        import ctranslate2

        from gptx.runtime.tokenizer import Tokenizer, bytes_to_unicode

        self.label, self.mode = label, mode
        self.generator = ctranslate2.Generator(str(ct2_dir), device="cpu", compute_type=compute_type,
                                               intra_threads=B.usable_cores())
        tok, byte_map = Tokenizer(), bytes_to_unicode()
        self.spell = lambda t: "".join(byte_map[b] for b in tok.decode_bytes([t]))

    def run(self, prompts, new_tokens):
        if len(prompts) != 1:
            raise ValueError("the CTranslate2 engine measures batch 1")
        stamps = []
        t0 = time.perf_counter()
        for _ in self.generator.generate_tokens([self.spell(t) for t in prompts[0]], max_length=new_tokens,
                                                min_length=new_tokens, sampling_topk=1):
            stamps.append(time.perf_counter())
        lat = list(np.diff(stamps))
        return {"ttft": stamps[0] - t0, "prefill": stamps[0] - t0, "decode": float(sum(lat)), "latencies": lat,
                "tokens": [len(stamps)]}


class LlamaCppEngine(Engine):
    """llama.cpp through its Python binding: one llama_decode per token, argmax over the last logits in numpy
    (the same host-side work as gptx's loop). KV cache in f16, llama.cpp's default."""

    family = "llama.cpp"

    def __init__(self, label: str, gguf: Path, mode: str, llama: LlamaCpp, flash_attn: bool, n_ctx: int = 1024,
                 logits_all: bool = False):
        self.llama_cpp = llama.binding()
        self.label, self.mode = label, mode
        self.llm = self.llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=512, n_ubatch=512,
                                        n_threads=B.usable_cores(), n_threads_batch=B.usable_cores(),
                                        flash_attn=flash_attn, logits_all=logits_all, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.weight_bytes_per_token = float(self.llama_cpp.llama_model_size(self.llm.model))
        meta = self.llm.metadata
        n_layer, n_embd = int(meta["gpt2.block_count"]), int(meta["gpt2.embedding_length"])
        self.weight_bytes_per_token -= 4.0 * int(meta["gpt2.context_length"]) * n_embd  # position table: one row read
        self.kv_bytes_per_slot = 2.0 * n_layer * n_embd * 2

    def _last_token(self) -> int:
        ptr = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))[:VOCAB].argmax())

    def run(self, prompts, new_tokens):
        if len(prompts) != 1:
            raise ValueError("the llama.cpp engine measures batch 1")
        clock = time.perf_counter
        self.llm.reset()
        t0 = clock()
        self.llm.eval(prompts[0])
        prefill = clock() - t0
        tok = self._last_token()
        ttft = clock() - t0
        lat, out = [], [tok]
        for _ in range(new_tokens - 1):
            t = clock()
            self.llm.eval([tok])
            tok = self._last_token()
            lat.append(clock() - t)
            out.append(tok)
        self.tokens = out
        return {"ttft": ttft, "prefill": prefill, "decode": float(sum(lat)), "latencies": lat, "tokens": [len(out)]}

    def greedy(self, prompt, new_tokens):
        self.run([prompt], new_tokens)
        return self.tokens

    def logits(self, tokens: list[int]) -> np.ndarray:
        """(len(tokens), VOCAB) logits of every position (needs logits_all=True)."""
        self.llm.reset()
        self.llm.eval(tokens)
        return np.array(self.llm.scores[:len(tokens), :VOCAB])

    def close(self):
        self.llm.close()


class Remote(Engine):
    """An engine in a process of its own, driven over a pipe, so engines share no heap, no allocator and no
    OpenMP / thread pool (a runtime's spinning threads would otherwise steal the cores from whichever engine runs
    next; measured here: llama.cpp q4_0 lost up to half its speed in a process shared with the other engines).
    Idle workers block on the pipe. `spec` = (Engine subclass name in this module, args, kwargs)."""

    def __init__(self, label: str, family: str, mode: str, spec: tuple, threads: int, timeout: float = 900):
        import multiprocessing as mp

        self.label, self.family, self.mode, self.timeout = label, family, mode, timeout
        self.conn, child = mp.get_context("spawn").Pipe()
        self.proc = mp.get_context("spawn").Process(target=_serve, args=(child, spec, threads), daemon=True)
        self.proc.start()
        child.close()
        attrs = self._reply()
        self.weight_bytes_per_token = attrs["weight_bytes_per_token"]
        self.kv_bytes_per_slot = attrs["kv_bytes_per_slot"]

    def _reply(self):
        if not self.conn.poll(self.timeout):
            self.close()
            raise TimeoutError(f"{self.label}: no answer from its worker in {self.timeout:.0f} s")
        status, value = self.conn.recv()
        if status == "error":
            raise RuntimeError(value)
        return value

    def _call(self, method: str, *args):
        self.conn.send((method, args))
        return self._reply()

    def run(self, prompts, new_tokens):
        return self._call("run", prompts, new_tokens)

    def prefill(self, prompt):
        return self._call("prefill", prompt)

    def greedy(self, prompt, new_tokens):
        return self._call("greedy", prompt, new_tokens)

    def close(self):
        if self.proc.is_alive():
            with contextlib.suppress(OSError, BrokenPipeError):
                self.conn.send(("close", ()))
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()


def _serve(conn, spec: tuple, threads: int) -> None:
    """Worker loop of a Remote engine: build it, then answer (method, args) until 'close'."""
    name, args, kwargs = spec
    if "torch" in sys.modules or name in ("HFEngine", "GptxEngine"):
        with contextlib.suppress(ImportError):
            import torch

            torch.set_num_threads(threads)
    try:
        engine = globals()[name](*args, **kwargs)
    except Exception as e:  # noqa: BLE001  reported to the parent, which decides (optional peer or bug)
        conn.send(("error", f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"))
        return
    conn.send(("ok", {"weight_bytes_per_token": engine.weight_bytes_per_token,
                      "kv_bytes_per_slot": engine.kv_bytes_per_slot}))
    while True:
        method, args = conn.recv()
        if method == "close":
            engine.close()
            return
        conn.send(("ok", getattr(engine, method)(*args)))


# ---------------------------------------------------------------------------------------------- machine
class CpuMeter:
    """Share of the machine's CPU time used by *other* processes between start() and stop(): (all busy jiffies
    from /proc/stat - the CPU time of this process and of `pids`, our engine workers) / (wall x cores).
    None where /proc is missing."""

    def __init__(self, pids=()):
        self.hz = os.sysconf("SC_CLK_TCK")
        self.pids = list(pids)

    @staticmethod
    def _busy_jiffies() -> int | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except OSError:
            return None
        return sum(fields) - fields[3] - fields[4]  # minus idle and iowait

    def _ours(self) -> float:
        """CPU seconds of this process and the worker processes."""
        total = sum(os.times()[:2])
        for pid in self.pids:
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / self.hz  # utime, stime
        return total

    def start(self):
        self.t, self.busy, self.own = time.perf_counter(), self._busy_jiffies(), self._ours()

    def stop(self) -> float | None:
        busy = self._busy_jiffies()
        if busy is None or self.busy is None:
            return None
        wall = time.perf_counter() - self.t
        others = (busy - self.busy) / self.hz - (self._ours() - self.own)
        return min(1.0, max(0.0, others / (wall * (os.cpu_count() or 1))))  # clock ticks are coarse


def read_bandwidth_gbs(threads: int | None = None, mib: int = 512, repeats: int = 7) -> dict:
    """Measured memory-read bandwidth, GB/s (1e9): `threads` threads each stream their share of a `mib` MiB float32
    array through a reduction that costs less than the read (numpy's max; a matrix-vector product with BLAS),
    best of `repeats` per method and best method. Numpy releases the GIL in both, so the threads run in parallel."""
    threads = threads or B.usable_cores()
    data = np.ones(mib * 2**20 // 4, dtype=np.float32)
    ones = np.ones(1024, dtype=np.float32)
    methods = {"numpy max": (np.max, data), "BLAS matrix-vector": (lambda m: m @ ones, data.reshape(-1, 1024))}
    best = {}
    for name, (fn, view) in methods.items():
        parts = np.array_split(view, threads)
        for _ in range(repeats):
            workers = [threading.Thread(target=fn, args=(part,)) for part in parts]
            t = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            best[name] = max(best.get(name, 0.0), data.nbytes / (time.perf_counter() - t) / 1e9)
    method = max(best, key=best.get)
    return {"gb_per_s": best[method], "method": method, "by_method": best, "threads": threads, "array_mib": mib,
            "repeats": repeats}


# ---------------------------------------------------------------------------------------------- rounds
@dataclass
class Rounds:
    """Raw runs per engine label, and per round the other processes' CPU share while that round ran."""

    raw: dict[str, list[dict]] = field(default_factory=dict)
    others_cpu: list[float | None] = field(default_factory=list)
    loadavg: list[float] = field(default_factory=list)
    probes: list = field(default_factory=list)  # what `probe()` returned at the start of each round


def interleaved(engines: list[Engine], task, rounds: int, warmup: int = 1, shuffle_seed: int = 0,
                probe=None) -> Rounds:
    """Warm every engine up, then `rounds` rounds of `task(engine) -> raw run`, each round running every engine
    once in a fresh random order (so no engine always follows the same neighbour). Engines are paired by round.
    `probe()`, if given, runs at the start of each round (e.g. a bandwidth measurement: it drifts too)."""
    out = Rounds(raw={e.label: [] for e in engines})
    for e in engines:
        for _ in range(warmup):
            task(e)
    rng = np.random.default_rng(shuffle_seed)
    meter = CpuMeter([e.proc.pid for e in engines if isinstance(e, Remote)])
    for i in range(rounds):
        if probe is not None:
            out.probes.append(probe())
        meter.start()
        out.loadavg.append(os.getloadavg()[0])
        for j in rng.permutation(len(engines)):
            e = engines[j]
            gc.collect()
            gc.disable()  # a collection in the middle of a token is noise, not the engine
            try:
                out.raw[e.label].append(task(e))
            finally:
                gc.enable()
        out.others_cpu.append(meter.stop())
        summary = ", ".join(f"{e.label} {_rate(out.raw[e.label][-1]):.1f}" for e in engines)
        log(f"  round {i + 1}/{rounds} (others' CPU {_pct(out.others_cpu[-1])}): {summary}")
    return out


def _rate(run: dict) -> float:
    return run.get("rate") or (run["decode_tokens"] / run["decode"] if run.get("decode") else 0.0)


def _pct(x):
    return "?" if x is None else f"{x * 100:.0f}%"


def decode_task(prompts: list[list[int]], new_tokens: int):
    def task(engine: Engine) -> dict:
        raw = engine.run(prompts, new_tokens)
        raw["decode_tokens"] = len(prompts) * (new_tokens - 1)
        return raw
    return task


def prefill_task(prompt: list[int]):
    def task(engine: Engine) -> dict:
        seconds = engine.prefill(prompt)
        return {"prefill": seconds, "rate": len(prompt) / seconds}
    return task


def paired_ratio(a: list[dict], b: list[dict], key=_rate) -> float | None:
    """Median over rounds of key(a_i) / key(b_i): each round's two runs saw the same machine load."""
    ratios = [key(x) / key(y) for x, y in zip(a, b) if key(y)]
    return float(statistics.median(ratios)) if ratios else None


def median_rate(runs: list[dict]) -> float | None:
    rates = [_rate(r) for r in runs if _rate(r)]
    return float(statistics.median(rates)) if rates else None


# ---------------------------------------------------------------------------------------------- profile
def decode_feeds(manifest: dict, past_len: int) -> dict:
    """Inputs of one batch-1 decode step of an export at `past_len` filled cache slots (values do not matter),
    shaped as the runtime feeds them: a batch-1 cache's whole window for in-place graphs, `past_len` slots
    otherwise."""
    from gptx.runtime.kv_cache import first_window
    from gptx.runtime.manifest import writes_cache_in_place

    cfg = manifest["config"]
    dtype = np.float16 if manifest["dtype"] == "float16" else np.float32
    in_place = writes_cache_in_place(manifest)
    block = cfg["block_size"]
    slots = first_window(past_len + 1, block, True, 1, cfg["n_layer"], cfg["n_embd"]) if in_place else past_len
    mask = np.zeros((1, slots + 1), np.int64)
    mask[0, :past_len] = mask[0, -1] = 1
    feeds = {"input_ids": np.array([[464]], np.int64), "attention_mask": mask,
             "position_ids": np.array([[past_len]], np.int64)}
    shape = (1, cfg["n_head"], slots, cfg["n_embd"] // cfg["n_head"])
    feeds.update({i["name"]: np.zeros(shape, dtype) for i in manifest["inputs"]
                  if i["name"].startswith("past_key_values.")})
    if any(i["name"] == "logits_index" for i in manifest["inputs"]):
        feeds["logits_index"] = np.zeros((1, 1), np.int64)  # the logits of the one new token
    return feeds


def bound_step(session, manifest: dict, feeds: dict):
    """A no-argument callable running one step as the runtime does: in-place graphs get each past buffer bound as
    its present output too (I/O binding), others a plain `session.run`."""
    from gptx.runtime.manifest import writes_cache_in_place

    if not writes_cache_in_place(manifest):
        return lambda: session.run(None, feeds)
    io = session.io_binding()
    io.bind_output("logits", "cpu")
    for name, value in feeds.items():
        if name.startswith("past_key_values."):
            ptr = value.__array_interface__["data"][0]
            io.bind_input(name, "cpu", 0, value.dtype, value.shape, ptr)
            io.bind_output(name.replace("past_key_values.", "present."), "cpu", 0, value.dtype, value.shape, ptr)
        else:
            io.bind_cpu_input(name, value)
    return lambda: session.run_with_iobinding(io)


def ort_op_profile(directory: Path, past_len: int, steps: int = 64, workdir: Path | None = None) -> dict:
    """Per-op kernel time of one decode step, from a plain ONNX Runtime session with profiling on (the runtime's
    own session options, our own session: nothing inside the runtime is touched)."""
    import onnxruntime as ort

    from gptx.runtime.backends.onnxruntime_backend import session_options
    from gptx.runtime.manifest import load_manifest

    manifest = load_manifest(directory)
    model = str(directory / manifest["model_file"])
    feeds = decode_feeds(manifest, past_len)
    plain = ort.InferenceSession(model, session_options(), providers=["CPUExecutionProvider"])
    step = bound_step(plain, manifest, feeds)
    for _ in range(4):
        step()
    t = time.perf_counter()
    for _ in range(steps):  # timed without profiling, which adds its own cost to every node
        step()
    session_ms = (time.perf_counter() - t) / steps * 1e3
    del plain, step
    opts = session_options()
    opts.enable_profiling = True
    opts.profile_file_prefix = str((workdir or Path(tempfile.gettempdir())) / f"ort_profile_{directory.name}")
    session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    step = bound_step(session, manifest, feeds)
    for _ in range(4 + steps):
        step()
    events = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, list] = {}
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    first_timed = runs[4]["ts"] if len(runs) > 4 else 0
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time") and ev["ts"] >= first_timed:
            entry = by_op.setdefault(ev.get("args", {}).get("op_name", "?"), [0.0, set()])
            entry[0] += ev["dur"]
            entry[1].add(ev["name"])
    total = sum(v[0] for v in by_op.values()) or 1.0
    ops = sorted(by_op.items(), key=lambda kv: -kv[1][0])
    return {"past_len": past_len, "steps": steps, "session_ms": session_ms,
            "nodes": sum(len(v[1]) for v in by_op.values()),
            "top_ops": [{"op": op, "share": us / total, "us_per_step": us / steps, "nodes": len(names)}
                        for op, (us, names) in ops[:12]]}


def llama_agreement(llama: LlamaCpp, gguf: dict, windows) -> dict:
    """{ftype: merged top-1 / perplexity agreement} of each GGUF type against the f32 one, teacher-forced over
    `windows` (token id rows) with gptx's own comparison (gptx.export.validate); every engine is closed."""
    from gptx.export.validate import logit_agreement, merge_agreement

    def engine(path):
        return LlamaCppEngine("", path, "", llama, False, n_ctx=windows.shape[1], logits_all=True)

    ref = engine(gguf["f32"])
    ref_logits = [ref.logits(w.tolist()) for w in windows]
    ref.close()
    out = {}
    for ftype, path in gguf.items():
        if ftype == "f32":
            continue
        log(f"quality: llama.cpp {ftype}")
        cand = engine(path)
        out[ftype] = merge_agreement([logit_agreement(r[:-1], cand.logits(w.tolist())[:-1], w[1:])
                                      for r, w in zip(ref_logits, windows)])
        cand.close()
    return out


# ---------------------------------------------------------------------------------------------- probes
def probe(spec: dict, timeout: float = 900) -> dict:
    """Load time and peak RSS of one engine in a fresh process (so engines never share a heap): load, one greedy
    decode (prompt 32 + 128 new: `peak_rss_mib`), then one 512-token prefill (`peak_rss_with_prefill_512_mib`).
    Returns the child's JSON, or {'error': ...}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "probe", json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"probe timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


def _vm(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _probe_main(spec: dict) -> None:
    import gptx.runtime  # noqa: F401  (imports numpy / onnxruntime first, so they count as the baseline)

    if spec["kind"] == "gptx":
        import onnxruntime  # noqa: F401
    gc.collect()
    base = _vm("VmRSS")
    t = time.perf_counter()
    if spec["kind"] == "gptx":
        engine = GptxEngine("probe", Path(spec["dir"]), "?", spec.get("backend", "onnxruntime"))
    elif spec["kind"] == "llama.cpp":
        engine = LlamaCppEngine("probe", Path(spec["gguf"]), "?", LlamaCpp(None), spec["flash_attn"],
                                n_ctx=spec["n_ctx"])
    else:
        raise SystemExit(f"unknown probe kind {spec['kind']!r}")
    load_s = time.perf_counter() - t
    after_load = _vm("VmRSS")
    engine.run(B.synthetic_prompts(1, 32, VOCAB), 128)
    decode_peak = _vm("VmHWM")
    engine.prefill(B.synthetic_prompts(1, 512, VOCAB)[0])
    print(json.dumps({"load_s": load_s, "rss_before_load_mib": base, "rss_after_load_mib": after_load,
                      "peak_rss_mib": decode_peak, "peak_rss_with_prefill_512_mib": _vm("VmHWM"),
                      "rss_end_mib": _vm("VmRSS")}))


@contextlib.contextmanager
def scratch_dir(path: Path | None):
    """`path` (kept), or a temporary directory removed afterwards."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    tmp = Path(tempfile.mkdtemp(prefix="gptx-peers-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "probe":
    _probe_main(json.loads(sys.argv[2]))
