"""`gptx export`: GPT -> ONNX directory (model + external weights + tokenizer + manifest).

Split as in Optimum's exporter: describe the I/O (`io_spec`), convert (`convert`), then check (`validate`
in `gpt_export.validate`). Everything is written to a temporary directory beside the target and renamed
into place only when complete, so an interrupted export never leaves a model that looks valid.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

from runtime.errors import ExportError
from runtime.manifest import FORMAT, FORMAT_VERSION, save_manifest
from runtime.tokenizer import Tokenizer

from .kv_step import KVStep, input_names, output_names
from .model import GPT
from .weights import load_any

DTYPES = {"fp32": "float32", "fp16": "float16"}
DEFAULT_OPSET = 17
MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "model.onnx.data"
TOKENIZER_FILE = "tokenizer.tiktoken"


def io_spec(model: GPT, dtype: str) -> tuple[list[dict], list[dict]]:
    """Names, symbolic shapes and dtypes of the graph's inputs and outputs (goes into the manifest)."""
    cfg = model.config
    kv_shape = ["batch", cfg.n_head, "past_sequence", cfg.head_dim]
    inputs = [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "past_sequence + sequence"]},
        {"name": "position_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
    ]
    outputs = [{"name": "logits", "dtype": "float32", "shape": ["batch", cfg.vocab_size]}]
    kv_dtype = DTYPES[dtype]
    for name in input_names(cfg.n_layer)[3:]:
        inputs.append({"name": name, "dtype": kv_dtype, "shape": kv_shape})
    for name in output_names(cfg.n_layer)[1:]:
        outputs.append({"name": name, "dtype": kv_dtype, "shape": ["batch", cfg.n_head, "sequence", cfg.head_dim]})
    return inputs, outputs


def dynamic_axes(n_layer: int) -> dict:
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch"},
    }
    for name in input_names(n_layer)[3:]:
        axes[name] = {0: "batch", 2: "past_sequence"}
    for name in output_names(n_layer)[1:]:
        axes[name] = {0: "batch", 2: "sequence"}
    return axes


def share_tied_embedding(proto, wte_name: str = "gpt.transformer.wte.weight") -> bool:
    """Point the LM head at the token embedding instead of a transposed copy (saves vocab x n_embd weights).

    The tracer folds `lm_head.weight.T` into a second initializer; Gemm(transB=1) reads wte directly.
    Weight-only quantizers only handle MatMul, so quantized exports keep the MatMul form.
    """
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    if wte_name not in inits:
        return False
    wte = numpy_helper.to_array(inits[wte_name])
    for node in proto.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        weight = inits[node.input[1]]
        if list(weight.dims) != [wte.shape[1], wte.shape[0]] or not (numpy_helper.to_array(weight) == wte.T).all():
            continue
        gemm = helper.make_node("Gemm", [node.input[0], wte_name], list(node.output), name=node.name + "_tied", transB=1)
        proto.graph.node.insert(list(proto.graph.node).index(node), gemm)
        proto.graph.node.remove(node)
        if not any(weight.name in n.input for n in proto.graph.node):
            proto.graph.initializer.remove(weight)
        return True
    return False


