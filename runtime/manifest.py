"""`manifest.json`: everything the runtime needs to drive an exported model without PyTorch.

Plain dicts on disk (readable, diffable); this module only reads, checks and writes them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import ManifestError

MANIFEST_NAME = "manifest.json"
FORMAT = "gptx-onnx"
FORMAT_VERSION = 1
NUMPY_DTYPES = {"float32": "float32", "float16": "float16", "int64": "int64"}


def load_manifest(directory: str | Path) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise ManifestError(f"{directory} is not a directory (expected a `gptx export` output)")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{directory} has no {MANIFEST_NAME}: not a `gptx export` output")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is corrupt: {e}") from None
    check_manifest(manifest, directory)
    return manifest


def check_manifest(manifest: dict, directory: Path) -> None:
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{directory}/{MANIFEST_NAME} is not a gptx manifest (format={manifest.get('format')!r})")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ManifestError(
            f"{directory} was exported by a newer gptx (format {manifest['format_version']}); upgrade gptx"
        )
    for key in ("config", "model_file", "tokenizer", "inputs", "outputs", "dtype"):
        if key not in manifest:
            raise ManifestError(f"{directory}/{MANIFEST_NAME} lacks '{key}'")
    for rel in (manifest["model_file"], manifest["tokenizer"]["file"]):
        if not (directory / rel).is_file():
            raise ManifestError(f"{directory} is incomplete: {rel} is missing")


def save_manifest(manifest: dict, directory: str | Path) -> Path:
    """Atomic write (tmp + rename) so a crash never leaves half a manifest."""
    path = Path(directory) / MANIFEST_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def kv_names(manifest: dict) -> tuple[list[str], list[str]]:
    """Past input names and present output names, layer by layer, key before value."""
    n_layer = manifest["config"]["n_layer"]
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    return past, present
