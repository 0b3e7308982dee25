#!/usr/bin/env python
"""Load test of `gptx serve` (and, beside it, llama.cpp's own server) on four kinds of traffic.

    python benchmarks/serve_load.py                                   # builds the weights, starts gptx serve
    python benchmarks/serve_load.py --llama-server /path/to/llama-server --llama-convert /path/to/convert_hf_to_gguf.py
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model NAME   # a server already running

Model: GPT-2-124M shapes with random weights (`random:gpt2`, built once in --workdir as a Hugging Face directory
by harness.hf_directory (as compare_peers.py does), then exported with gptx and, with --llama-convert, converted to
an f32 GGUF), so both servers run exactly the same weights. Every prompt is token ids cut from the bundled
Shakespeare text, so both servers see the same tokens; greedy, ignore_eos, streamed. Scenarios (--scenarios):

  throughput  for each concurrency level (1, 8, 16) that many clients send --requests-per-client requests of a
              32-token prompt and 128 new tokens back to back, staggered over one unloaded request's duration:
              aggregate output tokens/s, TTFT and inter-token gap percentiles.
  mixed       4 short streaming clients (32-token prompts) run for --mixed-seconds while a distinct --long-len
              token prompt arrives every --long-every seconds: the short streams' inter-token gap p50/p99/max and the
              mean of their 5 worst gaps, against the same clients without long prompts; the long prompts' TTFT
              under that load and on the idle server.
  prefix      per --system-prompts distinct --system-len token "system prompts": a cold request (system + a short
              user turn), a warm one (the same system, another turn) and a warm one sent while another stream holds
              a row (so it lands in a different row / slot): their TTFTs.
  fairness    4 single 32-token requests alone, then beside one request carrying 32 prompts: their completion times.

Servers run one after the other within each scenario, so drift in machine load hits both alike. Writes --json,
the plot (--plot) and, when --json is docs/serving_load.json, re-renders docs/serving.md's load-test block
(benchmarks/render_docs.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import export_variant, hf_directory, log  # after the sys.path lines

SCENARIOS = ("throughput", "mixed", "prefix", "fairness")


# ---------------------------------------------------------------------------------------------- servers
class Server:
    """A server process we started (stopped with SIGTERM, then SIGKILL), or one given by URL."""

    def __init__(self, label: str, url: str, model: str, proc: subprocess.Popen | None = None):
        self.label, self.url, self.model, self.proc = label, url, model, proc

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise SystemExit(f"{self.label} exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{self.label} not ready within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gptx(export_dir: Path, max_batch: int, threads: int | None, logfile: Path, extra: list[str]) -> Server:
    port = free_port()
    cmd = [sys.executable, str(ROOT / "gptx" / "cli.py"), "serve", str(export_dir), "--port", str(port),
           "--max-batch", str(max_batch), *extra]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=logfile.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
    return Server("gptx serve", f"http://127.0.0.1:{port}", export_dir.name, proc)


def start_llama(binary: Path, gguf: Path, parallel: int, context: int, threads: int | None, logfile: Path) -> Server:
    """llama-server with `parallel` slots sharing `context` tokens; its prompt cache (cache_prompt, on by default)
    is asked for in every request too."""
    port = free_port()
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--parallel", str(parallel),
           "-c", str(context), "--threads", str(threads or os.cpu_count() or 1)]
    proc = subprocess.Popen(cmd, stdout=logfile.open("w"), stderr=subprocess.STDOUT)
    return Server("llama.cpp server", f"http://127.0.0.1:{port}", gguf.stem, proc)


# ---------------------------------------------------------------------------------------------- weights
def prepare_weights(work: Path, seed: int, convert: Path | None, gguf: Path | None) -> tuple[Path, Path | None]:
    """random:gpt2 as a HF directory (shared with compare_peers), its gptx export, and an f32 GGUF of it."""
    from gptx.model.weights import random_model

    hf_dir, export_dir = work / "hf-gpt2-random", work / "gptx-fp32"
    if not (hf_dir / "config.json").exists():
        log("building random GPT-2-124M weights (HF directory)")
        hf_directory(random_model("random:gpt2", seed), hf_dir)
    log("exporting them with gptx (kept in --workdir)")
    export_variant(str(hf_dir), export_dir, reuse=True)
    if gguf is None and convert is not None:
        gguf = work / "gpt2-random-f32.gguf"
        if not gguf.exists():
            log("converting them to GGUF (f32) with llama.cpp's converter")
            env = {**os.environ, "PYTHONPATH": str(convert.parent / "gguf-py")}
            subprocess.run([sys.executable, str(convert), str(hf_dir), "--outfile", str(gguf), "--outtype", "f32"],
                           check=True, env=env, stdout=subprocess.DEVNULL)
    return export_dir, gguf


def text_ids() -> list[int]:
    from gptx.runtime.tokenizer import Tokenizer

    return Tokenizer().encode((ROOT / "gptx" / "export" / "data" / "tinyshakespeare.txt").read_text()[:400_000])


def fixed_prompts(n: int, length: int, part: int = 0, parts: int = 1) -> list[list[int]]:
    """n prompts of exactly `length` GPT-2 token ids, cut from the bundled Shakespeare text (from its `part`-th of
    `parts` equal parts, so scenarios that must not share prefixes take different parts)."""
    ids = text_ids()
    span = len(ids) // parts
    ids = ids[part * span:(part + 1) * span]
    step = len(ids) // n
    if step < length:
        raise SystemExit(f"the sample text has no room for {n} distinct prompts of {length} tokens")
    return [ids[i * step: i * step + length] for i in range(n)]


# ---------------------------------------------------------------------------------------------- load
async def one_request(http: httpx.AsyncClient, server: Server, prompt: list, new_tokens: int,
                      first: asyncio.Event | None = None, stream: bool = True) -> dict:
    """One completion: start, chunk arrival times, tokens, finish_reason, error (`first` is set on the first chunk).
    A list of prompts (not streamed) is one request carrying them all."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": stream,
            "ignore_eos": True}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if server.label.startswith("llama"):
        body["cache_prompt"] = True
    out = {"start": time.monotonic(), "chunks": [], "tokens": None, "finish": None, "error": None}
    try:
        if not stream:
            r = await http.post(f"{server.url}/v1/completions", json=body)
            if r.status_code != 200:
                out["error"] = f"HTTP {r.status_code}: {r.text[:120]}"
            else:
                choices = r.json().get("choices") or []
                out["finish"] = "length" if choices and all(c.get("finish_reason") == "length" for c in choices) \
                    else [c.get("finish_reason") for c in choices]
                out["tokens"] = (r.json().get("usage") or {}).get("completion_tokens")
                out["chunks"] = [time.monotonic()]
                if len(choices) != (len(prompt) if isinstance(prompt[0], list) else 1):
                    out["error"] = f"{len(choices)} choices"
        else:
            async with http.stream("POST", f"{server.url}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    out["error"] = f"HTTP {r.status_code}"
                    return out
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("error"):
                        out["error"] = str(chunk["error"])[:200]
                    for choice in chunk.get("choices") or []:
                        if choice.get("text"):
                            out["chunks"].append(time.monotonic())
                            if first is not None:
                                first.set()
                        out["finish"] = choice.get("finish_reason") or out["finish"]
                    if chunk.get("usage"):
                        out["tokens"] = chunk["usage"].get("completion_tokens")
    except httpx.HTTPError as e:
        out["error"] = type(e).__name__
    out["end"] = time.monotonic()
    if out["tokens"] is None:
        out["tokens"] = len(out["chunks"])
    if out["error"] is None and (out["finish"] != "length" or not out["chunks"]):
        out["error"] = f"finish_reason {out['finish']!r} after {len(out['chunks'])} chunks"
    return out


def client_for(clients: int) -> httpx.AsyncClient:
    # a fresh connection per request (loopback: ~0.1 ms): llama-server closes a connection after a stream
    return httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 40,
                                                             max_keepalive_connections=0))


