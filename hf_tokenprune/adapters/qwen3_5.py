"""Qwen3.5 and Qwen3.5-MoE: Qwen3-VL's visual inputs and M-RoPE in front of a hybrid text model.

The text model interleaves Gated DeltaNet linear-attention layers (a causal conv1d and a gated delta-rule
recurrence) with a full softmax-attention layer every fourth layer. What that changes for pruning:

* **Masking is not removing.** A linear-attention layer multiplies a masked token's input by zero, but the token
  still takes a step of the recurrence (the state decays by the token's gate) and a slot of the convolution window,
  so the unpruned model with the dropped tokens masked out is not the pruned model. The reference is the model run
  on the already-pruned sequence (:func:`hf_tokenprune.verify.generate_pruned_sequence_reference`).
* **Left padding is exact.** Padding comes first: its zeroed inputs give zero keys and values, so the conv and
  recurrent states are still zero when the first real token arrives, as for the sample alone.
* **The scoring feature** is the first full-attention layer's instruction->vision attention, computed from its q/k
  projections on the input embeddings (:func:`hf_tokenprune.features.first_layer_attention`, docs/design.md).

Visual inputs are Qwen3-VL's (no DeepStack): a video is one run of placeholders per frame group
(:class:`~hf_tokenprune.adapters.qwen3_vl.FrameRunsAdapter`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..compat import TRANSFORMERS_VERSION
from .qwen3_vl import FrameRunsAdapter


class Qwen3_5Adapter(FrameRunsAdapter):
    """Qwen3-VL's frame runs and M-RoPE; a masked token is not a removed one (see the module docstring)."""

    model_types = ("qwen3_5", "qwen3_5_moe")
    masking_removes_tokens = False

    def expansion_refusal(self, call: Mapping[str, Any]) -> str | None:
        """transformers 5.20 declares no image / video input modality for Qwen3.5 (``input_modalities``), so
        ``generate`` does not pre-encode its visual inputs and repeats ``pixel_values`` patch by patch instead of per
        image for beams or several return sequences: the unpruned model then runs on scrambled pictures."""
        visual = any(call.get(p.pixels) is not None for p in self.placeholders) or call.get("mm_encoder_outputs")
        if visual and not {"image", "video"} & set(getattr(self.model, "input_modalities", ())):
            return (f"transformers {TRANSFORMERS_VERSION} declares no image input for {type(self.model).__name__}, "
                    "so its generate() repeats the pixel values patch by patch instead of per image for beam search "
                    "or several return sequences (the unpruned model silently sees scrambled pictures); fixed in 5.21")
        return None

    def inllm_refusal(self, layer: int) -> str | None:
        """FastV and PDrop rank by a layer's softmax attention and DART by its key projection: a Gated DeltaNet
        layer has neither."""
        layer_types = self.model.config.get_text_config().layer_types
        if layer_types[layer] != "linear_attention":
            return None
        full = [i for i, kind in enumerate(layer_types) if kind != "linear_attention"]
        return (f"decoder layer {layer} of {self.model_type} is a Gated DeltaNet linear-attention layer, which has no "
                f"attention weights to rank visual tokens by (FastV, PDrop) nor a key projection (DART): prune before "
                f"a full-attention layer, layer= one of {full}, or at the LLM input (layer=0)")
