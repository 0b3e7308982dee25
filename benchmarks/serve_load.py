#!/usr/bin/env python
"""Load test of `gptx serve` (and, beside it, llama.cpp's own server) with N concurrent streaming clients.

    python benchmarks/serve_load.py                                   # builds the weights, starts gptx serve
    python benchmarks/serve_load.py --llama-server /path/to/llama-server --llama-convert /path/to/convert_hf_to_gguf.py
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model NAME   # a server already running

Model: GPT-2-124M shapes with random weights (`random:gpt2`, built once in --workdir as a Hugging Face directory
by harness.hf_directory (as compare_peers.py does), then exported with gptx and, with --llama-convert, converted to an f32
GGUF), so both servers run exactly the same weights. Load: for each concurrency level (1, 2, 4, 8, 16 by default)
that many clients each send --requests-per-client streaming /v1/completions requests back to back: a fixed set of
32-token prompts (token ids, so both servers see the same tokens), 128 new tokens, greedy, ignore_eos. Clients
start staggered over one unloaded request's duration, so arrivals are spread as in steady traffic (all clients
starting in the same instant would measure one batched prefill of every prompt instead). Levels run one server
after the other, level by level, so drift in machine load hits both alike.

Reported per server and level: aggregate output tokens/s (tokens received while every client was active, divided
by that window), time to first token p50/p99, inter-token latency p50/p99 (gaps between streamed chunks: one token
each, except the rare token whose bytes end mid-character), and errors. Writes --json, the results section of
--md (between its serve_load markers) and --plot.
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

BEGIN, END = "<!-- serve_load:begin -->", "<!-- serve_load:end -->"
TARGETS = {"scaling_at_8": 3.5, "ttft_ratio_at_8": 3.0}


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


def start_gptx(export_dir: Path, max_batch: int, threads: int | None, logfile: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, str(ROOT / "gptx" / "cli.py"), "serve", str(export_dir), "--port", str(port),
           "--max-batch", str(max_batch), "--max-queue", str(4 * max_batch)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=logfile.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
    return Server("gptx serve", f"http://127.0.0.1:{port}", export_dir.name, proc)


def start_llama(binary: Path, gguf: Path, parallel: int, context: int, threads: int | None, logfile: Path) -> Server:
    port = free_port()
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--parallel", str(parallel),
           "-c", str(parallel * context), "--threads", str(threads or os.cpu_count() or 1)]
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


def fixed_prompts(n: int, length: int) -> list[list[int]]:
    """n prompts of exactly `length` GPT-2 token ids, cut from the bundled Shakespeare text."""
    from gptx.runtime.tokenizer import Tokenizer

    text = (ROOT / "gptx" / "export" / "data" / "tinyshakespeare.txt").read_text()[:200_000]
    ids = Tokenizer().encode(text)
    step = len(ids) // n
    return [ids[i * step: i * step + length] for i in range(n)]


# ---------------------------------------------------------------------------------------------- load
async def one_request(http: httpx.AsyncClient, server: Server, prompt: list[int], new_tokens: int) -> dict:
    """One streaming completion: start, chunk arrival times, tokens, finish_reason, error."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    out = {"start": time.monotonic(), "chunks": [], "tokens": None, "finish": None, "error": None}
    try:
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


async def run_level(server: Server, clients: int, per_client: int, prompts: list[list[int]], new_tokens: int,
                    stagger: float) -> list[dict]:
    # a fresh connection per request (loopback: ~0.1 ms): llama-server closes a connection after a stream
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
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
    gaps = np.concatenate([np.diff(r["chunks"]) for r in ok if len(r["chunks"]) > 1] or [np.zeros(0)])

    def pct(values, q):  # milliseconds
        return float(np.percentile(values, q) * 1000) if len(values) else None

    return {"clients": clients, "requests": len(results), "errors": len(errors), "error_samples": errors[:3],
            "tokens": int(sum(r["tokens"] for r in ok)),
            "tok_s": in_window / (window[1] - window[0]), "window_s": window[1] - window[0],
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "itl_p50_ms": pct(gaps, 50), "itl_p99_ms": pct(gaps, 99),
            "request_p50_s": float(np.median([r["end"] - r["start"] for r in ok]))}


