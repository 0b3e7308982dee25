"""The API spec's import name: `from gpt_language_model import GPT, GPTConfig, Tokenizer, GPTClassifier`.

The same objects as `gptx.model`'s and `gptx.runtime`'s (not copies), so code written against either name mixes
freely:

    from gpt_language_model import GPT, GPTConfig, Tokenizer
    model = GPT.from_pretrained("shakespeare")
    tokenizer = Tokenizer()
    logits, loss = model(tokenizer.encode("ROMEO:"))
"""

from gptx.model import GPT, GPTConfig
from gptx.model.classifier import GPTClassifier
from gptx.model.gpt import GPTOutput
from gptx.runtime.tokenizer import Tokenizer

__all__ = ["GPT", "GPTClassifier", "GPTConfig", "GPTOutput", "Tokenizer"]
