"""gptx runtime: load an exported directory and generate text. Needs numpy, onnxruntime and tiktoken; not PyTorch."""

from .engine import Engine, load
from .errors import GenerationError, GptxError, InvalidInput, QueueFull
from .sampler import SamplingParams
from .scheduler import Request, Scheduler, StepOutput
from .serving import Completion, Event, Pool
from .tokenizer import Tokenizer

__all__ = ["Completion", "Engine", "Event", "GenerationError", "GptxError", "InvalidInput", "Pool", "QueueFull",
           "Request", "SamplingParams", "Scheduler", "StepOutput", "Tokenizer", "load"]
