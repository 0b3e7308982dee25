"""`manifest.json`: everything the runtime needs to drive an exported model without PyTorch.

Plain dicts on disk (readable, diffable); this module reads, checks and writes them. A manifest is
untrusted input: `load_manifest` validates it against a typed schema (the dataclasses below), checks that
its config agrees with its declared inputs/outputs, that every path it names stays inside the export
directory, and that the files it records have the recorded sizes (and, on request, sha256). Errors name the
key at fault, never what a file contains. `check_graph` compares it with the graph ONNX Runtime loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ManifestError
from .files import atomic_write, resolve_inside, sha256_file
from .io_names import LOGITS_INDEX, input_names, output_names, past_names, present_names

MANIFEST_NAME = "manifest.json"
FORMAT = "gptx-onnx"
FORMAT_VERSION = 1
NUMPY_DTYPES = {"float32": "float32", "float16": "float16", "int64": "int64"}
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


# ---------------------------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class ModelConfig:
    block_size: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: list[int | str]


@dataclass(frozen=True)
class TokenizerSpec:
    file: str
    vocab_size: int
    eot_token: int


@dataclass(frozen=True)
class FileRecord:
    size: int
    sha256: str


@dataclass(frozen=True)
class KVCacheSpec:
    present: str = NEW_TOKENS


@dataclass(frozen=True)
class EngineSpec:
    file: str


@dataclass(frozen=True)
class Manifest:
    """The keys gptx reads; others (versions, notes, validation...) are free-form and ignored here."""

    format: str
    format_version: int
    model_file: str
    config: ModelConfig
    dtype: str
    tokenizer: TokenizerSpec
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    weights_file: str | None = None
    source: str | None = None
    source_sha256: str | None = None
    seed: int = 0
    files: dict[str, FileRecord] = field(default_factory=dict)
    engines: list[EngineSpec] = field(default_factory=list)
    kv_cache: KVCacheSpec = KVCacheSpec()


def _type_name(value) -> str:
    return "null" if value is None else {dict: "object", list: "list", str: "string", bool: "boolean"}.get(
        type(value), type(value).__name__)


def parse(cls, value, key: str, where: str):
    """Check `value` against the type annotation `cls`, recursively; ManifestError names the key at fault."""
    origin, args = typing.get_origin(cls), typing.get_args(cls)
    if dataclasses.is_dataclass(cls):
        if not isinstance(value, dict):
            raise ManifestError(f"{where}: '{key}' must be an object, got {_type_name(value)}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            sub = f"{key}.{f.name}" if key else f.name
            if f.name in value:
                kwargs[f.name] = parse(hints[f.name], value[f.name], sub, where)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ManifestError(f"{where} lacks '{sub}'")
        return cls(**kwargs)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return parse(option, value, key, where)
            except ManifestError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            raise ManifestError(f"{where}: '{key}' must be a list, got {_type_name(value)}")
        return [parse(args[0], v, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ManifestError(f"{where}: '{key}' must be an object, got {_type_name(value)}")
        return {k: parse(args[1], v, f"{key}.{k}", where) for k, v in value.items()}
    if cls is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ManifestError(f"{where}: '{key}' must be an integer, got {_type_name(value)}")
        return value
    if cls is str:
        if not isinstance(value, str):
            raise ManifestError(f"{where}: '{key}' must be a string, got {_type_name(value)}")
        return value
    raise TypeError(f"no schema rule for {cls!r}")  # a bug in the schema above, not in the manifest


def writes_cache_in_place(manifest: dict) -> bool:
    """True for graphs whose attention writes the cache itself (the `in_place` contract: see KV_CONTRACTS)."""
    return (manifest.get("kv_cache") or {}).get("present") == IN_PLACE


def selects_logits(manifest: dict) -> bool:
    """True when the graph takes LOGITS_INDEX, so it can return the logits of any of a call's positions (what
    echo and prompt logprobs need); older exports return the last position's only."""
    return any(spec.get("name") == LOGITS_INDEX for spec in manifest.get("inputs") or [])


