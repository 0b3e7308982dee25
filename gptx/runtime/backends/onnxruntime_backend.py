"""ONNX Runtime backend: CPU execution provider, or CUDA with I/O binding.

On CPU the cache buffers are numpy arrays: ORT reads a contiguous numpy past without copying, and only the
new tokens' keys/values come back (kv_cache.py writes them in place), so a step costs the same at token 10
and token 1000 of the same window.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from ..errors import GptxError, InvalidInput
from ..io_names import INPUT_IDS, LOGITS, LOGITS_INDEX
from ..manifest import check_graph, selects_logits, writes_cache_in_place
from ..page_cache import advise_random_access, drop_cached_pages
from .base import Backend, Capabilities

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def ort_load_errors() -> tuple[type[Exception], ...]:
    """What ONNX Runtime raises for a graph it cannot load: its own pybind types (they derive from Exception
    directly), plus RuntimeError for what its Python layer raises."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return (RuntimeError, *(t for t in vars(state).values() if isinstance(t, type) and issubclass(t, Exception)))


def mapped_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed array in its own anonymous memory mapping: its pages become resident only as they are written, and
    go back to the OS when it dies (np.zeros may come from a heap that keeps them: docs/experiments.md)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes == 0 or not hasattr(mmap, "MAP_ANONYMOUS"):  # Windows: no flags, np.zeros as before
        return np.zeros(shape, dtype)
    private = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: a fork gets a copy
    return np.frombuffer(private, dtype).reshape(shape)