async def run_level(server: Server, clients: int, per_client: int, prompts: list[list[int]], new_tokens: int,
                    stagger: float) -> list[dict]:
    async with client_for(clients) as http:
        async def client(k: int) -> list[dict]:
            await asyncio.sleep(stagger * k / clients)
            results = []
            for i in range(per_client):
                prompt = prompts[(k * per_client + i) % len(prompts)]
                result = await one_request(http, server, prompt, new_tokens)
                results.append(result | {"client": k})
            return results

        per = await asyncio.gather(*(client(k) for k in range(clients)))
    return [r for rs in per for r in rs]


def pct(values, q):  # milliseconds
    return float(np.percentile(values, q) * 1000) if len(values) else None


def gaps_of(results: list[dict]) -> np.ndarray:
    return np.concatenate([np.diff(r["chunks"]) for r in results if len(r["chunks"]) > 1] or [np.zeros(0)])


def summarize(results: list[dict], clients: int) -> dict:
    ok = [r for r in results if r["error"] is None]
    errors = [r["error"] for r in results if r["error"] is not None]
    if not ok:
        return {"clients": clients, "requests": len(results), "errors": len(errors), "error_samples": errors[:3]}
    by_client: dict[int, list[dict]] = {}
    for r in results:
        by_client.setdefault(r["client"], []).append(r)
    # the window in which every client was busy: from the last first-request start to the first last-request end
    window = (max(rs[0]["start"] for rs in by_client.values()), min(rs[-1]["end"] for rs in by_client.values()))
    if window[1] - window[0] < 1.0:  # too short to mean anything (e.g. one request per client): whole run
        window = (min(r["start"] for r in results), max(r["end"] for r in results))
    chunk_times = np.array([t for r in ok for t in r["chunks"]])
    in_window = int(((chunk_times >= window[0]) & (chunk_times <= window[1])).sum())
    ttft = np.array([r["chunks"][0] - r["start"] for r in ok])
    gaps = gaps_of(ok)
    return {"clients": clients, "requests": len(results), "errors": len(errors), "error_samples": errors[:3],
            "tokens": int(sum(r["tokens"] for r in ok)),
            "tok_s": in_window / (window[1] - window[0]), "window_s": window[1] - window[0],
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "itl_p50_ms": pct(gaps, 50), "itl_p99_ms": pct(gaps, 99),
            "request_p50_s": float(np.median([r["end"] - r["start"] for r in ok]))}


