"""`manifest.json`: everything the runtime needs to drive an exported model without PyTorch.

A manifest is untrusted input: `load_manifest` checks it against SCHEMA, checks that its config agrees with its
inputs/outputs, that every path it names stays inside the export directory and that the files it records have the
recorded sizes (and, on request, sha256). Errors name the key at fault, never what a file contains.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .errors import ManifestError
from .files import atomic_write, resolve_inside, sha256_file
from .io_names import LOGITS_INDEX, input_names, output_names, past_names, present_names

MANIFEST_NAME = "manifest.json"
FORMAT = "gptx-onnx"
FORMAT_VERSION = 1
# What an export can be and record, by the names the CLI accepts (kept here, torch-free, so the CLI's choices
# and the exporter's checks come from one table). QUANT_SCHEMES are gptx.export.optimize.QUANT_BITS's keys.
EXPORT_DTYPES = {"fp32": "float32", "fp16": "float16"}
QUANT_SCHEMES = ("int8", "int8-dynamic", "int4")
ENGINE_PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}
# the cache contracts a graph can follow (manifest "kv_cache.present"): the portable one (gptx/export/kv_step.py,
# every backend), or gptx.export.optimize.fuse_attention (ONNX Runtime CPU only, the graph writes the cache itself)
NEW_TOKENS = "new_tokens_only"
IN_PLACE = "in_place"
KV_CONTRACTS = (NEW_TOKENS, IN_PLACE)
GRAPH_METADATA_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")  # written into model.onnx

TENSOR = {"name": str, "dtype": str, "shape": [(int, str)]}
# The keys gptx reads and their JSON types: "key?" is optional, a tuple allows any of its types, [x] is a list of
# x, {"*": x} an object whose every value is an x. Other keys (versions, notes, validation...) are free-form.
SCHEMA = {
    "format": str, "format_version": int, "model_file": str, "config": dict.fromkeys(GRAPH_METADATA_KEYS, int),
    "dtype": str, "tokenizer": {"file": str, "vocab_size": int, "eot_token": int},
    "inputs": [TENSOR], "outputs": [TENSOR],
    "weights_file?": (str, type(None)), "source?": (str, type(None)), "source_sha256?": (str, type(None)),
    "seed?": int, "files?": {"*": {"size": int, "sha256": str}}, "engines?": [{"file": str}],
    "kv_cache?": {"present?": str},
}
JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "an integer", bool: "a boolean",
              type(None): "null"}


def _type_name(value) -> str:
    return JSON_TYPES.get(type(value), f"a {type(value).__name__}").split()[-1]


def check_schema(schema, value, key: str, where: str) -> None:
    """Check `value` against `schema` (SCHEMA's notation), recursively; ManifestError names the key at fault."""
    types = schema if isinstance(schema, tuple) else (type(schema) if isinstance(schema, (dict, list)) else schema,)
    if not isinstance(value, types) or (type(value) is bool and bool not in types):
        raise ManifestError(f"{where}: '{key}' must be {JSON_TYPES[types[0]]}, got {_type_name(value)}")
    if isinstance(schema, list):
        for i, item in enumerate(value):
            check_schema(schema[0], item, f"{key}[{i}]", where)
    elif isinstance(schema, dict) and "*" in schema:
        for name, item in value.items():
            check_schema(schema["*"], item, f"{key}.{name}", where)
    elif isinstance(schema, dict):
        for name, sub in schema.items():
            name, optional = name.removesuffix("?"), name.endswith("?")
            path = f"{key}.{name}" if key else name
            if name in value:
                check_schema(sub, value[name], path, where)
            elif not optional:
                raise ManifestError(f"{where} lacks '{path}'")


def writes_cache_in_place(manifest: dict) -> bool:
    """True for graphs whose attention writes the cache itself (the `in_place` contract: see KV_CONTRACTS)."""
    return (manifest.get("kv_cache") or {}).get("present") == IN_PLACE


def selects_logits(manifest: dict) -> bool:
    """True when the graph takes LOGITS_INDEX: logits of any positions (echo, prompt logprobs), not the last only."""
    return any(spec.get("name") == LOGITS_INDEX for spec in manifest.get("inputs") or [])


def _names_summary(names: list[str], count: int) -> str:
    return ", ".join(names[:4]) + (f", ... ({count} in all)" if count > 4 else "")


def check_consistency(m: dict, where: str) -> None:
    """Numbers that must agree with each other: config, dtypes, I/O names and KV shapes."""
    if m["format_version"] < 1:
        raise ManifestError(f"{where}: 'format_version' must be >= 1, got {m['format_version']}")
    if m["format_version"] > FORMAT_VERSION:
        raise ManifestError(f"{where} was written by a newer gptx (format {m['format_version']}, this gptx reads "
                            f"up to {FORMAT_VERSION}); upgrade gptx")
    cfg = m["config"]
    for name in GRAPH_METADATA_KEYS:
        if cfg[name] < 1:
            raise ManifestError(f"{where}: 'config.{name}' must be >= 1, got {cfg[name]}")
    n_head, head_dim = cfg["n_head"], cfg["n_embd"] // cfg["n_head"]
    if cfg["n_embd"] % n_head:
        raise ManifestError(f"{where}: 'config.n_embd' {cfg['n_embd']} is not divisible by 'config.n_head' {n_head}")
    if m["dtype"] not in EXPORT_DTYPES.values():
        raise ManifestError(f"{where}: 'dtype' must be one of {', '.join(EXPORT_DTYPES.values())}")
    selects, n_layer = selects_logits(m), cfg["n_layer"]
    for key, names_for in (("inputs", lambda n: input_names(n, selects)), ("outputs", output_names)):
        if not m[key]:
            raise ManifestError(f"{where}: '{key}' is empty")
        for i, spec in enumerate(m[key]):
            if spec["dtype"] not in ORT_DTYPES.values():
                raise ManifestError(f"{where}: '{key}[{i}].dtype' must be one of {', '.join(ORT_DTYPES.values())}")
        names = [s["name"] for s in m[key]]
        expected = names_for(min(n_layer, len(names)))  # built no longer than the list: n_layer is untrusted
        if names != expected:
            needs = len(names_for(0)) + 2 * n_layer
            raise ManifestError(f"{where}: '{key}' ({len(names)} names: {_names_summary(names, len(names))}) do not "
                                f"match 'config.n_layer' {n_layer}, which needs {needs} "
                                f"({_names_summary(expected, needs)})")
    if m.get("kv_cache", {}).get("present", NEW_TOKENS) not in KV_CONTRACTS:
        raise ManifestError(f"{where}: 'kv_cache.present' must be one of {', '.join(KV_CONTRACTS)}")
    for spec in (*m["inputs"][3 + selects:], *m["outputs"][1:]):
        if len(spec["shape"]) != 4 or spec["shape"][1] != n_head or spec["shape"][3] != head_dim:
            raise ManifestError(f"{where}: {spec['name']} has shape {spec['shape']}, but 'config' gives n_head "
                                f"{n_head} and head_dim {head_dim}")
    # logits [batch, logits_count, vocab] with LOGITS_INDEX; [batch, vocab] (last position) in older exports
    shape, vocab = m["outputs"][0]["shape"], cfg["vocab_size"]
    if len(shape) != 2 + selects or shape[-1] != vocab:
        raise ManifestError(f"{where}: logits have shape {shape}, but 'config.vocab_size' is {vocab}")
    tok = m["tokenizer"]
    if not 1 <= tok["vocab_size"] <= vocab:
        raise ManifestError(f"{where}: 'tokenizer.vocab_size' must be in [1, config.vocab_size]")
    if not 0 <= tok["eot_token"] < tok["vocab_size"]:
        raise ManifestError(f"{where}: 'tokenizer.eot_token' must be in [0, tokenizer.vocab_size)")


def check_paths(m: dict, directory: Path, where: str) -> None:
    """Every path the manifest names stays inside the export directory; the ones gptx needs exist."""
    named = {"model_file": m["model_file"], "tokenizer.file": m["tokenizer"]["file"],
             "weights_file": m.get("weights_file"),
             **{f"engines[{i}].file": e["file"] for i, e in enumerate(m.get("engines", []))},
             **{f"files.{name}": name for name in m.get("files", {})}}
    for key, rel in named.items():
        if rel is not None and resolve_inside(directory, rel) is None:
            raise ManifestError(f"{where}: '{key}' points outside the export directory or is not a usable path; "
                                "refusing to read it")
    for key in ("model_file", "tokenizer.file", "weights_file"):
        if named[key] is not None and not (directory / named[key]).is_file():
            raise ManifestError(f"{directory} is incomplete: {named[key]} is missing ('{key}')")


def record_files(manifest: dict, directory: str | Path, names=None) -> dict:
    """Store size and sha256 of `names` (default: every file but the manifest) under manifest['files']."""
    directory = Path(directory)
    if names is None:
        names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST_NAME
                       and not p.name.startswith("."))
    files = dict(manifest.get("files") or {})
    for name in names:
        files[name] = {"size": (directory / name).stat().st_size, "sha256": sha256_file(directory / name)}
    manifest["files"] = dict(sorted(files.items()))
    return manifest


