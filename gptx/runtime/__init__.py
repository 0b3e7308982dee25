"""gptx runtime: load an exported directory and generate text. Needs numpy, onnxruntime and tiktoken; not PyTorch."""

from .engine import Engine, load
from .errors import GenerationError, GptxError, InvalidInput, QueueFull
from .sampler import SamplingParams
from .scheduler import Request, Scheduler, StepOutput
from .tokenizer import Tokenizer


def __getattr__(name: str):
    # gptx.runtime.serving imports asyncio, and asyncio imports ssl (~4 MiB of RSS): only apps that serve load it
    if name in ("Completion", "Event", "Pool"):
        from . import serving

        return getattr(serving, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["Completion", "Engine", "Event", "GenerationError", "GptxError", "InvalidInput", "Pool", "QueueFull",
           "Request", "SamplingParams", "Scheduler", "StepOutput", "Tokenizer", "load"]