# ---------------------------------------------------------------------------------------------- scenarios
def gap_stats(results: list[dict]) -> dict:
    gaps = np.sort(gaps_of([r for r in results if r["error"] is None]))
    return {"gaps": int(len(gaps)), "gap_p50_ms": pct(gaps, 50), "gap_p99_ms": pct(gaps, 99),
            "gap_max_ms": float(gaps[-1] * 1e3) if len(gaps) else None,
            "worst5_mean_ms": float(gaps[-5:].mean() * 1e3) if len(gaps) else None,
            "errors": sum(r["error"] is not None for r in results),
            "error_samples": [r["error"] for r in results if r["error"]][:3]}


async def short_streams(http, server: Server, shorts: list[list[int]], seconds: float, new_tokens: int,
                        stagger: float) -> list[dict]:
    """len(shorts) clients streaming requests back to back until `seconds` have passed."""
    stop_at = time.monotonic() + seconds

    async def client(k: int) -> list[dict]:
        await asyncio.sleep(stagger * k / len(shorts))
        out = []
        while time.monotonic() < stop_at:
            out.append(await one_request(http, server, shorts[k], new_tokens))
        return out

    return [r for rs in await asyncio.gather(*(client(k) for k in range(len(shorts)))) for r in rs]


IDLE_LONG = 3  # long prompts timed on the idle server


async def mixed(server: Server, a, shorts: list[list[int]], longs: list[list[int]], stagger: float) -> dict:
    """Short streams alone, then beside a long prompt every a.long_every seconds; then long prompts on the idle
    server. Every long prompt is distinct (no prefix of one is cached for another)."""
    async with client_for(len(shorts)) as http:
        alone = await short_streams(http, server, shorts, a.mixed_seconds / 2, a.new_tokens, stagger)
        sent: list[asyncio.Task] = []

        async def long_sender():
            await asyncio.sleep(stagger + a.long_every / 2)  # once every stream runs
            for prompt in longs[IDLE_LONG:]:
                sent.append(asyncio.create_task(one_request(http, server, prompt, a.long_new_tokens)))
                await asyncio.sleep(a.long_every)

        sender = asyncio.create_task(long_sender())
        loaded = await short_streams(http, server, shorts, a.mixed_seconds, a.new_tokens, stagger)
        sender.cancel()
        long_loaded = [await t for t in sent]
        idle = []
        for prompt in longs[:IDLE_LONG]:  # on the idle server: prompts not sent before (none is cached)
            idle.append(await one_request(http, server, prompt, a.long_new_tokens))
    ttft = lambda rs: [(r["chunks"][0] - r["start"]) * 1e3 for r in rs if r["error"] is None]  # noqa: E731
    return {"alone": gap_stats(alone), "loaded": gap_stats(loaded),
            "long_requests": len(long_loaded), "long_errors": sum(r["error"] is not None for r in long_loaded),
            "long_ttft_loaded_ms": ttft(long_loaded), "long_ttft_idle_ms": ttft(idle)}


async def prefix(server: Server, a, systems: list[list[int]], turns: list[list[int]], other: list[int]) -> dict:
    """Per system prompt: cold, warm (same row or slot if the server keeps it), warm while another stream runs."""
    rows = []
    async with client_for(4) as http:
        for k, system in enumerate(systems):
            turn = [turns[(3 * k + i) % len(turns)] for i in range(3)]
            cold = await one_request(http, server, system + turn[0], a.prefix_new_tokens)
            warm = await one_request(http, server, system + turn[1], a.prefix_new_tokens)
            busy = asyncio.Event()
            # long enough to still hold its row when the warm request's first token comes
            blocker = asyncio.create_task(one_request(http, server, other, 64, first=busy))
            await asyncio.wait_for(busy.wait(), 120)
            warm_other = await one_request(http, server, system + turn[2], a.prefix_new_tokens)
            await blocker
            rows.append({name: (r["chunks"][0] - r["start"]) * 1e3 if r["error"] is None else None
                         for name, r in (("cold", cold), ("warm", warm), ("warm_other_row", warm_other))}
                        | {"errors": [r["error"] for r in (cold, warm, warm_other, blocker.result()) if r["error"]]})
    med = lambda key: float(np.median([r[key] for r in rows if r[key] is not None] or [np.nan]))  # noqa: E731
    return {"system_len": len(systems[0]), "turn_len": len(turns[0]), "runs": rows,
            "cold_ttft_ms": med("cold"), "warm_ttft_ms": med("warm"), "warm_other_row_ttft_ms": med("warm_other_row")}


