"""Attention a decoder layer pays to each position, computed cheaply: the first LLM layer's instruction->vision
attention ``A^0_v`` (the compressor's input), and the same for any layer's input (FastV / PDrop ranking).

Only the layer's input norm, q/k projections (and q/k norms where the family has them) and rotary embedding are
run, and only the query rows of the softmax are formed: O(N_u * L) instead of a full eager forward.
Works whatever attention implementation the model itself runs with (sdpa, flash, eager). Scores are computed
in float32 after the projections.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn


def _apply_rotary(attention: nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The family's ``apply_rotary_pos_emb(q, k, cos, sin)`` from the modeling module of its attention class: it
    knows how the family rotates (half-split or interleaved pairs, the whole head or a part of it, as GLM-4V)."""
    rotary = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
    if rotary is None:
        raise NotImplementedError(f"{type(attention).__module__} has no apply_rotary_pos_emb(q, k, cos, sin): "
                                  "hf_tokenprune cannot recompute this family's attention scores")
    return rotary


def first_layer_attention(text_model: nn.Module, inputs_embeds: torch.Tensor, rotary_positions: torch.Tensor,
                          attention_mask: torch.Tensor | None, instruction_mask: torch.Tensor) -> torch.Tensor:
    """Attention each position receives in layer 0, averaged over heads and over the instruction tokens.

    Args:
        text_model: the decoder (``layers[0]`` with ``input_layernorm`` and ``self_attn.q_proj/k_proj``,
            ``rotary_emb``).
        inputs_embeds: ``[batch, length, hidden]`` prefill embeddings (visual features merged in).
        rotary_positions: position ids in the form ``text_model.rotary_emb`` takes.
        attention_mask: ``[batch, length]`` (1 = real token) or None.
        instruction_mask: ``[batch, length]``, the query rows to average over (at least one per sample).

    Returns:
        ``[batch, length]`` float32; the entries of visual positions form ``A^0_v``.
    """
    with torch.no_grad():
        cos, sin = text_model.rotary_emb(inputs_embeds, rotary_positions)
    return received_attention(text_model.layers[0], inputs_embeds, (cos, sin), attention_mask, instruction_mask)


def query_logits(layer: nn.Module, hidden_states: torch.Tensor,
                 position_embeddings: tuple[torch.Tensor, torch.Tensor], query_index: torch.Tensor) -> torch.Tensor:
    """Unmasked attention scores of decoder ``layer`` for the query rows ``query_index`` (``[batch, n_q]``)
    against every position: the layer's input norm, q/k projections (and q/k norms) and rotary embedding, in
    float32. Differentiable. Returns ``[batch, heads, n_q, length]``."""
    attn = layer.self_attn
    head_dim = attn.head_dim
    batch, length, _ = hidden_states.shape
    n_q = query_index.shape[1]
    hidden = layer.input_layernorm(hidden_states)
    q_hidden = torch.gather(hidden, 1, query_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    q = attn.q_proj(q_hidden).view(batch, n_q, -1, head_dim)
    k = attn.k_proj(hidden).view(batch, length, -1, head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = (t.float().expand(batch, -1, -1) for t in position_embeddings)
    q_cos = torch.gather(cos, 1, query_index.unsqueeze(-1).expand(-1, -1, cos.shape[-1]))
    q_sin = torch.gather(sin, 1, query_index.unsqueeze(-1).expand(-1, -1, sin.shape[-1]))
    q, k = q.float().transpose(1, 2), k.float().transpose(1, 2)  # [b, heads, n, d]
    rotary = _apply_rotary(attn)
    q, k = rotary(q, q, q_cos, q_sin)[0], rotary(k, k, cos, sin)[0]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return torch.matmul(q, k.transpose(-1, -2)) * attn.scaling


def received_attention(layer: nn.Module, hidden_states: torch.Tensor,
                       position_embeddings: tuple[torch.Tensor, torch.Tensor], attention_mask: torch.Tensor | None,
                       query_mask: torch.Tensor) -> torch.Tensor:
    """Attention each position receives in decoder ``layer`` from the ``query_mask`` rows, averaged over heads and
    rows (:func:`query_logits`, causal, padding from ``attention_mask``). ``hidden_states`` is the layer's input,
    ``position_embeddings`` the ``(cos, sin)`` it receives. Returns ``[batch, length]`` float32.
    """
    length = hidden_states.shape[1]
    with torch.no_grad():
        n_q = int(query_mask.sum(dim=1).max())
        # query rows of each sample, right-padded to n_q
        q_order = torch.sort(query_mask.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :n_q]
        q_valid = torch.gather(query_mask, 1, q_order)
        logits = query_logits(layer, hidden_states, position_embeddings, q_order)  # [b, heads, n_q, length]
        keys = torch.arange(length, device=hidden_states.device)
        allowed = keys[None, None, :] <= q_order[:, :, None]  # causal
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, :]
        allowed = allowed | ~q_valid[:, :, None]  # padding query rows: any finite row, zeroed below
        logits = logits.masked_fill(~allowed.unsqueeze(1), float("-inf"))
        probs = logits.softmax(dim=-1).mean(dim=1)  # [b, n_q, length]
        probs = probs * q_valid.unsqueeze(-1)
        return probs.sum(dim=1) / q_valid.sum(dim=1, keepdim=True).clamp(min=1)
