"""The PyTorch model (nanoGPT-style), its weight loading and the classifier head. Needs torch."""

from .gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
