"""gptx, PyTorch side: the GPT-2 model, weight loading, export to ONNX, optimization and engine builds."""

from runtime.tokenizer import Tokenizer

from .model import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "Tokenizer"]
