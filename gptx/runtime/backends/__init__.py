"""Backend registry: name -> class (imported lazily: each needs its own package), and what `auto` means here."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from ..errors import GptxError
from .base import Backend, Capabilities
from .tensorrt_backend import INSTALL_HINT as TENSORRT_HINT  # imports neither tensorrt nor torch

# name -> (module, class, the package it needs). The one list of backend names; the CLI derives its choices from it.
REGISTRY = {
    "onnxruntime": (".onnxruntime_backend", "OnnxRuntimeBackend", "onnxruntime"),
    "torch": ("gptx.export.torch_backend", "TorchBackend", "torch"),
    "tensorrt": (".tensorrt_backend", "TensorRTBackend", "tensorrt"),
}
BACKENDS = tuple(REGISTRY)
INSTALL_HINTS = {"onnxruntime": "pip install onnxruntime", "torch": "pip install 'gptx[torch]'",
                 "tensorrt": TENSORRT_HINT}

__all__ = ["BACKENDS", "REGISTRY", "Backend", "Capabilities", "available", "backend_class", "create_backend",
           "resolve"]


def available(name: str) -> bool:
    return importlib.util.find_spec(REGISTRY[name][2]) is not None


def resolve(name: str, manifest: dict, device: str) -> str:
    """`auto`: a TensorRT engine when one was built for CUDA, else ONNX Runtime, else PyTorch."""
    if name != "auto":
        if name not in REGISTRY:
            raise GptxError(f"unknown backend {name!r}: choose auto, {', '.join(BACKENDS)}")
        return name
    if device == "cuda" and manifest.get("engines") and available("tensorrt"):
        return "tensorrt"
    if available("onnxruntime"):
        return "onnxruntime"
    if available("torch"):
        return "torch"
    raise GptxError("no backend available: pip install onnxruntime (or torch)")


def backend_class(name: str) -> type[Backend]:
    module, cls, _ = REGISTRY[name]
    return getattr(importlib.import_module(module, __name__), cls)


def create_backend(name: str, manifest: dict, directory: Path, device: str = "cpu", **kwargs) -> Backend:
    name = resolve(name, manifest, device)
    if not available(name):
        raise GptxError(f"backend {name!r} is not installed: {INSTALL_HINTS[name]}")
    return backend_class(name)(manifest, directory, device, **kwargs)
