"""The exported graph's input and output names: one definition for export, the manifest and every backend.

Layer by layer, key before value, as Hugging Face / Optimum name them (`past_key_values.0.key`), so the
graph also reads naturally to users of their tools. No PyTorch needed.
"""

from __future__ import annotations

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
# which of this call's new positions get logits, per row ([batch, logits_count] int64): the last one for a step,
# every prompt position when a prompt is scored (echo, prompt logprobs); older exports lack it (last one only)
LOGITS_INDEX = "logits_index"
LOGITS = "logits"


def past_names(n_layer: int) -> list[str]:
    """The cache inputs: `past_key_values.{i}.key`, `past_key_values.{i}.value` for each layer i."""
    return [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def present_names(n_layer: int) -> list[str]:
    """The new tokens' keys/values the graph returns: `present.{i}.key`, `present.{i}.value`."""
    return [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def input_names(n_layer: int, logits_index: bool = True) -> list[str]:
    """The graph's inputs; `logits_index=False` gives those of exports that predate LOGITS_INDEX."""
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *([LOGITS_INDEX] if logits_index else []), *past_names(n_layer)]


def output_names(n_layer: int) -> list[str]:
    return [LOGITS, *present_names(n_layer)]
