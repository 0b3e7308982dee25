"""Train (or fine-tune) a GPT on one text file: nanoGPT's train.py habits in a plain function.

    from gpt_export.train import TrainConfig, train
    result = train(TrainConfig(data="input.txt", out_dir="out", max_iters=2000))

What it does, in order: tokenize the file with the GPT-2 BPE, split it into train / val (the last
`val_fraction` of the tokens is validation), then loop: random (B, block_size) windows from a seeded
generator, AdamW (weight decay on matrices only), linear warmup + cosine decay of the learning rate,
gradient clipping. Every `eval_interval` iterations (and at the end) it estimates train and val loss on
fixed batches and writes `out_dir/ckpt.pt` atomically: weights, optimizer state, iteration, RNG states.

`resume=True` continues from that checkpoint exactly: k iterations + resume to N gives bit-identical
weights to N iterations straight (keep the same config, in particular `lr_decay_iters`, since it
defaults to `max_iters`; and keep `half_checkpoint=False`, fp16 weights cannot resume exactly).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from runtime.errors import TrainError

from .model import GPT, GPTConfig
from .weights import save_checkpoint

CKPT_NAME = "ckpt.pt"
PADDED_VOCAB = 50304  # GPT-2's 50257 rounded up to a multiple of 64


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
    init_from: str | None = None  # anything GPT.from_pretrained takes, to fine-tune instead of from scratch
    tensorboard: bool = True  # scalars to out_dir/tb when tensorboard is importable, silently skipped otherwise
    half_checkpoint: bool = False  # store weights as fp16 (for small shipped models)

    def check(self) -> None:
        for name in ("batch_size", "max_iters", "eval_interval", "eval_iters", "block_size"):
            if getattr(self, name) <= 0:
                raise TrainError(f"{name} must be positive, got {getattr(self, name)}")
        if self.warmup_iters < 0:
            raise TrainError(f"warmup_iters must be >= 0, got {self.warmup_iters}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise TrainError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.dropout < 1.0:
            raise TrainError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.learning_rate <= 0 or self.min_lr < 0:
            raise TrainError("learning_rate must be > 0 and min_lr >= 0")


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
    from runtime.tokenizer import Tokenizer

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
    total_need = need * (2 if cfg.val_fraction > 0 else 1)
    train_data, val_data = tokens[: n - n_val], tokens[n - n_val:]
    if len(train_data) < need or (cfg.val_fraction > 0 and len(val_data) < need):
        hint = f"at least ~{max(total_need, math.ceil(need / cfg.val_fraction)) if cfg.val_fraction > 0 else need}"
        raise TrainError(
            f"{cfg.data} is too short: {n} tokens, but block_size {cfg.block_size} with val_fraction "
            f"{cfg.val_fraction} needs {hint} (use more text or a smaller --block-size)"
        )
    return train_data, val_data


def get_batch(data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator, device: str):
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([data[i: i + block_size] for i in ix.tolist()])
    y = torch.stack([data[i + 1: i + 1 + block_size] for i in ix.tolist()])
    return x.to(device), y.to(device)


def configure_optimizer(model: GPT, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on every parameter with dim >= 2 (matmuls, embeddings), none on biases and LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied wte/lm_head appears once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
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
        losses = [
            model(*get_batch(data, cfg.batch_size, block_size, gen, cfg.device))[1].item()
            for _ in range(cfg.eval_iters)
        ]
        out[name] = sum(losses) / len(losses)
    model.train(was_training)
    return out


def build_model(cfg: TrainConfig, ckpt: dict | None) -> GPT:
    if ckpt is not None:
        model = GPT(GPTConfig.from_dict(ckpt["model_args"]))
        state = dict(ckpt["model"])
        state.setdefault("lm_head.weight", state["transformer.wte.weight"])
        model.load_state_dict({k: v.float() for k, v in state.items()})
        return model
    if cfg.init_from:
        model = GPT.from_pretrained(cfg.init_from, override_args={"dropout": cfg.dropout})
        if cfg.block_size < model.config.block_size:
            model.crop_block_size(cfg.block_size)
        return model
    return GPT(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                         dropout=cfg.dropout, bias=cfg.bias, vocab_size=PADDED_VOCAB))


def open_tensorboard(cfg: TrainConfig, out_dir: Path):
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: silently skip
        return None
    return SummaryWriter(log_dir=str(out_dir / "tb"))


def make_progress(enabled: bool, total: int, start: int):
    if not enabled:
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  val {task.fields[val]}  lr {task.fields[lr]}"),
        TimeElapsedColumn(), TimeRemainingColumn(),
    )
    task = progress.add_task("train", total=total, completed=start, loss="-", val="-", lr="-")
    return progress, task


def rng_states(batch_gen: torch.Generator, device: str) -> dict:
    """Everything random in the loop: dropout (torch's global RNG) and the batch sampler."""
    states = {"torch": torch.get_rng_state(), "batch": batch_gen.get_state()}
    if torch.device(device).type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return states


def train(cfg: TrainConfig, progress: bool = True, log=print, *, return_model: bool = False) -> dict:
    """Run the training loop; return {'iter', 'train_loss', 'val_loss', 'best_val_loss', 'checkpoint', 'tokens', ...}.

    `log` gets one line per evaluation; `return_model=True` adds the trained in-memory GPT under 'model'.
    """
    cfg.check()
    out_dir = Path(cfg.out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainError(f"out_dir {out_dir} exists and is not a directory")
    ckpt_path = out_dir / CKPT_NAME
    ckpt = None
    if cfg.resume:
        if not ckpt_path.is_file():
            raise TrainError(f"cannot resume: no checkpoint at {ckpt_path} (train without --resume first)")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if "optimizer" not in ckpt or "iter_num" not in ckpt:
            raise TrainError(f"cannot resume from {ckpt_path}: it holds no optimizer state (an exported model?)")

    tokens = load_tokens(cfg.data)
    train_data, val_data = split_tokens(tokens, cfg)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainError(f"cannot create out_dir {out_dir}: {e.strerror}") from None

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
        optimizer.load_state_dict(ckpt["optimizer"])
        iter_num, best_val_loss = int(ckpt["iter_num"]), float(ckpt["best_val_loss"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        batch_gen.set_state(ckpt["rng"]["batch"])
        if "cuda" in ckpt["rng"] and torch.device(cfg.device).type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], torch.device(cfg.device))
        del ckpt
    splits = {"train": train_data, "val": val_data} if len(val_data) > block_size else {"train": train_data}

    writer = open_tensorboard(cfg, out_dir)
    bar, task = make_progress(progress, cfg.max_iters, iter_num)
    losses = {"train": float("nan"), "val": float("nan")}
    last_loss, t0 = float("nan"), time.perf_counter()
    start_iter = iter_num
    try:
        with bar if bar is not None else nullcontext():
            while iter_num < cfg.max_iters:
                lr = get_lr(iter_num, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x, y = get_batch(train_data, cfg.batch_size, block_size, batch_gen, cfg.device)
                _, loss = model(x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                iter_num += 1
                last_loss = loss.item()
                if writer is not None:
                    writer.add_scalar("train/loss", last_loss, iter_num)
                    writer.add_scalar("lr", lr, iter_num)
                if bar is not None:
                    bar.update(task, completed=iter_num, loss=f"{last_loss:.3f}", lr=f"{lr:.1e}")

                if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
                    losses = estimate_loss(model, splits, cfg, block_size)
                    losses.setdefault("val", float("nan"))
                    if losses["val"] < best_val_loss:
                        best_val_loss = losses["val"]
                    if writer is not None:
                        writer.add_scalar("val/loss", losses["val"], iter_num)
                        writer.flush()
                    if bar is not None:
                        bar.update(task, val=f"{losses['val']:.3f}")
                    log(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, lr {lr:.2e}")
                    save_checkpoint(
                        model, ckpt_path, half=cfg.half_checkpoint,
                        optimizer=optimizer.state_dict(), iter_num=iter_num, best_val_loss=best_val_loss,
                        train_config=asdict(cfg),
                        rng=rng_states(batch_gen, cfg.device),
                    )
            if iter_num == start_iter:  # resumed at or past max_iters: nothing to train, still report losses
                losses = estimate_loss(model, splits, cfg, block_size)
                losses.setdefault("val", float("nan"))
    finally:
        if writer is not None:
            writer.close()
    elapsed = time.perf_counter() - t0
    result = {
        "iter": iter_num,
        "train_loss": losses["train"],
        "val_loss": losses["val"],
        "best_val_loss": best_val_loss,
        "last_batch_loss": last_loss,
        "checkpoint": str(ckpt_path),
        "tokens": len(tokens),
        "tokens_seen": (iter_num - start_iter) * cfg.batch_size * block_size,
        "seconds": elapsed,
    }
    if return_model:
        result["model"] = model
    return result
