"""ONNX Runtime backend: CPU execution provider, CUDA when available.

The cache is a preallocated numpy buffer per layer. The whole buffer is fed as the past (ORT reads
numpy memory without copying); only the new tokens' keys/values come back and are written in place,
so a decode step costs the same at token 10 and token 1000.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import GptxError
from ..kv_cache import KVCache
from ..manifest import kv_names
from .base import Backend

DTYPES = {"float32": np.float32, "float16": np.float16}


def session_options(threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return opts


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, manifest: dict, directory: Path, device: str = "cpu", threads: int | None = None):
        super().__init__(manifest, directory, device)
        import onnxruntime as ort

        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise GptxError("onnxruntime has no CUDA execution provider here; pip install 'gptx[cuda]'")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        elif device == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise GptxError(f"unknown device {device!r}: use cpu or cuda")
        model_path = Path(directory) / manifest["model_file"]
        try:
            self.session = ort.InferenceSession(str(model_path), session_options(threads), providers=providers)
        except Exception as e:
            raise GptxError(f"onnxruntime could not load {model_path}: {str(e).splitlines()[0]}") from None
        self.past_names, self.present_names = kv_names(manifest)
        self.kv_dtype = DTYPES[next(i["dtype"] for i in manifest["inputs"] if i["name"] == self.past_names[0])]
        self.output_names = ["logits", *self.present_names]

    def allocate(self, batch: int, capacity: int):
        shape = (batch, self.n_head, capacity, self.head_dim)
        empty = (batch, self.n_head, 0, self.head_dim)
        return {
            "buffers": [np.zeros(shape, self.kv_dtype) for _ in self.past_names],
            "empty": np.zeros(empty, self.kv_dtype),
        }

    def run(self, input_ids, attention_mask, position_ids, cache: KVCache):
        storage = cache.storage
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if cache.length == 0:
            feeds.update({name: storage["empty"] for name in self.past_names})
        else:
            feeds.update(zip(self.past_names, storage["buffers"]))
        logits, *presents = self.session.run(self.output_names, feeds)
        start, end = cache.length, cache.length + input_ids.shape[1]
        for buf, new in zip(storage["buffers"], presents):
            buf[:, :, start:end] = new
        return logits