def check_files(manifest: dict, directory: str | Path, hashes: bool = False) -> list[str]:
    """Recorded files whose size (and sha256 when `hashes`) differ from what is on disk; [] when all match."""
    problems = []
    for name, record in (manifest.get("files") or {}).items():
        path = Path(directory) / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != record["size"]:
            problems.append(f"{name} is {path.stat().st_size:,} bytes, the export recorded {record['size']:,}")
        elif hashes and sha256_file(path) != record["sha256"]:
            problems.append(f"{name} does not match its recorded sha256")
    return problems


def _read_and_check(directory: Path, verify_hashes: bool) -> dict:
    if not directory.is_dir():
        raise ManifestError(f"{directory} is not a directory (expected a `gptx export` output)")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{directory} has no {MANIFEST_NAME}: not a `gptx export` output")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ManifestError(f"{path} is corrupt: not UTF-8 text") from None
    except json.JSONDecodeError as e:  # its message gives the position only, never the text
        raise ManifestError(f"{path} is corrupt: not valid JSON (line {e.lineno}, column {e.colno})") from None
    where = str(path)
    if not isinstance(raw, dict):
        raise ManifestError(f"{where} holds {_type_name(raw)}, not a JSON object: not a gptx manifest")
    if raw.get("format") != FORMAT:
        raise ManifestError(f"{where} is not a gptx manifest ('format' is not {FORMAT!r})")
    check_schema(SCHEMA, raw, "", where)
    check_consistency(raw, where)
    check_paths(raw, directory, where)
    problems = check_files(raw, directory, hashes=verify_hashes)
    if problems:
        raise ManifestError(f"{directory} does not match its manifest: {'; '.join(problems)} "
                            "(the export is damaged or was modified; re-export it)")
    return raw


