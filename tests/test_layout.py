"""The package's layering: the runtime never imports the PyTorch side, and backends outside it register themselves."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from gptx.runtime.backends import BUILTIN, backend_class, registry, resolve
from gptx.runtime.errors import GptxError

RUNTIME = Path(__file__).resolve().parents[1] / "gptx" / "runtime"
PYTORCH_SIDE = ("gptx.model", "gptx.export", "gptx.train", "gpt_language_model")
# torch as a CUDA array library, imported inside the functions that run on a GPU only
LAZY_TORCH = {"backends/onnxruntime_backend.py", "backends/tensorrt_backend.py"}


def imports(path: Path):
    """(absolute module name, at module level?) for every import statement in `path`; relative ones resolved."""
    package = ["gptx", *path.relative_to(RUNTIME.parent).parent.parts]
    tree = ast.parse(path.read_text(), str(path))
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if n is not f}
    type_checking = {id(n) for i in ast.walk(tree) if isinstance(i, ast.If) and "TYPE_CHECKING" in ast.unparse(i.test)
                     for n in ast.walk(i) if n is not i}
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            names = [module, *(f"{module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            yield name, id(node) not in nested


def runtime_modules():
    return sorted(RUNTIME.rglob("*.py"))


def test_the_import_walk_sees_relative_lazy_and_type_checking_imports(tmp_path):
    """The checker itself: a relative import three levels up resolves, a function's import is not module level."""
    assert "torch" not in dict(imports(RUNTIME / "backends" / "base.py"))  # there under TYPE_CHECKING only
    names = dict(imports(RUNTIME / "backends" / "onnxruntime_backend.py"))
    assert names["gptx.runtime.errors"] is True and names["gptx.runtime.backends.base.Backend"] is True
    assert names["torch"] is False  # in CudaBinding.__init__


@pytest.mark.parametrize("path", runtime_modules(), ids=lambda p: str(p.relative_to(RUNTIME)))
def test_the_runtime_never_imports_the_pytorch_side(path):
    rel = str(path.relative_to(RUNTIME))
    for name, top_level in imports(path):
        assert not name.startswith(PYTORCH_SIDE), f"{rel} imports {name}"
        if name == "torch" or name.startswith("torch."):
            assert not top_level and rel in LAZY_TORCH, f"{rel} imports torch"


def test_cli_and_runtime_load_no_torch_even_when_listing_backends():
    code = ("import sys, gptx.cli, gptx.runtime\nfrom gptx.runtime.backends import BACKENDS\n"
            "print(sorted(BACKENDS), sorted(m for m in sys.modules if m == 'torch' or m.startswith(('gptx.model', "
            "'gptx.export', 'gptx.train'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "['onnxruntime', 'tensorrt', 'torch'] []"


def test_the_torch_backend_registers_through_its_entry_point():
    assert all(spec.startswith("gptx.runtime.backends.") for spec in BUILTIN.values())
    assert registry()["torch"] == "gptx.export.torch_backend:TorchBackend"
    cls = backend_class("torch")
    assert (cls.__module__, cls.__name__, cls.requires) == ("gptx.export.torch_backend", "TorchBackend", "torch")


def unavailable(monkeypatch, *names):
    for name in names:
        monkeypatch.setattr(backend_class(name), "available", classmethod(lambda cls: False))


def test_auto_prefers_tensorrt_on_cuda_then_onnxruntime_then_torch(monkeypatch):
    trt = backend_class("tensorrt")
    monkeypatch.setattr(trt, "available", classmethod(lambda cls: True))
    assert resolve("auto", {"engines": [{"file": "x.engine"}]}, "cuda") == "tensorrt"
    assert resolve("auto", {"engines": [{"file": "x.engine"}]}, "cpu") == "onnxruntime"
    assert resolve("auto", {}, "cuda") == "onnxruntime"  # no engine built
    unavailable(monkeypatch, "onnxruntime")
    assert resolve("auto", {}, "cpu") == "torch"
    unavailable(monkeypatch, "torch")
    with pytest.raises(GptxError, match="no backend available"):
        resolve("auto", {}, "cpu")
    assert resolve("torch", {}, "cpu") == "torch"  # a named backend is taken as named; creating it says what is missing
    with pytest.raises(GptxError, match="unknown backend 'jax': choose auto, onnxruntime, tensorrt, torch"):
        resolve("jax", {}, "cpu")
