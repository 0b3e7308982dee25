"""`gptx.runtime.benchmark` / `gptx bench` on a tiny export, and the benchmark scripts' shared code: what each
measurement counts and how it is computed, never how fast anything runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from gptx.export.convert import export
from gptx.model.gpt import GPT, GPTConfig
from gptx.model.weights import save_checkpoint
from gptx.runtime import benchmark
from gptx.runtime.engine import load
from gptx.runtime.errors import GptxError

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


def rss_mib_now() -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def check_result(r: dict, batch: int, prompt_len: int, new_tokens: int, runs: int) -> None:
    """What a real bench_config result must hold (the formulas are tested on literals in test_summarize_runs)."""
    assert (r["batch"], r["prompt_len"], r["new_tokens"], r["runs"]) == (batch, prompt_len, new_tokens, runs)
    # every row generated every token asked for, and the rates count exactly those tokens
    assert r["tokens_generated_per_row"] == new_tokens
    assert (r["prefill_tokens"], r["decode_tokens"]) == (batch * prompt_len, batch * (new_tokens - 1))
    assert len(r["per_run"]) == runs
    assert r["prefill_ms"] <= r["ttft_ms"] <= r["total_ms"]  # TTFT = prefill + first sample; total adds the decode
    lat = r["latency_ms"]
    slowest_run = max(x["decode_ms"] for x in r["per_run"])
    assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] <= slowest_run


def check_peak_rss(r: dict) -> None:
    """Right after bench_config: its peak since the config started is in MiB and holds what the process holds now."""
    if r["peak_rss_method"].startswith("VmHWM"):
        assert r["peak_rss_mib"] >= 0.9 * rss_mib_now()


def raw_run(ttft, prefill, latencies, tokens=(4, 4)):
    return {"ttft": ttft, "prefill": prefill, "decode": sum(latencies), "latencies": list(latencies),
            "tokens": list(tokens)}


def test_summarize_runs_on_hand_computed_numbers(monkeypatch):
    monkeypatch.setattr(benchmark, "DRIFT_WINDOW", 1)
    # batch 2, prompt 5, 4 new tokens: 10 prompt tokens and 2 x 3 = 6 decode tokens per run
    runs = [raw_run(0.125, 0.1, [0.25, 0.125, 0.125]),    # decode 0.5 s -> 12 tok/s; prefill 100 tok/s
            raw_run(0.25, 0.2, [0.5, 0.25, 0.25]),        # decode 1.0 s -> 6 tok/s;  prefill 50 tok/s
            raw_run(0.5, 0.25, [0.25, 0.25, 0.25], (4, 3))]  # decode 0.75 s -> 8 tok/s; prefill 40 tok/s
    r = benchmark.summarize_runs(runs, batch=2, prompt_len=5, new_tokens=4, warmup=1)
    assert (r["decode_tokens"], r["prefill_tokens"], r["decode_tokens_per_row"]) == (6, 10, 3)
    assert r["tokens_generated_per_row"] == 3  # the shortest row of any run
    assert r["decode_tokens_per_s"] == pytest.approx(8.0)
    assert r["prefill_tokens_per_s"] == pytest.approx(50.0)
    assert r["ttft_ms"] == pytest.approx(250.0)
    assert r["decode_ms"] == pytest.approx(750.0)
    assert r["total_ms"] == pytest.approx(1250.0)  # TTFT + decode: 625, 1250, 1250 ms
    assert [x["decode_tokens_per_s"] for x in r["per_run"]] == pytest.approx([12.0, 6.0, 8.0])
    # nine pooled latencies: 125 x2, 250 x6, 500 x1 -> p50 250, mean 250, max 500
    assert r["latency_ms"]["p50"] == pytest.approx(250.0) and r["latency_ms"]["mean"] == pytest.approx(250.0)
    assert r["latency_ms"]["min"] == pytest.approx(125.0) and r["latency_ms"]["max"] == pytest.approx(500.0)
    # first / last 1-token windows: medians of (250, 500, 250) and (125, 250, 250)
    assert r["first100_ms"] == pytest.approx(250.0) and r["last100_ms"] == pytest.approx(250.0)
    assert r["last100_over_first100"] == pytest.approx(1.0)


def test_bench_config_numbers_are_consistent(ort_engine):
    r = benchmark.bench_config(ort_engine, batch=2, prompt_len=6, new_tokens=10, runs=3, warmup=1)
    check_peak_rss(r)
    check_result(r, 2, 6, 10, 3)
    assert r["backend_name"] == "onnxruntime"
    assert r["first100_ms"] is None and r["last100_over_first100"] is None  # fewer than 200 new tokens
    json.dumps(r)  # serialisable as is


def test_bench_config_takes_a_backend_too(ort_engine):
    r = benchmark.bench_config(ort_engine.backend, batch=1, prompt_len=3, new_tokens=4, runs=1, warmup=0)
    check_peak_rss(r)
    check_result(r, 1, 3, 4, 1)


def test_first_vs_last_window(ort_engine, monkeypatch):
    monkeypatch.setattr(benchmark, "DRIFT_WINDOW", 4)
    r = benchmark.bench_config(ort_engine, batch=1, prompt_len=4, new_tokens=12, runs=2, warmup=0)
    lat = r["latency_ms"]  # a window's mean latency lies among the pooled latencies, in the same unit
    assert lat["min"] <= r["first100_ms"] <= lat["max"] and lat["min"] <= r["last100_ms"] <= lat["max"]
    assert r["last100_over_first100"] == pytest.approx(r["last100_ms"] / r["first100_ms"])


def test_single_new_token_has_no_decode(ort_engine):
    r = benchmark.bench_config(ort_engine, batch=1, prompt_len=5, new_tokens=1, runs=1, warmup=0)
    assert r["decode_tokens"] == 0 and r["decode_tokens_per_s"] is None
    assert r["latency_ms"]["p50"] is None and r["ttft_ms"] >= r["prefill_ms"]


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


def test_run_bench_command_compares_and_writes_png(tiny_export, tmp_path):
    png = tmp_path / "r.png"
    report = benchmark.run_bench_command(tiny_export, backend="onnxruntime", batch_sizes=[1, 2], prompt_lens=[4],
                                         new_tokens=6, runs=2, plot_path=png)
    assert report["settings"]["compare"] == "torch"  # the default when torch is installed
    names = [(r["backend_name"], r["batch"]) for r in report["results"]]
    assert names == [("onnxruntime", 1), ("onnxruntime", 2), ("torch", 1), ("torch", 2)]
    torch_rate = {r["batch"]: r["decode_tokens_per_s"] for r in report["results"] if r["backend_name"] == "torch"}
    for r in report["results"]:
        check_result(r, r["batch"], 4, 6, 2)
        assert r["vs_torch"] == pytest.approx(r["decode_tokens_per_s"] / torch_rate[r["batch"]])
    saved = json.loads(json.dumps(report))  # what `gptx bench --json` writes
    assert len(saved["results"]) == 4
    m = saved["machine"]
    assert m["cores"] >= 1 and len(m["loadavg"]) == 3 and m["cpu"]
    assert "onnxruntime" in m["versions"] and "numpy" in m["versions"] and "torch" in m["versions"]
    assert saved["manifest"]["dtype"] == "float32" and "optimizations" in saved["manifest"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sampled_runs_go_through_the_sampler(tiny_export, monkeypatch):
    """With a SamplingParams every decoded token is drawn by sample_row (greedy runs never call it)."""
    from gptx.runtime import sampler
    from gptx.runtime.sampler import SamplingParams

    draws = []
    real = sampler.sample_row
    monkeypatch.setattr(sampler, "sample_row", lambda *args: draws.append(1) or real(*args))
    report = benchmark.run_bench_command(tiny_export, backend="onnxruntime", prompt_lens=[4], new_tokens=5, runs=1,
                                         warmup=0, compare="none", sampling=SamplingParams(0.8, top_k=20, seed=0))
    assert report["settings"]["sampling"] == "temperature 0.8, top-k 20, seed 0"
    assert len(draws) == 5 and report["results"][0]["tokens_generated_per_row"] == 5
    benchmark.run_bench_command(tiny_export, backend="onnxruntime", prompt_lens=[4], new_tokens=5, runs=1, warmup=0,
                                compare="none")
    assert len(draws) == 5


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
    code = "import sys, gptx.runtime.benchmark; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------- CLI
def cli():
    from typer.testing import CliRunner

    from gptx.cli import app

    return CliRunner(), app


def test_cli_bench_prints_table_with_ratio(tiny_export, tmp_path):
    runner, app = cli()
    result = runner.invoke(app, ["bench", str(tiny_export), "--prompt-len", "4", "--new-tokens", "5", "--runs", "1",
                                 "--json", str(tmp_path / "b.json")], env={"COLUMNS": "160"})  # no cell cut short
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


# ---------------------------------------------------------------------------------------------- peer benchmarks
# benchmarks/ is a folder of scripts, not a package: import its modules the way compare_peers.py does
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_judge_reads_targets_as_data():
    import judge

    targets = (judge.Target("fast", "speed", 1.5), judge.Target("small", "rss", 1.0, "<="),
               judge.Target("unmeasured", "nothing", 2.0))
    rows = judge.judge({"speed": 1.49, "rss": 0.9}, targets)
    assert [r["met"] for r in rows] == [False, True, None]
    assert rows[0]["value"] == 1.49 and rows[1]["comparison"] == "<="


def test_every_target_names_a_metric_compare_peers_computes():
    import compare_peers
    import judge

    # metrics() on an empty run lists every key it can produce, each None
    produced = compare_peers.metrics({"engines": {}, "quality": {"shakespeare": {}, "random": {}},
                                      "long": {"gptx ORT fp32": {"last100_over_first100": 1.0},
                                               "gptx ORT int4": {"last100_over_first100": 1.0}}})
    assert {t.metric for t in judge.TARGETS} <= set(produced)


def test_paired_ratio_is_the_median_of_per_round_ratios():
    import harness

    a = [{"rate": 10.0}, {"rate": 30.0}, {"rate": 12.0}]
    b = [{"rate": 5.0}, {"rate": 10.0}, {"rate": 12.0}]
    # per round 2.0, 3.0, 1.0 -> 2.0; the ratio of medians would say 12 / 10 = 1.2
    assert harness.paired_ratio(a, b) == pytest.approx(2.0)
    assert harness.median_rate(a) == pytest.approx(12.0)


def test_machine_probes_measure_what_they_say(monkeypatch):
    import harness

    ticks = iter(range(1000))
    monkeypatch.setattr(harness.time, "perf_counter", lambda: next(ticks) * 0.5)  # every timed read takes 0.5 s
    bw = harness.read_bandwidth_gbs(threads=2, mib=64, repeats=2)
    monkeypatch.undo()
    assert bw["gb_per_s"] == pytest.approx(64 * 2**20 / 0.5 / 1e9)  # bytes of the array / seconds, in GB/s
    assert set(bw["by_method"]) == {"numpy max", "BLAS matrix-vector"} and bw["method"] in bw["by_method"]
    assert (bw["threads"], bw["array_mib"], bw["repeats"]) == (2, 64, 2)
    # a worker's CPU time counts as ours when its pid is given, so it never shows up as "other processes"
    child = subprocess.Popen([sys.executable, "-c", "import sys, time\ninput()\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.3: pass\nprint(flush=True)\ntime.sleep(30)"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        with_child, alone = harness.CpuMeter([child.pid]), harness.CpuMeter()
        before = with_child._ours(), alone._ours()
        child.stdin.write("\n")
        child.stdin.flush()
        child.stdout.readline()  # the child has burnt 0.3 s of CPU (however long a busy machine took), then sleeps
        gained = with_child._ours() - before[0], alone._ours() - before[1]
    finally:
        child.kill()
        child.wait()
    assert gained[0] - gained[1] > 0.2
    meter = harness.CpuMeter()
    meter.start()
    share = meter.stop()
    assert share is None or 0.0 <= share <= 1.0


def test_memory_probe_measures_the_runtime_alone(tiny_export):
    """The probe's process loads a gptx engine without the benchmark's own helpers (onnx: ~15 MiB of RSS)."""
    harness = Path(__file__).resolve().parents[1] / "benchmarks" / "harness.py"
    code = (f"import sys, runpy; h = runpy.run_path({str(harness)!r}); "
            f"e = h['GptxEngine']('probe', __import__('pathlib').Path({str(tiny_export)!r}), '?'); "
            "assert 'onnx' not in sys.modules, 'onnx imported'; assert e.weight_bytes_per_token > 0")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_onnx_weight_bytes_skips_tables_only_gathered(tiny_export, tmp_path):
    import harness
    import onnx

    from gptx.export.optimize import optimize_export
    from gptx.runtime.manifest import load_manifest

    fp32 = harness.onnx_weight_bytes(tiny_export, load_manifest(tiny_export))
    inits = onnx.load(str(tiny_export / "model.onnx"), load_external_data=False).graph.initializer
    total = sum(next((int(e.value) for e in t.external_data if e.key == "length"), len(t.raw_data)) for t in inits)
    assert total - fp32 == BLOCK * 32 * 4  # all but the position table, of which a step reads one row
    q = tmp_path / "q"
    shutil.copytree(tiny_export, q)
    optimize_export(q, quantize="int4")
    assert harness.onnx_weight_bytes(q, load_manifest(q)) < fp32 / 2


def test_ort_op_profile_counts_a_decode_step(tiny_export, tmp_path):
    import harness

    from gptx.export.optimize import optimize_export

    p = harness.ort_op_profile(tiny_export, past_len=8, steps=3, workdir=tmp_path)
    assert (p["past_len"], p["steps"]) == (8, 3)
    assert abs(sum(op["share"] for op in p["top_ops"]) - 1.0) < 0.2
    # the fp32 export's tied LM head is one Gemm, the largest matrix of a tiny model
    assert {op["op"]: op["nodes"] for op in p["top_ops"]}.get("Gemm") == 1
    # an in-place graph is profiled as the runtime runs it: its presents bound to the past buffers
    fused = tmp_path / "fused"
    shutil.copytree(tiny_export, fused)
    optimize_export(fused)
    q = harness.ort_op_profile(fused, past_len=8, steps=3, workdir=tmp_path)
    ops = {op["op"]: op["nodes"] for op in q["top_ops"]}
    assert ops.get("GroupQueryAttention") == 2 and "Softmax" not in ops and q["nodes"] < p["nodes"]


def test_report_renders_a_small_run(tmp_path):
    import judge
    import report

    decode = {"rate": 10.0, "ttft_ms": 50.0, "latency_ms": {"p50": 100.0, "p90": 110.0, "p99": 120.0},
              "per_round": [9.0, 10.0, 11.0], "bound_share": 0.5, "bytes_per_token": 1e8, "bound_rate": 20.0}
    res = {"started": "s", "finished": "f", "wall_s": 60, "command": "python benchmarks/compare_peers.py",
           "preliminary": "under load", "loadavg_start": [1, 1, 1], "loadavg_end": [2, 2, 2], "notes": ["a note"],
           "machine": {"cpu": "cpu", "cores": 2, "logical_cpus": 2, "ram_gib": 8.0, "platform": "linux",
                       "versions": {"numpy": "2"}},
           "settings": {"threads": 2, "seed": 0, "prompt_len": 32, "new_tokens": 128, "prefill_len": 512,
                        "warmup": 1, "rounds": 3},
           "weights": {"hf_vs_gptx_max_abs_logit_diff": 1e-6},
           "bandwidth": {"gb_per_s": 2.0, "threads": 2, "array_mib": 512, "repeats": 7},
           "engines": {"gptx ORT int4": {"family": "gptx", "mode": "4-bit", "status": "ok", "peak_rss_mib": 200.0,
                                         "load_s": 0.5, "rss_after_load_mib": 150.0, "file_mb": 100.0},
                       "llama.cpp q4_0": {"family": "llama.cpp", "mode": "4-bit", "status": "ok",
                                          "peak_rss_mib": 250.0, "load_s": 0.1, "rss_after_load_mib": 120.0},
                       "CTranslate2 int8": {"family": "CTranslate2", "mode": "8-bit", "status": "not available",
                                            "note": "not installed"}},
           "decode": {"results": {"gptx ORT int4": decode, "llama.cpp q4_0": dict(decode, rate=5.0)},
                      "pairs": {"gptx ORT int4/llama.cpp q4_0": 2.1}, "transformers_reference": None,
                      "others_cpu": [0.1, 0.5, None]},
           "prefill": {"prompt_len": 512, "results": {"gptx ORT int4": {"rate": 400.0, "ms": 1280.0,
                                                                          "per_round": [400.0]}}, "pairs": {}},
           "quality": {"shakespeare": {"gptx ORT int4": {"top1_agreement": 0.98, "perplexity_ratio": 1.001,
                                                         "max_abs_diff": 0.5, "positions": 100}}}}
    res["targets"] = judge.judge({"decode_ratio:gptx ORT int4/llama.cpp q4_0": 2.1})
    md = tmp_path / "b.md"
    report.write_markdown(res, md)
    text = md.read_text()
    assert "**Preliminary:** under load" in text and "a note" in text
    assert "| 4-bit | 10.0 (gptx ORT int4) | 5.0 (llama.cpp q4_0) | 2.10× |" in text
    assert "**MET**" in text and "n/a (not measured)" in text
    assert "CTranslate2 int8 | not available: not installed" in text
    assert "98.00%" in text and "10%, 50%, —" in text
    assert "recorded in `docs/benchmarks.json`" in text  # the default results file
    report.write_markdown(res, md, tmp_path / "other.json")  # a second machine's run names its own file
    assert f"recorded in `{tmp_path / 'other.json'}`" in md.read_text()
    png = report.write_plot(res, tmp_path / "b.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grouped_bars_leave_gaps_for_missing_values(tmp_path, monkeypatch):
    import matplotlib.axes

    from gptx.runtime.bench_report import grouped_bars

    heights = []
    real = matplotlib.axes.Axes.bar
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", lambda self, x, h, *a, **k: heights.append(list(h))
                        or real(self, x, h, *a, **k))
    png = grouped_bars(["fp32", "4-bit"], {"a": [1.0, None], "b": [2.0, 3.0]}, tmp_path / "g.png", "t")
    assert heights == [[1.0, 0.0], [2.0, 3.0]]  # one call per series, the missing value a zero-height gap
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_remote_engine_runs_in_its_own_process(tiny_export):
    import harness

    local = harness.GptxEngine("local", tiny_export, "fp32")
    remote = harness.Remote("remote", "gptx", "fp32", ("GptxEngine", ("remote", tiny_export, "fp32"), {}), threads=1)
    try:
        assert remote.proc.pid != os.getpid() and remote.proc.is_alive()
        assert remote.weight_bytes_per_token == local.weight_bytes_per_token
        prompt = benchmark.synthetic_prompts(1, 5, 50257)[0]
        assert remote.greedy(prompt, 6) == local.greedy(prompt, 6)
        raw = remote.run([prompt], 4)
        assert raw["tokens"] == [4] and len(raw["latencies"]) == 3
    finally:
        remote.close()
    assert not remote.proc.is_alive()


def test_remote_engine_that_fails_to_load_says_why(tmp_path):
    import harness

    with pytest.raises(RuntimeError, match="ManifestError|not found|manifest"):
        harness.Remote("broken", "gptx", "fp32", ("GptxEngine", ("broken", tmp_path / "nope", "fp32"), {}), threads=1)
