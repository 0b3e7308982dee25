"""Backend registry: name -> class (imported only when used: each needs its own package), and what `auto` means.

The runtime lists its own engines here; any other registers a `gptx.backends` entry point (as the PyTorch one does,
pyproject.toml), read only when a name the runtime does not hold is asked for.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path

from ..errors import GptxError
from .base import Backend, Capabilities

GROUP = "gptx.backends"
BUILTIN = {"onnxruntime": "gptx.runtime.backends.onnxruntime_backend:OnnxRuntimeBackend",  # entry-point syntax
           "tensorrt": "gptx.runtime.backends.tensorrt_backend:TensorRTBackend"}

__all__ = ["BACKENDS", "GROUP", "Backend", "Capabilities", "backend_class", "create_backend", "registry", "resolve"]


@functools.cache
def registry() -> dict[str, str]:
    """Every backend name -> "module:Class": the runtime's own first, then the registered ones by name."""
    from importlib.metadata import entry_points

    registered = sorted((ep.name, ep.value) for ep in entry_points(group=GROUP) if ep.name not in BUILTIN)
    return {**BUILTIN, **dict(registered)}


def __getattr__(name: str):
    if name == "BACKENDS":  # the one list of names (the CLI's choices), read from the entry points on first use
        return tuple(registry())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def backend_class(name: str) -> type[Backend]:
    spec = BUILTIN.get(name) or registry().get(name)
    if spec is None:
        raise GptxError(f"unknown backend {name!r}: choose auto, {', '.join(registry())}")
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def resolve(name: str, manifest: dict, device: str) -> str:
    """`auto`: a TensorRT engine when one was built for CUDA, else ONNX Runtime, else PyTorch."""
    if name != "auto":
        backend_class(name)  # refuses an unknown name
        return name
    if device == "cuda" and manifest.get("engines") and backend_class("tensorrt").available():
        return "tensorrt"
    for fallback in ("onnxruntime", "torch"):
        if (fallback in BUILTIN or fallback in registry()) and backend_class(fallback).available():
            return fallback
    raise GptxError("no backend available: pip install onnxruntime (or 'gptx[torch]')")


def create_backend(name: str, manifest: dict, directory: Path, device: str = "cpu", **kwargs) -> Backend:
    cls = backend_class(resolve(name, manifest, device))
    if not cls.available():
        raise GptxError(f"backend {cls.name!r} is not installed: {cls.install_hint}")
    return cls(manifest, directory, device, **kwargs)
