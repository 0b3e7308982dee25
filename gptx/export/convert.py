"""`gptx export`: GPT -> ONNX directory (model + external weights + tokenizer + manifest).

Split as in Optimum's exporter: describe the I/O (`io_spec`), convert (`convert`), then check (gptx.export.validate).
Everything is written to a temporary directory beside the target and renamed into place only when complete, so an
interrupted export never leaves a model that looks valid.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import importlib.metadata
import json
import os
import shutil
import stat
import tempfile
import warnings
from pathlib import Path

import torch

from gptx.runtime.errors import ExportError
from gptx.runtime.files import (DISK_ERRNOS, PARTIAL, clean_stale, debris_path, debris_target, follow_umask, make_dir,
                                remove_tree, replace_dir)
from gptx.runtime.signals import interrupts_deferred
from gptx.runtime.manifest import (EXPORT_DTYPES, FORMAT, FORMAT_VERSION, GRAPH_METADATA_KEYS, MANIFEST_NAME,
                                   QUANT_SCHEMES, record_files, save_manifest)
from gptx.runtime.io_names import (ATTENTION_MASK, INPUT_IDS, LOGITS, LOGITS_INDEX, POSITION_IDS, input_names,
                                   output_names, past_names, present_names)
from gptx.runtime.tokenizer import Tokenizer

from gptx.export.kv_step import KVStep
from gptx.model.gpt import GPT
from gptx.model.weights import load_any, source_name, weights_sha256

DEFAULT_OPSET = 17
MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "model.onnx.data"
TOKENIZER_FILE = "tokenizer.tiktoken"


def io_spec(model: GPT, dtype: str) -> tuple[list[dict], list[dict]]:
    """Names, symbolic shapes and dtypes of the graph's inputs and outputs (goes into the manifest)."""
    cfg = model.config
    kv_shape = ["batch", cfg.n_head, "past_sequence", cfg.head_dim]
    inputs = [
        {"name": INPUT_IDS, "dtype": "int64", "shape": ["batch", "sequence"]},
        {"name": ATTENTION_MASK, "dtype": "int64", "shape": ["batch", "past_sequence + sequence"]},
        {"name": POSITION_IDS, "dtype": "int64", "shape": ["batch", "sequence"]},
        {"name": LOGITS_INDEX, "dtype": "int64", "shape": ["batch", "logits_count"]},
    ]
    outputs = [{"name": LOGITS, "dtype": "float32", "shape": ["batch", "logits_count", cfg.vocab_size]}]
    kv_dtype = EXPORT_DTYPES[dtype]
    inputs += [{"name": name, "dtype": kv_dtype, "shape": kv_shape} for name in past_names(cfg.n_layer)]
    outputs += [{"name": name, "dtype": kv_dtype, "shape": ["batch", cfg.n_head, "sequence", cfg.head_dim]}
                for name in present_names(cfg.n_layer)]
    return inputs, outputs


def dynamic_axes(n_layer: int) -> dict:
    """The traced graph's symbolic dims (the ONNX names; io_spec says them for the manifest)."""
    axes = {INPUT_IDS: {0: "batch", 1: "sequence"}, ATTENTION_MASK: {0: "batch", 1: "total_sequence"},
            POSITION_IDS: {0: "batch", 1: "sequence"}, LOGITS_INDEX: {0: "batch", 1: "logits_count"},
            LOGITS: {0: "batch", 1: "logits_count"}}
    axes.update({name: {0: "batch", 2: "past_sequence"} for name in past_names(n_layer)})
    return axes | {name: {0: "batch", 2: "sequence"} for name in present_names(n_layer)}


WTE = "gpt.transformer.wte.weight"  # the token embedding's initializer (tied to the LM head)


def find_tied_head(proto, wte_name: str = WTE):
    """(MatMul node, its weight initializer) of the LM head whose weight is the token embedding transposed (the
    copy the tracer folds `lm_head.weight.T` into), or None."""
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    if wte_name not in inits:
        return None
    wte = numpy_helper.to_array(inits[wte_name])
    for node in proto.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if (weight is not None and list(weight.dims) == [wte.shape[1], wte.shape[0]]
                and (numpy_helper.to_array(weight) == wte.T).all()):
            return node, weight
    return None