def _identity(directory: Path):
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def load_manifest(directory: str | Path, verify_hashes: bool = False) -> dict:
    """Read and check DIR/manifest.json; sizes of recorded files always, their sha256 with `verify_hashes`.

    A directory swapped while it is read (`gptx export --force`) can show the old manifest with the new files:
    its inode changed, so the read is retried and callers see one complete export or the other."""
    directory = Path(directory)
    for _ in range(2):
        before = _identity(directory)
        try:
            return _read_and_check(directory, verify_hashes)
        except ManifestError:
            after = _identity(directory)
            if before is None or after == before:
                raise
            if after is None:  # renamed away and not yet back (systems without an atomic exchange)
                time.sleep(0.05)
    return _read_and_check(directory, verify_hashes)


def save_manifest(manifest: dict, directory: str | Path) -> Path:
    """Atomic write (pid-tagged tmp + rename) so a crash never leaves half a manifest."""
    return atomic_write(Path(directory) / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")


def check_graph(manifest: dict, session, where: str = "model.onnx") -> None:
    """Compare the manifest with the graph an ONNX Runtime session loaded: names, dtypes, static dims and,
    when the export wrote them into the graph's metadata, the config numbers. Says what disagrees."""
    cfg = manifest["config"]
    problems = []
    for kind, declared, actual in (("inputs", manifest["inputs"], session.get_inputs()),
                                   ("outputs", manifest["outputs"], session.get_outputs())):
        graph = {a.name: a for a in actual}
        kv = set(past_names(len(graph)) if kind == "inputs" else present_names(len(graph)))
        graph_layers = len(kv & set(graph)) // 2
        if graph_layers != cfg["n_layer"]:
            problems.append(f"n_layer: the manifest says {cfg['n_layer']}, the graph's {kind} have {graph_layers}")
            continue
        names = [s["name"] for s in declared]
        if set(names) != set(graph):
            extra, missing = sorted(set(graph) - set(names)), sorted(set(names) - set(graph))
            problems.append(f"{kind} names differ (graph only: {extra[:3]}, manifest only: {missing[:3]})")
            continue
        for spec in declared:
            arg = graph[spec["name"]]
            dtype = ORT_DTYPES.get(arg.type, arg.type)
            if dtype != spec["dtype"]:
                problems.append(f"{spec['name']} dtype: the manifest says {spec['dtype']}, the graph {dtype}")
            dims = list(arg.shape)
            if len(dims) != len(spec["shape"]):
                problems.append(f"{spec['name']} rank: the manifest says {len(spec['shape'])}, the graph {len(dims)}")
                continue
            for axis, (want, got) in enumerate(zip(spec["shape"], dims)):
                if isinstance(want, int) and isinstance(got, int) and want != got:
                    label = {1: "n_head", 3: "head_dim"}.get(axis, f"dim {axis}") if len(dims) == 4 else "vocab"
                    problems.append(f"{label}: the manifest says {want}, the graph's {spec['name']} has {got}")
                    break
    metadata = getattr(session.get_modelmeta(), "custom_metadata_map", {}) or {}
    problems += [f"{key}: the manifest says {cfg[key]}, the graph was exported with {metadata[key]}"
                 for key in GRAPH_METADATA_KEYS if key in metadata and str(cfg[key]) != metadata[key]]
    if problems:
        unique = list(dict.fromkeys(problems))
        raise ManifestError(f"the manifest does not match {where}: {'; '.join(unique[:4])}"
                            + (f" (and {len(unique) - 4} more)" if len(unique) > 4 else ""))
