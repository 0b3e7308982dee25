"""`gptx build`: a `gptx export` directory -> a TensorRT engine (`engine.plan`) beside the ONNX model.

One engine, two optimization profiles (docs/tensorrt.md says why not two engines):
  profile 0 "prefill": T = 1..max_seq new tokens over one past slot. TensorRT profiles cannot describe a 0-length
                       dimension (NVIDIA/TensorRT#337), so an empty cache is a dummy slot whose mask column is 0.
  profile 1 "decode":  T = 1 over the runtime's whole preallocated cache (past length 1..max_seq).

Networks are strongly typed (TensorRT 10.12+; TensorRT 11 knows nothing else): the engine's precision is the
export's, so an fp16 engine needs an fp16 export, and `--precision bf16` (no bf16 exports) is refused plainly.
Everything that does not need TensorRT (argument checks, profiles, manifest entries) is plain Python, so the CPU
test-suite covers it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from pathlib import Path

from gptx.runtime.backends.tensorrt_backend import INSTALL_HINT, normalize_cc
from gptx.runtime.errors import BuildError, GptxError, InvalidInput
from gptx.runtime.files import atomic_write
from gptx.runtime.manifest import ENGINE_PRECISIONS, load_manifest, record_files, save_manifest

ENGINE_FILE = "engine.plan"
PREFILL, DECODE = "prefill", "decode"


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(f"{name} must be a positive integer, got {value!r}")
    return value


def check_build_args(manifest: dict, max_batch: int, max_seq: int, opt_batch: int, opt_seq: int | None = None) -> int:
    """Validate the profile arguments against the model; returns the opt sequence length to tune for."""
    for value, name in ((max_batch, "--max-batch"), (max_seq, "--max-seq"), (opt_batch, "--opt-batch")):
        _positive_int(value, name)
    block = manifest["config"]["block_size"]
    if max_seq > block:
        raise InvalidInput(f"--max-seq {max_seq} exceeds the model's context of {block} tokens (block_size)")
    if opt_batch > max_batch:
        raise InvalidInput(f"--opt-batch {opt_batch} is larger than --max-batch {max_batch}")
    if opt_seq is None:
        opt_seq = max(1, max_seq // 2)
    _positive_int(opt_seq, "opt_seq")
    if opt_seq > max_seq:
        raise InvalidInput(f"opt_seq {opt_seq} is larger than --max-seq {max_seq}")
    return opt_seq


def _resolve_dim(dim, sizes: dict[str, int], name: str) -> int:
    """An io_spec dimension: an int, a symbol ('batch') or a sum of symbols ('past_sequence + sequence')."""
    if isinstance(dim, int):
        return dim
    total = 0
    for term in str(dim).split("+"):
        term = term.strip()
        if term.isdigit():
            total += int(term)
        elif term in sizes:
            total += sizes[term]
        else:
            raise GptxError(f"manifest input {name} has a dimension {dim!r} that gptx build does not understand")
    return total


def profiles_from_manifest(manifest: dict, max_batch: int, max_seq: int, opt_batch: int,
                           opt_seq: int | None = None) -> list[dict]:
    """Min/opt/max shapes of every graph input (the manifest's `inputs`) for the prefill and decode profiles:
    [{"name": "prefill", "index": 0, "shapes": {input: {"min": [...], "opt": [...], "max": [...]}}}, {"name":
    "decode", "index": 1, ...}], plain lists stored as is in the manifest. logits_count is how many positions
    logits_index asks for: one at decode, up to every prompt token at prefill (a scored prompt)."""
    opt_seq = check_build_args(manifest, max_batch, max_seq, opt_batch, opt_seq)
    batch = {"min": 1, "opt": opt_batch, "max": max_batch}
    ranges = {  # optimization profile index = position here
        # T new tokens, P past slots (1: the masked dummy slot; TensorRT has no 0-length profile dims)
        PREFILL: {"sequence": {"min": 1, "opt": opt_seq, "max": max_seq},
                  "past_sequence": {"min": 1, "opt": 1, "max": 1},
                  "logits_count": {"min": 1, "opt": 1, "max": max_seq}},
        # one new token over the whole preallocated cache (capacity 1..max_seq)
        DECODE: {"sequence": {"min": 1, "opt": 1, "max": 1},
                 "past_sequence": {"min": 1, "opt": opt_seq, "max": max_seq},
                 "logits_count": {"min": 1, "opt": 1, "max": 1}},
    }
    profiles = []
    for index, (name, dims) in enumerate(ranges.items()):
        sizes = {level: {"batch": batch[level], **{k: v[level] for k, v in dims.items()}}
                 for level in ("min", "opt", "max")}
        shapes = {spec["name"]: {level: [_resolve_dim(d, known, spec["name"]) for d in spec["shape"]]
                                 for level, known in sizes.items()} for spec in manifest["inputs"]}
        profiles.append({"name": name, "index": index, "shapes": shapes})
    return profiles


def engine_entry(file: str, tensorrt_version: str, gpu_name: str, compute_capability: str, precision: str,
                 profiles: list[dict], max_batch: int, max_seq: int, build_seconds: float, **extra) -> dict:
    return {
        "file": file,
        "tensorrt_version": str(tensorrt_version),
        "gpu_name": gpu_name,
        "compute_capability": normalize_cc(compute_capability),
        "precision": precision,
        "profiles": profiles,
        "max_batch": max_batch,
        "max_seq": max_seq,
        "build_seconds": round(float(build_seconds), 2),
        "built_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def save_engine(directory: Path, plan, entry: dict) -> dict:
    """Write the engine file and record it in the manifest (its entry, and its checksum when the export has them).
    The old engine's checksum is dropped first: a crash in between leaves an engine without a record (loads,
    unverified), never one that fails its own check."""
    directory = Path(directory)
    manifest = load_manifest(directory)  # re-read: keep whatever else changed meanwhile
    checksums = manifest.get("files")
    if checksums and checksums.pop(entry["file"], None) is not None:
        save_manifest(manifest, directory)
    atomic_write(directory / entry["file"], plan)
    manifest = add_engine_entry(manifest, entry)
    if checksums:
        record_files(manifest, directory, [entry["file"]])
    save_manifest(manifest, directory)
    return manifest


def add_engine_entry(manifest: dict, entry: dict) -> dict:
    """Append `entry` to manifest['engines'], replacing an older entry for the same file."""
    manifest["engines"] = [*(e for e in manifest.get("engines") or [] if e.get("file") != entry["file"]), entry]
    return manifest


def detect_gpu() -> tuple[str, str] | None:
    """(name, compute capability) of CUDA device 0, or None when no CUDA GPU is visible."""
    with contextlib.suppress(Exception):  # a CPU-only or broken torch just means "ask CUDA directly"
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return torch.cuda.get_device_name(0), f"{major}.{minor}"
    try:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart  # older cuda-python
        err, props = cudart.cudaGetDeviceProperties(0)
        if int(err) != 0:
            return None
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return name.rstrip("\x00"), f"{props.major}.{props.minor}"
    except Exception:  # noqa: BLE001
        return None


def require_tensorrt(what: str = "gptx build"):
    """Import tensorrt and find the GPU, or raise one GptxError line saying what is missing."""
    missing = []
    try:
        import tensorrt as trt
    except ImportError:
        missing.append("the tensorrt package is not installed")
    except Exception as e:  # noqa: BLE001 - a broken install (missing libnvinfer) raises OSError etc.
        missing.append(f"tensorrt failed to import ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    gpu = detect_gpu()
    if gpu is None:
        missing.append("no CUDA GPU is visible")
    if missing:
        raise GptxError(f"{what} needs TensorRT and a CUDA GPU, but {' and '.join(missing)}: {INSTALL_HINT}")
    return trt, gpu


def check_precision(manifest: dict, precision: str) -> None:
    if precision not in ENGINE_PRECISIONS:
        raise InvalidInput(f"--precision must be one of {', '.join(ENGINE_PRECISIONS)}, got {precision!r}")
    export_dtype = manifest["dtype"]
    if precision == "bf16":
        raise BuildError("--precision bf16 needs a bfloat16 export, and gptx exports only fp32 and fp16; TensorRT "
                         "networks are strongly typed (the engine runs in the ONNX graph's types), so build an fp16 "
                         "export with --precision fp16 instead")
    if ENGINE_PRECISIONS[precision] != export_dtype:
        redo = "re-export with `gptx export MODEL --dtype fp16`" if precision == "fp16" else "use an fp32 export"
        have = {v: k for k, v in ENGINE_PRECISIONS.items()}.get(export_dtype, export_dtype)
        raise BuildError(f"--precision {precision} does not match this {export_dtype} export: TensorRT networks are "
                         f"strongly typed, so the engine's precision is the ONNX graph's; {redo}, or build with "
                         f"--precision {have}")


def _progress_monitor(trt, progress):
    """A TensorRT IProgressMonitor (10.0+) that shows the builder's top phases as rich progress bars."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None or progress is None:
        return None

    class Monitor(base):
        def __init__(self):
            base.__init__(self)
            self.tasks, self.depth = {}, {}

        # each callback suppresses its errors: never let the display break a build
        def phase_start(self, phase_name, parent_phase, num_steps):
            with contextlib.suppress(Exception):
                depth = 0 if not parent_phase else self.depth.get(parent_phase, 0) + 1
                self.depth[phase_name] = depth
                if depth <= 1:
                    label = ("  " * depth) + phase_name
                    self.tasks[phase_name] = progress.add_task(label, total=max(int(num_steps), 1))

        def step_complete(self, phase_name, step):
            with contextlib.suppress(Exception):
                task = self.tasks.get(phase_name)
                if task is not None:
                    progress.update(task, completed=int(step) + 1)
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            with contextlib.suppress(Exception):
                task = self.tasks.pop(phase_name, None)
                if task is not None:
                    progress.remove_task(task)
                self.depth.pop(phase_name, None)

    return Monitor()


