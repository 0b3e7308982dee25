"""Monitoring: `gptx train --report-to` drives the real TensorBoard, W&B (offline) and MLflow (local store), and what
they stored, read back through each tool's own reader, equals what the training loop printed and returned."""

import base64
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gptx.cli import app
from gptx.train.monitoring import parse_report_to
from gptx.train.trainer import TrainConfig, train
from gptx.runtime.errors import InvalidInput

SHAKESPEARE_TXT = Path(__file__).resolve().parents[1] / "gptx" / "export" / "data" / "tinyshakespeare.txt"
TINY_ARGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
             "--eval-iters", "2", "--warmup-iters", "2", "--max-iters", "6", "--eval-interval", "3"]
LINE = re.compile(r"iter (\d+): train loss ([\d.]+), val loss ([\d.]+), lr ([\d.e+-]+)")
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_report_to_choices():
    assert parse_report_to("wandb, mlflow,wandb") == ("wandb", "mlflow")
    assert parse_report_to(["tensorboard"]) == ("tensorboard",)
    assert parse_report_to("none") == parse_report_to("") == ()
    with pytest.raises(InvalidInput, match="unknown report_to tensorbord"):
        parse_report_to("tensorbord")
    result = runner.invoke(app, ["train", "x.txt", "--report-to", "wandb,comet"])
    assert result.exit_code == 1 and "comet" in result.output  # a parser error, before any work


def test_missing_extra_is_one_line_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # how Python marks a package as not importable
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", str(SHAKESPEARE_TXT), "--out", str(out), "--report-to", "mlflow"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["error: --report-to mlflow needs mlflow: pip install 'gptx[monitor]'"]
    assert not out.exists()


def test_mlflow_store_must_be_local(tmp_path):
    with pytest.raises(InvalidInput, match="local store"):
        TrainConfig(data="x", mlflow_uri="http://127.0.0.1:5000").check()
    result = runner.invoke(app, ["train", str(SHAKESPEARE_TXT), "--out", str(tmp_path / "o"), "--report-to", "mlflow",
                                 "--mlflow-uri", "https://example.com"])
    assert result.exit_code == 1 and "local store" in result.output and not (tmp_path / "o").exists()
    not_a_db = tmp_path / "notes.db"
    not_a_db.write_text("private notes\n")
    result = runner.invoke(app, ["train", str(SHAKESPEARE_TXT), "--out", str(tmp_path / "o"), "--report-to", "mlflow",
                                 "--mlflow-uri", f"sqlite:///{not_a_db}", "--max-iters", "1"])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "cannot use the tracking store" in result.output and "private notes" not in result.output
    assert not_a_db.read_text() == "private notes\n" and not (tmp_path / "o").exists()  # no empty OUT left


def wandb_records(run_dir: Path) -> list[dict]:
    """The offline run's records, through wandb's own reader of its .wandb log (`wandb leet inspect --json`)."""
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_wandb_and_mlflow_offline_read_back_what_train_printed(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    for var in ("WANDB_MODE", "WANDB_DATA_DIR", "WANDB_PROJECT", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)  # our defaults: offline, artifacts staged inside OUT
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(SHAKESPEARE_TXT), "--out", str(out), *TINY_ARGS,
                                 "--report-to", "wandb,mlflow"])
    assert result.exit_code == 0, result.output
    printed = [m.groups() for m in LINE.finditer(result.output)]
    assert [int(p[0]) for p in printed] == [3, 6]
    ckpt_md5 = hashlib.md5((out / "ckpt.pt").read_bytes()).digest()

    # MLflow: the default local store inside OUT, read with MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("gptx").experiment_id])
    assert run.info.status == "FINISHED"
    ml = {key: client.get_metric_history(run.info.run_id, key) for key in ("train/loss", "val/loss", "train/lr")}
    assert [m.step for m in ml["val/loss"]] == [3, 6]
    assert [f"{m.value:.4f}" for m in ml["train/loss"]] == [p[1] for p in printed]
    assert [f"{m.value:.4f}" for m in ml["val/loss"]] == [p[2] for p in printed]
    lr_at_eval = {m.step: m.value for m in ml["train/lr"]}
    assert [f"{lr_at_eval[int(p[0])]:.2e}" for p in printed] == [p[3] for p in printed]
    assert len(client.get_metric_history(run.info.run_id, "train/batch_loss")) == 6
    assert client.get_metric_history(run.info.run_id, "train/tokens_per_sec")[0].value > 0
    assert run.data.params["n_layer"] == "1" and run.data.params["model.n_embd"] == "16"
    artifact_dir = Path(client.download_artifacts(run.info.run_id, "ckpt", str(tmp_path / "dl")))
    assert hashlib.md5((artifact_dir / "ckpt.pt").read_bytes()).digest() == ckpt_md5

    # W&B: the offline run inside OUT/wandb, read with wandb's own reader
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    records = wandb_records(run_dir)
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    evals = [h for h in history if "val/loss" in h]
    assert [h["_step"] for h in evals] == [3, 6]
    # both tools hold the very same numbers (to the bit), and they are the ones printed
    assert [h["train/loss"] for h in evals] == [m.value for m in ml["train/loss"]]
    assert [h["val/loss"] for h in evals] == [m.value for m in ml["val/loss"]]
    assert [h["train/lr"] for h in evals] == [lr_at_eval[s] for s in (3, 6)]
    assert len(history) == 6
    config = next(r["run"]["config"]["update"] for r in records if r["type"] == "run" and "config" in r["run"])
    config.update(*(r["config"]["update"] for r in records if r["type"] == "config"))
    assert config["n_layer"] == 1 and config["model"]["n_embd"] == 16
    (artifact,) = [r["artifact"] for r in records if r["type"] == "artifact"]
    (entry,) = artifact["manifest"]["contents"]
    assert entry["path"] == "ckpt.pt" and base64.b64decode(entry["digest"]) == ckpt_md5
    assert Path(entry["local_path"]).is_relative_to(out)  # the staged copy stays in OUT, not in ~/.local
    assert any(r["type"] == "exit" and r["exit"].get("exit_code", 0) == 0 for r in records)


def test_tensorboard_reads_back_the_returned_history(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig(data=str(SHAKESPEARE_TXT), out_dir=str(tmp_path / "tb"), n_layer=1, n_head=2, n_embd=16,
                      block_size=16, batch_size=4, max_iters=4, eval_interval=2, eval_iters=2, warmup_iters=1,
                      report_to=["tensorboard"])
    result = train(cfg, progress=False, log=lambda s: None)
    assert result["reports"] == {"tensorboard": str(tmp_path / "tb" / "tb")}
    events = EventAccumulator(result["reports"]["tensorboard"])
    events.Reload()
    val = events.Scalars("val/loss")
    assert [e.step for e in val] == [h["iter"] for h in result["history"]] == [2, 4]
    # TensorBoard stores float32
    assert [e.value for e in val] == [float(torch.tensor(h["val_loss"], dtype=torch.float32)) for h in result["history"]]
    batch = events.Scalars("train/batch_loss")
    assert len(batch) == 4
    assert batch[-1].value == float(torch.tensor(result["last_batch_loss"], dtype=torch.float32))
    assert "config" in "".join(events.Tags()["tensors"])

