"""`gptx`: export GPT-2 models to ONNX / TensorRT, verify them against PyTorch, generate, benchmark, train, serve.

Each command is a thin layer over a library function. Heavy imports (torch, onnx) happen inside the commands:
`--help` is instant and the runtime-only install (no PyTorch) runs `info`, `generate` and `bench`.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

try:  # typer >= 0.26 vendors click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - older typer on top of click
    from click.exceptions import ClickException, NoArgsIsHelpError

from gptx.runtime.backends import BACKENDS
from gptx.runtime.errors import GptxError, InvalidInput
from gptx.runtime.manifest import ENGINE_PRECISIONS, EXPORT_DTYPES, QUANT_SCHEMES

REPORT_BUG = ("this is a bug in gptx, not in your input: please report it (issue tracker of the gptx repository) "
              "with the command you ran and the traceback above")
# optional modules -> the extra that installs them (what a command without them should tell the user)
EXTRAS = {"torch": "torch", "onnx": "torch", "safetensors": "torch", "huggingface_hub": "torch",
          "tensorrt": "tensorrt", "matplotlib": "plot", "tensorboard": "monitor", "transformers": "compare"}


class OneLineErrors(TyperGroup):
    """Parser errors as one line (exit 1) instead of a usage panel; unexpected exceptions keep their traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode: bool = True, **extra):
        rv = 1  # what each failure below exits with
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError:  # typer already printed the help
            rv = 0
        except ClickException as e:
            command = getattr(getattr(e, "ctx", None), "command_path", "gptx")
            err.print(f"[bold red]error:[/bold red] {escape(e.format_message())} (see `{escape(command)} --help`)",
                      highlight=False, soft_wrap=True)
        except typer.Abort:
            err.print("[bold red]aborted[/bold red]")
        except Exception:  # noqa: BLE001 - the last resort: a bug, shown in full and reported
            traceback.print_exc()
            err.print(f"[bold red]error:[/bold red] {REPORT_BUG}", highlight=False, soft_wrap=True)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    help="gptx: GPT-2 from PyTorch to fast, verified inference (ONNX Runtime, TensorRT, PyTorch).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(emoji=False)  # emoji off: ':x:' in a prompt, path or manifest stays ':x:'
err = Console(stderr=True, emoji=False)


def above_zero(upper: float | None = None):
    """A parser for floats in (0, upper]: typer's min/max are closed ranges."""

    def parse(text) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise typer.BadParameter(f"{text!r} is not a number") from None
        if not (0 < value and (upper is None or value <= upper)):
            raise typer.BadParameter(f"{value:g} is not in (0, {upper:g}]" if upper else f"{value:g} is not > 0")
        return value

    return parse


# Choices come from the tables the library checks against, so the parser rejects a typo before any work.
Backend = Enum("Backend", {name: name for name in ("auto", *BACKENDS)}, type=str)
Compare = Enum("Compare", {name: name for name in ("none", "auto", *BACKENDS)}, type=str)
Device = Enum("Device", {"cpu": "cpu", "cuda": "cuda"}, type=str)
DType = Enum("DType", {name: name for name in EXPORT_DTYPES}, type=str)
Quantize = Enum("Quantize", {name: name for name in QUANT_SCHEMES}, type=str)
Precision = Enum("Precision", {name: name for name in ENGINE_PRECISIONS}, type=str)

ExportDir = Annotated[Path, typer.Argument(help="A `gptx export` output directory.")]
BackendOpt = Annotated[Backend, typer.Option(help="Engine to run (auto: TensorRT engine on CUDA if built, else "
                                                  "ONNX Runtime, else PyTorch).")]
DeviceOpt = Annotated[Device, typer.Option(help="cpu or cuda.")]
JsonOut = Annotated[Path | None, typer.Option("--json", help="Also write the results here as JSON.")]
TopP = Annotated[float | None, typer.Option(parser=above_zero(upper=1.0), metavar="FLOAT",
                                            help="Nucleus sampling mass in (0, 1].")]


# ---------------------------------------------------------------------------------------------- shared helpers
def fail(message: str, code: int = 1):
    err.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def say(text: str) -> None:
    """Print text that may hold user or file content: no markup, no emoji, no highlighting."""
    out.print(text, markup=False, highlight=False, soft_wrap=True)