def share_tied_embedding(proto, wte_name: str = WTE) -> bool:
    """Point the LM head at the token embedding instead of a transposed copy (saves vocab x n_embd weights): a
    Gemm(transB=1) reads wte directly. Quantized exports keep the MatMul: weight-only quantizers take only MatMul."""
    from onnx import helper

    found = find_tied_head(proto, wte_name)
    if found is None:
        return False
    node, weight = found
    gemm = helper.make_node("Gemm", [node.input[0], wte_name], list(node.output), name=node.name + "_tied", transB=1)
    proto.graph.node.insert(list(proto.graph.node).index(node), gemm)
    proto.graph.node.remove(node)
    if not any(weight.name in n.input for n in proto.graph.node):
        proto.graph.initializer.remove(weight)
    return True


def convert(model: GPT, onnx_path: Path, dtype: str = "fp32", opset: int = DEFAULT_OPSET,
            tie_lm_head: bool = True) -> None:
    """Trace the KV step and write ONNX with all weights in one external data file."""
    import onnx

    if dtype == "fp16":  # KVStep converts in place: never touch the caller's fp32 model
        model = copy.deepcopy(model)
    step = KVStep(model, half=dtype == "fp16").eval()
    n_layer = model.config.n_layer
    with tempfile.TemporaryDirectory(dir=onnx_path.parent) as scratch:
        raw = Path(scratch) / "raw.onnx"
        with torch.no_grad(), warnings.catch_warnings(), interrupts_deferred():
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
        # the config, inside the graph: the runtime checks the manifest against it (gptx.runtime.manifest.check_graph)
        cfg = model.config.to_dict()
        onnx.helper.set_model_props(proto, {key: str(cfg[key]) for key in GRAPH_METADATA_KEYS})
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
        out["gptx"] = importlib.metadata.version("gptx")
    with contextlib.suppress(ImportError):
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    return out


def build_manifest(model: GPT, source: str, dtype: str, opset: int, tokenizer: Tokenizer, seed: int = 0) -> dict:
    inputs, outputs = io_spec(model, dtype)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_file": MODEL_FILE,
        "weights_file": WEIGHTS_FILE,
        "source": source,
        "seed": seed,  # what `random:<size>` weights were drawn with, so the torch reference can redraw them
        "config": model.config.to_dict(),
        "dtype": EXPORT_DTYPES[dtype],
        "opset": opset,
        "inputs": inputs,
        "outputs": outputs,
        "kv_cache": {
            "layout": "batch, n_head, sequence, head_dim",
            "present": "new_tokens_only",
            "note": "present.* hold only the new tokens' keys/values; the runtime writes them into a "
                    "preallocated cache in place, and attention_mask[:, :past] marks filled cache slots",
        },
        "logits": "positions_in_logits_index",
        "tokenizer": {"file": TOKENIZER_FILE, "type": "tiktoken-bpe", "vocab_size": tokenizer.vocab_size,
                      "eot_token": tokenizer.eot_token},
        "versions": versions(),
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "optimizations": [],
        "quantization": None,
        "engines": [],
    }


def export_files(manifest: dict) -> set[str]:
    """The files a gptx export is made of, per its manifest (anything else in the directory is not ours)."""
    names = {MANIFEST_NAME, manifest.get("model_file"), manifest.get("weights_file"),
             (manifest.get("tokenizer") or {}).get("file"), *(manifest.get("files") or {})}
    names.update(e.get("file") for e in manifest.get("engines") or [] if isinstance(e, dict))
    return {n for n in names if isinstance(n, str)}


def prepare_target(out_dir: Path, force: bool) -> None:
    """Refuse any target whose replacement could destroy something gptx did not write.

    A new or empty directory is fine. An existing export may be replaced with `force`, and only when the
    directory holds nothing but the export's own files. Never the working directory or one of its parents.
    """
    cwd = Path.cwd().resolve()
    if out_dir == cwd or out_dir in cwd.parents:
        raise ExportError(f"--out {out_dir} is the current directory or one of its parents; "
                          "export into a new directory instead")
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir():
        raise ExportError(f"--out {out_dir} exists and is not a directory; gptx replaces only its own exports")
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries:
        return
    try:
        manifest = json.loads((out_dir / MANIFEST_NAME).read_bytes().decode("utf-8"))
        is_export = isinstance(manifest, dict) and manifest.get("format") == FORMAT
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        is_export = False
    if not is_export:
        raise ExportError(f"--out {out_dir} is a non-empty directory that is not a gptx export; "
                          "--force replaces only gptx exports or empty directories")
    ours = export_files(manifest)
    foreign = [name for name in entries if name not in ours and debris_target(name) not in ours]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ExportError(f"--out {out_dir} is a gptx export but also holds files gptx did not write ({shown}); "
                          "move them out or choose another directory")
    if not force:
        raise ExportError(f"{out_dir} already holds a gptx export; pass --force to replace it")


