"""The API spec's code blocks, as a user pastes them.

Only two things are made local: the weights name (the bundled "shakespeare" model, or a tiny config) and
the vocabulary path (the GPT-2 ranks shipped in gptx/runtime/data). Everything else is the spec's own code;
the asserts after each block check that it did what the spec says.
"""

from pathlib import Path

import pytest
import torch

VOCAB_FILE = str(Path(__file__).resolve().parents[1] / "gptx" / "runtime" / "data" / "gpt2.tiktoken")


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def test_spec_names_are_gptx_objects():
    import gpt_language_model
    from gptx.model import GPT, GPTConfig
    from gptx.model.classifier import GPTClassifier
    from gptx.runtime import Tokenizer

    assert gpt_language_model.GPT is GPT
    assert gpt_language_model.GPTConfig is GPTConfig
    assert gpt_language_model.Tokenizer is Tokenizer
    assert gpt_language_model.GPTClassifier is GPTClassifier


def test_usage(capsys):
    # --- spec: usage ---
    from gpt_language_model import GPT, GPTConfig, Tokenizer

    # Initialize the model
    config = GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    model = GPT(config)

    # Or load pre-trained weights
    model = GPT.from_pretrained("shakespeare")

    # Tokenize input text
    tokenizer = Tokenizer(VOCAB_FILE)
    input_tokens = tokenizer.encode("Hello, how are you?")

    # Run the model
    logits, loss = model.forward(input_tokens)
    output_tokens = logits.argmax(dim=-1)

    # Decode output tokens
    print(tokenizer.decode(output_tokens))
    # --- end ---
    assert logits.shape == (1, len(input_tokens), 50304) and loss is None
    assert output_tokens.shape == (1, len(input_tokens))
    assert capsys.readouterr().out.strip()


def test_tokenizer():
    # --- spec: tokenizer ---
    from gpt_language_model import Tokenizer

    tokenizer = Tokenizer(VOCAB_FILE)
    text = "Hello, how are you?"
    tokens = tokenizer.encode(text)
    decoded_text = tokenizer.decode(tokens)

    texts = ["Hello, how are you?", "I am fine, thank you.", "Good night!"]
    batch_tokens = tokenizer.encode_batch(texts)
    decoded_texts = tokenizer.decode(batch_tokens)
    # --- end ---
    assert tokens == [15496, 11, 703, 389, 345, 30]
    assert decoded_text == text and decoded_texts == texts
    assert [len(t) for t in batch_tokens] == [6, 7, 3]  # ragged: each text its own length
    ids, mask = tokenizer.encode_batch(texts, pad_to="longest", return_mask=True)
    assert [len(r) for r in ids] == [7, 7, 7] and ids[2][3:] == [tokenizer.eot_token] * 4
    assert mask[2] == [1, 1, 1, 0, 0, 0, 0]


def shifted_text_pairs(tokenizer, count=16):
    """(input_text, target_text) pairs of different lengths: the target is the input shifted by one token.

    Only lines whose two halves re-encode to exactly those tokens are kept (BPE may merge differently
    across a cut), so both texts of a row encode to the same number of tokens."""
    text = (Path(__file__).resolve().parents[1] / "gptx" / "export" / "data" / "tinyshakespeare.txt").read_text()
    pairs = []
    for line in text.splitlines():
        ids = tokenizer.encode(line)
        if not 4 <= len(ids) <= 20:
            continue
        source, target = tokenizer.decode(ids[:-1]), tokenizer.decode(ids[1:])
        if tokenizer.encode(source) == ids[:-1] and tokenizer.encode(target) == ids[1:]:
            pairs.append({"input_text": source, "target_text": target})
        if len(pairs) == count:
            return pairs
    raise AssertionError("not enough lines")


