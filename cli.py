"""`gptx`: export GPT-2 models to ONNX / TensorRT, verify them against PyTorch, generate, benchmark, train.

Each command is a thin layer over a library function; errors the user can fix print one red line
and exit 1 (no traceback). Heavy imports (torch, onnx) happen inside the commands so `--help` is instant.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.console import Console

app = typer.Typer(
    help="gptx: GPT-2 from PyTorch to fast, verified inference (ONNX Runtime, TensorRT, PyTorch).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


class Backend(str, Enum):
    auto = "auto"
    onnxruntime = "onnxruntime"
    torch = "torch"
    tensorrt = "tensorrt"


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


def fail(message: str, code: int = 1):
    from rich.markup import escape

    err.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def guarded(fn):
    """Turn the errors a user can fix into one line + exit code 1; keep tracebacks for real bugs."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from runtime.errors import GptxError

        try:
            return fn(*args, **kwargs)
        except (GptxError, ValueError, FileNotFoundError, PermissionError) as e:
            fail(str(e))
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper


# ---------------------------------------------------------------------------------------------- export
@app.command()
@guarded
def export(
    model: str = typer.Argument(..., help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl | shakespeare | a local HF "
                                          "GPT-2 directory | a nanoGPT checkpoint .pt | random:<size> (random weights)"),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Directory to write (model.onnx, weights, tokenizer, manifest.json)."),
    dtype: str = typer.Option("fp32", help="fp32 (CPU and GPU) or fp16 (GPU; LayerNorm, softmax and logits stay fp32)."),
    opset: int = typer.Option(17, help="ONNX opset (14-20)."),
    seed: int = typer.Option(0, help="Seed for random:<size> weights."),
    optimize: bool = typer.Option(False, "--optimize/--no-optimize", help="Apply ONNX Runtime graph fusions and save the optimized graph."),
    quantize: Optional[str] = typer.Option(None, help="Weight-only quantization: int8 or int4 (MatMulNBits, LM head included)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it already exists."),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="Check the ONNX graph against PyTorch before finishing."),
):
    """Export a GPT-2 model to ONNX with KV-cache inputs (one graph for prefill and decode)."""
    from gpt_export.export import export as run_export

    manifest = run_export(model, out_dir, dtype=dtype, opset=opset, seed=seed, optimize=optimize, quantize=quantize,
                          force=force)
    print_summary(out_dir, manifest)


def print_summary(directory: Path, manifest: dict) -> None:
    from rich.table import Table

    cfg = manifest["config"]
    size = sum(f.stat().st_size for f in Path(directory).iterdir() if f.is_file())
    t = Table(show_header=False, box=None, padding=(0, 2))
    t.add_row("directory", str(directory))
    t.add_row("source", str(manifest.get("source")))
    t.add_row("model", f"{cfg['n_layer']} layers, {cfg['n_head']} heads, {cfg['n_embd']} wide, "
                       f"context {cfg['block_size']}, vocab {cfg['vocab_size']}")
    t.add_row("dtype / opset", f"{manifest['dtype']} / {manifest['opset']}")
    if manifest.get("optimizations"):
        t.add_row("optimizations", ", ".join(manifest["optimizations"]))
    if manifest.get("quantization"):
        q = manifest["quantization"]
        t.add_row("quantization", f"{q.get('method')} ({q.get('bits')}-bit weights)")
    if manifest.get("validation"):
        v = manifest["validation"]
        t.add_row("validation", f"max |diff| {v['max_abs_diff']:.2e}, top-1 {v['top1_agreement']:.3f}, "
                                f"greedy identical: {v['greedy_identical']}")
    for engine in manifest.get("engines", []):
        t.add_row("engine", f"{engine.get('file')} ({engine.get('precision')}, TensorRT {engine.get('tensorrt_version')}, "
                            f"{engine.get('gpu_name')})")
    t.add_row("size on disk", f"{size / 2**20:.1f} MiB")
    out.print(t)


# ---------------------------------------------------------------------------------------------- info
@app.command()
@guarded
def info(directory: Path = typer.Argument(..., help="A `gptx export` output directory."),
         as_json: bool = typer.Option(False, "--json", help="Print the raw manifest as JSON.")):
    """Describe an export directory (reads manifest.json; no model is loaded)."""
    from runtime.manifest import load_manifest

    manifest = load_manifest(directory)
    if as_json:
        out.print_json(data=manifest)
        return
    print_summary(directory, manifest)
    out.print(f"exported {manifest.get('exported_at')} with " +
              ", ".join(f"{k} {v}" for k, v in manifest.get("versions", {}).items()), highlight=False)
    out.print("inputs:  " + ", ".join(f"{i['name']}{list(i['shape'])}:{i['dtype']}" for i in manifest["inputs"][:4]) +
              (f", … ({len(manifest['inputs'])} in all)" if len(manifest["inputs"]) > 4 else ""), highlight=False)
    out.print("outputs: " + ", ".join(f"{o['name']}{list(o['shape'])}:{o['dtype']}" for o in manifest["outputs"][:3]) +
              (f", … ({len(manifest['outputs'])} in all)" if len(manifest["outputs"]) > 3 else ""), highlight=False)


