"""Train (or fine-tune) a GPT on one text file, as nanoGPT's train.py does, in a plain function:

    result = train(TrainConfig(data="input.txt", out_dir="out", max_iters=2000))

GPT-2 BPE tokens split into train / val (the last `val_fraction`), random windows from a seeded generator, AdamW,
warmup + cosine learning rate, gradient clipping; every `eval_interval` iterations the losses and an atomic
`out_dir/ckpt.pt` (weights, optimizer, iteration, RNG states). `resume=True` continues it bit-exactly (same config,
`half_checkpoint=False`). An existing checkpoint is replaced only with `resume` or `force`, a non-finite loss stops
the run before it writes, and a checkpoint read back is untrusted (`weights_only=True`, every key checked).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from gptx.runtime.errors import ModelLoadError, TrainError

from gptx.model.gpt import GPT, GPTConfig
from gptx.train.monitoring import check_mlflow_uri, open_reporters, parse_report_to, require_installed
from gptx.model.weights import load_checkpoint, read_checkpoint, save_checkpoint

CKPT_NAME = "ckpt.pt"


@dataclass
class TrainConfig:
    data: str  # path to a UTF-8 text file
    out_dir: str = "out"
    # model (ignored when resuming or with init_from: the checkpoint decides)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    dropout: float = 0.0
    bias: bool = True
    # optimisation
    batch_size: int = 16
    max_iters: int = 2000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # None -> max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    # evaluation
    eval_interval: int = 200
    eval_iters: int = 20
    val_fraction: float = 0.1
    # system
    seed: int = 1337
    device: str = "cpu"
    resume: bool = False  # continue from out_dir/ckpt.pt exactly
    force: bool = False  # start over even though out_dir/ckpt.pt exists (it is replaced at the first checkpoint)
    init_from: str | None = None  # anything GPT.from_pretrained takes, to fine-tune instead of from scratch
    half_checkpoint: bool = False  # store weights as fp16 (for small shipped models)
    # monitoring: "tensorboard,wandb,mlflow" (any subset, or a list); None = tensorboard when installed; "none" = off
    report_to: str | Sequence[str] | None = None
    mlflow_uri: str | None = None  # a file: or sqlite: URI; None = sqlite:///<out_dir>/mlflow.db

    def check(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if field.type == "int" and (not isinstance(value, int) or isinstance(value, bool)):
                raise TrainError(f"{field.name} must be an integer, got {value!r}")
            if field.type == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                          or not math.isfinite(value)):
                raise TrainError(f"{field.name} must be a finite number, got {value!r}")
        for name in ("batch_size", "max_iters", "eval_interval", "eval_iters", "block_size"):
            if getattr(self, name) <= 0:
                raise TrainError(f"{name} must be positive, got {getattr(self, name)}")
        if self.warmup_iters < 0:
            raise TrainError(f"warmup_iters must be >= 0, got {self.warmup_iters}")
        if self.lr_decay_iters is not None and (not isinstance(self.lr_decay_iters, int) or self.lr_decay_iters < 0):
            raise TrainError(f"lr_decay_iters must be a non-negative integer or None, got {self.lr_decay_iters!r}")
        for name in ("val_fraction", "dropout", "beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise TrainError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.learning_rate <= 0 or self.min_lr < 0:
            raise TrainError("learning_rate must be > 0 and min_lr >= 0")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise TrainError("weight_decay and grad_clip must be >= 0")
        parse_report_to(self.report_to)
        if self.mlflow_uri is not None:
            check_mlflow_uri(self.mlflow_uri)


def get_lr(it: int, cfg: TrainConfig) -> float:
    """Linear warmup for warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    decay_iters = cfg.lr_decay_iters if cfg.lr_decay_iters is not None else cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters or decay_iters <= cfg.warmup_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / (decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def load_tokens(path: str | Path) -> torch.Tensor:
    """The whole file as a 1-D LongTensor of GPT-2 token ids."""
    from gptx.runtime.tokenizer import Tokenizer

    path = Path(path).expanduser()
    if not path.exists():
        raise TrainError(f"data file not found: {path}")
    if not path.is_file():
        raise TrainError(f"data must be a text file, {path} is a directory")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TrainError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return torch.tensor(Tokenizer().encode(text), dtype=torch.long)


def split_tokens(tokens: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Train = the first (1 - val_fraction) of the tokens, val = the rest; both must fit a block + 1."""
    n = len(tokens)
    n_val = int(n * cfg.val_fraction)
    need = cfg.block_size + 1
    train_data, val_data = tokens[: n - n_val], tokens[n - n_val:]
    if len(train_data) < need or (cfg.val_fraction > 0 and len(val_data) < need):
        least = max(2 * need, math.ceil(need / cfg.val_fraction)) if cfg.val_fraction > 0 else need
        raise TrainError(f"{cfg.data} is too short: {n} tokens, but block_size {cfg.block_size} with val_fraction "
                         f"{cfg.val_fraction} needs at least ~{least} (use more text or a smaller --block-size)")
    return train_data, val_data


def get_batch(data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator, device: str):
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([data[i: i + block_size] for i in ix.tolist()])
    y = torch.stack([data[i + 1: i + 1 + block_size] for i in ix.tolist()])
    return x.to(device), y.to(device)


def configure_optimizer(model: GPT, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on every parameter with dim >= 2 (matmuls, embeddings), none on biases and LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied wte/lm_head appears once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = torch.device(cfg.device).type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)


@torch.no_grad()
def estimate_loss(model: GPT, splits: dict[str, torch.Tensor], cfg: TrainConfig, block_size: int) -> dict[str, float]:
    """Mean loss over eval_iters fixed batches per split (own generator: the training RNGs are untouched)."""
    was_training = model.training
    model.eval()
    out = {}
    for i, (name, data) in enumerate(splits.items()):
        gen = torch.Generator().manual_seed(cfg.seed + 1 + i)
        batches = (get_batch(data, cfg.batch_size, block_size, gen, cfg.device) for _ in range(cfg.eval_iters))
        out[name] = sum(model(x, y)[1].item() for x, y in batches) / cfg.eval_iters
    model.train(was_training)
    return out


def build_model(cfg: TrainConfig, ckpt: dict | None) -> GPT:
    """The checkpoint's model (`weights.load_checkpoint` checks before it allocates) in fp32, refused if it holds NaN
    or inf (a diverged checkpoint must not be trained on); else `init_from`'s, else a new one."""
    if ckpt is not None:
        path = Path(cfg.out_dir).expanduser() / CKPT_NAME
        try:
            model = load_checkpoint(path, ckpt=ckpt)
        except ModelLoadError as e:
            raise TrainError(f"cannot resume from {path}: {e}") from None
        not_finite = [k for k, v in model.state_dict().items() if not torch.isfinite(v).all()]
        if not_finite:
            raise TrainError(f"cannot resume from {path}: its weights hold NaN or inf ({not_finite[0]})")
        return model.float()
    if cfg.init_from:
        model = GPT.from_pretrained(cfg.init_from, override_args={"dropout": cfg.dropout})
        if cfg.block_size < model.config.block_size:
            model.crop_block_size(cfg.block_size)
        return model
    # GPTConfig's default vocab_size: GPT-2's 50257 padded to a multiple of 64
    return GPT(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                         dropout=cfg.dropout, bias=cfg.bias))


# ckpt.pt is untrusted: every key is checked before anything is built from it; errors name keys and types, not values
RESUME_KEYS = {"model_args": dict, "model": dict, "optimizer": dict, "iter_num": int, "best_val_loss": float,
               "rng": dict}


def read_resume_checkpoint(path: Path) -> dict:
    """`weights.read_checkpoint` (the one untrusted-checkpoint reader), plus what resuming needs on top."""
    where = f"cannot resume from {path}"
    try:
        ckpt = read_checkpoint(path)
    except ModelLoadError as e:
        raise TrainError(f"{where}: {e}") from None
    if "optimizer" not in ckpt or "iter_num" not in ckpt:
        raise TrainError(f"{where}: it holds no optimizer state (an exported model?)")
    for key, kind in RESUME_KEYS.items():
        value = ckpt.get(key)
        fits = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
        if key not in ckpt or not fits or isinstance(value, bool):
            found = "missing" if key not in ckpt else f"a {type(value).__name__}"
            raise TrainError(f"{where}: '{key}' is {found}, expected {kind.__name__}")
    if ckpt["iter_num"] < 0:
        raise TrainError(f"{where}: 'iter_num' is negative")
    reference = {"torch": torch.get_rng_state(), "batch": torch.Generator().get_state()}
    for key, like in reference.items():
        state = ckpt["rng"].get(key)
        if not isinstance(state, torch.Tensor) or state.dtype != like.dtype or state.shape != like.shape:
            raise TrainError(f"{where}: 'rng.{key}' is not a CPU random-generator state")
    return ckpt


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict, where: str) -> None:
    """Refuse an optimizer state whose groups or moment shapes do not match the model, then load it."""
    groups, state = saved.get("param_groups"), saved.get("state")
    fits = (isinstance(groups, list) and isinstance(state, dict) and len(groups) == len(optimizer.param_groups)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) and len(g["params"]) == len(o["params"])
                    for g, o in zip(groups, optimizer.param_groups)))
    if fits:
        params = dict(zip((i for g in groups for i in g["params"]), (p for o in optimizer.param_groups
                                                                      for p in o["params"])))
        fits = all(i in params and isinstance(s, dict) and all(
            isinstance(s.get(m), torch.Tensor) and s[m].shape == params[i].shape for m in ("exp_avg", "exp_avg_sq"))
            for i, s in state.items())
    if not fits:
        raise TrainError(f"{where}: its optimizer state does not fit the model")
    optimizer.load_state_dict(saved)


