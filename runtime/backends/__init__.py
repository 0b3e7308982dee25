"""Backend registry: name -> class, and what `auto` means on this machine."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import GptxError
from .base import Backend

BACKENDS = ("onnxruntime", "torch", "tensorrt")


def available(name: str) -> bool:
    module = {"onnxruntime": "onnxruntime", "torch": "torch", "tensorrt": "tensorrt"}[name]
    return importlib.util.find_spec(module) is not None


def resolve(name: str, manifest: dict, device: str) -> str:
    """`auto`: a TensorRT engine when one was built for CUDA, else ONNX Runtime, else PyTorch."""
    if name != "auto":
        if name not in BACKENDS:
            raise GptxError(f"unknown backend {name!r}: choose auto, {', '.join(BACKENDS)}")
        return name
    if device == "cuda" and manifest.get("engines") and available("tensorrt"):
        return "tensorrt"
    if available("onnxruntime"):
        return "onnxruntime"
    if available("torch"):
        return "torch"
    raise GptxError("no backend available: pip install onnxruntime (or torch)")


def create_backend(name: str, manifest: dict, directory: Path, device: str = "cpu", **kwargs) -> Backend:
    name = resolve(name, manifest, device)
    if not available(name):
        hint = {"tensorrt": "pip install 'gptx[tensorrt]' on a CUDA machine"}.get(name, f"pip install {name}")
        raise GptxError(f"backend {name!r} is not installed: {hint}")
    if name == "onnxruntime":
        from .onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(manifest, directory, device, **kwargs)
    if name == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend(manifest, directory, device, **kwargs)
    from .tensorrt_backend import TensorRTBackend

    return TensorRTBackend(manifest, directory, device, **kwargs)
