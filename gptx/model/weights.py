"""Where GPT weights come from: the Hugging Face Hub, a local HF directory, a nanoGPT checkpoint, or the bundled sample.

Every file is untrusted: the config's types and ranges, the parameter count it claims against the bytes on disk and
every tensor's shape are checked before a model is built, so a tiny file cannot make gptx allocate gigabytes.
`torch.load` runs with `weights_only=True` only, and no error message repeats what a file contains.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import socket
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import torch

from gptx.runtime.errors import InvalidInput, ModelLoadError
from gptx.runtime.files import atomic_path, resolve_inside

from gptx.model.gpt import GPT, GPTConfig

HUB_MODELS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
SAMPLE_MODELS = {"shakespeare": Path(__file__).parent / "data" / "shakespeare.pt"}
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
IN_MEMORY = "in-memory GPT"
CONFIG_INTS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")
MIN_BYTES_PER_PARAM = 2  # fp16/bf16: the smallest weights gptx reads
# What torch.load raises on bytes it cannot read with weights_only=True; caught only around that call.
UNREADABLE = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError,
              zipfile.BadZipFile, UnicodeDecodeError)
ALTERNATIVES = (
    "use a local Hugging Face GPT-2 directory (config.json + model.safetensors), a nanoGPT checkpoint .pt, "
    "'shakespeare' (bundled), or 'random:gpt2' for export benchmarks"
)


def load_pretrained(name_or_path: str, override_args: dict | None = None) -> GPT:
    override_args = dict(override_args or {})
    unknown = set(override_args) - {"dropout"}
    if unknown:
        raise InvalidInput(f"only 'dropout' can be overridden when loading pretrained weights, got {sorted(unknown)}")
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
    raise ModelLoadError(f"'{name}' is neither a known model ({', '.join([*HUB_MODELS, *SAMPLE_MODELS])}) nor an "
                         "existing path")


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe, so that an offline machine fails in seconds instead of hanging in retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def download_hub_model(repo_id: str) -> Path:
    """Fetch config + safetensors into the standard HF cache (reused by transformers and friends)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json"]
    try:  # already cached: no network at all
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if not hub_reachable():
        raise ModelLoadError(f"cannot reach the Hugging Face Hub to download '{repo_id}' (offline?); {ALTERNATIVES}")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except OSError as e:  # huggingface_hub's HTTP errors (gated, missing repo), connection errors, disk full
        raise ModelLoadError(f"download of '{repo_id}' failed: {e}; {ALTERNATIVES}") from e


# ---------------------------------------------------------------------------------------------- checks
def check_config(values, source: str, names: dict[str, str] | None = None) -> dict:
    """The five shape numbers of a config (nanoGPT `model_args` or HF config.json, `names` maps ours -> theirs):
    present, integers, positive, heads dividing the width. Returns them under our names."""
    names = names or {k: k for k in CONFIG_INTS}
    if not isinstance(values, dict):
        raise ModelLoadError(f"{source}: the model config is a {type(values).__name__}, not a mapping")
    out = {}
    for ours, theirs in names.items():
        if theirs not in values:
            raise ModelLoadError(f"{source}: the model config lacks '{theirs}'")
        v = values[theirs]
        if isinstance(v, bool) or not isinstance(v, int):
            raise ModelLoadError(f"{source}: '{theirs}' must be an integer, got a {type(v).__name__}")
        if v < 1:
            raise ModelLoadError(f"{source}: '{theirs}' must be >= 1, got {v}")
        out[ours] = v
    if out["n_embd"] % out["n_head"]:
        raise ModelLoadError(f"{source}: n_embd {out['n_embd']} is not divisible by n_head {out['n_head']}")
    return out


def claimed_params(cfg: dict, bias: bool = True) -> int:
    """Parameters a GPT with these shapes holds (tied LM head counted once), computed without building it."""
    V, P, L, E = cfg["vocab_size"], cfg["block_size"], cfg["n_layer"], cfg["n_embd"]
    per_layer = 12 * E * E + (13 * E if bias else 2 * E)  # attn qkv + proj, 4x MLP, two LayerNorms
    return V * E + P * E + L * per_layer + (2 * E if bias else E)


def check_fits_files(cfg: dict, nbytes: int, source: str, bias: bool = True) -> None:
    """A config must not claim more weights than its files can hold: checked before anything is allocated."""
    params = claimed_params(cfg, bias)
    if params * MIN_BYTES_PER_PARAM > nbytes:
        raise ModelLoadError(
            f"{source}: the config claims a {params / 1e6:,.1f}M-parameter model (n_layer {cfg['n_layer']}, "
            f"n_embd {cfg['n_embd']}, vocab {cfg['vocab_size']}, context {cfg['block_size']}), which needs at least "
            f"{params * MIN_BYTES_PER_PARAM:,} bytes of weights, but the weight files hold {nbytes:,} bytes"
        )


