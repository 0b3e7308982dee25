"""Fine-tune a GPT trunk as a sequence classifier on a small synthetic task, then print held-out accuracy.

Task: is a line real Shakespeare, or the same words in shuffled order? A trunk that has seen
Shakespeare (the bundled `shakespeare` sample model) knows word order; a random trunk has to learn it.

    python examples/finetune_classifier.py                 # bundled sample model if present
    python examples/finetune_classifier.py --random-trunk  # a small random GPT instead
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from gptx.model.classifier import GPTClassifier, accuracy, finetune_classifier
from gptx.model.gpt import GPT, GPTConfig
from gptx.model.weights import SAMPLE_MODELS
from gptx.runtime.tokenizer import Tokenizer

DATA = Path(__file__).resolve().parents[1] / "gptx" / "export" / "data" / "tinyshakespeare.txt"


def make_examples(n: int, seed: int, tokenizer: Tokenizer, max_tokens: int):
    """Half real lines (label 1), half the same lines with their words shuffled (label 0)."""
    lines = [ln.strip() for ln in DATA.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if 6 <= len(ln.split()) <= 14 and not ln.endswith(":")]
    rng = random.Random(seed)
    ids, labels = [], []
    for i in range(n):
        words = rng.choice(lines).split()
        label = i % 2
        if not label:
            while True:
                shuffled = words[:]
                rng.shuffle(shuffled)
                if shuffled != words:
                    break
            words = shuffled
        ids.append(tokenizer.encode(" ".join(words))[:max_tokens])
        labels.append(label)
    return ids, labels


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random-trunk", action="store_true", help="use a small random GPT, not the sample model")
    parser.add_argument("--train", type=int, default=800, help="training examples")
    parser.add_argument("--test", type=int, default=400, help="held-out examples")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.manual_seed(0)

    if not args.random_trunk and SAMPLE_MODELS["shakespeare"].is_file():
        trunk, source = GPT.from_pretrained("shakespeare"), "bundled shakespeare sample model"
    else:
        trunk = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=50257))
        source = "small random GPT"
    tokenizer = Tokenizer()
    max_tokens = min(64, trunk.config.block_size)
    train_ids, train_labels = make_examples(args.train, seed=1, tokenizer=tokenizer, max_tokens=max_tokens)
    test_ids, test_labels = make_examples(args.test, seed=2, tokenizer=tokenizer, max_tokens=max_tokens)

    model = GPTClassifier(trunk, num_classes=2, pad_token_id=tokenizer.eot_token)
    print(f"trunk: {source} ({trunk.get_num_params() / 1e6:.2f}M parameters)")
    print(f"task: real Shakespeare line vs shuffled words; {args.train} train / {args.test} held-out examples")
    print(f"held-out accuracy before fine-tuning: {accuracy(model, test_ids, test_labels):.3f}")
    start = time.perf_counter()
    finetune_classifier(model, train_ids, train_labels, val_ids=test_ids, val_labels=test_labels,
                        epochs=args.epochs, lr=args.lr, batch_size=32, log=lambda s: print("  " + s))
    print(f"held-out accuracy after fine-tuning:  {accuracy(model, test_ids, test_labels):.3f} "
          f"({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
