"""The serving figures the docs show, rendered from a `serve_load.py` results dict (docs/serving_load.json).

Rendering only: nothing here measures. `render_docs.py` calls these for its "serving_summary" (README) and
"serving_load" (docs/serving.md's load test) blocks.
"""

from __future__ import annotations

GPTX, LLAMA = "gptx serve", "llama.cpp server"


def level(server: dict, clients: int) -> dict:
    """The load level with `clients` concurrent clients ({} when it was not run or produced no tokens)."""
    return next((lv for lv in server["levels"] if lv["clients"] == clients and lv.get("tok_s")), {})


def scaling(server: dict, clients: int) -> tuple[float | None, float | None]:
    """(aggregate tok/s at `clients` over one client's, TTFT p50 at `clients` over one client's)."""
    one, many = level(server, 1), level(server, clients)
    if not (one and many):
        return None, None
    return many["tok_s"] / one["tok_s"], many["ttft_p50_ms"] / one["ttft_p50_ms"]


def serving_summary(results: dict, clients: int = 8) -> str:
    """README's one-paragraph load-test summary: gptx serve at `clients` streaming clients beside llama.cpp, then,
    when the run has them, long prompts arriving among short streams and a shared prefix."""
    s, m = results["settings"], results["machine"]
    gptx = results["servers"][GPTX]
    llama = results["servers"].get(LLAMA)
    parts = []
    tok, ttft = scaling(gptx, clients)
    if tok is not None:
        errors = sum(lv["errors"] for lv in gptx["levels"])
        part = (f"{clients} streaming clients get {tok:.2f}x the tokens/s of one ({level(gptx, clients)['tok_s']:.1f} "
                f"vs {level(gptx, 1)['tok_s']:.1f} tok/s), with time to first token {ttft:.2f}x its unloaded value "
                f"and {errors} errors")
        if llama and all(scaling(llama, clients)):
            l_tok, l_ttft = scaling(llama, clients)
            part += (f"; llama.cpp's server in the same run: {l_tok:.2f}x ({level(llama, clients)['tok_s']:.1f} "
                     f"tok/s) and {l_ttft:.2f}x")
        parts.append(part)
    mixed = gptx.get("mixed")
    if mixed and mixed["loaded"]["worst5_mean_ms"] is not None:
        part = (f"while {s['mixed']['long_len']}-token prompts arrive every {s['mixed']['long_every']:g} s, short "
                f"streams' 5 worst gaps average {mixed['loaded']['worst5_mean_ms']:.0f} ms (p99 without them: "
                f"{mixed['alone']['gap_p99_ms']:.0f} ms)")
        if llama and llama.get("mixed") and llama["mixed"]["loaded"]["worst5_mean_ms"] is not None:
            part += f", llama.cpp's {llama['mixed']['loaded']['worst5_mean_ms']:.0f} ms"
        parts.append(part)
    pre = gptx.get("prefix")
    if pre and pre["cold_ttft_ms"]:
        part = (f"a request sharing a {pre['system_len']}-token prefix gets its first token in "
                f"{pre['warm_other_row_ttft_ms']:.0f} ms in another row against {pre['cold_ttft_ms']:.0f} ms cold")
        lp = llama.get("prefix") if llama else None
        if lp and lp["cold_ttft_ms"]:
            part += f" (llama.cpp: {lp['warm_other_row_ttft_ms']:.0f} vs {lp['cold_ttft_ms']:.0f} ms)"
        parts.append(part)
    return (f"Load test (`benchmarks/serve_load.py`, run {results['started']}: GPT-2-124M shapes, fp32, "
            f"{s['prompt_len']} + {s['new_tokens']} tokens a request, {m['cores']} CPU cores): "
            + "; ".join(parts) + ".\n")


def serving_load(results: dict) -> str:
    """docs/serving.md's load-test section."""
    import serve_load

    return serve_load.markdown(results).strip("\n") + "\n"


def chunk_sweep(results: dict) -> str:
    """docs/serving.md's prefill-budget table, from `serve_load.py --chunk-sweep` (docs/serving_load_chunks.json)."""
    m = results["machine"]
    lines = [f"Measured {results['started']} on {m['cpu']} ({m['cores']} cores; load average "
             f"{results['loadavg_start'][0]:.1f} at the start, {results['loadavg_end'][0]:.1f} at the end): "
             f"{results['streams']} rows decode while one {results['long_len']}-token prompt arrives, in-process "
             f"(`{results['command']}`). CPU milliseconds of the process (summed over its threads; wall "
             "milliseconds in brackets, the machine being shared):", "",
             "| prefill chunk | decode step | longest step while the prompt arrives | over a decode step | "
             "long-prompt TTFT idle | loaded / idle |", "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        c, w = r["cpu"], r["wall"]
        lines.append(f"| {r['chunk']} | {c['decode_step_ms']:.0f} ({w['decode_step_ms']:.0f}) | "
                     f"{c['max_gap_ms']:.0f} ({w['max_gap_ms']:.0f}) | {c['gap_over_decode']:.1f}x "
                     f"({w['gap_over_decode']:.1f}x) | {c['ttft_idle_ms']:.0f} ({w['ttft_idle_ms']:.0f}) | "
                     f"{c['ttft_ratio']:.2f}x ({w['ttft_ratio']:.2f}x) |")
    return "\n".join(lines) + "\n"