# ---------------------------------------------------------------------------------------------- generate
@app.command()
@guarded
def generate(
    directory: Path = typer.Argument(..., help="A `gptx export` output directory."),
    prompt: str = typer.Argument("", help="Prompt text (empty: start from <|endoftext|>)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Tokens to generate."),
    temperature: float = typer.Option(0.8, help="0 = greedy."),
    top_k: Optional[int] = typer.Option(40, help="Keep the k most likely tokens (0 = off)."),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling mass in (0, 1]."),
    repetition_penalty: float = typer.Option(1.0, help="> 1 discourages repeats."),
    seed: Optional[int] = typer.Option(None, help="Seed for reproducible sampling."),
    stop: Optional[List[str]] = typer.Option(None, help="Stop when this text appears (repeatable)."),
    backend: Backend = typer.Option(Backend.auto, help="Engine to run."),
    device: Device = typer.Option(Device.cpu, help="cpu or cuda."),
):
    """Generate text, streaming it to the terminal as tokens arrive."""
    import runtime

    engine = runtime.load(directory, backend=backend.value, device=device.value)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    for piece in engine.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


# ---------------------------------------------------------------------------------------------- verify
def int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{name} must be positive integers, got {text!r}")
    return values


@app.command()
@guarded
def verify(
    directory: Path = typer.Argument(..., help="A `gptx export` output directory."),
    backend: Backend = typer.Option(Backend.onnxruntime, help="Engine to check against PyTorch."),
    device: Device = typer.Option(Device.cpu, help="cpu or cuda."),
    decode_steps: int = typer.Option(8, help="Decode steps after each prefill."),
    batch_sizes: str = typer.Option("1,2,3", help="Comma-separated batch sizes (prompts of different lengths)."),
    ppl_tokens: int = typer.Option(128, help="Tokens of sample text for the perplexity comparison (0 = skip)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the full report here."),
):
    """Compare a backend with the PyTorch reference: logits, top-1 agreement, greedy tokens, perplexity."""
    from rich.table import Table

    from gpt_export.validate import compare

    report = compare(directory, backend=backend.value, device=device.value,
                     batch_sizes=tuple(int_list(batch_sizes, "--batch-sizes")),
                     decode_steps=decode_steps, ppl_tokens=ppl_tokens)
    t = Table(title=f"verify {directory} ({report['backend']}, {report['dtype']})")
    for col in ("batch", "prompt lengths", "max |diff|", "top-1", "greedy identical"):
        t.add_column(col)
    for c in report["cases"]:
        t.add_row(str(c["batch"]), str(c["prompt_lengths"]), f"{c['max_abs_diff']:.2e}", f"{c['top1_agreement']:.3f}",
                  "✓" if c["greedy_identical"] else "✗")
    out.print(t)
    if report.get("perplexity"):
        p = report["perplexity"]
        out.print(f"perplexity on {p['tokens']} tokens of sample text: reference {p['reference']:.3f}, "
                  f"candidate {p['candidate']:.3f} (ratio {p['ratio']:.4f})")
    if json_path:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    if report["passed"]:
        out.print("[bold green]PASS[/bold green]")
    else:
        out.print("[bold red]FAIL[/bold red]: " + "; ".join(report["failures"]))
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------- build
@app.command()
@guarded
def build(
    directory: Path = typer.Argument(..., help="A `gptx export` output directory (the engine is written into it)."),
    precision: str = typer.Option("fp16", help="fp32 | fp16 | bf16. TensorRT 10+/11 networks are strongly typed: "
                                               "use an fp16 export for fp16."),
    max_batch: int = typer.Option(8, help="Largest batch the engine serves."),
    max_seq: int = typer.Option(1024, help="Largest prompt + generated length."),
    opt_batch: int = typer.Option(1, help="Batch size TensorRT tunes kernels for."),
    timing_cache: Optional[Path] = typer.Option(None, help="Reusable timing cache file (read and updated)."),
    workspace: float = typer.Option(4.0, help="Workspace memory pool limit, GiB."),
):
    """Build a TensorRT engine (one engine, prefill + decode profiles) from an export. Needs a CUDA GPU and TensorRT."""
    from gpt_export.tensorrt_build import build_engine

    entry = build_engine(directory, precision=precision, max_batch=max_batch, max_seq=max_seq, opt_batch=opt_batch,
                         timing_cache=timing_cache, workspace_gib=workspace)
    out.print(f"[green]✓[/green] engine {entry['file']} built in {entry['build_seconds']:.0f}s")


