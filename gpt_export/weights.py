"""Where GPT weights come from: the Hugging Face Hub, a local HF directory, a nanoGPT checkpoint, or the bundled sample.

The HF -> gptx mapping is explicit (as in nanoGPT): parameter names already match, the `attn.bias` /
`attn.masked_bias` buffers are dropped and the four Conv1D weights are transposed. Every shape is checked.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch

from runtime.errors import ModelLoadError

from .model import GPT, GPTConfig

HUB_MODELS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
SAMPLE_MODELS = {"shakespeare": Path(__file__).parent / "data" / "shakespeare.pt"}
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
HUB_HOST = "huggingface.co"


ALTERNATIVES = (
    "use a local Hugging Face GPT-2 directory (config.json + model.safetensors), a nanoGPT checkpoint .pt, "
    "'shakespeare' (bundled), or 'random:gpt2' for export benchmarks"
)


def load_pretrained(name_or_path: str, override_args: dict | None = None) -> GPT:
    override_args = dict(override_args or {})
    unknown = set(override_args) - {"dropout"}
    if unknown:
        raise ValueError(f"only 'dropout' can be overridden when loading pretrained weights, got {sorted(unknown)}")
    name = str(name_or_path)
    if name in SAMPLE_MODELS:
        return load_checkpoint(SAMPLE_MODELS[name], override_args)
    path = Path(name).expanduser()
    if path.is_dir():
        return load_hf_dir(path, override_args)
    if path.is_file():
        return load_checkpoint(path, override_args)
    if name in HUB_MODELS:
        return load_hf_dir(download_hub_model(name), override_args)
    raise ModelLoadError(
        f"'{name}' is neither a known model ({', '.join([*HUB_MODELS, *SAMPLE_MODELS])}) nor an existing path"
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe, so that an offline machine fails in seconds instead of hanging in retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", f"https://{HUB_HOST}")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def download_hub_model(repo_id: str) -> Path:
    """Fetch config + safetensors into the standard HF cache (reused by transformers and friends)."""
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json"]
    try:  # already cached: no network at all
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    if not hub_reachable():
        raise ModelLoadError(f"cannot reach the Hugging Face Hub to download '{repo_id}' (offline?); {ALTERNATIVES}")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # network errors, gated repos, disk full...
        raise ModelLoadError(f"download of '{repo_id}' failed: {e}; {ALTERNATIVES}") from e


def read_hf_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(directory / shard))
        return state
    bin_file = directory / "pytorch_model.bin"
    if bin_file.is_file():
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise ModelLoadError(f"{directory} has no model.safetensors, sharded safetensors or pytorch_model.bin")


def config_from_hf(hf: dict, override_args: dict) -> GPTConfig:
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ModelLoadError(f"expected a GPT-2 model, config.json says model_type={hf.get('model_type')!r}")
    act = hf.get("activation_function", "gelu_new")
    if act not in TANH_GELUS:
        raise ModelLoadError(f"unsupported activation_function {act!r}: gptx implements GPT-2's tanh GELU")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise ModelLoadError(f"unsupported n_inner={hf['n_inner']}: gptx uses GPT-2's 4 * n_embd MLP")
    return GPTConfig(
        block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"],
        n_embd=hf["n_embd"], bias=True, dropout=override_args.get("dropout", 0.0),
    )


def gpt_state_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (GPT2Model keys lack the `transformer.` prefix), drop mask buffers, transpose Conv1D."""
    out = {}
    for key, tensor in hf_state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key
        if key.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        out[key] = tensor
    out.setdefault("lm_head.weight", out.get("transformer.wte.weight"))
    return out


def load_state_checked(model: GPT, state: dict[str, torch.Tensor], source: str) -> GPT:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state or state[k] is None]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ModelLoadError(f"{source}: weights do not fit GPT (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for k, v in expected.items():
        if state[k].shape != v.shape:
            raise ModelLoadError(f"{source}: {k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state[k].to(v.dtype))
    return model.eval()


def load_hf_dir(directory: Path, override_args: dict | None = None) -> GPT:
    config_file = Path(directory) / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{directory} is not a Hugging Face model directory (no config.json)")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{config_file} is not valid JSON: {e}") from None
    model = GPT(config_from_hf(hf, override_args or {}))
    return load_state_checked(model, gpt_state_from_hf(read_hf_state_dict(Path(directory))), str(directory))


def load_checkpoint(path: Path, override_args: dict | None = None) -> GPT:
    """A nanoGPT-style checkpoint: {'model_args': {...}, 'model': state_dict, ...} (ours adds optimizer etc.)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"{path} is not a readable PyTorch checkpoint: {e}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise ModelLoadError(f"{path} is not a nanoGPT-style checkpoint (needs 'model_args' and 'model' keys)")
    args = dict(ckpt["model_args"])
    args.update(override_args or {})
    model = GPT(GPTConfig.from_dict(args))
    # torch.compile'd models save their parameters under `_orig_mod.`
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    state.setdefault("lm_head.weight", state.get("transformer.wte.weight"))
    return load_state_checked(model, state, str(path))


def save_checkpoint(model: GPT, path: Path, half: bool = False, **extra) -> None:
    """Write a nanoGPT-compatible checkpoint atomically (tmp file then rename)."""
    state = model.state_dict()
    state.pop("lm_head.weight", None)  # tied to wte: store once
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    payload = {"model_args": model.config.to_dict(), "model": state, **extra}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def random_model(spec: str, seed: int = 0) -> GPT:
    """`random:gpt2` etc.: GPT-2 shapes with random weights, for export and benchmarks without downloads."""
    size = spec.split(":", 1)[1] if ":" in spec else spec
    if size not in HUB_MODELS:
        raise ModelLoadError(f"unknown size '{size}' in '{spec}'; choose one of {', '.join(HUB_MODELS)}")
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=50257, block_size=1024, **HUB_MODELS[size])).eval()


def load_any(spec: str, seed: int = 0) -> GPT:
    """What the CLI accepts as MODEL: anything from_pretrained takes, or random:<size>."""
    if str(spec).startswith("random:"):
        return random_model(spec, seed)
    return load_pretrained(spec)