# ---------------------------------------------------------------------------------------------- report
def targets(levels: list[dict]) -> list[dict]:
    by = {lv["clients"]: lv for lv in levels if lv.get("tok_s")}
    out = []
    if 1 in by and 8 in by:
        scaling = by[8]["tok_s"] / by[1]["tok_s"]
        out.append({"target": f"aggregate tok/s at 8 clients >= {TARGETS['scaling_at_8']}x one client",
                    "measured": f"{scaling:.2f}x", "met": scaling >= TARGETS["scaling_at_8"]})
        ratio = by[8]["ttft_p50_ms"] / by[1]["ttft_p50_ms"]
        out.append({"target": f"TTFT p50 at 8 clients <= {TARGETS['ttft_ratio_at_8']}x unloaded",
                    "measured": f"{ratio:.2f}x ({by[8]['ttft_p50_ms']:.0f} vs {by[1]['ttft_p50_ms']:.0f} ms)",
                    "met": ratio <= TARGETS["ttft_ratio_at_8"]})
    errors = sum(lv["errors"] for lv in levels)
    out.append({"target": "zero errors", "measured": str(errors), "met": errors == 0})
    return out


def fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [BEGIN, "", f"Run {res['started']} on {m['cpu']} ({m['cores']} cores), load average "
             f"{res['loadavg_start'][0]:.2f} at the start and {res['loadavg_end'][0]:.2f} at the end.", ""]
    if res.get("note"):
        lines += [f"**{res['note']}**", ""]
    s = res["settings"]
    lines += [f"Command: `{res['command']}`", "",
              f"Model: GPT-2-124M shapes, random weights, fp32 (gptx ONNX Runtime export; llama.cpp f32 GGUF of the "
              f"same weights). Each request: {s['prompt_len']}-token prompt, {s['new_tokens']} new tokens, greedy, "
              f"streamed; {s['requests_per_client']} requests per client, clients staggered over "
              f"{s['stagger_s']:.1f} s.", ""]
    for label, server in res["servers"].items():
        lines += [f"### {label}", "", f"`{server['command']}`", "",
                  "| clients | requests | errors | aggregate tok/s | vs 1 client | TTFT p50 / p99 (ms) | "
                  "inter-token p50 / p99 (ms) | request p50 (s) |", "|---|---|---|---|---|---|---|---|"]
        base = next((lv.get("tok_s") for lv in server["levels"] if lv["clients"] == 1), None)
        for lv in server["levels"]:
            scale = lv["tok_s"] / base if base and lv.get("tok_s") else None
            lines.append(f"| {lv['clients']} | {lv['requests']} | {lv['errors']} | {fmt(lv.get('tok_s'), '.1f')} | "
                         f"{fmt(scale, '.2f')}x | {fmt(lv.get('ttft_p50_ms'), '.0f')} / "
                         f"{fmt(lv.get('ttft_p99_ms'), '.0f')} | {fmt(lv.get('itl_p50_ms'), '.1f')} / "
                         f"{fmt(lv.get('itl_p99_ms'), '.1f')} | {fmt(lv.get('request_p50_s'), '.2f')} |")
        lines.append("")
        if server["targets"]:
            lines += ["| target | measured | |", "|---|---|---|"]
            lines += [f"| {t['target']} | {t['measured']} | {'MET' if t['met'] else 'MISSED'} |"
                      for t in server["targets"]]
            lines.append("")
        errors = [e for lv in server["levels"] for e in lv.get("error_samples", [])]
        if errors:
            lines += [f"Errors seen: {'; '.join(errors[:3])}", ""]
    if res.get("plot"):
        lines += [f"![aggregate tokens/s and time to first token by concurrency]({res['plot']})", ""]
    lines.append(END)
    return "\n".join(lines)


