"""The API spec's import name: `from gpt_language_model import GPT, GPTConfig, Tokenizer, GPTClassifier`.

The same objects as `gpt_export`'s (not copies), so code written against either name mixes freely:

    from gpt_language_model import GPT, GPTConfig, Tokenizer
    model = GPT.from_pretrained("shakespeare")
    tokenizer = Tokenizer()
    logits, loss = model(tokenizer.encode("ROMEO:"))
"""

from gpt_export import GPT, GPTConfig, Tokenizer
from gpt_export.classifier import GPTClassifier
from gpt_export.model import GPTOutput

__all__ = ["GPT", "GPTClassifier", "GPTConfig", "GPTOutput", "Tokenizer"]