async def fairness(server: Server, a, singles: list[list[int]], many: list[list[int]]) -> dict:
    """The singles alone (together), then the same beside one request carrying len(many) prompts."""
    async with client_for(len(singles) + 2) as http:
        async def singles_now():
            return await asyncio.gather(*(one_request(http, server, p, a.fair_new_tokens) for p in singles))

        alone = await singles_now()
        big = asyncio.create_task(one_request(http, server, many, a.fair_new_tokens, stream=False))
        await asyncio.sleep(0.2)
        beside = await singles_now()
        big = await big
    took = lambda rs: [r["end"] - r["start"] for r in rs if r["error"] is None]  # noqa: E731
    return {"prompts_in_big_request": len(many), "singles_alone_s": took(alone), "singles_beside_s": took(beside),
            "big_request_s": big["end"] - big["start"] if big["error"] is None else None,
            "errors": [r["error"] for r in (*alone, *beside, big) if r["error"]]}


# ---------------------------------------------------------------------------------------------- chunk sweep
def chunk_sweep(export_dir: Path, chunks: list[int], long_len: int = 800, streams: int = 4) -> list:
    """In-process, no HTTP: for each prefill budget, `streams` rows decode while one `long_len`-token prompt is
    prefilled. Per budget: the decode-only step (the streams' normal gap), the longest step while the long prompt
    is prefilled (the gap it costs them), and the long prompt's time to first token loaded and alone. Each in
    wall time and in the process's CPU time (what the steps cost on an otherwise idle machine, summed over
    threads: robust when the machine is shared)."""
    import gptx.runtime
    from gptx.runtime.sampler import SamplingParams
    from gptx.runtime.scheduler import Request, Scheduler

    engine = gptx.runtime.load(export_dir)
    shorts = fixed_prompts(streams, 32, 0, 4)
    longs = fixed_prompts(2 * len(chunks), long_len, 1, 4)
    greedy = SamplingParams(temperature=0)
    clocks = (time.perf_counter, time.process_time)
    rows = []
    for n, chunk in enumerate(chunks):
        def scheduler():
            return Scheduler(engine.backend, engine.tokenizer, eos_token_id=engine.eos_token_id,
                             vocab_size=engine.vocab_size, max_batch=8, prefill_chunk=chunk)

        def step(s: Scheduler) -> tuple[list, list[float]]:
            t = [c() for c in clocks]
            outs = s.step()
            return outs, [c() - t0 for c, t0 in zip(clocks, t)]

        def until_first(s: Scheduler, request_id: str) -> tuple[np.ndarray, np.ndarray]:
            steps = []
            while True:
                outs, took = step(s)
                steps.append(took)
                if any(o.request_id == request_id and o.token_id is not None for o in outs):
                    return np.sum(steps, axis=0), np.max(steps, axis=0)

        idle = scheduler()
        idle.add_request(Request(longs[2 * n], 1, greedy, id="long"))
        ttft_idle, _ = until_first(idle, "long")
        s = scheduler()
        for i, p in enumerate(shorts):
            s.add_request(Request(p, 200, greedy, stop_at_eos=False, id=f"s{i}"))
        for _ in range(4):  # prefill the streams, then decode-only steps
            s.step()
        decode = np.median([step(s)[1] for _ in range(8)], axis=0)
        s.add_request(Request(longs[2 * n + 1], 1, greedy, id="long"))
        ttft_loaded, worst = until_first(s, "long")
        row = {"chunk": chunk}
        for k, clock in enumerate(("wall", "cpu")):
            row[clock] = {"decode_step_ms": decode[k] * 1e3, "max_gap_ms": worst[k] * 1e3,
                          "ttft_idle_ms": ttft_idle[k] * 1e3, "ttft_loaded_ms": ttft_loaded[k] * 1e3,
                          "ttft_ratio": ttft_loaded[k] / ttft_idle[k], "gap_over_decode": worst[k] / decode[k]}
        rows.append(row)
        c = row["cpu"]
        log(f"chunk {chunk} (CPU ms): decode step {c['decode_step_ms']:.0f}, max gap {c['max_gap_ms']:.0f} "
            f"({c['gap_over_decode']:.1f}x), TTFT {c['ttft_loaded_ms']:.0f} loaded / {c['ttft_idle_ms']:.0f} idle "
            f"({c['ttft_ratio']:.2f}x); wall max gap {row['wall']['max_gap_ms']:.0f}")
    return rows