def build_checked(config: GPTConfig, state, source: str) -> GPT:
    """Names, types and shapes of the weights against the model `config` describes (from a model on the meta device,
    no memory) first; the model is only built once its weights are known to fit. The head may be left out (tied)."""
    if not isinstance(state, dict):
        raise ModelLoadError(f"{source}: the weights are a {type(state).__name__}, not a state dict")
    state.setdefault("lm_head.weight", state.get("transformer.wte.weight"))
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    missing = [k for k in expected if not isinstance(state.get(k), torch.Tensor)]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ModelLoadError(f"{source}: weights do not fit GPT (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise ModelLoadError(f"{source}: {k} has shape {tuple(state[k].shape)}, the config says {shape}")
        if not state[k].is_floating_point():
            raise ModelLoadError(f"{source}: {k} holds {state[k].dtype} values, not floating point weights")
    model = GPT(config)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(state[k].to(v.dtype))
    return model.eval()


# ---------------------------------------------------------------------------------------------- files
def read_checkpoint(path: str | Path) -> dict:
    """torch.load of an untrusted file, weights only; memory-mapped when the file is a zip checkpoint, so
    nothing is read into memory before it has been checked. Any unreadable file is one ModelLoadError."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path} is not a file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path} is empty, not a PyTorch checkpoint")
    with open(path, "rb") as f:
        head = f.read(2)  # an ONNX ModelProto starts with field 1 (ir_version), a small varint
    if path.suffix.lower() in (".onnx", ".data") or (len(head) == 2 and head[0] == 0x08 and head[1] < 0x80):
        raise ModelLoadError(f"{path} looks like an ONNX model or export, not a PyTorch checkpoint: gptx exports "
                             "from PyTorch weights (a nanoGPT .pt or a Hugging Face directory); run an export with "
                             "`gptx generate DIR`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except UNREADABLE:
        # torch's own message may quote the file and suggests weights_only=False: say neither
        raise ModelLoadError(f"{path} is not a readable PyTorch checkpoint (corrupt, truncated, or it holds Python "
                             "objects besides tensors; gptx only loads weights)") from None
    if not isinstance(ckpt, dict):
        raise ModelLoadError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def weight_files(directory: Path) -> list[Path]:
    """The files holding an HF directory's weights, each checked to lie inside the directory."""
    index = directory / "model.safetensors.index.json"
    if not (directory / "model.safetensors").is_file() and index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise ModelLoadError(f"{index} is not a valid safetensors index (needs a 'weight_map' of file "
                                 "names)") from None
        files = [resolve_inside(directory, shard) for shard in shards]
        if None in files:
            raise ModelLoadError(f"{index}: a shard in 'weight_map' lies outside {directory} or is not a usable "
                                 "path; refusing it")
        if not all(path.is_file() for path in files):
            raise ModelLoadError(f"{index} names a shard that is missing from {directory}")
        return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    raise ModelLoadError(f"{directory} has no model.safetensors, sharded safetensors or pytorch_model.bin")


def config_from_hf(hf, override_args: dict, source: str = "config.json") -> GPTConfig:
    if not isinstance(hf, dict):
        raise ModelLoadError(f"{source} holds a {type(hf).__name__}, not a JSON object")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ModelLoadError(f"{source}: expected a GPT-2 model (model_type 'gpt2')")
    act = hf.get("activation_function", "gelu_new")
    if act not in TANH_GELUS:
        raise ModelLoadError(f"{source}: unsupported activation_function: gptx implements GPT-2's tanh GELU "
                             f"({', '.join(TANH_GELUS)})")
    cfg = check_config(hf, source, {**{k: k for k in CONFIG_INTS}, "block_size": "n_positions"})
    if hf.get("n_inner") not in (None, 4 * cfg["n_embd"]):
        raise ModelLoadError(f"{source}: unsupported n_inner: gptx uses GPT-2's 4 * n_embd MLP")
    return GPTConfig(**cfg, bias=True, dropout=override_args.get("dropout", 0.0))


def gpt_state_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (GPT2Model keys lack the `transformer.` prefix), drop mask buffers, transpose Conv1D."""
    out = {}
    for key, tensor in hf_state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key
        if key.endswith(CONV1D_WEIGHTS) and isinstance(tensor, torch.Tensor) and tensor.dim() == 2:
            tensor = tensor.t()
        out[key] = tensor
    return out


def load_hf_dir(directory: Path, override_args: dict | None = None) -> GPT:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        hint = " (it is a gptx export: run it with `gptx generate`)" if (directory / "manifest.json").is_file() else ""
        raise ModelLoadError(f"{directory} is not a Hugging Face model directory (no config.json){hint}")
    try:
        hf = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise ModelLoadError(f"{config_file} is not valid JSON{where}") from None
    config = config_from_hf(hf, override_args or {}, str(config_file))
    files = weight_files(directory)
    check_fits_files(config.to_dict(), sum(f.stat().st_size for f in files), str(directory))
    state = {}
    for file in files:
        try:
            state.update(load_file(file) if file.suffix == ".safetensors" else read_checkpoint(file))
        except SafetensorError:
            raise ModelLoadError(f"{file} is not a valid safetensors file (corrupt or truncated header)") from None
    return build_checked(config, gpt_state_from_hf(state), str(directory))


def load_checkpoint(path: Path, override_args: dict | None = None, ckpt: dict | None = None) -> GPT:
    """A nanoGPT-style checkpoint {'model_args': {...}, 'model': state_dict, ...} (or `ckpt`, read from `path` already):
    model_args are checked for types, ranges and against the file's size before anything is allocated."""
    path = Path(path)
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    if "model" not in ckpt or "model_args" not in ckpt:
        raise ModelLoadError(f"{path} is not a nanoGPT-style checkpoint (needs 'model_args' and 'model' keys)")
    args = ckpt["model_args"]
    cfg = check_config(args, str(path))
    bias = args.get("bias", True)
    if not isinstance(bias, bool):
        raise ModelLoadError(f"{path}: 'bias' in model_args must be true or false")
    check_fits_files(cfg, path.stat().st_size, str(path), bias)
    dropout = (override_args or {}).get("dropout", args.get("dropout", 0.0))
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ModelLoadError(f"{path}: 'dropout' in model_args must be a number in [0, 1)")
    config = GPTConfig(**cfg, bias=bias, dropout=dropout)
    if not isinstance(ckpt["model"], dict):
        raise ModelLoadError(f"{path}: 'model' is a {type(ckpt['model']).__name__}, not a state dict")
    # torch.compile'd models save their parameters under `_orig_mod.`
    state = {str(k).removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    return build_checked(config, state, str(path))


def save_checkpoint(model: GPT, path: Path, half: bool = False, **extra) -> None:
    """Write a nanoGPT-compatible checkpoint atomically (`atomic_path`: a temporary file beside it, then a rename)."""
    state = model.state_dict()
    state.pop("lm_head.weight", None)  # tied to wte: store once
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    payload = {"model_args": model.config.to_dict(), "model": state, **extra}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


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


# ---------------------------------------------------------------------------------------------- export sources
def source_name(spec: str | GPT) -> str:
    """What the manifest records as `source`: a known name as is, a path made absolute (so verify works from
    any directory), or `in-memory GPT`."""
    if isinstance(spec, GPT):
        return IN_MEMORY
    spec = str(spec)
    if spec.startswith("random:") or spec in SAMPLE_MODELS or (spec in HUB_MODELS and not Path(spec).exists()):
        return spec
    return str(Path(spec).expanduser().resolve())


def weights_sha256(model: GPT) -> str:
    """A content hash of a model's fp32 weights (names, shapes and values), independent of the file format."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def load_export_source(manifest: dict) -> GPT:
    """Rebuild the PyTorch model an export was made from (for `verify` and `--backend torch`), refusing weights
    whose hash differs from the manifest's rather than silently comparing or running them."""
    source = manifest.get("source")
    if not isinstance(source, str) or not source or source == IN_MEMORY:
        raise ModelLoadError("this export came from an in-memory model: the PyTorch reference cannot be rebuilt "
                             "from the manifest (pass the model itself, e.g. compare(..., reference_model=gpt))")
    known = source.startswith("random:") or source in SAMPLE_MODELS or source in HUB_MODELS
    if not known and not Path(source).expanduser().exists():
        why = (" (a relative path, recorded by an older gptx: run from the directory you exported in, or re-export)"
               if not Path(source).is_absolute() else "")
        raise ModelLoadError(f"the export's source {source} no longer exists{why}")
    model = load_any(source, seed=manifest.get("seed", 0))
    expected = manifest.get("source_sha256")
    if expected:
        actual = weights_sha256(model)
        if actual != expected:
            raise ModelLoadError(f"the source changed since export: {source} now holds weights with sha256 "
                                 f"{actual}, the export was made from weights with sha256 {expected}; re-export it "
                                 "or point verify at the weights it was made from")
    return model
