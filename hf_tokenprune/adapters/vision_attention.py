"""Attention inside a vision tower, recomputed from one layer's input and its own q/k projections (VisionZip).

:class:`VisionAttentionCapture` records, with a forward pre-hook, the input of the tower layer an adapter names
(:meth:`~hf_tokenprune.adapters.Adapter.vision_attention_layer`) while the tower runs anyway; the adapter turns the
records into the attention each LLM visual token receives (:meth:`~hf_tokenprune.adapters.Adapter.vision_attention`).
Like :mod:`hf_tokenprune.features` for ``A^0_v`` only the layer's input norm and q/k projections run, never an
eager forward, whatever attention implementation the tower uses; probabilities are float32.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

QUERY_BLOCK = 512  # query rows of one segment's attention held at once


class VisionAttentionCapture:
    """The inputs (``(args, kwargs)`` per tower call, in call order) of a tower ``layer`` since the last
    :meth:`take`; records only while ``active()`` is true. :meth:`remove` uninstalls the hook."""

    def __init__(self, layer: nn.Module, active: Any) -> None:
        self.records: list[tuple[tuple, dict]] = []
        self._active = active
        self._hook: RemovableHandle | None = layer.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._active():
            self.records.append((args, kwargs))

    def take(self) -> list[tuple[tuple, dict]]:
        """The records so far, cleared."""
        records, self.records = self.records, []
        return records

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.records = []


def argument(args: tuple, kwargs: dict, name: str, index: int) -> Any:
    """A layer call's argument ``name``, given by keyword or at position ``index``."""
    return kwargs[name] if name in kwargs else args[index]


def cls_attention(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """CLIP or DINOv2 encoder ``layer``: the attention its CLS query (position 0) pays to every patch, averaged over
    heads. ``hidden_states``: the layer's input ``[images, 1 + patches, hidden]``. Returns ``[images, patches]``."""
    clip = hasattr(layer, "self_attn")
    attn, norm = (layer.self_attn, layer.layer_norm1) if clip else (layer.attention, layer.norm1)
    heads, scale = (attn.num_heads, attn.scale) if clip else (attn.num_attention_heads, attn.scaling)
    with torch.no_grad():
        x = norm(hidden_states)
        images, length, _ = x.shape
        q = attn.q_proj(x[:, :1]).view(images, 1, heads, attn.head_dim).transpose(1, 2).float()
        k = attn.k_proj(x).view(images, length, heads, attn.head_dim).transpose(1, 2).float()
        probs = ((q @ k.transpose(-1, -2)) * scale).softmax(dim=-1)  # [images, heads, 1, length]
        return probs[:, :, 0, 1:].mean(dim=1)


def patch_received_attention(block: nn.Module, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                             position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """A Qwen2-VL-style vision ``block`` (``norm1``, fused ``attn.qkv``, 2-D rotary, full attention within each
    ``cu_seqlens`` segment): the attention each patch receives, averaged over heads and over the segment's queries
    (each segment's values sum to 1). ``hidden_states``: the block's input ``[patches, hidden]``. Returns
    ``[patches]``."""
    attn = block.attn
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    with torch.no_grad():
        x = block.norm1(hidden_states)
        q, k, _ = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = rotary(q, k, *position_embeddings)
        q, k = q.float().transpose(0, 1), k.float().transpose(0, 1)  # [heads, patches, d]
        out = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
        bounds = cu_seqlens.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            keys = k[:, start:end]
            for row in range(start, end, QUERY_BLOCK):
                stop = min(row + QUERY_BLOCK, end)
                probs = ((q[:, row:stop] @ keys.transpose(-1, -2)) * attn.scaling).softmax(dim=-1)
                out[start:end] += probs.sum(dim=(0, 1))
            out[start:end] /= attn.num_heads * (end - start)
        return out