# ---------------------------------------------------------------------------------------------- report
# issue targets: each (name, text, check(server results, other servers' results) -> (measured text, met) or None)
def targets(server: dict, others: list[dict], baseline: dict | None = None) -> list[dict]:
    """baseline: {"tok_s": {clients: tok/s}, "what": ...}, an earlier gptx measured on this machine (--baseline)."""
    out = []
    mixed, pre, fair = server.get("mixed"), server.get("prefix"), server.get("fairness")
    if mixed and mixed["loaded"]["worst5_mean_ms"] and mixed["alone"]["gap_p99_ms"]:
        worst, p99 = mixed["loaded"]["worst5_mean_ms"], mixed["alone"]["gap_p99_ms"]
        theirs = [o["mixed"]["loaded"]["worst5_mean_ms"] for o in others if o.get("mixed")]
        met = worst <= 3 * p99 and all(worst < t for t in theirs if t)
        out.append({"target": "with long prompts arriving, mean of the 5 worst gaps <= 3x the p99 gap without "
                              "them" + (", and below the other server's" if theirs else ""),
                    "measured": f"{worst:.0f} ms vs 3 x {p99:.0f} ms" + "".join(f"; other {t:.0f} ms" for t in theirs),
                    "met": met})
    if mixed and mixed["long_ttft_loaded_ms"] and mixed["long_ttft_idle_ms"]:
        loaded, idle = np.median(mixed["long_ttft_loaded_ms"]), np.median(mixed["long_ttft_idle_ms"])
        out.append({"target": "long-prompt TTFT under load <= 1.5x idle", "measured": f"{loaded / idle:.2f}x "
                    f"({loaded:.0f} vs {idle:.0f} ms)", "met": loaded <= 1.5 * idle})
    if pre and pre["cold_ttft_ms"] > 0:
        for key, what in (("warm_ttft_ms", "same row"), ("warm_other_row_ttft_ms", "another row")):
            ratio = pre[key] / pre["cold_ttft_ms"]
            out.append({"target": f"shared-prefix TTFT <= 0.25x cold ({what})",
                        "measured": f"{ratio:.2f}x ({pre[key]:.0f} vs {pre['cold_ttft_ms']:.0f} ms)",
                        "met": bool(ratio <= 0.25)})
    if fair and fair["singles_alone_s"] and fair["singles_beside_s"]:
        ratio = max(fair["singles_beside_s"]) / float(np.median(fair["singles_alone_s"]))
        out.append({"target": f"beside a {fair['prompts_in_big_request']}-prompt request, single requests "
                              "finish within 3x their time alone",
                    "measured": f"{ratio:.2f}x (slowest {max(fair['singles_beside_s']):.2f} s vs "
                                f"{np.median(fair['singles_alone_s']):.2f} s)", "met": ratio <= 3})
    by = {lv["clients"]: lv for lv in server.get("levels", []) if lv.get("tok_s")}
    for clients in (8, 16):
        if clients in by:
            theirs = [lv["tok_s"] for o in others for lv in o.get("levels", []) if lv["clients"] == clients
                      and lv.get("tok_s")]
            before = (baseline or {}).get("tok_s", {}).get(str(clients))
            floor = max([before or 0, *theirs])
            out.append({"target": f"tok/s at {clients} clients"
                                  + (f" >= {before:.0f} ({baseline['what']})" if before else "")
                                  + (" and >= the other server's" if theirs else ""),
                        "measured": f"{by[clients]['tok_s']:.0f}" + "".join(f" vs {t:.0f}" for t in theirs),
                        "met": by[clients]["tok_s"] >= floor})
    for t in out:
        t["met"] = bool(t["met"])
    errors = sum(lv["errors"] for lv in server.get("levels", [])) + sum(
        len(x.get("errors", [])) if isinstance(x.get("errors"), list) else x.get("errors", 0)
        for x in (fair or {}, pre or {}))
    out.append({"target": "zero errors", "measured": str(errors), "met": errors == 0})
    return out


