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
    """README's one-paragraph load-test summary: gptx serve at `clients` streaming clients, beside llama.cpp."""
    s, m = results["settings"], results["machine"]
    gptx = results["servers"][GPTX]
    tok, ttft = scaling(gptx, clients)
    errors = sum(lv["errors"] for lv in gptx["levels"])
    text = (f"Load test (`benchmarks/serve_load.py`, run {results['started']}: GPT-2-124M shapes, fp32, "
            f"{s['prompt_len']} + {s['new_tokens']} tokens a request, {m['cores']} CPU cores): {clients} streaming "
            f"clients get {tok:.2f}x the tokens/s of one ({level(gptx, clients)['tok_s']:.1f} vs "
            f"{level(gptx, 1)['tok_s']:.1f} tok/s), with time to first token {ttft:.2f}x its unloaded value and "
            f"{errors} errors")
    llama = results["servers"].get(LLAMA)
    if llama and all(scaling(llama, clients)):
        l_tok, l_ttft = scaling(llama, clients)
        text += (f"; llama.cpp's server in the same run: {l_tok:.2f}x ({level(llama, clients)['tok_s']:.1f} tok/s) "
                 f"and {l_ttft:.2f}x")
    return text + ".\n"


def serving_load(results: dict) -> str:
    """docs/serving.md's load-test section: what serve_load.py writes between its own markers."""
    import serve_load

    lines = serve_load.markdown(results).splitlines()
    body = [line for line in lines if line not in (serve_load.BEGIN, serve_load.END)]
    return "\n".join(body).strip("\n") + "\n"