def convert(model: GPT, onnx_path: Path, dtype: str = "fp32", opset: int = DEFAULT_OPSET, tie_lm_head: bool = True) -> None:
    """Trace the KV step and write ONNX with all weights in one external data file."""
    import onnx

    if dtype == "fp16":  # KVStep converts in place: never touch the caller's fp32 model
        import copy

        model = copy.deepcopy(model)
    step = KVStep(model, half=dtype == "fp16").eval()
    n_layer = model.config.n_layer
    with tempfile.TemporaryDirectory(dir=onnx_path.parent) as scratch:
        raw = Path(scratch) / "raw.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The TorchScript exporter gives a plain, control-flow-free graph with symbolic dims, which
            # both ONNX Runtime and TensorRT's parser take as is.
            torch.onnx.export(
                step, step.example_inputs(), str(raw), input_names=input_names(n_layer),
                output_names=output_names(n_layer), dynamic_axes=dynamic_axes(n_layer), opset_version=opset,
                do_constant_folding=True, dynamo=False,
            )
        proto = onnx.load(str(raw))
        if tie_lm_head:
            share_tied_embedding(proto)
        onnx.save_model(proto, str(onnx_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=WEIGHTS_FILE, size_threshold=1024)


def check(onnx_path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(onnx_path), full_check=False)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the ONNX checker rejected the exported graph: {e}") from None


def versions() -> dict:
    import onnx

    out = {"torch": torch.__version__, "onnx": onnx.__version__}
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        out["gptx"] = version("gptx")
    with contextlib.suppress(ImportError):
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    return out


def build_manifest(model: GPT, source: str, dtype: str, opset: int, tokenizer: Tokenizer, seed: int = 0) -> dict:
    inputs, outputs = io_spec(model, dtype)
    cfg = model.config
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_file": MODEL_FILE,
        "weights_file": WEIGHTS_FILE,
        "source": source,
        "seed": seed,  # what `random:<size>` weights were drawn with, so the torch reference can redraw them
        "config": cfg.to_dict(),
        "dtype": DTYPES[dtype],
        "opset": opset,
        "inputs": inputs,
        "outputs": outputs,
        "kv_cache": {
            "layout": "batch, n_head, sequence, head_dim",
            "present": "new_tokens_only",
            "note": "present.* hold only the new tokens' keys/values; the runtime writes them into a "
                    "preallocated cache in place, and attention_mask[:, :past] marks filled cache slots",
        },
        "logits": "last_position_only",
        "tokenizer": {
            "file": TOKENIZER_FILE, "type": "tiktoken-bpe", "vocab_size": tokenizer.vocab_size,
            "eot_token": tokenizer.eot_token,
        },
        "versions": versions(),
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "optimizations": [],
        "quantization": None,
        "engines": [],
    }


def prepare_target(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if not force:
            raise ExportError(f"{out_dir} already exists and is not empty; pass --force to replace it")


def swap_into_place(tmp_dir: Path, out_dir: Path) -> None:
    """Replace out_dir by tmp_dir with renames only, so a reader sees the old or the new export, never a mix."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{int(time.time() * 1000)}")
        out_dir.rename(old)
    tmp_dir.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export(model: str | GPT, out_dir: str | Path, dtype: str = "fp32", opset: int = DEFAULT_OPSET, seed: int = 0,
           optimize: bool = False, quantize: str | None = None, force: bool = False, validate: bool = True,
           progress: bool = True, source: str | None = None) -> dict:
    """Export and return the manifest. `model` is a GPT or anything `gptx export MODEL` accepts."""
    from .progress import Steps

    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantize and dtype != "fp32":
        raise ExportError("--quantize works on an fp32 export; drop --dtype fp16")
    if not 14 <= opset <= 20:
        raise ExportError(f"--opset must be between 14 and 20, got {opset}")
    out_dir = Path(out_dir).expanduser().resolve()
    prepare_target(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        with Steps(enabled=progress) as steps:
            with steps.step("load model"):
                gpt = model if isinstance(model, GPT) else load_any(model, seed=seed)
                gpt = gpt.float().eval()
                source = source or (model if isinstance(model, str) else "in-memory GPT")
                reference = gpt if validate else None
            tokenizer = Tokenizer()
            if gpt.config.vocab_size < tokenizer.vocab_size:
                raise ExportError(
                    f"model vocab_size {gpt.config.vocab_size} is smaller than the GPT-2 tokenizer's "
                    f"{tokenizer.vocab_size}: gptx exports GPT-2-vocabulary models"
                )
            onnx_path = tmp_dir / MODEL_FILE
            with steps.step("trace and write ONNX"):
                convert(gpt, onnx_path, dtype=dtype, opset=opset, tie_lm_head=not quantize)
            with steps.step("check graph"):
                check(onnx_path)
            manifest = build_manifest(gpt, source, dtype, opset, tokenizer, seed)
            shutil.copyfile(tokenizer.vocab_file, tmp_dir / TOKENIZER_FILE)
            save_manifest(manifest, tmp_dir)
            if optimize or quantize:
                from .optimize import optimize_export

                with steps.step("optimize" + (f" + quantize {quantize}" if quantize else "")):
                    manifest = optimize_export(tmp_dir, fuse_graph=optimize, quantize=quantize)
            if validate:
                from .validate import quick_validate

                with steps.step("validate against PyTorch"):
                    manifest["validation"] = quick_validate(tmp_dir, reference, manifest)
                    save_manifest(manifest, tmp_dir)
        swap_into_place(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return manifest