def check_finite(model: GPT, losses: dict[str, float], iter_num: int, ckpt_path: Path) -> None:
    """Stop a diverged run before it writes a checkpoint: the one on disk (if any) keeps the last finite weights."""
    bad = [f"{k} loss {v}" for k, v in losses.items() if not math.isfinite(v)]
    bad += [f"weights of {n}" for n, p in model.named_parameters() if not torch.isfinite(p).all()][:1]
    if bad:
        kept = f"{ckpt_path} was left as it was" if ckpt_path.exists() else "no checkpoint was written"
        raise TrainError(f"training diverged at iteration {iter_num} ({bad[0]} is not finite); stopped, {kept}. "
                         "Try a lower --learning-rate")


def make_progress(enabled: bool, total: int, start: int):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]}  val {task.fields[val]}  lr {task.fields[lr]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled)
    task = progress.add_task("train", total=total, completed=start, loss="-", val="-", lr="-")
    return progress, task


def rng_states(batch_gen: torch.Generator, device: str) -> dict:
    """Everything random in the loop: dropout (torch's global RNG) and the batch sampler."""
    states = {"torch": torch.get_rng_state(), "batch": batch_gen.get_state()}
    if torch.device(device).type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return states


def train(cfg: TrainConfig, progress: bool = True, log=print, *, return_model: bool = False) -> dict:
    """Run the training loop; return {'iter', 'train_loss', 'val_loss', 'best_val_loss', 'checkpoint', 'history', ...}.
    `log` gets one line per evaluation; `return_model=True` adds the trained GPT under 'model'. Raises TrainError
    (nothing written) on bad input or a diverged run."""
    cfg.check()
    report_to = parse_report_to(cfg.report_to)
    require_installed(report_to)  # before any work: a missing extra is a one-line error, not a late crash
    out_dir = Path(cfg.out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainError(f"out_dir {out_dir} exists and is not a directory")
    ckpt_path = out_dir / CKPT_NAME
    if ckpt_path.exists() and not (cfg.resume or cfg.force):
        raise TrainError(f"{ckpt_path} already exists: pass --resume (resume=True) to continue it, or --force "
                         "(force=True) to train from scratch and replace it")
    ckpt = None
    if cfg.resume:
        if not ckpt_path.is_file():
            raise TrainError(f"cannot resume: no checkpoint at {ckpt_path} (train without --resume first)")
        ckpt = read_resume_checkpoint(ckpt_path)

    tokens = load_tokens(cfg.data)
    train_data, val_data = split_tokens(tokens, cfg)

    torch.manual_seed(cfg.seed)
    batch_gen = torch.Generator().manual_seed(cfg.seed)
    model = build_model(cfg, ckpt).to(cfg.device)
    block_size = min(cfg.block_size, model.config.block_size)
    if len(train_data) <= block_size:
        raise TrainError(f"{cfg.data} is too short: {len(tokens)} tokens for block_size {block_size}")
    model.train()
    optimizer = configure_optimizer(model, cfg)

    iter_num, best_val_loss = 0, float("inf")
    if ckpt is not None:
        load_optimizer_state(optimizer, ckpt["optimizer"], f"cannot resume from {ckpt_path}")
        iter_num, best_val_loss = ckpt["iter_num"], float(ckpt["best_val_loss"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        batch_gen.set_state(ckpt["rng"]["batch"])
        if "cuda" in ckpt["rng"] and torch.device(cfg.device).type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], torch.device(cfg.device))
        del ckpt
    splits = {"train": train_data, "val": val_data} if len(val_data) > block_size else {"train": train_data}

    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainError(f"cannot create out_dir {out_dir}: {e.strerror}") from None
    try:
        reporters = open_reporters(report_to, out_dir, mlflow_uri=cfg.mlflow_uri)
    except BaseException:
        if created and not any(out_dir.iterdir()):  # a failed start leaves no empty directory of ours behind
            out_dir.rmdir()
        raise
    reporters.log_config({**asdict(cfg), "report_to": ",".join(report_to), "model": model.config.to_dict(),
                          "n_params": model.get_num_params(non_embedding=False), "tokens": len(tokens)})
    bar, task = make_progress(progress, cfg.max_iters, iter_num)
    losses = {"train": float("nan"), "val": float("nan")}
    history = []
    last_loss, t0 = float("nan"), time.perf_counter()
    start_iter = iter_num
    interval_start, interval_iter = t0, iter_num  # tokens/s covers training steps only, not evaluation
    failed, saved = True, False
    try:
        with bar:
            while iter_num < cfg.max_iters:
                lr = get_lr(iter_num, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x, y = get_batch(train_data, cfg.batch_size, block_size, batch_gen, cfg.device)
                _, loss = model(x, y)
                last_loss = loss.item()
                if not math.isfinite(last_loss):
                    check_finite(model, {"train batch": last_loss}, iter_num + 1, ckpt_path)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                iter_num += 1
                reporters.log_metrics({"train/batch_loss": last_loss, "train/lr": lr}, iter_num)
                bar.update(task, completed=iter_num, loss=f"{last_loss:.3f}", lr=f"{lr:.1e}")

                if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
                    seconds = time.perf_counter() - interval_start
                    tokens_per_sec = (iter_num - interval_iter) * cfg.batch_size * block_size / max(seconds, 1e-9)
                    losses = estimate_loss(model, splits, cfg, block_size)
                    check_finite(model, losses, iter_num, ckpt_path)
                    losses.setdefault("val", float("nan"))
                    best_val_loss = min(best_val_loss, losses["val"])  # a NaN val loss (no val split) keeps it
                    history.append({"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                                    "lr": lr, "tokens_per_sec": tokens_per_sec})
                    reporters.log_metrics({"train/loss": losses["train"], "val/loss": losses["val"],
                                           "train/tokens_per_sec": tokens_per_sec}, iter_num)
                    bar.update(task, val=f"{losses['val']:.3f}")
                    log(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
                        f"lr {lr:.2e}, {tokens_per_sec:,.0f} tokens/s")
                    save_checkpoint(model, ckpt_path, half=cfg.half_checkpoint, optimizer=optimizer.state_dict(),
                                    iter_num=iter_num, best_val_loss=best_val_loss, train_config=asdict(cfg),
                                    rng=rng_states(batch_gen, cfg.device))
                    saved = True
                    interval_start, interval_iter = time.perf_counter(), iter_num
            if iter_num == start_iter:  # resumed at or past max_iters: nothing to train, still report losses
                losses = estimate_loss(model, splits, cfg, block_size)
                losses.setdefault("val", float("nan"))
        if saved:
            reporters.log_artifact(ckpt_path, "ckpt")
        failed = False
    finally:
        reporters.close(failed=failed)
    result = {"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
              "best_val_loss": best_val_loss, "last_batch_loss": last_loss, "checkpoint": str(ckpt_path),
              "tokens": len(tokens), "tokens_seen": (iter_num - start_iter) * cfg.batch_size * block_size,
              "seconds": time.perf_counter() - t0, "history": history, "reports": reporters.locations}
    return {**result, "model": model} if return_model else result