def write_export(gpt: GPT, tmp_dir: Path, steps, source: str, dtype: str, opset: int, seed: int, optimize: bool,
                 quantize: str | None, validate: bool, tokenizer: Tokenizer) -> dict:
    """Every file of the export, into `tmp_dir`; checksums last, after every pass that rewrites a file."""
    onnx_path = tmp_dir / MODEL_FILE
    with steps.step("trace and write ONNX"):
        convert(gpt, onnx_path, dtype=dtype, opset=opset, tie_lm_head=not quantize)
    with steps.step("check graph"):
        check(onnx_path)
    manifest = build_manifest(gpt, source, dtype, opset, tokenizer, seed)
    shutil.copyfile(tokenizer.vocab_file, tmp_dir / TOKENIZER_FILE)
    save_manifest(manifest, tmp_dir)
    if optimize or quantize:
        from gptx.export.optimize import optimize_export

        with steps.step("optimize" + (f" + quantize {quantize}" if quantize else "")):
            manifest = optimize_export(tmp_dir, fuse_graph=optimize, quantize=quantize)
    if validate:
        from gptx.export.validate import quick_validate

        with steps.step("validate against PyTorch"):
            manifest["validation"] = quick_validate(tmp_dir, gpt, manifest)
    with steps.step("checksums"):
        manifest["source_sha256"] = weights_sha256(gpt)
        record_files(manifest, tmp_dir)
        save_manifest(manifest, tmp_dir)
    return manifest


def export(model: str | GPT, out_dir: str | Path, dtype: str = "fp32", opset: int = DEFAULT_OPSET, seed: int = 0,
           optimize: bool = False, quantize: str | None = None, force: bool = False, validate: bool = True,
           progress: bool = True, source: str | None = None) -> dict:
    """Export and return the manifest. `model` is a GPT or anything `gptx export MODEL` accepts.

    Work happens in `.OUT.partial-PID-TOKEN` beside the target, which replaces the target only when complete;
    on any error (Ctrl-C and, under the CLI, SIGTERM included) it is removed. Leftovers of a killed export
    are removed by the next export to the same target.
    """
    from gptx.export.progress import Steps

    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    if quantize is not None and quantize not in QUANT_SCHEMES:
        raise ExportError(f"--quantize must be one of {', '.join(QUANT_SCHEMES)}, got {quantize!r}")
    if quantize and dtype != "fp32":
        raise ExportError("--quantize works on an fp32 export; drop --dtype fp16")
    if isinstance(opset, bool) or not isinstance(opset, int) or not 14 <= opset <= 20:
        raise ExportError(f"--opset must be between 14 and 20, got {opset}")
    out_dir = Path(out_dir).expanduser().resolve()
    prepare_target(out_dir, force)
    steps = Steps(enabled=progress)
    with steps.step("load model"):  # before anything touches the disk: a bad model leaves no trace
        gpt = model if isinstance(model, GPT) else load_any(model, seed=seed)
        gpt = gpt.float().eval()
    tokenizer = Tokenizer()
    if gpt.config.vocab_size < tokenizer.vocab_size:
        raise ExportError(f"model vocab_size {gpt.config.vocab_size} is smaller than the GPT-2 tokenizer's "
                          f"{tokenizer.vocab_size}: gptx exports GPT-2-vocabulary models")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out_dir)
        tmp_dir = make_dir(debris_path(out_dir, PARTIAL))
    except OSError as e:
        raise ExportError(f"cannot write beside {out_dir}: {e.strerror or e}") from None
    try:
        manifest = write_export(gpt, tmp_dir, steps, source or source_name(model), dtype, opset, seed, optimize,
                                quantize, validate, tokenizer)
        follow_umask(tmp_dir)  # onnx writes its data file 0600; a replaced directory keeps its own permissions
        if out_dir.is_dir():
            os.chmod(tmp_dir, stat.S_IMODE(out_dir.stat().st_mode))
        replace_dir(tmp_dir, out_dir)
    except BaseException as e:  # Ctrl-C included: never leave a partial export behind
        remove_tree(tmp_dir)
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            raise ExportError(f"cannot write the export beside {out_dir}: {e.strerror}") from None
        raise
    return manifest
