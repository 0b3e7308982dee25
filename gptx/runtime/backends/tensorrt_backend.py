"""TensorRT backend: runs the `engine.plan` that `gptx build` wrote, with the KV cache resident on the GPU.

Same contract as the ONNX Runtime backend (the graph is the same ONNX file), with device memory:
  * cache buffers are PyTorch CUDA tensors, [rows, n_head, window, head_dim] per layer and K/V; kv_cache.py
    feeds `buf[:active]` (contiguous) as the past and copies the presents into each row's slot on the device;
  * present.* (the new tokens' keys/values) are written by TensorRT into fresh device tensors (TensorRT
    outputs must be contiguous; a row's slot is not);
  * only the logits ([B, K, vocab] for the positions in logits_index, fp32) come back to the host.

Two execution contexts, one per optimization profile (see gptx/export/tensorrt_build.py):
  prefill (T >= 1, a 1-slot past): profiles cannot express a 0-length past, so the backend declares
                                   `min_past = 1` and kv_cache.py passes one masked dummy slot;
  decode  (T = 1):                 the active rows' whole window as past.
Several tokens onto a non-empty cache is not something gptx does (prefill always starts from an empty row),
so it is refused rather than emulated.

All work is queued on torch's current CUDA stream, so TensorRT's reads of the cache are ordered after the
previous step's cache writes. torch and tensorrt are imported in __init__, so this module imports on
machines that have neither.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import GptxError
from ..io_names import ATTENTION_MASK, INPUT_IDS, LOGITS, LOGITS_INDEX, POSITION_IDS, input_names, output_names
from ..manifest import kv_names, selects_logits
from .base import Backend, Capabilities, last_positions, old_export_error

INSTALL_HINT = "pip install 'gptx[tensorrt]' on a machine with an NVIDIA CUDA GPU"


def normalize_cc(cc) -> str:
    """(8, 9) / '8.9' / 'sm_89' / 8.9 -> '8.9'."""
    try:
        if isinstance(cc, (tuple, list)):
            return f"{int(cc[0])}.{int(cc[1])}"
        text = str(cc).strip().lower().removeprefix("sm_").removeprefix("sm")
        if "." in text:
            major, minor = text.split(".", 1)
            return f"{int(major)}.{int(minor)}"
        if text.isdigit() and len(text) >= 2:
            return f"{int(text[:-1])}.{int(text[-1])}"
        return text
    except (TypeError, ValueError, IndexError):
        return str(cc)


def check_engine_compat(entry: dict, trt_version: str, gpu_name: str, cc,
                        directory: str | Path | None = None) -> str | None:
    """None when the engine can run here; otherwise one plain line saying what differs and what to rebuild.

    TensorRT engines are tied to the TensorRT version that built them and to the GPU (compute capability
    and, for tuned kernels, the exact model); we do not build version- or hardware-compatible engines.
    """
    where = str(directory) if directory is not None else "DIR"
    file = entry.get("file", "engine.plan")
    diffs = []
    if str(entry.get("tensorrt_version")) != str(trt_version):
        diffs.append(f"TensorRT {entry.get('tensorrt_version')} (this machine has {trt_version})")
    built_cc, here_cc = normalize_cc(entry.get("compute_capability", "?")), normalize_cc(cc)
    if built_cc != here_cc:
        diffs.append(f"compute capability {built_cc} (this GPU is {here_cc})")
    if entry.get("gpu_name") != gpu_name:
        diffs.append(f"a {entry.get('gpu_name')} GPU (this one is a {gpu_name})")
    if not diffs:
        return None
    command = f"gptx build {where}"
    for option, key in (("--precision", "precision"), ("--max-batch", "max_batch"), ("--max-seq", "max_seq")):
        if entry.get(key) is not None:
            command += f" {option} {entry[key]}"
    return (f"TensorRT engine {file} was built for " + ", ".join(diffs)
            + f": rebuild it on this machine with `{command}`")


def select_engine(manifest: dict, directory, engine: str | None = None) -> dict:
    """The manifest entry to load: the one named `engine`, else the most recently built."""
    entries = manifest.get("engines") or []
    if not entries:
        raise GptxError(f"{directory} has no TensorRT engine: run `gptx build {directory}` first")
    if engine is None:
        return entries[-1]
    for entry in entries:
        if entry.get("file") == engine:
            return entry
    raise GptxError(f"{directory} has no engine {engine!r} (it has {', '.join(e.get('file', '?') for e in entries)})")


class TensorRTBackend(Backend):
    name = "tensorrt"
    requires = "tensorrt"
    install_hint = INSTALL_HINT

    def __init__(self, manifest: dict, directory: Path, device: str = "cuda", engine: str | None = None):
        super().__init__(manifest, directory, device)
        if device != "cuda":
            raise GptxError("the tensorrt backend runs on a CUDA GPU: pass --device cuda")
        directory = Path(directory)
        self.entry = entry = select_engine(manifest, directory, engine)
        try:
            import tensorrt as trt
        except ImportError:
            raise GptxError(f"the tensorrt backend needs TensorRT: {INSTALL_HINT}") from None
        try:
            import torch
        except ImportError:
            raise GptxError("the tensorrt backend keeps its buffers in PyTorch CUDA tensors: pip install torch "
                            "(a CUDA build)") from None
        if not torch.cuda.is_available():
            raise GptxError(f"the tensorrt backend needs a CUDA GPU, and PyTorch sees none: {INSTALL_HINT}")
        self.trt, self.torch = trt, torch
        major, minor = torch.cuda.get_device_capability(0)
        self.gpu_name = torch.cuda.get_device_name(0)
        problem = check_engine_compat(entry, trt.__version__, self.gpu_name, (major, minor), directory)
        if problem:
            raise GptxError(problem)

        path = directory / entry["file"]
        if not path.is_file():
            raise GptxError(f"{path} is missing: run `gptx build {directory}` again")
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise GptxError(f"TensorRT could not load {path} (see its messages above): "
                            f"run `gptx build {directory}` again")

        self.past_names, self.present_names = kv_names(manifest)
        io = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in io if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in io if n not in inputs]
        self.selects_logits = selects_logits(manifest)
        want_in = input_names(self.n_layer, self.selects_logits)
        want_out = output_names(self.n_layer)
        if sorted(inputs) != sorted(want_in) or sorted(outputs) != sorted(want_out):
            raise GptxError(f"{path} does not have this export's inputs/outputs: run `gptx build {directory}` again")
        self.dtypes = {n: self._torch_dtype(self.engine.get_tensor_dtype(n)) for n in io}
        self.kv_dtype = self.dtypes[self.past_names[0]]
        self.max_batch, self.max_seq = int(entry["max_batch"]), int(entry["max_seq"])

        profiles = {p["name"]: int(p["index"]) for p in entry.get("profiles", [])}
        if set(profiles) != {"prefill", "decode"} or max(profiles.values()) >= self.engine.num_optimization_profiles:
            raise GptxError(f"{path} lacks the prefill/decode profiles gptx needs: run `gptx build {directory}` again")
        self.capabilities = Capabilities(max_batch=self.max_batch, max_seq=min(self.max_seq, self.block_size),
                                         min_past=1, any_logits=self.selects_logits)
        stream = torch.cuda.current_stream()
        self.contexts = {}
        for name, index in profiles.items():
            ctx = self.engine.create_execution_context()
            if ctx is None:
                raise GptxError("TensorRT could not create an execution context (out of GPU memory?)")
            if not ctx.set_optimization_profile_async(index, stream.cuda_stream):
                raise GptxError(f"TensorRT refused optimization profile {index} ({name}) of {path}")
            self.contexts[name] = ctx
        stream.synchronize()

    def _torch_dtype(self, trt_dtype):
        trt, torch = self.trt, self.torch
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
                 trt.int64: torch.int64, trt.bool: torch.bool}
        if hasattr(trt, "bfloat16"):
            table[trt.bfloat16] = torch.bfloat16
        if trt_dtype not in table:
            raise GptxError(f"the engine uses tensor type {trt_dtype}, which the tensorrt backend does not handle")
        return table[trt_dtype]

    # ----------------------------------------------------------------------------------- interface
    def allocate(self, rows: int, window: int):
        if rows > self.max_batch:
            raise GptxError(f"batch {rows} exceeds the engine's --max-batch {self.max_batch}: "
                            f"rebuild with a larger `gptx build --max-batch`")
        if window > self.max_seq:
            raise GptxError(f"{window} cache slots exceed the engine's --max-seq {self.max_seq}: "
                            f"rebuild with a larger `gptx build --max-seq`")
        shape = (rows, self.n_head, window, self.head_dim)
        return [self.torch.zeros(shape, dtype=self.kv_dtype, device="cuda") for _ in self.past_names]

    def run(self, input_ids, attention_mask, position_ids, past, logits_index=None):
        """Prefill profile for several tokens onto the dummy past, decode profile for one token."""
        torch = self.torch
        batch, new_len = input_ids.shape
        profile = "decode" if new_len == 1 else "prefill"
        if profile == "prefill" and past[0].shape[2] != 1:
            raise GptxError("the TensorRT engine takes several tokens only onto an empty cache (prefill)")
        ctx = self.contexts[profile]
        feeds = {
            INPUT_IDS: self._to_device(input_ids, INPUT_IDS),
            ATTENTION_MASK: self._to_device(attention_mask, ATTENTION_MASK),
            POSITION_IDS: self._to_device(position_ids, POSITION_IDS),
            **dict(zip(self.past_names, past)),
        }
        if self.selects_logits:
            index = last_positions(attention_mask, new_len, False) if logits_index is None else logits_index
            feeds[LOGITS_INDEX] = self._to_device(index, LOGITS_INDEX)
        elif logits_index is not None:
            raise old_export_error(self.directory)
        for name, tensor in feeds.items():
            if not ctx.set_input_shape(name, tuple(tensor.shape)):
                raise GptxError(f"input {name} of shape {tuple(tensor.shape)} is outside the engine's "
                                f"{profile} profile (batch <= {self.max_batch}, sequence <= {self.max_seq})")
            ctx.set_tensor_address(name, tensor.data_ptr())
        logits = torch.empty(tuple(ctx.get_tensor_shape(LOGITS)), dtype=self.dtypes[LOGITS], device="cuda")
        ctx.set_tensor_address(LOGITS, logits.data_ptr())
        presents = [torch.empty((batch, self.n_head, new_len, self.head_dim), dtype=self.dtypes[n], device="cuda")
                    for n in self.present_names]
        for name, tensor in zip(self.present_names, presents):
            ctx.set_tensor_address(name, tensor.data_ptr())
        if not ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise GptxError(f"TensorRT failed to run the {profile} step (see its messages above)")
        logits = logits.float().cpu().numpy()  # .cpu() waits for the stream
        return (logits[:, 0] if self.selects_logits and logits_index is None else logits), presents

    def describe(self) -> str:
        return f"tensorrt on cuda ({self.entry.get('precision')}, {self.gpu_name})"

    def _to_device(self, array: np.ndarray, name: str):
        host = self.torch.from_numpy(np.ascontiguousarray(array))
        return host.to(device="cuda", dtype=self.dtypes[name])
