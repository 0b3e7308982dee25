"""The exported graph's input and output names: one definition for export, the manifest and every backend.

Layer by layer, key before value, as Hugging Face / Optimum name them (`past_key_values.0.key`), so the
graph also reads naturally to users of their tools. No PyTorch needed.
"""

from __future__ import annotations

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"


def past_names(n_layer: int) -> list[str]:
    """The cache inputs: `past_key_values.{i}.key`, `past_key_values.{i}.value` for each layer i."""
    return [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def present_names(n_layer: int) -> list[str]:
    """The new tokens' keys/values the graph returns: `present.{i}.key`, `present.{i}.value`."""
    return [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def input_names(n_layer: int) -> list[str]:
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names(n_layer)]


def output_names(n_layer: int) -> list[str]:
    return [LOGITS, *present_names(n_layer)]