def test_training_loop():
    # --- spec: training loop ---
    import torch
    from torch.utils.data import DataLoader, Dataset

    from gpt_language_model import GPT, GPTConfig, Tokenizer

    class TextDataset(Dataset):
        def __init__(self, examples):
            self.examples = examples

        def __len__(self):
            return len(self.examples)

        def __getitem__(self, i):
            return self.examples[i]

    tokenizer = Tokenizer(VOCAB_FILE)
    dataset = TextDataset(shifted_text_pairs(tokenizer))
    dataloader = DataLoader(dataset, batch_size=4, shuffle=True)

    config = GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    losses = []
    for epoch in range(4):
        for batch in dataloader:
            input_tokens = tokenizer.encode_batch(batch["input_text"])
            target_tokens = tokenizer.encode_batch(batch["target_text"])
            logits, loss = model.forward(input_tokens, targets=target_tokens)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    # --- end ---
    assert len({len(t) for t in tokenizer.encode_batch([d["input_text"] for d in dataset])}) > 3  # really ragged
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 1.0, losses  # from ~10.8 (uniform over 50304) down


def sentiment_examples(count, seed):
    """Label 1 if the text says 'good', 0 if 'bad'; filler words of different lengths around it."""
    g = torch.Generator().manual_seed(seed)
    filler = "the a movie plot actor film story scene was is very quite really and but it this".split()
    texts, labels = [], []
    for i in range(count):
        words = [filler[j] for j in torch.randint(len(filler), (int(torch.randint(2, 8, (1,), generator=g)),),
                                                 generator=g)]
        words.insert(int(torch.randint(len(words) + 1, (1,), generator=g)), "good" if i % 2 else "bad")
        texts.append(" ".join(words))
        labels.append(i % 2)
    return texts, labels


def test_fine_tuning():
    texts, labels = sentiment_examples(64, seed=1)
    # --- spec: fine-tuning ---
    import torch
    import torch.nn as nn

    from gpt_language_model import GPT, GPTConfig, Tokenizer

    class GPTClassifier(nn.Module):
        def __init__(self, gpt_model, num_classes):
            super().__init__()
            self.gpt_model = gpt_model
            self.classifier = nn.Linear(gpt_model.config.hidden_size, num_classes)

        def forward(self, input_ids, attention_mask):
            gpt_output = self.gpt_model(input_ids=input_ids, attention_mask=attention_mask)
            pooled_output = gpt_output.pooler_output
            return self.classifier(pooled_output)

    config = GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    gpt_model = GPT(config)
    tokenizer = Tokenizer(VOCAB_FILE)
    model = GPTClassifier(gpt_model, num_classes=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    criterion = nn.CrossEntropyLoss()

    losses = []
    for epoch in range(6):
        for start in range(0, len(texts), 16):
            input_ids, attention_mask = tokenizer.encode_batch(texts[start:start + 16], pad_to="longest",
                                                               return_mask=True)
            input_ids, attention_mask = torch.tensor(input_ids), torch.tensor(attention_mask)
            batch_labels = torch.tensor(labels[start:start + 16])
            logits = model(input_ids, attention_mask)
            loss = criterion(logits, batch_labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    # --- end ---
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses
    test_texts, test_labels = sentiment_examples(32, seed=2)
    ids, mask = tokenizer.encode_batch(test_texts, pad_to="longest", return_mask=True)
    with torch.no_grad():
        predictions = model(torch.tensor(ids), torch.tensor(mask)).argmax(-1)
    assert (predictions == torch.tensor(test_labels)).float().mean().item() >= 0.75  # chance is 0.5


def test_generation():
    # --- spec: generation ---
    import torch

    from gpt_language_model import GPT, Tokenizer

    model = GPT.from_pretrained("shakespeare")
    tokenizer = Tokenizer(VOCAB_FILE)

    input_ids = torch.tensor([tokenizer.encode("ROMEO:")])
    output = model.generate(input_ids, max_length=30, temperature=0.7, top_k=50, top_p=0.95)
    generated_text = tokenizer.decode(output[0])
    print(generated_text)
    # --- end ---
    assert output.shape == (1, 30) and generated_text.startswith("ROMEO:")
    seeded = [model.generate(input_ids, max_length=30, temperature=0.7, top_k=50, top_p=0.95, seed=1) for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1])
