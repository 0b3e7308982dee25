"""TensorRT backend: runs the `engine.plan` that `gptx build` wrote, with the KV cache resident on the GPU.

The ONNX Runtime backend's contract (the same ONNX graph) with device memory: cache buffers are PyTorch CUDA
tensors, present.* land in fresh device tensors (TensorRT outputs must be contiguous, a row's slot is not), only
the logits come back. One execution context per optimization profile (gptx/export/tensorrt_build.py): prefill
(T >= 1 onto a 1-slot masked dummy past, as profiles cannot express a 0-length one: `min_past = 1`) and decode
(T = 1 onto the active rows' window). All work is queued on torch's current CUDA stream, after the previous
step's cache writes. torch and tensorrt are imported in __init__: this module imports on machines without them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import GptxError
from ..io_names import LOGITS, input_names, output_names
from ..manifest import selects_logits
from .base import Backend, Capabilities

INSTALL_HINT = "pip install 'gptx[tensorrt]' on a machine with an NVIDIA CUDA GPU"
TORCH_DTYPES = ("float32", "float16", "bfloat16", "int32", "int64", "bool")  # TensorRT's names are torch's


def normalize_cc(cc) -> str:
    """(8, 9) / '8.9' / 'sm_89' / 8.9 -> '8.9'; anything else as given."""
    text = ".".join(map(str, cc[:2])) if isinstance(cc, (tuple, list)) else str(cc).strip().lower().removeprefix("sm_")
    major, _, minor = text.partition(".") if "." in text else (text[:-1].removeprefix("sm"), ".", text[-1:])
    return f"{int(major)}.{int(minor)}" if major.isdecimal() and minor.isdecimal() else str(cc)


def check_engine_compat(entry: dict, trt_version: str, gpu_name: str, cc,
                        directory: str | Path | None = None) -> str | None:
    """None when the engine can run here, else one line saying what differs and how to rebuild: an engine is tied to
    the TensorRT that built it and to the GPU (we do not build version- or hardware-compatible engines)."""
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
    options = "".join(f" {option} {entry[key]}" for option, key in
                      (("--precision", "precision"), ("--max-batch", "max_batch"), ("--max-seq", "max_seq"))
                      if entry.get(key) is not None)
    return (f"TensorRT engine {entry.get('file', 'engine.plan')} was built for {', '.join(diffs)}: rebuild it on "
            f"this machine with `gptx build {'DIR' if directory is None else directory}{options}`")


def select_engine(manifest: dict, directory, engine: str | None = None) -> dict:
    """The manifest entry to load: the one named `engine`, else the most recently built."""
    entries = manifest.get("engines") or []
    if not entries:
        raise GptxError(f"{directory} has no TensorRT engine: run `gptx build {directory}` first")
    entry = entries[-1] if engine is None else next((e for e in entries if e.get("file") == engine), None)
    if entry is None:
        raise GptxError(f"{directory} has no engine {engine!r} (it has "
                        f"{', '.join(e.get('file', '?') for e in entries)})")
    return entry


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
        self.torch = torch
        self.gpu_name = torch.cuda.get_device_name(0)
        if problem := check_engine_compat(entry, trt.__version__, self.gpu_name, torch.cuda.get_device_capability(0),
                                          directory):
            raise GptxError(problem)

        path, rebuild = directory / entry["file"], f"run `gptx build {directory}` again"
        if not path.is_file():
            raise GptxError(f"{path} is missing: {rebuild}")
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise GptxError(f"TensorRT could not load {path} (see its messages above): {rebuild}")

        io = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in io if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        selects = selects_logits(manifest)
        if sorted(inputs) != sorted(input_names(self.n_layer, selects)) or \
                sorted(set(io) - set(inputs)) != sorted(output_names(self.n_layer)):
            raise GptxError(f"{path} does not have this export's inputs/outputs: {rebuild}")
        dtypes = {getattr(trt, t): getattr(torch, t) for t in TORCH_DTYPES if hasattr(trt, t)}
        unknown = [t for t in map(self.engine.get_tensor_dtype, io) if t not in dtypes]
        if unknown:
            raise GptxError(f"the engine uses tensor type {unknown[0]}, which the tensorrt backend does not handle")
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in io}
        self.kv_dtype = self.dtypes[self.past_names[0]]
        self.max_batch, self.max_seq = int(entry["max_batch"]), int(entry["max_seq"])

        profiles = {p["name"]: int(p["index"]) for p in entry.get("profiles", [])}
        if set(profiles) != {"prefill", "decode"} or max(profiles.values()) >= self.engine.num_optimization_profiles:
            raise GptxError(f"{path} lacks the prefill/decode profiles gptx needs: {rebuild}")
        self.capabilities = Capabilities(max_batch=self.max_batch, max_seq=min(self.max_seq, self.block_size),
                                         min_past=1, any_logits=selects)
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
        feeds = {name: torch.from_numpy(np.ascontiguousarray(array)).to(device="cuda", dtype=self.dtypes[name])
                 for name, array in self.graph_inputs(input_ids, attention_mask, position_ids, logits_index).items()}
        feeds.update(zip(self.past_names, past))
        for name, tensor in feeds.items():
            if not ctx.set_input_shape(name, tuple(tensor.shape)):
                raise GptxError(f"input {name} of shape {tuple(tensor.shape)} is outside the engine's "
                                f"{profile} profile (batch <= {self.max_batch}, sequence <= {self.max_seq})")
            ctx.set_tensor_address(name, tensor.data_ptr())
        logits = torch.empty(tuple(ctx.get_tensor_shape(LOGITS)), dtype=self.dtypes[LOGITS], device="cuda")
        presents = [torch.empty((batch, self.n_head, new_len, self.head_dim), dtype=self.dtypes[n], device="cuda")
                    for n in self.present_names]
        for name, tensor in zip([LOGITS, *self.present_names], [logits, *presents]):
            ctx.set_tensor_address(name, tensor.data_ptr())
        if not ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise GptxError(f"TensorRT failed to run the {profile} step (see its messages above)")
        logits = logits.float().cpu().numpy()  # .cpu() waits for the stream
        return (logits[:, 0] if logits_index is None and logits.ndim == 3 else logits), presents

    def describe(self) -> str:
        return f"tensorrt on cuda ({self.entry.get('precision')}, {self.gpu_name})"