# ---------------------------------------------------------------------------------------------- bench
@app.command()
@guarded
def bench(
    directory: Path = typer.Argument(..., help="A `gptx export` output directory."),
    backend: Backend = typer.Option(Backend.auto, help="Engine to benchmark."),
    device: Device = typer.Option(Device.cpu, help="cpu or cuda."),
    batch_size: str = typer.Option("1", "--batch-size", help="Comma-separated batch sizes."),
    prompt_len: str = typer.Option("32", "--prompt-len", help="Comma-separated prompt lengths."),
    new_tokens: int = typer.Option(128, help="Tokens generated per run (greedy)."),
    runs: int = typer.Option(3, help="Timed runs per configuration (median reported), after one warm-up."),
    compare: Optional[str] = typer.Option(None, help="Also run this backend (default: torch when installed; 'none' to skip)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write results as JSON."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG chart (needs matplotlib)."),
):
    """Measure time to first token, prefill and decode tokens/s, per-token latency percentiles and peak memory."""
    from runtime.benchmark import run_bench_command

    run_bench_command(directory, backend=backend.value, device=device.value,
                      batch_sizes=int_list(batch_size, "--batch-size"), prompt_lens=int_list(prompt_len, "--prompt-len"),
                      new_tokens=new_tokens, runs=runs, compare=compare, json_path=json_path, plot_path=plot,
                      console=out)


# ---------------------------------------------------------------------------------------------- train
def report_to_choices(value: str | None) -> str | None:
    """Check --report-to's comma-separated choices at parse time (usage error, exit 2, before any work)."""
    if value is None:
        return None  # the default: tensorboard when installed
    from gpt_export.monitoring import parse_report_to
    from runtime.errors import InvalidInput

    try:
        return ",".join(parse_report_to(value)) or "none"
    except InvalidInput as e:
        raise typer.BadParameter(str(e)) from None


@app.command()
@guarded
def train(
    data: Annotated[Path, typer.Argument(help="UTF-8 text file to train on (GPT-2 tokenizer).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint directory (ckpt.pt and monitoring logs).")]
    = Path("out"),
    n_layer: Annotated[int, typer.Option(help="Transformer blocks (new models only).")] = 4,
    n_head: Annotated[int, typer.Option(help="Attention heads (new models only).")] = 4,
    n_embd: Annotated[int, typer.Option(help="Embedding width (new models only).")] = 128,
    block_size: Annotated[int, typer.Option(help="Context length of the training windows.")] = 128,
    dropout: Annotated[float, typer.Option(help="Dropout probability in [0, 1).")] = 0.0,
    batch_size: Annotated[int, typer.Option(help="Windows per iteration.")] = 16,
    max_iters: Annotated[int, typer.Option(help="Train until this iteration (counted from the start when resuming).")]
    = 2000,
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
    init_from: Annotated[str | None, typer.Option(help="Fine-tune from anything `export` accepts instead of "
                                                          "scratch.")] = None,
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
    from gpt_export.train import TrainConfig
    from gpt_export.train import train as run_train

    cfg = TrainConfig(data=str(data), out_dir=str(out_dir), n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                      block_size=block_size, dropout=dropout, batch_size=batch_size, max_iters=max_iters,
                      learning_rate=learning_rate, min_lr=min_lr, warmup_iters=warmup_iters,
                      weight_decay=weight_decay, grad_clip=grad_clip, eval_interval=eval_interval,
                      eval_iters=eval_iters, seed=seed, resume=resume, force=force, init_from=init_from,
                      half_checkpoint=half_checkpoint, report_to=report_to, mlflow_uri=mlflow_uri)
    result = run_train(cfg)
    out.print(f"[green]✓[/green] {result['iter']} iterations; train loss {result['train_loss']:.4f}, "
              f"val loss {result['val_loss']:.4f}; checkpoint {result['checkpoint']}", highlight=False)
    for name, location in result["reports"].items():
        out.print(f"  {name}: {location}", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------- serve
from runtime.server.command import serve  # noqa: E402  (the command lives with the server, runtime/server/)

app.command()(serve)


def main():
    app()


if __name__ == "__main__":
    main()