def session_options(threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or 0  # 0: onnxruntime's default
    opts.log_severity_level = 3
    return opts


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    requires = "onnxruntime"
    install_hint = "pip install onnxruntime"

    def __init__(self, manifest: dict, directory: Path, device: str = "cpu", threads: int | None = None):
        super().__init__(manifest, directory, device)
        import onnxruntime as ort

        in_place = writes_cache_in_place(manifest)
        if in_place and device != "cpu":
            raise GptxError(f"{directory} was optimized with in-place attention (GroupQueryAttention), which "
                            "gptx runs on CPU only; export again without --optimize/--quantize for CUDA")
        if device not in PROVIDERS:
            raise GptxError(f"unknown device {device!r}: use cpu or cuda")
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise GptxError("onnxruntime has no CUDA execution provider here; pip install 'gptx[cuda]'")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
            raise InvalidInput(f"threads must be an integer >= 0 (0 = onnxruntime's default), got {threads!r}")
        model_path = Path(directory) / manifest["model_file"]
        mapped = device == "cpu" and manifest.get("weights_file")  # the session maps it: see drop_cached_pages
        if mapped:
            drop_cached_pages(Path(directory) / mapped)
        try:
            self.session = ort.InferenceSession(str(model_path), session_options(threads), providers=PROVIDERS[device])
        except ort_load_errors() as e:  # its message names the problem and the path, never the file's bytes
            raise GptxError(f"onnxruntime could not load {model_path}: {str(e).splitlines()[0]}") from None
        check_graph(manifest, self.session, str(model_path))
        if mapped:  # from here on it reads rows by token id
            advise_random_access(Path(directory) / mapped)
        self.capabilities = Capabilities(max_batch=None, max_seq=self.block_size, writes_cache=in_place,
                                         any_logits=selects_logits(manifest))
        self.kv_dtype = np.dtype(next(i["dtype"] for i in manifest["inputs"] if i["name"] == self.past_names[0]))
        self.output_names, self.vocab = [LOGITS, *self.present_names], manifest["config"]["vocab_size"]
        self.cuda = CudaBinding(self) if device == "cuda" else None
        self.in_place = InPlaceBinding(self) if in_place else None

    def allocate(self, rows: int, window: int):
        if self.cuda:
            return self.cuda.allocate(rows, window)
        return [mapped_zeros((rows, self.n_head, window, self.head_dim), self.kv_dtype) for _ in self.past_names]

    def run(self, input_ids, attention_mask, position_ids, past, logits_index=None):
        small = self.graph_inputs(input_ids, attention_mask, position_ids, logits_index)
        if self.cuda:
            logits, presents = self.cuda.run(small, past)
        elif self.in_place:
            logits, presents = self.in_place.run(small, past), []
        else:
            logits, *presents = self.session.run(self.output_names, {**small, **dict(zip(self.past_names, past))})
        if logits_index is None and logits.ndim == 3:  # one position per row
            logits = logits[:, 0]
        return logits, presents

    def logits_shape(self, small: dict[str, np.ndarray]) -> tuple[int, ...]:
        batch = len(small[INPUT_IDS])
        return (batch, small[LOGITS_INDEX].shape[1], self.vocab) if LOGITS_INDEX in small else (batch, self.vocab)


class InPlaceBinding:
    """I/O binding for in-place attention graphs on CPU: each layer's past and present name one numpy buffer,
    so GroupQueryAttention writes the new keys/values straight into the cache (no copy back in kv_cache.py).
    Binding 49 names costs about 0.1 ms, so the cache and logits buffers stay bound while the same `past` list
    comes back (KVCache hands one list of views to every decode step of a window)."""

    def __init__(self, backend: OnnxRuntimeBackend):
        self.backend = backend
        self.io = backend.session.io_binding()
        self.bound = None  # the `past` list the buffers are bound for (held, so its id is never reused)
        self.logits = np.empty((0, backend.vocab), np.float32)

    def _bind(self, past, logits_shape: tuple[int, ...]) -> None:
        b, io = self.backend, self.io
        if not all(buf.flags.c_contiguous for buf in past):
            raise GptxError("in-place attention needs contiguous cache rows")  # a bug in kv_cache.py
        io.clear_binding_outputs()
        self.logits = np.empty(logits_shape, np.float32)
        io.bind_output(LOGITS, "cpu", 0, np.float32, self.logits.shape, self.logits.ctypes.data)
        for past_name, present_name, buf in zip(b.past_names, b.present_names, past):
            io.bind_input(past_name, "cpu", 0, buf.dtype, buf.shape, buf.ctypes.data)
            io.bind_output(present_name, "cpu", 0, buf.dtype, buf.shape, buf.ctypes.data)
        self.bound = past

    def run(self, small: dict[str, np.ndarray], past) -> np.ndarray:
        """`small`: the inputs other than the cache, by name."""
        shape = self.backend.logits_shape(small)
        if past is not self.bound or self.logits.shape != shape:
            self._bind(past, shape)
        small = {name: np.ascontiguousarray(a, dtype=np.int64) for name, a in small.items()}
        for name, array in small.items():
            self.io.bind_cpu_input(name, array)  # bound by address: `small` keeps them alive through the run
        self.backend.session.run_with_iobinding(self.io)
        return self.logits.copy()  # the next step overwrites the bound buffer


class CudaBinding:
    """CUDA execution provider with I/O binding: the cache lives on the GPU and never crosses to the host.

    Buffers are PyTorch CUDA tensors (onnxruntime-gpu has no public slice-copy for OrtValues); the new keys/values
    land in device tensors that kv_cache.py copies into the cache slots; only the logits come back. Needs
    onnxruntime-gpu and a CUDA build of torch. Not yet run on real hardware: see docs/tensorrt.md.
    """

    def __init__(self, backend: OnnxRuntimeBackend):
        try:
            import torch
        except ImportError:
            raise GptxError("onnxruntime on CUDA keeps the cache in torch CUDA tensors: "
                            "install a CUDA build of torch") from None
        if not torch.cuda.is_available():
            raise GptxError("device cuda requested but no CUDA GPU is visible")
        self.torch = torch
        self.backend = backend
        self.dtype = torch.float16 if backend.kv_dtype == np.float16 else torch.float32

    def allocate(self, rows: int, window: int):
        b = self.backend
        # a 0-slot past is a view of a 1-slot tensor: binding needs a real device pointer
        shape = (rows, b.n_head, max(window, 1), b.head_dim)
        return [self.torch.zeros(shape, dtype=self.dtype, device="cuda")[:, :, :window] for _ in b.past_names]

    def bind(self, io, name: str, tensor, output: bool = False):
        np_dtype = np.float16 if tensor.dtype == self.torch.float16 else np.float32
        (io.bind_output if output else io.bind_input)(name, "cuda", 0, np_dtype, tuple(tensor.shape), tensor.data_ptr())

    def run(self, small: dict[str, np.ndarray], past):
        """`small`: the inputs other than the cache, by name (they go up to the device each step)."""
        torch, b = self.torch, self.backend
        # the cache writes of the previous step were queued on torch's stream; ORT runs on its own
        torch.cuda.current_stream().synchronize()
        io = b.session.io_binding()
        for name, array in small.items():
            io.bind_cpu_input(name, np.ascontiguousarray(array, dtype=np.int64))
        for name, buf in zip(b.past_names, past):
            self.bind(io, name, buf)
        batch, new = small[INPUT_IDS].shape
        logits = torch.empty(b.logits_shape(small), dtype=torch.float32, device="cuda")
        presents = [torch.empty((batch, b.n_head, new, b.head_dim), dtype=self.dtype, device="cuda")
                    for _ in b.present_names]
        for name, tensor in zip([LOGITS, *b.present_names], [logits, *presents]):
            self.bind(io, name, tensor, output=True)
        b.session.run_with_iobinding(io)
        return logits.cpu().numpy(), presents