def fmt(value, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def parse_baseline(text: str | None, what: str) -> dict | None:
    if not text:
        return None
    pairs = [item.split("=") for item in text.split(",")]
    return {"tok_s": {clients.strip(): float(rate) for clients, rate in pairs}, "what": what}


def markdown(res: dict) -> str:
    """The load-test section of docs/serving.md (rendered by serve_report.serving_load)."""
    m = res["machine"]
    lines = [f"Run {res['started']} on {m['cpu']} ({m['cores']} cores), load average "
             f"{res['loadavg_start'][0]:.2f} at the start and {res['loadavg_end'][0]:.2f} at the end.", ""]
    if res.get("note"):
        lines += [f"**{res['note']}**", ""]
    s = res["settings"]
    lines += [f"Command: `{res['command']}`", "",
              "Model: GPT-2-124M shapes, random weights, fp32 (gptx ONNX Runtime export; llama.cpp f32 GGUF of the "
              "same weights). Prompts are token ids, greedy, streamed.", ""]
    for label, server in res["servers"].items():
        lines += [f"### {label}", "", f"`{server['command']}`", ""]
        if server.get("levels"):
            lines += [f"Throughput: {s['prompt_len']}-token prompts, {s['new_tokens']} new tokens, "
                      f"{s['requests_per_client']} requests per client, clients staggered over "
                      f"{s.get('stagger_s', 0):.1f} s.", "",
                      "| clients | requests | errors | aggregate tok/s | vs 1 client | TTFT p50 / p99 (ms) | "
                      "inter-token p50 / p99 (ms) | request p50 (s) |", "|---|---|---|---|---|---|---|---|"]
            base = next((lv.get("tok_s") for lv in server["levels"] if lv["clients"] == 1), None)
            for lv in server["levels"]:
                scale = lv["tok_s"] / base if base and lv.get("tok_s") else None
                lines.append(f"| {lv['clients']} | {lv['requests']} | {lv['errors']} | {fmt(lv.get('tok_s'), '.1f')} "
                             f"| {fmt(scale, '.2f')}x | {fmt(lv.get('ttft_p50_ms'), '.0f')} / "
                             f"{fmt(lv.get('ttft_p99_ms'), '.0f')} | {fmt(lv.get('itl_p50_ms'), '.1f')} / "
                             f"{fmt(lv.get('itl_p99_ms'), '.1f')} | {fmt(lv.get('request_p50_s'), '.2f')} |")
            lines.append("")
        mixed = server.get("mixed")
        if mixed:
            lines += [f"Mixed: {len(s['mixed']['shorts'])} short streams ({s['prompt_len']}-token prompts, "
                      f"{s['new_tokens']} new tokens) and a distinct {s['mixed']['long_len']}-token prompt every "
                      f"{s['mixed']['long_every']:g} s ({mixed['long_requests']} sent, {mixed['long_errors']} errors).",
                      "", "| short streams | gaps | gap p50 (ms) | p99 (ms) | max (ms) | mean of 5 worst (ms) |",
                      "|---|---|---|---|---|---|"]
            for name, g in (("alone", mixed["alone"]), ("with long prompts", mixed["loaded"])):
                lines.append(f"| {name} | {g['gaps']} | {fmt(g['gap_p50_ms'], '.1f')} | {fmt(g['gap_p99_ms'], '.1f')} "
                             f"| {fmt(g['gap_max_ms'], '.0f')} | {fmt(g['worst5_mean_ms'], '.0f')} |")
            loaded, idle = (float(np.median(v)) if v else None
                            for v in (mixed["long_ttft_loaded_ms"], mixed["long_ttft_idle_ms"]))
            lines += ["", f"Long-prompt TTFT: {fmt(loaded, '.0f')} ms under that load, {fmt(idle, '.0f')} ms idle "
                          "(medians).", ""]
        pre = server.get("prefix")
        if pre:
            lines += [f"Shared prefix: {len(pre['runs'])} system prompts of {pre['system_len']} tokens, user turns of "
                      f"{pre['turn_len']} tokens. TTFT cold {fmt(pre['cold_ttft_ms'], '.0f')} ms, warm "
                      f"{fmt(pre['warm_ttft_ms'], '.0f')} ms, warm while another stream holds a row "
                      f"{fmt(pre['warm_other_row_ttft_ms'], '.0f')} ms (medians).", ""]
        fair = server.get("fairness")
        if fair and fair["singles_alone_s"]:
            lines += [f"Fairness: {len(fair['singles_alone_s'])} single requests take "
                      f"{fmt(max(fair['singles_alone_s']), '.2f')} s at most alone and "
                      f"{fmt(max(fair['singles_beside_s'] or [np.nan]), '.2f')} s beside one request carrying "
                      f"{fair['prompts_in_big_request']} prompts (which takes {fmt(fair['big_request_s'], '.2f')} s).",
                      ""]
        if server.get("targets"):
            lines += ["| target | measured | |", "|---|---|---|"]
            lines += [f"| {t['target']} | {t['measured']} | {'MET' if t['met'] else 'MISSED'} |"
                      for t in server["targets"]]
            lines.append("")
        errors = [e for lv in server.get("levels", []) for e in lv.get("error_samples", [])]
        errors += [e for key in ("prefix", "fairness") for e in (server.get(key) or {}).get("errors", [])
                   if isinstance(e, str)]
        if errors:
            lines += [f"Errors seen: {'; '.join(map(str, errors[:3]))}", ""]
    if res.get("plot"):
        lines += [f"![throughput, and the short streams' gaps with long prompts arriving]({res['plot']})", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for n, (label, server) in enumerate(res["servers"].items()):
        levels = [lv for lv in server.get("levels", []) if lv.get("tok_s")]
        if levels:
            left.plot([lv["clients"] for lv in levels], [lv["tok_s"] for lv in levels], marker="o", color=f"C{n}",
                      label=label)
        mixed = server.get("mixed")
        if mixed:
            names = ["p50", "p99", "max", "5 worst"]
            for k, (key, style) in enumerate((("alone", "--"), ("loaded", "-"))):
                g = mixed[key]
                right.plot(names, [g["gap_p50_ms"], g["gap_p99_ms"], g["gap_max_ms"], g["worst5_mean_ms"]],
                           marker="o", color=f"C{n}", linestyle=style,
                           label=f"{label}, {'with long prompts' if key == 'loaded' else 'alone'}")
    left.set_xscale("log", base=2)
    left.set_xticks(res["settings"]["concurrency"], [str(c) for c in res["settings"]["concurrency"]])
    left.set_xlabel("concurrent streaming clients")
    left.set_ylabel("tok/s")
    left.set_title("aggregate output tokens/s")
    right.set_yscale("log")
    right.set_ylabel("ms")
    right.set_title("short streams' inter-token gaps")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"GPT-2-124M fp32 (random weights), {res['machine']['cores']} CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running OpenAI-compatible server (then --model too); nothing is started")
    p.add_argument("--model", help="model name to send with --url")
    p.add_argument("--export", type=Path, help="serve this gptx export instead of the random GPT-2-124M one")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    p.add_argument("--concurrency", default="1,8,16")
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--mixed-seconds", type=float, default=30, help="mixed: how long the short streams run loaded")
    p.add_argument("--long-len", type=int, default=800, help="mixed: tokens in each long prompt")
    p.add_argument("--long-every", type=float, default=5, help="mixed: seconds between long prompts")
    p.add_argument("--long-new-tokens", type=int, default=8)
    p.add_argument("--system-len", type=int, default=512, help="prefix: tokens in each system prompt")
    p.add_argument("--system-prompts", type=int, default=3)
    p.add_argument("--prefix-new-tokens", type=int, default=8)
    p.add_argument("--fair-prompts", type=int, default=32, help="fairness: prompts in the one big request")
    p.add_argument("--fair-new-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16, help="gptx serve --max-batch")
    p.add_argument("--gptx-args", default="", help="more `gptx serve` flags, e.g. '--prefill-chunk 128'")
    p.add_argument("--llama-parallel", type=int, default=8, help="llama-server --parallel")
    p.add_argument("--llama-context", type=int, default=8192, help="llama-server -c (shared by its slots)")
    p.add_argument("--threads", type=int, help="CPU threads for each server (default: theirs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--llama-server", type=Path, help="llama.cpp's llama-server binary: run it beside gptx")
    p.add_argument("--llama-convert", type=Path, help="llama.cpp's convert_hf_to_gguf.py (gguf-py beside it)")
    p.add_argument("--llama-gguf", type=Path, help="an existing GGUF of the same weights (instead of converting)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/gptx-serve-load"))
    p.add_argument("--baseline", help="tok/s of an earlier gptx on this machine, e.g. '8=207,16=261': the "
                                      "throughput targets compare against it")
    p.add_argument("--baseline-what", default="before", help="what --baseline measured (a commit, a date)")
    p.add_argument("--note", help="a line printed at the top of the results (e.g. 'preliminary: machine busy')")
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "serving_load.json")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "serving_load.png")
    p.add_argument("--chunk-sweep", help="instead: the in-process prefill-budget sweep over these sizes "
                                         "(comma-separated), written to --sweep-json")
    p.add_argument("--sweep-json", type=Path, default=ROOT / "docs" / "serving_load_chunks.json")
    a = p.parse_args(argv)
    levels = [int(c) for c in a.concurrency.split(",")]
    scenarios = [x for x in a.scenarios.split(",") if x]
    if set(scenarios) - set(SCENARIOS):
        p.error(f"--scenarios takes {', '.join(SCENARIOS)}")
    if min(levels) < 1 or a.requests_per_client < 1 or a.new_tokens < 2 or a.prompt_len < 1:
        p.error("concurrency levels, --requests-per-client, --prompt-len >= 1 and --new-tokens >= 2")
    if a.url and not a.model:
        p.error("--url needs --model")
    if a.llama_server and not (a.llama_convert or a.llama_gguf):
        p.error("--llama-server needs --llama-convert (to make the GGUF) or --llama-gguf")

    from gptx.runtime.benchmark import machine_info

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through `finally`: the servers are stopped
    work = a.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if a.chunk_sweep:
        export_dir = a.export.resolve() if a.export else prepare_weights(work, a.seed, None, None)[0]
        started, load = time.strftime("%Y-%m-%d %H:%M:%S %Z"), list(os.getloadavg())
        rows = chunk_sweep(export_dir, [int(c) for c in a.chunk_sweep.split(",")], a.long_len)
        out = {"started": started, "loadavg_start": load, "loadavg_end": list(os.getloadavg()),
               "command": "python benchmarks/serve_load.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])),
               "machine": machine_info(), "long_len": a.long_len, "streams": 4, "rows": rows}
        a.sweep_json.write_text(json.dumps(out, indent=2) + "\n")
        log(f"wrote {a.sweep_json}")
        return 0
    # prompts from separate parts of the text: no scenario's prompt starts like another's
    shorts = fixed_prompts(16, a.prompt_len, 0, 4)
    longs = fixed_prompts(IDLE_LONG + int(a.mixed_seconds / a.long_every) + 1, a.long_len, 1, 4)
    systems = fixed_prompts(a.system_prompts, a.system_len, 2, 4)
    parts = fixed_prompts(3 * a.system_prompts + a.fair_prompts + 5, a.prompt_len, 3, 4)
    turns = [t[:16] for t in parts[:3 * a.system_prompts]]
    singles, many, other = parts[-5:-1], parts[3 * a.system_prompts:-5], parts[-1]
    res = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg_start": list(os.getloadavg()),
           "command": "python benchmarks/serve_load.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])),
           "note": a.note, "baseline": parse_baseline(a.baseline, a.baseline_what),
           "settings": {"prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                                        "requests_per_client": a.requests_per_client, "concurrency": levels,
                                        "scenarios": scenarios,
                                        "mixed": {"shorts": [len(x) for x in shorts[:4]], "long_len": a.long_len,
                                                  "long_every": a.long_every, "seconds": a.mixed_seconds}},
           "servers": {}}
    servers: list[Server] = []
    try:
        if a.url:
            servers.append(Server(a.url, a.url.rstrip("/"), a.model))
        else:
            export_dir, gguf = (a.export.resolve(), a.llama_gguf) if a.export else \
                prepare_weights(work, a.seed, a.llama_convert, a.llama_gguf)
            servers.append(start_gptx(export_dir, a.max_batch, a.threads, work / "gptx-serve.log",
                                      shlex.split(a.gptx_args)))
            if a.llama_server:
                servers.append(start_llama(a.llama_server, gguf, a.llama_parallel, a.llama_context, a.threads,
                                           work / "llama-server.log"))
        for server in servers:
            server.wait_ready()
            cmd = " ".join(shlex.quote(c) for c in server.proc.args) if server.proc else server.url
            res["servers"][server.label] = {"command": cmd.replace(str(ROOT) + "/", "").replace(str(work), "WORKDIR")}
        stagger = {}
        for server in servers:  # warm-up, and the unloaded request time that clients are staggered over
            warm = asyncio.run(run_level(server, 1, 2, shorts, a.new_tokens, 0))
            if any(r["error"] for r in warm):
                raise SystemExit(f"{server.label}: warm-up failed: {[r['error'] for r in warm]}")
            stagger[server.label] = float(np.median([r["end"] - r["start"] for r in warm]))
        res["settings"]["stagger_s"] = max(stagger.values())
        if "throughput" in scenarios:
            for server in servers:
                res["servers"][server.label]["levels"] = []
            for clients in levels:
                for server in servers:
                    log(f"{server.label}: {clients} client(s) x {a.requests_per_client} requests")
                    results = asyncio.run(run_level(server, clients, a.requests_per_client, shorts, a.new_tokens,
                                                    stagger[server.label]))
                    summary = summarize(results, clients)
                    res["servers"][server.label]["levels"].append(summary)
                    log(f"  {fmt(summary.get('tok_s'), '.1f')} tok/s, TTFT p50 {fmt(summary.get('ttft_p50_ms'), '.0f')}"
                        f" ms, ITL p50 {fmt(summary.get('itl_p50_ms'), '.1f')} ms, errors {summary['errors']}")
        for name, run in (("mixed", lambda srv: mixed(srv, a, shorts[:4], longs, stagger[srv.label])),
                          ("prefix", lambda srv: prefix(srv, a, systems, turns, other)),
                          ("fairness", lambda srv: fairness(srv, a, singles, many))):
            if name not in scenarios:
                continue
            for server in servers:
                log(f"{server.label}: {name}")
                res["servers"][server.label][name] = out = asyncio.run(run(server))
                log("  " + json.dumps({k: v for k, v in out.items() if not isinstance(v, list)}, default=str)[:300])
    finally:
        for server in servers:
            server.stop()
    for label, server in res["servers"].items():
        server["targets"] = targets(server, [o for other, o in res["servers"].items() if other != label],
                                    res.get("baseline") if label == "gptx serve" else None)
    res["loadavg_end"] = list(os.getloadavg())
    res["machine"] = machine_info()
    if a.plot:
        plot(res, a.plot)
        res["plot"] = os.path.relpath(a.plot, ROOT / "docs")
    a.json.write_text(json.dumps(res, indent=2) + "\n")
    if a.json.resolve() == (ROOT / "docs" / "serving_load.json").resolve():
        import render_docs

        render_docs.main([])
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
