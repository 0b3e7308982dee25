"""Weight loading from every format gptx reads, and what it does with files it should not trust."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gptx.model import GPT, GPTConfig
from gptx.model.weights import (
    claimed_params,
    load_checkpoint,
    load_export_source,
    load_pretrained,
    read_checkpoint,
    save_checkpoint,
    weights_sha256,
)
from gptx.runtime.errors import InvalidInput, ModelLoadError

REPO = Path(__file__).resolve().parents[1]


def logits_of(model: GPT, ids=(464, 2068, 7586, 21831)) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([list(ids)]))[0]


@pytest.fixture(scope="module")
def hf_reference(hf_model):
    with torch.no_grad():
        return hf_model(torch.tensor([[464, 2068, 7586, 21831]])).logits


def test_sharded_safetensors_load_like_the_single_file(hf_model, hf_reference, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="1MB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    assert torch.allclose(logits_of(load_pretrained(str(tmp_path))), hf_reference, atol=1e-4)


def test_pytorch_model_bin_loads(hf_model, hf_reference, tmp_path):
    hf_model.config.save_pretrained(tmp_path)  # the pre-safetensors layout: config.json + a pickled state dict
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    assert (tmp_path / "pytorch_model.bin").is_file() and not list(tmp_path.glob("*.safetensors"))
    assert torch.allclose(logits_of(load_pretrained(str(tmp_path))), hf_reference, atol=1e-4)


def test_a_shard_outside_the_directory_is_refused(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path / "m", max_shard_size="1MB")
    index = tmp_path / "m" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = next(iter(data["weight_map"]))
    (tmp_path / "outside.safetensors").write_bytes((tmp_path / "m" / data["weight_map"][key]).read_bytes())
    data["weight_map"][key] = "../outside.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="outside"):
        load_pretrained(str(tmp_path / "m"))


def test_checkpoint_round_trip_and_content_hash(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=50257)).eval()
    save_checkpoint(model, tmp_path / "a.pt")
    again = load_checkpoint(tmp_path / "a.pt")
    assert torch.equal(logits_of(model), logits_of(again))
    assert weights_sha256(model) == weights_sha256(again)
    with torch.no_grad():
        again.transformer.h[0].mlp.c_fc.weight[0, 0] += 1e-3
    assert weights_sha256(model) != weights_sha256(again)


def test_claimed_params_matches_the_model():
    cfg = GPTConfig(n_layer=3, n_head=4, n_embd=32, block_size=40, vocab_size=1000)
    assert claimed_params(cfg.to_dict()) == GPT(cfg).get_num_params(non_embedding=False)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=100, bias=False)
    assert claimed_params(cfg.to_dict(), bias=False) == GPT(cfg).get_num_params(non_embedding=False)


def test_a_malicious_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model_args": {}, "model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ModelLoadError) as info:
        read_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    assert "weights_only" not in str(info.value) and "touch" not in str(info.value)


def test_an_onnx_file_is_not_taken_for_a_checkpoint(export_dir):
    with pytest.raises(ModelLoadError, match="looks like an ONNX model") as info:
        load_pretrained(str(export_dir / "model.onnx"))
    assert "weights_only" not in str(info.value)
    with pytest.raises(ModelLoadError, match="it is a gptx export"):
        load_pretrained(str(export_dir))


def test_only_dropout_can_be_overridden():
    with pytest.raises(InvalidInput, match="only 'dropout'"):
        load_pretrained("shakespeare", {"n_layer": 2})


def test_load_export_source_refuses_an_in_memory_export():
    with pytest.raises(ModelLoadError, match="in-memory"):
        load_export_source({"source": "in-memory GPT"})


def test_an_old_relative_source_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="relative path"):
        load_export_source({"source": "no/such/ckpt.pt"})


# ---------------------------------------------------------------------------------------------- item 6: memory
RSS_PROBE = textwrap.dedent("""
    import resource, subprocess, sys
    proc = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=300)
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(proc.returncode, round(peak_mib))
    sys.stderr.write(proc.stderr)
""")


def peak_rss_of(args: list[str]) -> tuple[int, float, str]:
    """Exit code and peak RSS (MiB) of a command, measured by a fresh parent that runs nothing else."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, *args], capture_output=True, text=True, env=env,
                          timeout=400)
    code, peak = proc.stdout.split()
    return int(code), float(peak), proc.stderr


def absurd_checkpoint(path: Path) -> Path:
    args = {"n_layer": 2000, "n_head": 32, "n_embd": 4096, "block_size": 1024, "vocab_size": 50257}
    torch.save({"model_args": args, "model": {"transformer.wte.weight": torch.zeros(4)}}, path)
    return path


def absurd_hf_dir(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2000, "n_head": 32, "n_embd": 4096,
                                                  "n_positions": 1024, "vocab_size": 50257}))
    from safetensors.torch import save_file

    save_file({"wte.weight": torch.zeros(4)}, path / "model.safetensors")
    return path


@pytest.mark.parametrize("make", [absurd_checkpoint, absurd_hf_dir], ids=["checkpoint", "hf-config"])
def test_a_tiny_file_claiming_a_huge_model_is_refused_before_allocating(tmp_path, make):
    source = make(tmp_path / "claims-2000-layers.pt" if make is absurd_checkpoint else tmp_path / "hf")
    size = source.stat().st_size if source.is_file() else sum(p.stat().st_size for p in source.iterdir())
    assert size < 2048
    code, peak_mib, err = peak_rss_of([sys.executable, "-m", "gptx.cli", "export", str(source), "--out",
                                       str(tmp_path / "out")])
    assert code == 1 and "Traceback" not in err
    assert "claims a" in err and "parameter model" in err
    # the real model would need ~1.6 TB; torch + onnxruntime imports alone take a few hundred MiB
    assert peak_mib < 1000, peak_mib
    assert not (tmp_path / "out").exists()
