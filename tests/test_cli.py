import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


@pytest.mark.parametrize("command", ["export", "info", "generate", "verify", "build", "bench", "train"])
def test_every_command_has_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output and len(result.output) > 200


def test_console_script_is_installed():
    proc = subprocess.run([sys.executable, "-m", "cli", "--help"], capture_output=True, text=True, timeout=60)
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
    assert result.exit_code == 1 and "top_p" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["generate", str(export_dir), "hi", "-n", "500"])
    assert result.exit_code == 1 and "context" in result.output


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
