"""`gptx verify`: run the PyTorch reference and a backend on the same inputs and compare, step by step.

Both sides run through the runtime's Backend interface on the same tokens (teacher-forced on the reference's greedy
continuation), so any difference is the engine's. Tolerances follow the precision (llm.c / ORT habit): fp32 tight,
fp16 loose, quantized exports judged by top-1 agreement and perplexity instead of raw logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptx.runtime.backends import create_backend
from gptx.runtime.backends.base import Backend
from gptx.runtime.errors import ExportError, InvalidInput
from gptx.runtime.generation import Generation
from gptx.runtime.kv_cache import KVCache
from gptx.runtime.manifest import load_manifest
from gptx.runtime.sampler import SamplingParams
from gptx.runtime.tokenizer import Tokenizer

SAMPLE_TEXT = Path(__file__).parent / "data" / "tinyshakespeare.txt"
PROMPTS = [
    "The quick brown fox",
    "In the beginning was the Word, and the Word",
    "ROMEO:\nBut soft, what light",
    "def fibonacci(n):\n    return",
    "Numbers: 1, 2, 3, 5, 8, 13,",
    "Hi",
]


@dataclass(frozen=True)
class Thresholds:
    max_abs_diff: float | None  # None: not judged on raw logits
    min_top1: float
    greedy_identical: bool
    max_ppl_ratio: float | None = None


def thresholds_for(manifest: dict) -> Thresholds:
    quant = manifest.get("quantization")
    if quant:
        return Thresholds(None, 0.80 if quant.get("bits") == 4 else 0.90, False, 1.25)
    if manifest["dtype"] == "float16":
        return Thresholds(0.25, 0.95, False, 1.02)
    return Thresholds(1e-3, 0.999, True, 1.0001)


def teacher_forced(backend: Backend, prompts: list[list[int]], continuation: np.ndarray, pad_id: int):
    """Prefill the prompts (one call), then feed `continuation` (B, steps) one column at a time, on the
    runtime's slot cache; yields each call's logits."""
    cache = KVCache(backend, len(prompts), max(map(len, prompts)) + continuation.shape[1] + 1, pad_id=pad_id)
    rows = [cache.claim() for _ in prompts]
    yield cache.prefill(rows, prompts)
    for col in range(continuation.shape[1]):
        yield cache.decode(continuation[:, col])


def logit_agreement(ref: np.ndarray, cand: np.ndarray, targets: np.ndarray | None = None) -> dict:
    """Two engines' logits for the same positions ((N, V), already cut to the real vocabulary): counts and sums
    that add up across calls (`merge_agreement`), so long texts never hold every position's logits at once."""
    out = {"positions": int(ref.shape[0]), "top1_matches": int((ref.argmax(-1) == cand.argmax(-1)).sum()),
           "max_abs_diff": float(np.max(np.abs(ref - cand))) if ref.size else 0.0}
    if targets is not None:
        out["ref_nll"], out["cand_nll"] = (float(nll(x, targets).sum()) for x in (ref, cand))
    return out


def nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each row's target id, computed in float64."""
    x = logits.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return np.log(np.exp(x).sum(-1)) - x[np.arange(len(targets)), targets]


def merge_agreement(parts: list[dict]) -> dict:
    """Sum `logit_agreement` parts into top-1 agreement, max |diff| and (with targets) perplexities and their ratio."""
    n = sum(p["positions"] for p in parts)
    out = {"positions": n, "top1_agreement": sum(p["top1_matches"] for p in parts) / n,
           "max_abs_diff": max(p["max_abs_diff"] for p in parts)}
    if all("ref_nll" in p for p in parts):
        out["ref_perplexity"] = math.exp(sum(p["ref_nll"] for p in parts) / n)
        out["cand_perplexity"] = math.exp(sum(p["cand_nll"] for p in parts) / n)
        out["perplexity_ratio"] = out["cand_perplexity"] / out["ref_perplexity"]
    return out


def text_agreement(ref: Backend, cand: Backend, windows: np.ndarray, vocab: int) -> dict:
    """Teacher-force every window (one batch) through both backends in lockstep; `merge_agreement` of all positions.

    Position k of a window is scored on predicting token k + 1, so perplexity is that of the text itself."""
    prompts, continuation = windows[:, :1].tolist(), windows[:, 1:-1]
    parts = []
    steps = zip(teacher_forced(ref, prompts, continuation, 0), teacher_forced(cand, prompts, continuation, 0))
    for k, (r, c) in enumerate(steps):
        parts.append(logit_agreement(r[:, :vocab], c[:, :vocab], windows[:, k + 1]))
    return merge_agreement(parts)


def greedy(backend: Backend, prompts: list[list[int]], steps: int, pad_id: int) -> np.ndarray:
    """(B, steps) greedy continuation through the runtime's own generation loop."""
    vocab = backend.manifest["tokenizer"]["vocab_size"]
    gen = Generation(backend, None, prompts, steps, SamplingParams(temperature=0), eos_token_id=pad_id,
                     vocab_size=vocab, stop_at_eos=False)
    while not gen.is_done():
        gen.generate_next()
    return np.array(gen.tokens)


