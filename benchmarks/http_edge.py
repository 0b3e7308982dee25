#!/usr/bin/env python
"""The HTTP edge under the audit's hostile clients: what each costs the server and the other clients.

    python benchmarks/http_edge.py                       # builds a small random export, starts gptx serve
    python benchmarks/http_edge.py --export DIR          # an export of your own

Cases, each against a fresh idle baseline of the same server:

  big prompts    one client loops 1 MB prompts (each answered 400 from its length alone), then prompts just under
                 the length bound (tokenized, then refused by the exact count), while another client streams
                 greedy tokens: that stream's worst and p99 inter-token gap and /health's worst latency, against
                 the same stream alone.
  header flood   8 connections each sending 200 MB of headers at once: the server's RSS peak over its baseline.
  stalls         an idle connection, one that sent half its headers, half its body: seconds until closed.

Speed and memory belong here, not in timed tests (tests/test_http_edge.py checks the behaviour). Writes --json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from serve_load import Server, start_gptx  # the benchmarks' one way to start and stop a server

MB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]


def build_export(workdir: Path) -> Path:
    """A random GPT-2-shaped model small enough for a busy CPU (2 layers, 256 wide, 1024 context)."""
    out = workdir / "edge-model"
    if not (out / "manifest.json").exists():
        import torch

        from gptx.export.convert import export
        from gptx.model.gpt import GPT, GPTConfig

        torch.manual_seed(0)
        export(GPT(GPTConfig(n_layer=2, n_head=4, n_embd=256, block_size=1024, vocab_size=50257)).eval(), out,
               validate=False, progress=False)
    return out


def rss_bytes(server: Server) -> int:
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def port_of(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def stream_gaps(url: str, tokens: int) -> list[float]:
    """Seconds between the SSE events of one greedy stream."""
    body = {"prompt": "Once upon a time", "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    stamps = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


HAMMER = """
import sys, httpx
url, size, ascii_char = sys.argv[1], int(sys.argv[2]), sys.argv[3]
body = {"prompt": ascii_char * size, "max_tokens": 1}
sent = 0
with httpx.Client(timeout=120) as http:
    while True:
        r = http.post(url + "/v1/completions", json=body)
        assert r.status_code == 400, r.text[:200]
        sent += 1
        print(sent, flush=True)
"""


def under_load(server: Server, prompt_bytes: int | None, tokens: int) -> dict:
    """One stream's gaps and /health latencies while another process loops prompts of `prompt_bytes` bytes
    (None: alone). The hostile client runs in its own process, so its CPU work does not hold this one's GIL."""
    stop, health = threading.Event(), []
    hammer = None
    if prompt_bytes:
        hammer = subprocess.Popen([sys.executable, "-c", HAMMER, server.url, str(prompt_bytes), "x"],
                                  stdout=subprocess.PIPE, text=True)

    def probe():
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                started = time.perf_counter()
                http.get(f"{server.url}/health")
                health.append(time.perf_counter() - started)
                time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    time.sleep(1.0)
    gaps = stream_gaps(server.url, tokens)
    stop.set()
    prober.join()
    sent = 0
    if hammer is not None:
        hammer.terminate()
        lines = hammer.communicate(timeout=30)[0].split()
        sent = int(lines[-1]) if lines else 0
        assert sent > 0, "the hostile client sent nothing"
    return {"gap_max_ms": 1000 * max(gaps), "gap_p99_ms": 1000 * percentile(gaps, 0.99),
            "gap_p50_ms": 1000 * percentile(gaps, 0.5), "health_max_ms": 1000 * max(health),
            "hostile_requests": sent}