def _parse(trt, builder, logger, onnx_path: Path):
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:
        flags |= 1 << int(strongly_typed)  # required on 10.x, implied (and accepted) on 11.x
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # from the file, not from bytes: the parser then finds model.onnx.data next to it
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)).strip().replace("\n", " ") for i in range(parser.num_errors)]
        raise BuildError(f"TensorRT's ONNX parser rejected {onnx_path.name}: " + ("; ".join(errors[:3]) or "no detail"))
    return network, parser, strongly_typed is not None


def build_engine(directory: str | Path, precision: str = "fp16", max_batch: int = 8, max_seq: int = 1024,
                 opt_batch: int = 1, timing_cache: str | Path | None = None, workspace_gib: float = 4.0,
                 opt_seq: int | None = None, progress: bool = True) -> dict:
    """Build `engine.plan` in `directory`, record it in the manifest's `engines` list and return that entry."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from gptx.export.progress import Steps
    from gptx.export.trt_support import check_graph

    directory = Path(directory).expanduser().resolve()
    manifest = load_manifest(directory)
    # everything the user can get wrong is checked before TensorRT is even imported
    check_precision(manifest, precision)
    profiles = profiles_from_manifest(manifest, max_batch, max_seq, opt_batch, opt_seq)
    if not workspace_gib or workspace_gib <= 0:
        raise InvalidInput(f"--workspace must be a positive number of GiB, got {workspace_gib!r}")
    onnx_path = directory / manifest["model_file"]
    problems = check_graph(onnx_path)
    if problems:
        raise BuildError(f"{onnx_path.name} cannot be built with TensorRT: " + "; ".join(problems))
    trt, (gpu_name, cc) = require_tensorrt()

    console = Console(stderr=True)
    timing_path = Path(timing_cache).expanduser() if timing_cache else None
    start = time.perf_counter()
    steps = Steps(enabled=progress, console=console)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    with steps.step(f"parse {onnx_path.name}"):
        network, parser, strongly_typed = _parse(trt, builder, logger, onnx_path)
        names = {network.get_input(i).name for i in range(network.num_inputs)}
        expected = {spec["name"] for spec in manifest["inputs"]}
        if names != expected:
            raise BuildError(f"the ONNX inputs {sorted(names)} do not match the manifest's {sorted(expected)}; "
                             f"re-export the model")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if not strongly_typed and precision == "fp16":  # a TensorRT without STRONGLY_TYPED
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        # TF32 (on by default) has a 10-bit mantissa: fp32 engines are held to fp32 tolerances by `gptx verify`
        with contextlib.suppress(Exception):
            config.clear_flag(trt.BuilderFlag.TF32)
    for prof in profiles:
        p = builder.create_optimization_profile()
        for name, s in prof["shapes"].items():
            p.set_shape(name, s["min"], s["opt"], s["max"])
        index = config.add_optimization_profile(p)
        if index != prof["index"]:
            raise BuildError(f"TensorRT put the {prof['name']} profile at index {index}, expected {prof['index']}")
    cache = None
    if timing_path is not None:
        data = timing_path.read_bytes() if timing_path.is_file() else b""
        try:
            cache = config.create_timing_cache(data)
            reused = cache is not None and config.set_timing_cache(cache, False)  # (cache, ignore_mismatch)
        except Exception:  # noqa: BLE001 - a corrupt cache file must not stop the build
            reused = False
        if not reused:
            if data:
                console.print(f"[yellow]![/yellow] timing cache {timing_path} is from another TensorRT/GPU or "
                              f"corrupt: starting a new one", highlight=False)
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, False)

    bars = None
    if progress and console.is_terminal:
        bars = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                        console=console, transient=True)
    monitor = _progress_monitor(trt, bars)
    if monitor is not None:
        config.progress_monitor = monitor
    title = f"build engine ({precision}, batch <= {max_batch}, sequence <= {max_seq}; this takes minutes)"
    if bars is not None:  # TensorRT's own phases as progress bars (one live display: not inside a step)
        t0 = time.perf_counter()
        with bars:
            bars.add_task(title, total=None)
            plan = builder.build_serialized_network(network, config)
        if plan is not None:
            console.print(f"[green]✓[/green] {title} [dim]({time.perf_counter() - t0:.1f}s)[/dim]")
    else:
        with steps.step(title):
            plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError("TensorRT failed to build the engine (see the TensorRT messages above)")
    seconds = time.perf_counter() - start
    with steps.step(f"write {ENGINE_FILE}"):
        if timing_path is not None:
            serialized = config.get_timing_cache().serialize()
            timing_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(timing_path, memoryview(serialized))
        entry = engine_entry(
            ENGINE_FILE, trt.__version__, gpu_name, cc, precision, profiles, max_batch, max_seq, seconds,
            opt_batch=opt_batch, workspace_gib=workspace_gib, engine_bytes=memoryview(plan).nbytes,
            model_file=manifest["model_file"], strongly_typed=strongly_typed,
        )
        save_engine(directory, memoryview(plan), entry)
    del cache, parser  # the parser must outlive the network until the build is done
    return entry
