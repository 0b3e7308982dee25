"""The PyTorch reference backend: the very module that was exported (KVStep), run eagerly. Weights come from the
export's `source` (a path, hub name, `shakespeare` or `random:<size>` + seed) or a GPT passed in. Needs torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gptx.runtime.errors import GptxError
from gptx.runtime.backends.base import Backend, Capabilities, last_positions


class TorchBackend(Backend):
    name = "torch"
    requires = "torch"
    install_hint = "pip install 'gptx[torch]'"

    def __init__(self, manifest: dict, directory: Path | None, device: str = "cpu", model=None,
                 half: bool | None = None):
        super().__init__(manifest, directory, device)
        try:
            import torch
        except ImportError:
            raise GptxError(f"the torch backend needs PyTorch: {self.install_hint}") from None
        from gptx.export.kv_step import KVStep
        from gptx.model.weights import load_export_source

        self.torch = torch
        if model is None:
            model = load_export_source(manifest)  # refuses a source whose weights changed since export
        if half is None:
            half = manifest["dtype"] == "float16"
        self.step_module = KVStep(model.to(device).float(), half=half).eval()
        self.kv_dtype = self.step_module.compute_dtype
        self.capabilities = Capabilities(max_batch=None, max_seq=self.block_size, any_logits=True)

    def allocate(self, rows: int, window: int):
        shape = (rows, self.n_head, window, self.head_dim)
        return [self.torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in range(2 * self.n_layer)]

    def run(self, input_ids, attention_mask, position_ids, past, logits_index=None):
        torch = self.torch
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731
        index = last_positions(attention_mask, input_ids.shape[1], False) if logits_index is None else logits_index
        # no_grad, not inference_mode: the presents are copied into ordinary (non-inference) cache tensors
        with torch.no_grad():
            logits, *presents = self.step_module(as_t(input_ids), as_t(attention_mask), as_t(position_ids),
                                                 as_t(index), *past)
        logits = logits.float().cpu().numpy()
        return (logits[:, 0] if logits_index is None else logits), presents
