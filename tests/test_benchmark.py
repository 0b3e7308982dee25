"""`runtime.benchmark` / `gptx bench` on a tiny export: sane, consistent numbers and outputs (no timing thresholds)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from gpt_export.export import export  # noqa: E402
from gpt_export.model import GPT, GPTConfig  # noqa: E402
from gpt_export.weights import save_checkpoint  # noqa: E402
from runtime import benchmark  # noqa: E402
from runtime.engine import load  # noqa: E402
from runtime.errors import GptxError  # noqa: E402

BLOCK = 128


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, vocab_size=50257))
    save_checkpoint(model, tmp / "m.pt")  # a path source, so the torch backend can reload the same weights
    export(str(tmp / "m.pt"), tmp / "x", progress=False)
    return tmp / "x"


@pytest.fixture(scope="module")
def ort_engine(tiny_export):
    return load(tiny_export, "onnxruntime")


def check_result(r: dict, batch: int, prompt_len: int, new_tokens: int, runs: int) -> None:
    assert (r["batch"], r["prompt_len"], r["new_tokens"], r["runs"]) == (batch, prompt_len, new_tokens, runs)
    assert r["tokens_generated_per_row"] == new_tokens
    assert r["decode_tokens_per_row"] == new_tokens - 1
    assert r["decode_tokens"] == batch * (new_tokens - 1)
    assert r["prefill_tokens"] == batch * prompt_len
    for key in ("ttft_ms", "prefill_ms", "decode_ms", "total_ms", "prefill_tokens_per_s", "decode_tokens_per_s",
                "peak_rss_mib"):
        assert r[key] is not None and r[key] > 0, key
    assert r["prefill_ms"] <= r["ttft_ms"]  # TTFT = prefill + first sample
    assert len(r["per_run"]) == runs
    for run in r["per_run"]:
        assert run["prefill_ms"] <= run["ttft_ms"]
        assert run["total_ms"] == pytest.approx(run["ttft_ms"] + run["decode_ms"])
        # throughput and time agree
        assert run["decode_tokens_per_s"] == pytest.approx(r["decode_tokens"] / (run["decode_ms"] / 1e3))
        assert run["prefill_tokens_per_s"] == pytest.approx(r["prefill_tokens"] / (run["prefill_ms"] / 1e3))
    lat = r["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert lat["min"] <= lat["mean"] <= lat["max"]
    # the median run's decode time is bracketed by the per-token extremes
    assert lat["min"] * (new_tokens - 1) <= r["decode_ms"] * 1.0001
    assert r["decode_ms"] <= lat["max"] * (new_tokens - 1) * 1.0001
    assert len(r["loadavg_before"]) == 3 and len(r["loadavg_after"]) == 3


def test_bench_config_numbers_are_consistent(ort_engine):
    r = benchmark.bench_config(ort_engine, batch=2, prompt_len=6, new_tokens=10, runs=3, warmup=1)
    check_result(r, 2, 6, 10, 3)
    assert r["backend_name"] == "onnxruntime"
    assert r["first100_ms"] is None and r["last100_over_first100"] is None  # fewer than 200 new tokens
    json.dumps(r)  # serialisable as is


def test_bench_config_takes_a_backend_too(ort_engine):
    r = benchmark.bench_config(ort_engine.backend, batch=1, prompt_len=3, new_tokens=4, runs=1, warmup=0)
    check_result(r, 1, 3, 4, 1)


def test_first_vs_last_window(ort_engine, monkeypatch):
    monkeypatch.setattr(benchmark, "DRIFT_WINDOW", 4)
    r = benchmark.bench_config(ort_engine, batch=1, prompt_len=4, new_tokens=12, runs=2, warmup=0)
    assert r["first100_ms"] > 0 and r["last100_ms"] > 0
    assert r["last100_over_first100"] == pytest.approx(r["last100_ms"] / r["first100_ms"])


def test_single_new_token_has_no_decode(ort_engine):
    r = benchmark.bench_config(ort_engine, batch=1, prompt_len=5, new_tokens=1, runs=1, warmup=0)
    assert r["decode_tokens"] == 0 and r["decode_tokens_per_s"] is None
    assert r["latency_ms"]["p50"] is None and r["ttft_ms"] > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(new_tokens=0), "new_tokens"),
    (dict(runs=0), "runs"),
    (dict(prompt_len=BLOCK - 4, new_tokens=10), "block size"),
    (dict(batch=0), "batch"),
])
def test_bench_config_rejects_bad_args(ort_engine, kwargs, message):
    args = dict(batch=1, prompt_len=4, new_tokens=4, runs=1) | kwargs
    with pytest.raises(ValueError, match=message):
        benchmark.bench_config(ort_engine, **args)


def test_synthetic_prompts_are_fixed_and_valid():
    a = benchmark.synthetic_prompts(3, 50, 50257)
    assert a == benchmark.synthetic_prompts(3, 50, 50257)
    assert all(0 <= t < 50256 for row in a for t in row)
    assert len(a) == 3 and all(len(row) == 50 for row in a)


def test_run_bench_command_compares_and_writes_json_and_png(tiny_export, tmp_path):
    json_path, png = tmp_path / "r.json", tmp_path / "r.png"
    report = benchmark.run_bench_command(tiny_export, backend="onnxruntime", batch_sizes=[1, 2], prompt_lens=[4],
                                         new_tokens=6, runs=2, json_path=json_path, plot_path=png)
    assert report["settings"]["compare"] == "torch"  # the default when torch is installed
    names = [(r["backend_name"], r["batch"]) for r in report["results"]]
    assert names == [("onnxruntime", 1), ("onnxruntime", 2), ("torch", 1), ("torch", 2)]
    for r in report["results"]:
        check_result(r, r["batch"], 4, 6, 2)
        assert r["vs_torch"] > 0
        if r["backend_name"] == "torch":
            assert r["vs_torch"] == pytest.approx(1.0)
    saved = json.loads(json_path.read_text())
    assert len(saved["results"]) == 4
    m = saved["machine"]
    assert m["cores"] >= 1 and len(m["loadavg"]) == 3 and m["cpu"]
    assert "onnxruntime" in m["versions"] and "numpy" in m["versions"] and "torch" in m["versions"]
    assert saved["manifest"]["dtype"] == "float32" and "optimizations" in saved["manifest"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_none_and_torch_primary(tiny_export):
    report = benchmark.run_bench_command(tiny_export, backend="onnxruntime", prompt_lens=[4], new_tokens=3, runs=1,
                                         compare="none")
    assert [r["backend_name"] for r in report["results"]] == ["onnxruntime"]
    assert report["results"][0]["vs_torch"] is None
    report = benchmark.run_bench_command(tiny_export, backend="torch", prompt_lens=[4], new_tokens=3, runs=1)
    assert [r["backend_name"] for r in report["results"]] == ["torch"]  # nothing to compare a torch run with


def test_plot_without_matplotlib_is_a_clear_error(tiny_export, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec -> None, as if not installed
    with pytest.raises(GptxError, match="matplotlib"):
        benchmark.run_bench_command(tiny_export, prompt_lens=[4], new_tokens=3, runs=1, compare="none",
                                    plot_path=tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


def test_bad_compare_backend(tiny_export):
    with pytest.raises(ValueError, match="compare"):
        benchmark.run_bench_command(tiny_export, prompt_lens=[4], new_tokens=3, runs=1, compare="nope")


def test_module_does_not_import_torch():
    code = "import sys, runtime.benchmark; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------- CLI
def cli():
    from typer.testing import CliRunner

    from cli import app

    return CliRunner(), app


def test_cli_bench_prints_table_with_ratio(tiny_export, tmp_path):
    runner, app = cli()
    result = runner.invoke(app, ["bench", str(tiny_export), "--prompt-len", "4", "--new-tokens", "5", "--runs", "1",
                                 "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "decode" in out and "TTFT" in out and "torch" in out and "vs" in out
    assert re.search(r"onnxruntime\s+b1 p4.*\d+\.\d\d×", out), out  # the onnxruntime row has a ratio vs torch
    assert re.search(r"torch\s+b1 p4.*1\.00×", out), out
    assert json.loads((tmp_path / "b.json").read_text())["results"]


@pytest.mark.parametrize("args, message", [
    (["--runs", "0"], "runs"),
    (["--new-tokens", "0"], "new_tokens"),
    (["--prompt-len", "120", "--new-tokens", "20"], "block size"),
    (["--batch-size", "x"], "--batch-size"),
    (["--compare", "nope"], "compare"),
])
def test_cli_bench_bad_args_exit_1_with_one_line(tiny_export, args, message):
    runner, app = cli()
    result = runner.invoke(app, ["bench", str(tiny_export), "--new-tokens", "4", "--prompt-len", "4", *args])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "error" in lines[0] and message in lines[0]
    assert "Traceback" not in result.output