def command(fn):
    """Register a subcommand. GptxError -> one red line, exit 1; a missing optional package -> which extra to
    install; Ctrl-C / SIGTERM -> unwind (cleanups run), exit 130 / 143. Everything else propagates as a bug."""
    from gptx.runtime.signals import Terminated, terminate_as_interrupt

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with terminate_as_interrupt():
                return fn(*args, **kwargs)
        except GptxError as e:
            fail(str(e))
        except ModuleNotFoundError as e:
            root = (e.name or "").split(".")[0]
            if root not in EXTRAS:
                raise
            fail(f"`gptx {fn.__name__}` needs {root}, which is not installed: pip install 'gptx[{EXTRAS[root]}]'")
        except Terminated:
            fail("terminated", 143)
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return app.command()(wrapper)


def writable(path: Path | None, option: str) -> Path | None:
    """Check an output file option before the work starts (not a directory, not /dev/full, parent exists)."""
    from gptx.runtime.files import check_writable_file

    return None if path is None else check_writable_file(path, option)


def write_json(path: Path | None, data: dict) -> None:
    from gptx.runtime.files import atomic_write

    if path is not None:
        atomic_write(path, json.dumps(data, indent=2) + "\n")
        say(f"wrote {path}")


def int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InvalidInput(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise InvalidInput(f"{name} must be positive integers, got {text!r}")
    return values


def unescape(text: str) -> str:
    """`\\n`, `\\t`, `\\r` and `\\\\` typed on a command line become the characters (other backslashes stay)."""
    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r"}.get(m.group(1), "\\"), text)


def print_summary(directory: Path, manifest: dict) -> None:
    cfg = manifest["config"]
    size = sum(f.stat().st_size for f in Path(directory).iterdir() if f.is_file())
    t = Table(show_header=False, box=None, padding=(0, 2))

    def row(key: str, value) -> None:
        t.add_row(key, Text(str(value)))  # Text: values may hold any text, never markup

    row("directory", directory)
    row("source", manifest.get("source"))
    row("model", f"{cfg['n_layer']} layers, {cfg['n_head']} heads, {cfg['n_embd']} wide, "
                 f"context {cfg['block_size']}, vocab {cfg['vocab_size']}")
    row("dtype / opset", f"{manifest['dtype']} / {manifest.get('opset')}")
    # the free-form keys below are shown only when they have the shape gptx writes (the manifest is untrusted)
    if isinstance(manifest.get("optimizations"), list) and manifest["optimizations"]:
        row("optimizations", ", ".join(map(str, manifest["optimizations"])))
    if isinstance(manifest.get("quantization"), dict):
        q = manifest["quantization"]
        row("quantization", f"{q.get('method')} ({q.get('bits')}-bit weights)")
    v = manifest.get("validation")
    if isinstance(v, dict) and all(isinstance(v.get(k), (int, float)) for k in ("max_abs_diff", "top1_agreement")):
        row("validation", f"max |diff| {v['max_abs_diff']:.2e}, top-1 {v['top1_agreement']:.3f}, "
                          f"greedy identical: {v.get('greedy_identical')}")
    for engine in manifest.get("engines", []):
        row("engine", f"{engine.get('file')} ({engine.get('precision')}, TensorRT {engine.get('tensorrt_version')}, "
                      f"{engine.get('gpu_name')})")
    row("size on disk", f"{size / 2**20:.1f} MiB")
    out.print(t)


# ---------------------------------------------------------------------------------------------- commands
@command
def export(
    model: Annotated[str, typer.Argument(help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl | shakespeare | a local HF "
                                         "GPT-2 directory | a nanoGPT checkpoint .pt | random:<size> (random "
                                         "weights)")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Directory to write (model.onnx, weights, tokenizer, "
                                          "manifest.json): new, empty, or (with --force) an earlier gptx export.")],
    dtype: Annotated[DType, typer.Option(
        help="fp32 (CPU and GPU) or fp16 (GPU; LayerNorm, softmax and logits stay fp32).")] = DType.fp32,
    opset: Annotated[int, typer.Option(min=14, max=20, help="ONNX opset.")] = 17,
    seed: Annotated[int, typer.Option(min=0, help="Seed for random:<size> weights.")] = 0,
    optimize: Annotated[bool, typer.Option(
        "--optimize/--no-optimize", help="Apply ONNX Runtime graph fusions and save the optimized graph.")] = False,
    quantize: Annotated[Quantize | None, typer.Option(help=(
        "Quantize every matrix, LM head included. int8: 8-bit weights (MatMulNBits, closest to fp32); int8-dynamic: "
        "int8 weights and activations (MatMulInteger, fastest 8-bit); int4: 4-bit weights, the first layer as "
        "dynamic int8, the LM head's 64 best logits recomputed in fp32."))] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it holds only an earlier export.")] = False,
    validate: Annotated[bool, typer.Option("--validate/--no-validate", help="Check the graph against PyTorch.")] = True,
):
    """Export a GPT-2 model to ONNX with KV-cache inputs (one graph for prefill and decode)."""
    from gptx.export.convert import export as run_export

    manifest = run_export(model, out_dir, dtype=dtype.value, opset=opset, seed=seed, optimize=optimize,
                          quantize=quantize.value if quantize else None, force=force, validate=validate)
    print_summary(out_dir, manifest)


@command
def info(directory: ExportDir,
         as_json: Annotated[bool, typer.Option("--json", help="Print the raw manifest as JSON.")] = False):
    """Describe an export directory and check its files against the sha256 sums in its manifest."""
    from gptx.runtime.errors import ManifestError
    from gptx.runtime.manifest import check_files, load_manifest

    manifest = load_manifest(directory)
    problems = check_files(manifest, directory, hashes=True)
    if problems:
        raise ManifestError(f"{directory} does not match its manifest: {'; '.join(problems)} "
                            "(the export is damaged or was modified; re-export it)")
    if as_json:
        say(json.dumps(manifest, indent=2))
        return
    print_summary(directory, manifest)
    versions = manifest.get("versions") if isinstance(manifest.get("versions"), dict) else {}
    say(f"exported {manifest.get('exported_at')} with " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    for key, specs, shown in (("inputs: ", manifest["inputs"], 4), ("outputs:", manifest["outputs"], 3)):
        say(f"{key} " + ", ".join(f"{s['name']}{list(s['shape'])}:{s['dtype']}" for s in specs[:shown]) +
            (f", … ({len(specs)} in all)" if len(specs) > shown else ""))
    files = manifest.get("files") or {}
    say(f"files:   OK (size and sha256 of {len(files)} files match the manifest)" if files else
        "files:   not verified: this export records no checksums (made by an older gptx; re-export it)")


@command
def generate(
    directory: ExportDir,
    prompt: Annotated[str, typer.Argument(help="Prompt text (empty: start from <|endoftext|>).")] = "",
    max_new_tokens: Annotated[int | None, typer.Option(
        "--max-new-tokens", "-n", min=0, help="Tokens to generate (default 64).")] = None,
    max_length: Annotated[int | None, typer.Option(
        min=1, help="Stop when prompt + generated tokens reach this length (instead of -n).")] = None,
    temperature: Annotated[float, typer.Option(min=0, help="0 = greedy.")] = 0.8,
    top_k: Annotated[int, typer.Option(min=0, help="Keep the k most likely tokens (0 = off).")] = 40,
    top_p: TopP = None,
    repetition_penalty: Annotated[float, typer.Option(parser=above_zero(), metavar="FLOAT",
                                                      help="> 1 discourages repeats.")] = 1.0,
    seed: Annotated[int | None, typer.Option(min=0, help="Seed for reproducible sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option(
        help="Stop when this text appears (repeatable). Escapes \\n, \\t, \\r and \\\\ are understood, "
             "so --stop '\\n' stops at the end of a line.")] = None,
    backend: BackendOpt = Backend.auto,
    device: DeviceOpt = Device.cpu,
    verify_weights: Annotated[bool, typer.Option(
        "--verify-weights", help="Check the weights' sha256 against the manifest before loading.")] = False,
):
    """Generate text, streaming it to the terminal as tokens arrive."""
    import gptx.runtime

    if max_new_tokens is not None and max_length is not None:
        raise InvalidInput("give --max-new-tokens (-n) or --max-length, not both")
    engine = gptx.runtime.load(directory, backend=backend.value, device=device.value, verify_weights=verify_weights)
    pieces = engine.stream(prompt, max_new_tokens, max_length=max_length, temperature=temperature, top_k=top_k,
                           top_p=top_p, repetition_penalty=repetition_penalty, seed=seed,
                           stop=[unescape(s) for s in stop or []])
    first = next(pieces, "")  # arguments are validated (and may fail) before anything is printed
    for piece in itertools.chain([prompt + first], pieces):
        print(piece, end="", flush=True)
    print()


@command
def verify(
    directory: ExportDir,
    backend: Annotated[Backend, typer.Option(help="Engine to check against PyTorch.")] = Backend.onnxruntime,
    device: DeviceOpt = Device.cpu,
    decode_steps: Annotated[int, typer.Option(min=1, help="Decode steps after each prefill.")] = 8,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes (mixed prompt lengths).")] = "1,2,3",
    ppl_tokens: Annotated[int, typer.Option(min=0, help="Tokens of sample text for perplexity (0 = skip).")] = 128,
    json_path: JsonOut = None,
):
    """Compare a backend with the PyTorch reference: logits, top-1 agreement, greedy tokens, perplexity."""
    from gptx.export.validate import compare

    writable(json_path, "--json")
    report = compare(directory, backend=backend.value, device=device.value, decode_steps=decode_steps,
                     batch_sizes=tuple(int_list(batch_sizes, "--batch-sizes")), ppl_tokens=ppl_tokens)
    t = Table("batch", "prompt lengths", "max |diff|", "top-1", "greedy identical",
              title=Text(f"verify {directory} ({report['backend']}, {report['dtype']})"))
    for c in report["cases"]:
        t.add_row(str(c["batch"]), str(c["prompt_lengths"]), f"{c['max_abs_diff']:.2e}", f"{c['top1_agreement']:.3f}",
                  "✓" if c["greedy_identical"] else "✗")
    out.print(t)
    if report.get("perplexity"):
        p = report["perplexity"]
        say(f"perplexity on {p['tokens']} tokens of sample text: reference {p['reference']:.3f}, "
            f"candidate {p['candidate']:.3f} (ratio {p['ratio']:.4f})")
    write_json(json_path, report)
    if not report["passed"]:
        out.print("[bold red]FAIL[/bold red]: " + escape("; ".join(report["failures"])))
        raise typer.Exit(1)
    out.print("[bold green]PASS[/bold green]")


@command
def build(
    directory: Annotated[Path, typer.Argument(help="A `gptx export` output directory (the engine is written here).")],
    precision: Annotated[Precision, typer.Option(
        help="TensorRT networks are strongly typed: use an fp16 export for fp16.")] = Precision.fp16,
    max_batch: Annotated[int, typer.Option(min=1, help="Largest batch the engine serves.")] = 8,
    max_seq: Annotated[int, typer.Option(min=1, help="Largest prompt + generated length.")] = 1024,
    opt_batch: Annotated[int, typer.Option(min=1, help="Batch size TensorRT tunes kernels for.")] = 1,
    timing_cache: Annotated[Path | None, typer.Option(help="Reusable timing cache file (read and updated).")] = None,
    workspace: Annotated[float, typer.Option(parser=above_zero(), metavar="FLOAT",
                                             help="Workspace memory pool limit, GiB.")] = 4.0,
):
    """Build a TensorRT engine (one engine, prefill + decode profiles) from an export. Needs a CUDA GPU and TensorRT."""
    from gptx.export.tensorrt_build import build_engine

    writable(timing_cache, "--timing-cache")
    entry = build_engine(directory, precision=precision.value, max_batch=max_batch, max_seq=max_seq,
                         opt_batch=opt_batch, timing_cache=timing_cache, workspace_gib=workspace)
    out.print(f"[green]✓[/green] engine {escape(str(entry['file']))} built in {entry['build_seconds']:.0f}s")


@command
def bench(
    directory: ExportDir,
    backend: BackendOpt = Backend.auto,
    device: DeviceOpt = Device.cpu,
    batch_size: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1",
    prompt_len: Annotated[str, typer.Option(help="Comma-separated prompt lengths.")] = "32",
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per run.")] = 128,
    runs: Annotated[int, typer.Option(help="Timed runs per configuration (median reported), after one warm-up.")] = 3,
    temperature: Annotated[float, typer.Option(min=0, help="0 = greedy; above 0, time sampling (seed 0) too.")] = 0.0,
    top_k: Annotated[int, typer.Option(min=0, help="Sample from the k most likely tokens (0 = off).")] = 0,
    top_p: TopP = None,
    compare: Annotated[Compare | None, typer.Option(
        help="Also run this backend (default: torch when installed; none to skip).")] = None,
    json_path: JsonOut = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG chart (needs matplotlib).")] = None,
):
    """Measure time to first token, prefill and decode tokens/s, per-token latency percentiles and peak memory."""
    from gptx.runtime.benchmark import run_bench_command
    from gptx.runtime.sampler import SamplingParams

    writable(json_path, "--json")
    writable(plot, "--plot")
    if temperature == 0 and (top_k or top_p is not None):
        raise InvalidInput("--top-k and --top-p need --temperature above 0 (0 is greedy)")
    sampling = SamplingParams(temperature, top_k or None, top_p, seed=0) if temperature > 0 else None
    report = run_bench_command(directory, backend.value, device.value, int_list(batch_size, "--batch-size"),
                               int_list(prompt_len, "--prompt-len"), new_tokens, runs, sampling=sampling,
                               compare=compare.value if compare else None, plot_path=plot, console=out)
    write_json(json_path, report)


def report_to_choices(value: str | None) -> str | None:
    """Check --report-to's comma-separated choices at parse time (usage error, exit 2, before any work)."""
    if value is None:
        return None  # the default: tensorboard when installed
    from gptx.train.monitoring import parse_report_to

    try:
        return ",".join(parse_report_to(value)) or "none"
    except InvalidInput as e:
        raise typer.BadParameter(str(e)) from None


@command
def train(
    data: Annotated[Path, typer.Argument(help="UTF-8 text file to train on (GPT-2 tokenizer).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where ckpt.pt and monitoring logs go.")] = Path("out"),
    n_layer: Annotated[int, typer.Option(help="Transformer blocks (new models only).")] = 4,
    n_head: Annotated[int, typer.Option(help="Attention heads (new models only).")] = 4,
    n_embd: Annotated[int, typer.Option(help="Embedding width (new models only).")] = 128,
    block_size: Annotated[int, typer.Option(help="Context length of the training windows.")] = 128,
    dropout: Annotated[float, typer.Option(help="Dropout probability in [0, 1).")] = 0.0,
    batch_size: Annotated[int, typer.Option(help="Windows per iteration.")] = 16,
    max_iters: Annotated[int, typer.Option(help="Last iteration (counted from the start when resuming).")] = 2000,
    learning_rate: Annotated[float, typer.Option(help="Peak AdamW learning rate (after warmup).")] = 1e-3,
    min_lr: Annotated[float, typer.Option(help="Learning rate at the end of the cosine decay.")] = 1e-4,
    warmup_iters: Annotated[int, typer.Option(help="Linear warmup iterations.")] = 100,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay on matrices and embeddings.")] = 0.1,
    grad_clip: Annotated[float, typer.Option(help="Clip the gradient norm to this (0 = off).")] = 1.0,
    eval_interval: Annotated[int, typer.Option(help="Validate and checkpoint every N iterations.")] = 200,
    eval_iters: Annotated[int, typer.Option(help="Batches per validation estimate.")] = 20,
    seed: Annotated[int, typer.Option(help="Seed for initialisation, batches and dropout.")] = 1337,
    resume: Annotated[bool, typer.Option("--resume", help="Continue exactly from OUT/ckpt.pt.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Start over even though OUT/ckpt.pt exists (it is "
                                                        "replaced at the first new checkpoint).")] = False,
    init_from: Annotated[str | None, typer.Option(help="Fine-tune from anything `export` accepts.")] = None,
    half_checkpoint: Annotated[bool, typer.Option(help="Store weights in fp16 (small shipped models).")] = False,
    report_to: Annotated[str | None, typer.Option(
        "--report-to", callback=report_to_choices, metavar="tensorboard,wandb,mlflow|none",
        help="Where to log losses, learning rate, tokens/s and the config (comma-separated). Default: tensorboard "
             "when installed. wandb runs offline in OUT/wandb; mlflow uses a local store. Needs gptx[monitor].")]
    = None,
    mlflow_uri: Annotated[str | None, typer.Option(
        help="MLflow tracking store: a file: or sqlite: URI (default sqlite:///OUT/mlflow.db).")] = None,
):
    """Train (or fine-tune) a GPT on a text file with AdamW, warmup + cosine LR, clipping and validation."""
    options = {**locals(), "data": str(data), "out_dir": str(out_dir)}  # the options are TrainConfig's fields
    from gptx.train.trainer import TrainConfig
    from gptx.train.trainer import train as run_train

    result = run_train(TrainConfig(**options))
    out.print(f"[green]✓[/green] {result['iter']} iterations; train loss {result['train_loss']:.4f}, "
              f"val loss {result['val_loss']:.4f}; checkpoint {result['checkpoint']}", highlight=False)
    for name, location in result["reports"].items():
        out.print(f"  {name}: {location}", highlight=False, soft_wrap=True)


@command
def serve(
    directory: ExportDir,
    host: Annotated[str, typer.Option(help="Address to bind. 0.0.0.0 exposes the server to your network: "
                                           "set --api-key then.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    max_batch: Annotated[int, typer.Option(min=1, help="Rows decoded together (continuous batching).")] = 8,
    max_queue: Annotated[int, typer.Option(min=1, help="Prompts that may wait for a row; more get 429. One request "
                                                       "may hold half of them (docs/serving.md).")] = 64,
    prefill_chunk: Annotated[int | None, typer.Option(min=1, help=(
        "Prompt tokens computed per step after the running rows' decode: long prompts arrive in chunks while "
        "streams flow (default: docs/serving.md)."))] = None,
    prefix_cache_mb: Annotated[float | None, typer.Option(min=0, help=(
        "MiB of host memory for computed prompt blocks that later prompts starting the same way reuse (shared "
        "system prompts); 0 turns it off."))] = None,
    max_tokens_limit: Annotated[int | None, typer.Option(
        min=1, help="Largest max_tokens a request may ask for (default: up to the model's context).")] = None,
    backend: BackendOpt = Backend.auto,
    device: DeviceOpt = Device.cpu,
    threads: Annotated[int | None, typer.Option(
        min=0, help="ONNX Runtime intra-op threads (default: onnxruntime's choice; per replica with --ray).")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="GPTX_API_KEY", show_envvar=True, help=(
        "Require `Authorization: Bearer KEY` on /v1/* (/health and /metrics stay open)."))] = None,
    model_name: Annotated[str | None, typer.Option(
        help="The model id clients send and /v1/models lists (default: the directory's name).")] = None,
    chat_template: Annotated[Path | None, typer.Option(help=(
        "JSON file overriding the chat transcript template (keys: system, user, assistant, generation_prompt, "
        "stop; see docs/serving.md)."))] = None,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="Larger request bodies get 413.")] = 1 << 20,
    shutdown_timeout: Annotated[float, typer.Option(
        min=0, help="On SIGTERM, seconds in-flight requests may take to finish (/health answers 503 meanwhile) "
                    "before they end with a shutting_down error.")] = 10.0,
    max_connections: Annotated[int, typer.Option(
        min=1, help="Open connections at most; past it a new connection gets 503 and is closed.")] = 512,
    header_timeout: Annotated[float, typer.Option(min=0.1, help=(
        "Seconds a request's headers may take to arrive (from the connection or its first byte)."))] = 10.0,
    body_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds a body may take after its headers.")] = 30.0,
    keep_alive_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds an idle connection stays open.")] = 5.0,
    ray: Annotated[bool, typer.Option("--ray", help="Deploy on Ray Serve: a local Ray, or --ray-address. "
                                                    "Needs gptx\\[ray].")] = False,
    replicas: Annotated[int, typer.Option(min=1, help="Ray: replicas, each with its own engine and pool.")] = 1,
    autoscale: Annotated[str | None, typer.Option(metavar="MIN:MAX", help=(
        "Ray: autoscale between MIN and MAX replicas (not --replicas), aiming at max-batch requests each."))] = None,
    ray_address: Annotated[str | None, typer.Option(help=(
        "Ray: join an existing cluster ('auto': the one running here, or ray://HOST:10001)."))] = None,
    replica_cpus: Annotated[float | None, typer.Option(min=0.01, help=(
        "Ray: CPUs per replica (default: this machine's cores / replicas on a local Ray, 1 on a cluster)."))] = None,
):
    """Serve an export over an OpenAI-compatible HTTP API (completions, chat, streaming, metrics)."""
    options = {**locals(), "backend": backend.value, "device": device.value}
    from gptx.runtime.server.command import run_serve

    run_serve(**options)


def main():
    app(prog_name="gptx")


if __name__ == "__main__":
    main()