def write_markdown(res: dict, path: Path) -> None:
    section = markdown(res)
    text = path.read_text() if path.exists() else f"# Serving\n\n## Load test\n\n{BEGIN}\n{END}\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## Load test\n\n" + section + "\n"
    path.write_text(text)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for n, (label, server) in enumerate(res["servers"].items()):
        levels = [lv for lv in server["levels"] if lv.get("tok_s")]
        x = [lv["clients"] for lv in levels]
        left.plot(x, [lv["tok_s"] for lv in levels], marker="o", color=f"C{n}", label=label)
        right.plot(x, [lv["ttft_p50_ms"] for lv in levels], marker="o", color=f"C{n}", label=f"{label} p50")
        right.plot(x, [lv["ttft_p99_ms"] for lv in levels], marker="x", color=f"C{n}", linestyle="--",
                   label=f"{label} p99")
    for ax, title, unit in ((left, "aggregate output tokens/s", "tok/s"), (right, "time to first token", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(res["settings"]["concurrency"], [str(c) for c in res["settings"]["concurrency"]])
        ax.set_xlabel("concurrent streaming clients")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"GPT-2-124M fp32 (random weights), {res['settings']['prompt_len']} + "
                 f"{res['settings']['new_tokens']} tokens, {res['machine']['cores']} CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running OpenAI-compatible server (then --model too); nothing is started")
    p.add_argument("--model", help="model name to send with --url")
    p.add_argument("--export", type=Path, help="serve this gptx export instead of the random GPT-2-124M one")
    p.add_argument("--concurrency", default="1,2,4,8,16")
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, help="CPU threads for each server (default: theirs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--llama-server", type=Path, help="llama.cpp's llama-server binary: run it beside gptx")
    p.add_argument("--llama-convert", type=Path, help="llama.cpp's convert_hf_to_gguf.py (gguf-py beside it)")
    p.add_argument("--llama-gguf", type=Path, help="an existing GGUF of the same weights (instead of converting)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/gptx-serve-load"))
    p.add_argument("--note", help="a line printed at the top of the results (e.g. 'preliminary: machine busy')")
    p.add_argument("--md", type=Path, default=ROOT / "docs" / "serving.md")
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "serving_load.json")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "serving_load.png")
    a = p.parse_args(argv)
    levels = [int(c) for c in a.concurrency.split(",")]
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
    res = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg_start": list(os.getloadavg()),
           "command": "python benchmarks/serve_load.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])),
           "note": a.note, "settings": {"prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                                        "requests_per_client": a.requests_per_client, "concurrency": levels},
           "servers": {}}
    servers: list[Server] = []
    try:
        if a.url:
            servers.append(Server(a.url, a.url.rstrip("/"), a.model))
        else:
            export_dir, gguf = (a.export.resolve(), a.llama_gguf) if a.export else \
                prepare_weights(work, a.seed, a.llama_convert, a.llama_gguf)
            servers.append(start_gptx(export_dir, max(levels), a.threads, work / "gptx-serve.log"))
            if a.llama_server:
                servers.append(start_llama(a.llama_server, gguf, max(levels), a.prompt_len + a.new_tokens + 16,
                                           a.threads, work / "llama-server.log"))
        for server in servers:
            server.wait_ready()
            cmd = " ".join(shlex.quote(c) for c in server.proc.args) if server.proc else server.url
            res["servers"][server.label] = {"command": cmd.replace(str(ROOT) + "/", "").replace(str(work), "WORKDIR"),
                                            "levels": []}
        prompts = fixed_prompts(16, a.prompt_len)
        stagger = {}
        for server in servers:  # warm-up, and the unloaded request time that clients are staggered over
            warm = asyncio.run(run_level(server, 1, 2, prompts, a.new_tokens, 0))
            if any(r["error"] for r in warm):
                raise SystemExit(f"{server.label}: warm-up failed: {[r['error'] for r in warm]}")
            stagger[server.label] = float(np.median([r["end"] - r["start"] for r in warm]))
        res["settings"]["stagger_s"] = max(stagger.values())
        for clients in levels:
            for server in servers:
                log(f"{server.label}: {clients} client(s) x {a.requests_per_client} requests")
                results = asyncio.run(run_level(server, clients, a.requests_per_client, prompts, a.new_tokens,
                                                stagger[server.label]))
                summary = summarize(results, clients)
                res["servers"][server.label]["levels"].append(summary)
                log(f"  {fmt(summary.get('tok_s'), '.1f')} tok/s, TTFT p50 {fmt(summary.get('ttft_p50_ms'), '.0f')} "
                    f"ms, ITL p50 {fmt(summary.get('itl_p50_ms'), '.1f')} ms, errors {summary['errors']}")
    finally:
        for server in servers:
            server.stop()
    for server in res["servers"].values():
        server["targets"] = targets(server["levels"])
    res["loadavg_end"] = list(os.getloadavg())
    res["machine"] = machine_info()
    a.json.write_text(json.dumps(res, indent=2) + "\n")
    if a.plot:
        plot(res, a.plot)
        res["plot"] = os.path.relpath(a.plot, a.md.parent)
    write_markdown(res, a.md)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