def compare(directory: str | Path, backend: str = "onnxruntime", device: str = "cpu", reference_model=None,
            batch_sizes=(1, 2, 3), decode_steps: int = 8, ppl_tokens: int = 128,
            candidate: Backend | None = None) -> dict:
    """Compare a backend with the fp32 PyTorch model the export came from: the report `gptx verify` prints."""
    from gptx.export.torch_backend import TorchBackend

    directory = Path(directory)
    manifest = load_manifest(directory)
    block = manifest["config"]["block_size"]
    # each case needs a prompt token, `decode_steps` fed tokens and the one sampled after them in the context
    if isinstance(decode_steps, bool) or not isinstance(decode_steps, int) or not 1 <= decode_steps <= block - 2:
        raise InvalidInput(f"decode_steps must be an integer from 1 to {block - 2} (the model's context is {block} "
                           f"tokens), got {decode_steps!r}")
    tokenizer = Tokenizer(directory / manifest["tokenizer"]["file"])
    vocab = manifest["tokenizer"]["vocab_size"]
    pad = manifest["tokenizer"]["eot_token"]
    ref = TorchBackend(manifest, directory, "cpu", model=reference_model, half=False)
    cand = candidate or create_backend(backend, manifest, directory, device)
    limits = thresholds_for(manifest)
    room = block - decode_steps - 1  # prompt + fed tokens + the last sampled one
    cases = []
    for b in batch_sizes:
        prompts = [tokenizer.encode(PROMPTS[(i + b) % len(PROMPTS)])[:room] for i in range(b)]
        expected = greedy(ref, prompts, decode_steps, pad)
        steps = zip(teacher_forced(ref, prompts, expected, pad), teacher_forced(cand, prompts, expected, pad))
        parts = [logit_agreement(r[:, :vocab], c[:, :vocab]) for r, c in steps]
        merged = merge_agreement(parts)
        got = greedy(cand, prompts, decode_steps, pad)
        cases.append({"batch": b, "prompt_lengths": [len(p) for p in prompts], "decode_steps": decode_steps,
                      "max_abs_diff": merged["max_abs_diff"], "prefill_max_abs_diff": parts[0]["max_abs_diff"],
                      "top1_agreement": merged["top1_agreement"],
                      "greedy_identical": bool(np.array_equal(expected, got))})
    report = {"directory": str(directory), "backend": cand.describe(), "dtype": manifest["dtype"],
              "quantization": manifest.get("quantization"), "cases": cases,
              "max_abs_diff": max(c["max_abs_diff"] for c in cases),
              "top1_agreement": float(np.mean([c["top1_agreement"] for c in cases])),
              "greedy_identical": all(c["greedy_identical"] for c in cases), "thresholds": limits.__dict__}
    if ppl_tokens:
        text = SAMPLE_TEXT.read_text(encoding="utf-8")[:20000]
        sample = tokenizer.encode(text)[: min(ppl_tokens, block)]
        agreement = text_agreement(ref, cand, np.asarray([sample], dtype=np.int64), vocab)
        report["perplexity"] = {"tokens": len(sample), "reference": agreement["ref_perplexity"],
                                "candidate": agreement["cand_perplexity"], "ratio": agreement["perplexity_ratio"]}
    report["failures"] = judge(report, limits)
    report["passed"] = not report["failures"]
    return report


def judge(report: dict, limits: Thresholds) -> list[str]:
    fails = []
    if limits.max_abs_diff is not None and report["max_abs_diff"] > limits.max_abs_diff:
        fails.append(f"max |logits diff| {report['max_abs_diff']:.3g} > {limits.max_abs_diff:g}")
    if report["top1_agreement"] < limits.min_top1:
        fails.append(f"top-1 agreement {report['top1_agreement']:.3f} < {limits.min_top1:g}")
    if limits.greedy_identical and not report["greedy_identical"]:
        fails.append("greedy continuations differ from PyTorch")
    ppl = report.get("perplexity")
    if ppl and limits.max_ppl_ratio and ppl["ratio"] > limits.max_ppl_ratio:
        fails.append(f"perplexity ratio {ppl['ratio']:.4f} > {limits.max_ppl_ratio:g}")
    return fails


def quick_validate(directory: Path, reference_model, manifest: dict) -> dict:
    """The export's own smoke check: one batch, a few steps; raises if the graph is clearly wrong."""
    report = compare(directory, "onnxruntime", reference_model=reference_model, batch_sizes=(2,), decode_steps=3,
                     ppl_tokens=0)
    summary = {k: report[k] for k in ("max_abs_diff", "top1_agreement", "greedy_identical")}
    if not np.isfinite(report["max_abs_diff"]):
        raise ExportError("the exported graph produces non-finite logits")
    # A quantized graph is judged by `gptx verify` (top-1 and perplexity on a real sample): on a random
    # model, near-uniform logits make a few prompts' top-1 flip and say nothing about quality.
    if report["failures"] and not manifest.get("quantization"):
        raise ExportError("the exported graph does not match PyTorch: " + "; ".join(report["failures"]))
    return summary
