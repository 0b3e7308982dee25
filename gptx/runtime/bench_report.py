"""Presenting `gptx bench` results: its table and its bar chart (benchmarks/report.py draws its own charts with it).
Nothing here times anything; rich and matplotlib are imported only when a table or a plot is asked for."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import MissingDependency


def add_ratios(results: list[dict]) -> None:
    """`vs_torch`: decode tok/s over the torch backend's for the same config (None without a torch row)."""
    torch_rate = {(r["batch"], r["prompt_len"]): r["decode_tokens_per_s"]
                  for r in results if r["backend_name"] == "torch"}
    for r in results:
        ref, mine = torch_rate.get((r["batch"], r["prompt_len"])), r["decode_tokens_per_s"]
        r["vs_torch"] = mine / ref if ref and mine else None


def fmt(value, spec: str = ".1f", suffix: str = "") -> str:
    """A number for a table cell; an em dash for a missing one."""
    return "—" if value is None else f"{value:{spec}}{suffix}"


def results_table(results: list[dict], report: dict | None = None):
    """The `gptx bench` table (a rich Table): one row per (backend, batch, prompt length)."""
    from rich import box
    from rich.table import Table

    title = None
    if report is not None:
        m, st, quant = report["machine"], report["settings"], report["manifest"].get("quantization") or {}
        title = (f"{m['cpu']}, {m['cores']} cores, load {m['loadavg'][0]:.2f} · {st['device']} · "
                 f"{report['manifest']['dtype']}" + (f" {quant.get('method', 'quantized')}" if quant else "")
                 + f" · +{st['new_tokens']} tokens, {st.get('sampling', 'greedy')}, median of {st['runs']}")
    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    t.add_column("backend", no_wrap=True)
    t.add_column("config", no_wrap=True)
    drift = any(r.get("last100_over_first100") is not None for r in results)
    # two-line headers keep the table inside 80 columns without truncating anything
    for col in ("TTFT\nms", "prefill\ntok/s", "decode\ntok/s", "p50\nms", "p90\nms", "p99\nms", "peak\nMiB",
                "× vs\ntorch", *(["last/first\n100 tok"] if drift else [])):
        t.add_column(col, justify="right", no_wrap=True)
    for r in results:
        lat = r["latency_ms"]
        peak = r["cuda_peak_mib"] if r.get("cuda_peak_mib") is not None else r["peak_rss_mib"]
        t.add_row(r["backend_name"], f"b{r['batch']} p{r['prompt_len']}", fmt(r["ttft_ms"]),
                  fmt(r["prefill_tokens_per_s"], ".0f"), fmt(r["decode_tokens_per_s"]), fmt(lat["p50"]),
                  fmt(lat["p90"]), fmt(lat["p99"]), fmt(peak, ".0f"), fmt(r.get("vs_torch"), ".2f", "×"),
                  *([fmt(r.get("last100_over_first100"), ".2f", "×")] if drift else []))
    return t


# ---------------------------------------------------------------------------------------------- plots
def require_matplotlib():
    if importlib.util.find_spec("matplotlib") is None:
        raise MissingDependency("--plot needs matplotlib: pip install 'gptx[plot]' (or pip install matplotlib)")


def grouped_bars(groups: list[str], series: dict[str, list[float | None]], path: Path, title: str,
                 ylabel: str = "decode tokens / s") -> Path:
    """One cluster of bars per group (x axis), one bar per series; a missing value leaves a gap."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) * max(1, len(series)) ** 0.5), 4.0))
    x = np.arange(len(groups))
    for i, (label, values) in enumerate(series.items()):
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, [v or 0.0 for v in values], width, label=label)
        ax.bar_label(bars, labels=["" if v is None else f"{v:.0f}" for v in values], fontsize=7)
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_plot(results: list[dict], path: Path, title: str = "decode throughput") -> Path:
    """`gptx bench --plot`: decode tok/s per configuration (x) and backend (bars)."""
    rate = {(r["backend"], f"b{r['batch']} p{r['prompt_len']} +{r['new_tokens']}"): r["decode_tokens_per_s"]
            for r in results}
    configs = list(dict.fromkeys(config for _, config in rate))
    labels = list(dict.fromkeys(label for label, _ in rate))
    return grouped_bars(configs, {label: [rate.get((label, c)) for c in configs] for label in labels}, path, title)
