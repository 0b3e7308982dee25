"""The acceptance targets of the peer benchmarks, as data, and the one function that checks them.

A target names a metric (a key of the flat `metrics` dict that compare_peers.py derives from one run), a
threshold and a comparison. Speed metrics are paired-median ratios (each round's two runs saw the same load),
never ratios of medians taken minutes apart. Edit this table, not the report, to change what "met" means.
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass

COMPARISONS = {">=": operator.ge, "<=": operator.le}


@dataclass(frozen=True)
class Target:
    name: str          # what the report prints
    metric: str        # key into the metrics dict
    threshold: float
    comparison: str = ">="


TARGETS = (
    # against transformers and the torch backend, batch and long-context scaling
    Target("gptx ORT fp32 decode vs transformers (faster attention)", "decode_ratio:gptx ORT fp32/transformers",
           1.3),
    Target("gptx ORT fp32 decode vs the gptx torch backend", "decode_ratio:gptx ORT fp32/gptx torch", 1.3),
    Target("gptx ORT int4 decode vs transformers", "decode_ratio:gptx ORT int4/transformers", 2.0),
    Target("gptx ORT fp32 batch 8 vs batch 1 decode throughput", "batch_ratio:gptx ORT fp32", 4.0),
    Target("gptx ORT fp32 prompt 512 + 512: last-100 / first-100 token latency", "drift:gptx ORT fp32", 1.5,
           "<="),
    Target("gptx ORT int4 prompt 512 + 512: last-100 / first-100 token latency", "drift:gptx ORT int4", 1.5,
           "<="),
    # against llama.cpp, the memory-read bound and the quality bar
    Target("gptx ORT int4 decode vs llama.cpp's best q4_0 (FA on or off)", "decode_ratio:gptx ORT int4/llama.cpp q4_0",
           1.5),
    Target("gptx ORT int4 decode: share of the measured memory-read bound", "bound_share:gptx ORT int4", 0.8),
    Target("gptx int4 top-1 agreement with the fp32 export (Shakespeare sample)", "top1:shakespeare:gptx ORT int4",
           0.97),
    Target("gptx int4 perplexity ratio to the fp32 export (Shakespeare sample)", "ppl_ratio:shakespeare:gptx ORT int4",
           1.01, "<="),
    Target("gptx int4 peak RSS / llama.cpp q4_0 peak RSS", "rss_ratio:gptx ORT int4/llama.cpp q4_0", 1.0, "<="),
    Target("prefill 512: gptx fp32 vs llama.cpp's best f32", "prefill_ratio:gptx ORT fp32/llama.cpp f32", 1.0),
    Target("prefill 512: gptx int8 vs llama.cpp's best q8_0", "prefill_ratio:gptx ORT int8/llama.cpp q8_0", 1.0),
    Target("prefill 512: gptx int8-dynamic vs llama.cpp's best q8_0",
           "prefill_ratio:gptx ORT int8-dynamic/llama.cpp q8_0", 1.0),
    Target("gptx int8-dynamic top-1 agreement with the fp32 export (Shakespeare sample)",
           "top1:shakespeare:gptx ORT int8-dynamic", 0.97),
    Target("prefill 512: gptx int4 vs llama.cpp's best q4_0", "prefill_ratio:gptx ORT int4/llama.cpp q4_0", 1.0),
)


def judge(metrics: dict, targets=TARGETS) -> list[dict]:
    """One row per target: its fields, the measured value and `met` (None when the metric was not measured)."""
    rows = []
    for t in targets:
        value = metrics.get(t.metric)
        met = None if value is None else bool(COMPARISONS[t.comparison](value, t.threshold))
        rows.append({**asdict(t), "value": value, "met": met})
    return rows
