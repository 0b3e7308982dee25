"""gptx runtime: load an exported directory and generate text. Needs numpy, onnxruntime and tiktoken; not PyTorch."""

from .engine import Engine, load
from .errors import GptxError
from .sampler import SamplingParams
from .tokenizer import Tokenizer

__all__ = ["Engine", "GptxError", "SamplingParams", "Tokenizer", "load"]
