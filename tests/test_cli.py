import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gptx import cli
from gptx.cli import app

runner = CliRunner()


@pytest.mark.parametrize("command", ["export", "info", "generate", "verify", "build", "bench", "train"])
def test_every_command_has_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output and len(result.output) > 200


def test_console_script_is_installed():
    proc = subprocess.run([sys.executable, "-m", "gptx.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "export" in proc.stdout and "verify" in proc.stdout


def test_info_prints_manifest(export_dir):
    result = runner.invoke(app, ["info", str(export_dir)])
    assert result.exit_code == 0, result.output
    assert "2 layers" in result.output and "float32" in result.output
    raw = runner.invoke(app, ["info", str(export_dir), "--json"])
    assert json.loads(raw.output)["config"]["n_layer"] == 2


def test_generate_streams_text(export_dir):
    result = runner.invoke(app, ["generate", str(export_dir), "Hello there", "-n", "8", "--temperature", "0"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Hello there") and len(result.output.strip()) > len("Hello there")


def test_verify_passes_and_writes_json(export_dir, tmp_path):
    report_path = tmp_path / "report.json"
    result = runner.invoke(app, ["verify", str(export_dir), "--decode-steps", "4", "--ppl-tokens", "32",
                                 "--json", str(report_path)])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
    report = json.loads(report_path.read_text())
    assert report["passed"] and report["max_abs_diff"] < 1e-4 and report["greedy_identical"]
    assert [c["batch"] for c in report["cases"]] == [1, 2, 3]
    assert report["perplexity"]["ratio"] == pytest.approx(1.0, abs=1e-4)


def test_verify_fails_on_a_tampered_model(export_dir, tmp_path):
    """Corrupt one weight in the ONNX data: verify must notice and exit non-zero."""
    import shutil

    import numpy as np
    import onnx
    from onnx import numpy_helper

    bad = tmp_path / "tampered"
    shutil.copytree(export_dir, bad)
    model = onnx.load(str(bad / "model.onnx"))
    init = next(t for t in model.graph.initializer if len(t.dims) == 2 and t.dims[0] == 32)
    arr = numpy_helper.to_array(init).copy()
    arr += np.random.default_rng(0).normal(0, 0.5, arr.shape).astype(np.float32)
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    (bad / "model.onnx").unlink()
    (bad / "model.onnx.data").unlink()
    onnx.save_model(model, str(bad / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    result = runner.invoke(app, ["verify", str(bad), "--decode-steps", "2", "--ppl-tokens", "0"])
    assert result.exit_code == 1
    assert "FAIL" in result.output


@pytest.mark.parametrize("args,needle", [
    (["info", "/nonexistent/dir"], "not a directory"),
    (["generate", "/nonexistent/dir", "hi"], "not a directory"),
    (["verify", "/nonexistent/dir"], "not a directory"),
    (["export", "gpt5", "--out", "/tmp/gptx-never"], "neither a known model"),
])
def test_bad_input_is_one_clear_line(args, needle):
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert needle in result.output
    assert "Traceback" not in result.output


def test_invalid_option_values(export_dir):
    result = runner.invoke(app, ["generate", str(export_dir), "hi", "--top-p", "2"])
    assert result.exit_code == 1 and "--top-p" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["generate", str(export_dir), "PROMPT-NOT-ECHOED", "-n", "500"])
    assert result.exit_code == 1 and "context" in result.output
    assert "PROMPT-NOT-ECHOED" not in result.output  # the prompt is printed only once the arguments are valid


def test_bench_times_sampled_decoding(export_dir, tmp_path):
    """--temperature > 0 samples (seed 0) through the runtime's sampler; top-k/top-p alone would be ignored by
    greedy decoding, so they are refused before any work."""
    report = tmp_path / "sampled.json"
    result = runner.invoke(app, ["bench", str(export_dir), "--prompt-len", "4", "--new-tokens", "6", "--runs", "1",
                                 "--compare", "none", "--temperature", "0.9", "--top-p", "0.9", "--json", str(report)])
    assert result.exit_code == 0, result.output
    saved = json.loads(report.read_text())
    assert saved["settings"]["sampling"] == "temperature 0.9, top-p 0.9, seed 0"
    assert saved["results"][0]["decode_tokens_per_s"] > 0
    result = runner.invoke(app, ["bench", str(export_dir), "--top-k", "5", "--runs", "1"])
    assert result.exit_code == 1 and "--temperature" in result.output and "Traceback" not in result.output


def test_hub_offline_export_is_clear_and_quick(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    result = runner.invoke(app, ["export", "gpt2", "--out", str(tmp_path / "g")])
    assert result.exit_code == 1
    assert "Hugging Face Hub" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "g").exists()


def test_export_cli_end_to_end(hf_dir, tmp_path):
    out = tmp_path / "e"
    result = runner.invoke(app, ["export", str(hf_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "validation" in result.output and (out / "manifest.json").is_file()
    again = runner.invoke(app, ["export", str(hf_dir), "--out", str(out)])
    assert again.exit_code == 1 and "--force" in again.output
    forced = runner.invoke(app, ["export", str(hf_dir), "--out", str(out), "--force", "--no-validate"])
    assert forced.exit_code == 0, forced.output
    assert "validate against PyTorch" not in forced.output and "validation" not in json.loads(
        (out / "manifest.json").read_text())


def test_choices_come_from_the_library_tables():
    from gptx.runtime.backends import BACKENDS
    from gptx.runtime.manifest import ENGINE_PRECISIONS, EXPORT_DTYPES, QUANT_SCHEMES

    assert [b.value for b in cli.Backend] == ["auto", *BACKENDS]
    assert [d.value for d in cli.DType] == list(EXPORT_DTYPES)
    assert [q.value for q in cli.Quantize] == list(QUANT_SCHEMES)
    assert [p.value for p in cli.Precision] == list(ENGINE_PRECISIONS)
    from gptx.export.optimize import QUANT_BITS

    assert set(QUANT_SCHEMES) == set(QUANT_BITS)  # the exporter's quantizer knows every scheme the CLI offers


def test_quantize_typo_is_rejected_before_any_work(tmp_path):
    import time

    start = time.perf_counter()
    result = runner.invoke(app, ["export", "random:gpt2", "--out", str(tmp_path / "q"), "--quantize", "int3"])
    assert result.exit_code == 1 and "'--quantize'" in result.output and "int8" in result.output
    assert "load model" not in result.output and not (tmp_path / "q").exists()
    assert time.perf_counter() - start < 10  # the parser, not a 20 s trace of GPT-2


def test_user_text_is_never_taken_as_markup(export_dir, tmp_path):
    weird = tmp_path / ":x: [red]dir[/red]"
    result = runner.invoke(app, ["info", str(weird)])
    assert result.exit_code == 1 and ":x: [red]dir[/red]" in result.output and "❌" not in result.output
    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["source"] = ":x: [bold]source[/bold]"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    shown = runner.invoke(app, ["info", str(copy)])
    assert shown.exit_code == 0 and ":x: [bold]source[/bold]" in shown.output and "❌" not in shown.output
    prompt = runner.invoke(app, ["generate", str(export_dir), ":x: [red]hi", "-n", "2", "--temperature", "0"])
    assert prompt.exit_code == 0 and prompt.output.startswith(":x: [red]hi")


def test_stop_escapes():
    assert cli.unescape(r"\n") == "\n" and cli.unescape(r"a\tb") == "a\tb" and cli.unescape(r"\r\n") == "\r\n"
    assert cli.unescape(r"\\n") == r"\n"  # an escaped backslash stays one backslash
    assert cli.unescape(r"C:\data") == r"C:\data"  # other backslashes are left alone
    assert cli.unescape("END") == "END"


def test_stop_at_newline_typed_as_backslash_n(shakespeare_dir):
    args = ["generate", str(shakespeare_dir), "ROMEO:", "-n", "60", "--temperature", "0"]
    free = runner.invoke(app, args)
    assert free.exit_code == 0 and "\n" in free.output.rstrip("\n")[len("ROMEO:"):]  # the sample writes lines
    stopped = runner.invoke(app, [*args, "--stop", "\\n"])  # what a shell passes for --stop "\n"
    assert stopped.exit_code == 0
    text = stopped.output[len("ROMEO:"):].rstrip("\n")
    assert "\n" not in text and free.output.startswith("ROMEO:" + text)


def test_max_length_counts_the_prompt(export_dir):
    import gptx.runtime

    prompt = "Hello there"
    n_prompt = len(gptx.runtime.load(export_dir).tokenizer.encode(prompt))
    by_length = runner.invoke(app, ["generate", str(export_dir), prompt, "--max-length", str(n_prompt + 5),
                                    "--temperature", "0"])
    by_count = runner.invoke(app, ["generate", str(export_dir), prompt, "-n", "5", "--temperature", "0"])
    assert by_length.exit_code == 0, by_length.output
    assert by_length.output == by_count.output


def test_an_unexpected_error_keeps_its_traceback_and_asks_for_a_report(export_dir, monkeypatch):
    import gptx.runtime.manifest

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(gptx.runtime.manifest, "load_manifest", broken)
    result = runner.invoke(app, ["info", str(export_dir)])
    assert result.exit_code == 1
    assert "Traceback" in result.output and "simulated bug" in result.output and "please report" in result.output


# ---------------------------------------------------------------------------------------------- runtime-only install
REPO = Path(__file__).resolve().parents[1]
RUNTIME_PACKAGES = ("numpy", "onnxruntime", "tiktoken", "typer", "rich")


@pytest.fixture(scope="session")
def runtime_venv():
    """A virtual environment with `pip install .` only (the runtime: no torch), reused across runs.

    Built from the wheels of this environment's versions (pip's cache after the main install, the index
    otherwise). CI (CI=true) fails here if it cannot be built; elsewhere the tests skip, saying why.
    """
    from importlib.metadata import version

    venv = Path(os.environ.get("GPTX_RUNTIME_VENV", REPO / ".venv-runtime"))
    python = venv / "bin" / "python"
    stamp = venv / "gptx-stamp"
    pins = "\n".join(f"{name}=={version(name)}" for name in RUNTIME_PACKAGES)
    key = pins + "\n" + (REPO / "pyproject.toml").read_text()
    if not (python.is_file() and stamp.is_file() and stamp.read_text() == key):
        shutil.rmtree(venv, ignore_errors=True)
        constraints = venv.parent / ".gptx-runtime-constraints.txt"
        # no pip of its own (ensurepip takes seconds): this environment's pip installs into it
        steps = [[sys.executable, "-m", "venv", "--without-pip", str(venv)],
                 [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                  "--disable-pip-version-check", "-c", str(constraints), "-e", str(REPO)]]
        try:
            constraints.write_text(pins + "\n")
            for step in steps:
                proc = subprocess.run(step, capture_output=True, text=True, timeout=900)
                if proc.returncode:
                    raise RuntimeError(f"{' '.join(step[:4])}... failed: {proc.stderr.strip()[-800:]}")
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            shutil.rmtree(venv, ignore_errors=True)
            message = f"could not build the runtime-only virtual environment: {e}"
            if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
                pytest.fail(message)
            pytest.skip(message)
        finally:
            constraints.unlink(missing_ok=True)
        stamp.write_text(key)
    return venv


def run_in(venv: Path, *args, timeout=300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=str(venv.parent))


@pytest.mark.slow
def test_runtime_only_install_runs_info_generate_and_bench(runtime_venv, export_dir, tmp_path):
    no_torch = run_in(runtime_venv, "python", "-c", "import torch")
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    which = run_in(runtime_venv, "python", "-c", "from gptx import cli; print(cli.__file__)")
    assert which.stdout.strip() == str(REPO / "gptx" / "cli.py")  # this checkout, through the install's console script

    info = run_in(runtime_venv, "gptx", "info", str(export_dir))
    assert info.returncode == 0 and "files:   OK" in info.stdout, info.stderr
    gen = run_in(runtime_venv, "gptx", "generate", str(export_dir), "Hello", "-n", "5", "--temperature", "0")
    assert gen.returncode == 0 and gen.stdout.startswith("Hello") and len(gen.stdout.strip()) > 5, gen.stderr
    report = tmp_path / "bench.json"
    bench = run_in(runtime_venv, "gptx", "bench", str(export_dir), "--prompt-len", "8", "--new-tokens", "8",
                   "--runs", "1", "--json", str(report))
    assert bench.returncode == 0, bench.stderr
    results = json.loads(report.read_text())["results"]
    assert [r["backend_name"] for r in results] == ["onnxruntime"] and results[0]["decode_tokens_per_s"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("args", [["export", "shakespeare", "--out", "x"], ["verify", "{export}"],
                                  ["generate", "{export}", "hi", "--backend", "torch"]])
def test_commands_that_need_torch_say_which_extra(runtime_venv, export_dir, args):
    result = run_in(runtime_venv, "gptx", *[a.format(export=export_dir) for a in args])
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "torch" in lines[0] and "pip install" in lines[0], result.stderr