def kv_names(manifest: dict) -> tuple[list[str], list[str]]:
    """Past input names and present output names, layer by layer, key before value."""
    n_layer = manifest["config"]["n_layer"]
    return past_names(n_layer), present_names(n_layer)


def _names_summary(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")


def check_consistency(m: Manifest, where: str) -> None:
    """Numbers that must agree with each other: config, dtypes, I/O names and KV shapes."""
    if m.format != FORMAT:
        raise ManifestError(f"{where} is not a gptx manifest ('format' is not {FORMAT!r})")
    if m.format_version < 1:
        raise ManifestError(f"{where}: 'format_version' must be >= 1, got {m.format_version}")
    if m.format_version > FORMAT_VERSION:
        raise ManifestError(f"{where} was written by a newer gptx (format {m.format_version}, this gptx reads "
                            f"up to {FORMAT_VERSION}); upgrade gptx")
    cfg = m.config
    for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
        if getattr(cfg, name) < 1:
            raise ManifestError(f"{where}: 'config.{name}' must be >= 1, got {getattr(cfg, name)}")
    if cfg.n_embd % cfg.n_head:
        raise ManifestError(f"{where}: 'config.n_embd' {cfg.n_embd} is not divisible by 'config.n_head' {cfg.n_head}")
    if m.dtype not in ("float32", "float16"):
        raise ManifestError(f"{where}: 'dtype' must be float32 or float16")
    for key, specs in (("inputs", m.inputs), ("outputs", m.outputs)):
        if not specs:
            raise ManifestError(f"{where}: '{key}' is empty")
        for i, spec in enumerate(specs):
            if spec.dtype not in NUMPY_DTYPES:
                raise ManifestError(f"{where}: '{key}[{i}].dtype' must be one of {', '.join(NUMPY_DTYPES)}")
    selects = any(spec.name == LOGITS_INDEX for spec in m.inputs)
    expected = {"inputs": input_names(cfg.n_layer, selects), "outputs": output_names(cfg.n_layer)}
    for key, specs in (("inputs", m.inputs), ("outputs", m.outputs)):
        names = [s.name for s in specs]
        if names != expected[key]:
            raise ManifestError(f"{where}: '{key}' ({len(names)} names: {_names_summary(names)}) do not match "
                                f"'config.n_layer' {cfg.n_layer}, which needs {len(expected[key])} "
                                f"({_names_summary(expected[key])})")
    if m.kv_cache.present not in KV_CONTRACTS:
        raise ManifestError(f"{where}: 'kv_cache.present' must be one of {', '.join(KV_CONTRACTS)}")
    head_dim = cfg.n_embd // cfg.n_head
    for spec in (*m.inputs[3 + selects:], *m.outputs[1:]):
        if len(spec.shape) != 4 or spec.shape[1] != cfg.n_head or spec.shape[3] != head_dim:
            raise ManifestError(f"{where}: {spec.name} has shape {spec.shape}, but 'config' gives n_head "
                                f"{cfg.n_head} and head_dim {head_dim}")
    # logits [batch, logits_count, vocab] with LOGITS_INDEX; [batch, vocab] (last position) in older exports
    if len(m.outputs[0].shape) != 2 + selects or m.outputs[0].shape[-1] != cfg.vocab_size:
        raise ManifestError(f"{where}: logits have shape {m.outputs[0].shape}, but 'config.vocab_size' is "
                            f"{cfg.vocab_size}")
    tok = m.tokenizer
    if not 1 <= tok.vocab_size <= cfg.vocab_size:
        raise ManifestError(f"{where}: 'tokenizer.vocab_size' must be in [1, config.vocab_size]")
    if not 0 <= tok.eot_token < tok.vocab_size:
        raise ManifestError(f"{where}: 'tokenizer.eot_token' must be in [0, tokenizer.vocab_size)")


def inside(directory: Path, rel: str, key: str, where: str) -> Path:
    """`directory/rel` if it resolves (symlinks followed) inside `directory`; refuse otherwise, naming the key."""
    path = resolve_inside(directory, rel)
    if path is None:
        raise ManifestError(f"{where}: '{key}' points outside the export directory or is not a usable path; "
                            "refusing to read it")
    return path


def check_paths(m: Manifest, directory: Path, where: str) -> None:
    """Every path the manifest names stays inside the export directory; the ones gptx needs exist."""
    required = {"model_file": m.model_file, "tokenizer.file": m.tokenizer.file}
    named = {**required, "weights_file": m.weights_file,
             **{f"engines[{i}].file": e.file for i, e in enumerate(m.engines)},
             **{f"files.{name}": name for name in m.files}}
    resolved = {key: inside(directory, rel, key, where) for key, rel in named.items() if rel is not None}
    for key in (*required, "weights_file"):
        if key in resolved and not resolved[key].is_file():
            raise ManifestError(f"{directory} is incomplete: {named[key]} is missing ('{key}')")


def file_record(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def record_files(manifest: dict, directory: str | Path, names=None) -> dict:
    """Store size and sha256 of `names` (default: every file but the manifest) under manifest['files']."""
    directory = Path(directory)
    if names is None:
        names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST_NAME
                       and not p.name.startswith("."))
    files = dict(manifest.get("files") or {})
    for name in names:
        files[name] = file_record(directory / name)
    manifest["files"] = dict(sorted(files.items()))
    return manifest


def check_files(manifest: dict, directory: str | Path, hashes: bool = False) -> list[str]:
    """Recorded files whose size (and sha256 when `hashes`) differ from what is on disk; [] when all match."""
    directory = Path(directory)
    problems = []
    for name, record in (manifest.get("files") or {}).items():
        path = directory / name
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
    m = parse(Manifest, raw, "", where)
    check_consistency(m, where)
    check_paths(m, directory, where)
    problems = check_files(raw, directory, hashes=verify_hashes)
    if problems:
        raise ManifestError(f"{directory} does not match its manifest: {'; '.join(problems)} "
                            "(the export is damaged or was modified; re-export it)")
    return raw


def _identity(directory: Path):
    try:
        st = os.stat(directory)
        return st.st_dev, st.st_ino
    except OSError:
        return None


def load_manifest(directory: str | Path, verify_hashes: bool = False) -> dict:
    """Read and check DIR/manifest.json; sizes of recorded files always, their sha256 with `verify_hashes`.

    If the directory is replaced while it is read (`gptx export --force` swapping in a new export), the
    checks may see the old manifest and the new files: that is detected (the directory's inode changed)
    and the read is retried, so callers see one complete export or the other.
    """
    directory = Path(directory)
    for attempt in range(3):
        before = _identity(directory)
        try:
            return _read_and_check(directory, verify_hashes)
        except ManifestError:
            after = _identity(directory)
            if attempt == 2 or before is None or after == before:
                raise
            if after is None:  # renamed away and not yet back (systems without an atomic exchange)
                time.sleep(0.05)
    raise AssertionError("unreachable")


def save_manifest(manifest: dict, directory: str | Path) -> Path:
    """Atomic write (pid-tagged tmp + rename) so a crash never leaves half a manifest."""
    return atomic_write(Path(directory) / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=False) + "\n")


# ---------------------------------------------------------------------------------------------- graph
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
    for key in GRAPH_METADATA_KEYS:
        if key in metadata and str(cfg[key]) != metadata[key]:
            problems.append(f"{key}: the manifest says {cfg[key]}, the graph was exported with {metadata[key]}")
    if problems:
        unique = list(dict.fromkeys(problems))
        raise ManifestError(f"the manifest does not match {where}: {'; '.join(unique[:4])}"
                            + (f" (and {len(unique) - 4} more)" if len(unique) > 4 else ""))