def header_flood(server: Server, connections: int = 8, size: int = 200 * MB) -> dict:
    baseline, peak, done = rss_bytes(server), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes(server))
            time.sleep(0.005)

    def flood():
        with socket.create_connection(("127.0.0.1", port_of(server)), timeout=60) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Flood: ")
            chunk, sent = b"a" * MB, 0
            try:
                while sent < size:
                    sock.sendall(chunk)
                    sent += len(chunk)
            except OSError:
                pass

    sampler = threading.Thread(target=sample)
    sampler.start()
    floods = [threading.Thread(target=flood) for _ in range(connections)]
    started = time.perf_counter()
    for t in floods:
        t.start()
    for t in floods:
        t.join()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return {"connections": connections, "mb_each": size // MB, "rss_growth_mb": (peak[0] - baseline) / MB,
            "seconds": seconds}


def stall(server: Server, sent: bytes) -> float:
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=120) as sock:
        sock.sendall(sent)
        started = time.monotonic()
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass
        return time.monotonic() - started


def render_markdown(results: dict) -> str:
    """The docs' table of one run (docs/serving.md, block `http_edge`), from its JSON."""
    load = results["machine"]["load_average"][0]
    lines = [f"One run on {results['machine']['cpus']} CPU cores (load average {load:.1f} when it started), a "
             f"random 2-layer 256-wide export with a {results['context']}-token context:", "",
             "| case | stream gap p50 / p99 / max (ms) | `/health` worst (ms) | hostile requests |",
             "|---|---|---|---|"]
    cases = [(k, v) for k, v in results.items() if isinstance(v, dict) and "gap_max_ms" in v]
    for name, r in cases:
        lines.append(f"| {name} | {r['gap_p50_ms']:.0f} / {r['gap_p99_ms']:.0f} / {r['gap_max_ms']:.0f} | "
                     f"{r['health_max_ms']:.0f} | {r['hostile_requests']} |")
    alone = max(v["gap_max_ms"] for k, v in cases if k.startswith("alone"))
    hostile = max(v["gap_max_ms"] for k, v in cases if not k.startswith("alone"))
    flood = results["header flood"]
    stalls_key = next(k for k in results if k.startswith("stalls"))
    stalls = ", ".join(f"{k} {v:.1f} s" for k, v in results[stalls_key].items())
    lines += ["", f"Beside the hostile clients the stream's worst gap was {hostile:.0f} ms, against {alone:.0f} ms "
              f"alone ({hostile - alone:+.0f} ms). A header flood of {flood['connections']} connections x "
              f"{flood['mb_each']} MB raised the RSS by {flood['rss_growth_mb']:.1f} MB. Stalled connections "
              f"({stalls_key.removeprefix('stalls ').strip('()')}): {stalls}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, help="an export directory (default: a small random one)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/gptx-http-edge"))
    parser.add_argument("--tokens", type=int, default=300, help="tokens in the measured stream")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "http_edge.json")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    export = args.export or build_export(args.workdir)
    server = start_gptx(export, 8, None, args.workdir / "serve.log",
                        ["--max-body-bytes", str(2 * MB), "--header-timeout", "10", "--body-timeout", "10"])
    try:
        server.wait_ready(120)
        context = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["max_model_len"]
        near_bound = (context - 2) * 128  # bytes just under the length bound: tokenized, then refused
        results = {"machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()}, "context": context}
        results["alone"] = under_load(server, None, args.tokens)
        results["1 MB prompts"] = under_load(server, MB, args.tokens)
        results[f"{near_bound}-byte prompts"] = under_load(server, near_bound, args.tokens)
        results["alone again"] = under_load(server, None, args.tokens)
        results["machine"]["load_average_after"] = os.getloadavg()
        results["header flood"] = header_flood(server)
        results["stalls (s until closed, timeout 10 s)"] = {
            "idle": stall(server, b""),
            "half headers": stall(server, b"GET /health HTTP/1.1\r\nHost: x\r\n"),
            "half body": stall(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"),
        }
    finally:
        server.stop()
        print("server exit code", server.proc.returncode)
    print(json.dumps(results, indent=2))
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}; `python benchmarks/render_docs.py` renders it into docs/serving.md")


if __name__ == "__main__":
    main()
