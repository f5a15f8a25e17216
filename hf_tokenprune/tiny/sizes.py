"""The sizes and text-model settings every tiny family shares."""

from __future__ import annotations

from typing import Any

from .tokenizer import SPECIAL_TOKENS, WORDS, text_token_ids

TEXT_HIDDEN_SIZE = 64
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
TEXT_HEAD_DIM = TEXT_HIDDEN_SIZE // TEXT_HEADS  # 16
VISION_HIDDEN_SIZE = 32
VISION_HEADS = 4


def text_kwargs(num_hidden_layers: int) -> dict[str, Any]:
    """The ``text_config`` of a tiny family (without its ``model_type`` and RoPE), sized for the shared tokenizer."""
    return dict(
        vocab_size=len(SPECIAL_TOKENS) + len(WORDS),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=2 * TEXT_HIDDEN_SIZE,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        **text_token_ids(),
    )
