"""The PyTorch reference backend: the very module that was exported (KVStep), run eagerly.

Weights come from the export's `source` (a path, hub name, `shakespeare` or `random:<size>` + seed),
or from a GPT passed in directly. Needs torch; the rest of the runtime does not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import GptxError
from ..kv_cache import KVCache
from .base import Backend


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, manifest: dict, directory: Path | None, device: str = "cpu", model=None, half: bool | None = None):
        super().__init__(manifest, directory, device)
        try:
            import torch
        except ImportError:
            raise GptxError("the torch backend needs PyTorch: pip install torch") from None
        from gpt_export.kv_step import KVStep
        from gpt_export.weights import load_export_source

        self.torch = torch
        if model is None:
            model = load_export_source(manifest)  # refuses a source whose weights changed since export
        if half is None:
            half = manifest["dtype"] == "float16"
        self.step_module = KVStep(model.to(device).float(), half=half).eval()
        self.kv_dtype = self.step_module.compute_dtype

    def allocate(self, batch: int, capacity: int):
        shape = (batch, self.n_head, capacity, self.head_dim)
        return [self.torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in range(2 * self.n_layer)]

    def run(self, input_ids, attention_mask, position_ids, cache: KVCache):
        torch = self.torch
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731
        # same contract as the ONNX graph: the whole buffer is the past, the mask marks filled slots
        past = cache.storage if cache.length else [buf[:, :, :0] for buf in cache.storage]
        with torch.inference_mode():
            logits, *presents = self.step_module(as_t(input_ids), as_t(attention_mask), as_t(position_ids), *past)
            start, end = cache.length, cache.length + input_ids.shape[1]
            for buf, new in zip(cache.storage, presents):
                buf[:, :, start:end] = new
        return logits.float().cpu().numpy()
