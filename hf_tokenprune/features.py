"""Attention a decoder layer pays to each position, computed cheaply: the first LLM layer's instruction->vision
attention ``A^0_v`` (the compressor's input), and the same for any layer's input (FastV / PDrop ranking).

Only the layer's input norm, q/k projections (and q/k norms where the family has them) and rotary embedding are
run, and only the query rows of the softmax are formed: O(N_u * L) instead of a full eager forward.
Works whatever attention implementation the model itself runs with (sdpa, flash, eager). Scores are computed
in float32 after the projections.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


def _apply_rotary(attention: nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The family's ``apply_rotary_pos_emb(q, k, cos, sin)`` from the modeling module of its attention class: it
    knows how the family rotates (half-split or interleaved pairs, the whole head or a part of it, as GLM-4V)."""
    return _module_rotary(type(attention).__module__)


@functools.cache
def _module_rotary(module: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """:func:`_apply_rotary` of a modeling module, looked up (and its signature read) once per module."""
    rotary = getattr(sys.modules[module], "apply_rotary_pos_emb", None)
    if rotary is None:
        raise NotImplementedError(f"{module} has no apply_rotary_pos_emb(q, k, cos, sin): "
                                  "hf_tokenprune cannot recompute this family's attention scores")
    if list(inspect.signature(rotary).parameters)[:3] == ["x", "cos", "sin"]:  # one tensor at a time (Gemma 4)
        return lambda q, k, cos, sin: (rotary(q, cos, sin), rotary(k, cos, sin))
    return rotary


def first_layer_attention(text_model: nn.Module, inputs_embeds: torch.Tensor, rotary_positions: torch.Tensor,
                          attention_mask: torch.Tensor | None, instruction_mask: torch.Tensor,
                          per_head: bool = False) -> torch.Tensor:
    """Attention each position receives in layer 0 (:func:`feature_layer`), averaged over heads and over the
    instruction tokens (``per_head``: over the instruction tokens only, one row per query head).

    Args:
        text_model: the decoder (``layers`` with ``input_layernorm`` and ``self_attn.q_proj/k_proj``, ``rotary_emb``).
        inputs_embeds: ``[batch, length, hidden]`` prefill embeddings (visual features merged in).
        rotary_positions: position ids in the form ``text_model.rotary_emb`` takes.
        attention_mask: ``[batch, length]`` (1 = real token) or None.
        instruction_mask: ``[batch, length]``, the query rows to average over (at least one per sample).

    Returns:
        ``[batch, length]`` float32; the entries of visual positions form ``A^0_v``. ``[batch, heads, length]``
        with ``per_head``.
    """
    index = feature_layer(text_model)
    with torch.no_grad():
        cos, sin = layer_rotary(text_model, inputs_embeds, rotary_positions, index)
    return received_attention(text_model.layers[index], inputs_embeds, (cos, sin), attention_mask, instruction_mask,
                              per_head=per_head)


def layer_rotary(text_model: nn.Module, x: torch.Tensor, rotary_positions: torch.Tensor,
                 index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(cos, sin)`` decoder layer ``index`` gets: ``text_model.rotary_emb``'s, for the layer's type where the
    rotary embedding differs per type (Gemma: local and global RoPE bases)."""
    if "layer_type" in inspect.signature(text_model.rotary_emb.forward).parameters:
        return text_model.rotary_emb(x, rotary_positions, text_model.config.layer_types[index])
    return text_model.rotary_emb(x, rotary_positions)


def feature_layer(text_model: nn.Module) -> int:
    """The decoder layer whose q/k projections give ``A^0_v``: the first softmax-attention layer (``self_attn``).

    Layer 0 everywhere but in hybrid decoders whose first layers are linear attention (Qwen3.5: Gated DeltaNet
    layers 0-2, full attention at 3). There that layer's q/k are applied to the input embeddings, as if the
    layers before it were the identity (docs/design.md, "The feature on a hybrid decoder")."""
    for index, layer in enumerate(text_model.layers):
        if getattr(layer, "self_attn", None) is not None:
            return index
    raise ValueError(f"{type(text_model).__name__} has no softmax-attention layer to compute A^0_v from")


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
    # a gated attention's q_proj (Qwen3.5) gives each head's query then its output gate
    q = attn.q_proj(q_hidden).view(batch, n_q, attn.config.num_attention_heads, -1)[..., :head_dim]
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
                       query_mask: torch.Tensor, per_head: bool = False) -> torch.Tensor:
    """Attention each position receives in decoder ``layer`` from the ``query_mask`` rows, averaged over heads and
    rows (:func:`query_logits`, causal, padding from ``attention_mask``, the layer's sliding window where it has one).
    ``hidden_states`` is the layer's input, ``position_embeddings`` the ``(cos, sin)`` it receives. Returns
    ``[batch, length]`` float32, or ``[batch, heads, length]`` with ``per_head`` (averaged over rows only).
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
        window = getattr(layer.self_attn, "sliding_window", None)
        if window:
            allowed = allowed & (keys[None, None, :] > q_order[:, :, None] - window)
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, :]
        allowed = allowed | ~q_valid[:, :, None]  # padding query rows: any finite row, zeroed below
        logits = logits.masked_fill(~allowed.unsqueeze(1), float("-inf"))
        probs = logits.softmax(dim=-1)  # [b, heads, n_q, length]
        if not per_head:
            probs = probs.mean(dim=1, keepdim=True)
        probs = probs * q_valid[:, None, :, None]
        received = probs.sum(dim=2) / q_valid.sum(dim=1)[:, None, None].clamp(min=1)  # [b, heads or 1, length]
        return received if per_head else received[:, 0]


def delta_rule_attention(linear_attn: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                         rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact token mixing of a Gated DeltaNet layer (``linear_attn``, Qwen3.5's linear attention): ``(A, V)``
    with the recurrence's output ``o = A @ V`` per value head, before the gated norm and ``out_proj``.

    The gated delta rule ``S_t = a_t S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T``, ``o_t = S_t^T q_t`` is linear
    in the values, and unrolled it is ``A = (Q K^T * G) (I + L)^-1 diag(b)`` with ``G[t, j] = a_{j+1} ... a_t``
    (causal, 1 on the diagonal) and ``L[t, j] = b_t G[t, j] k_t^T k_j`` strictly below the diagonal (the chunked
    algorithm's UT transform over the whole sequence). q, k, v, the gates ``a`` and ``b`` are computed as the layer
    does (input projections, causal depthwise conv + activation, l2-normalised q and k, q scaled by
    ``d_k^-1/2``); padding (``attention_mask`` 0) is zeroed as the layer zeroes it. ``A[b, h, t, j]`` weighs the
    conv output ``V[b, h, j]`` of token ``j`` (whose window also holds the ``kernel - 1`` tokens before it).

    Args:
        linear_attn: the layer's ``Qwen3_5GatedDeltaNet`` (``layer.linear_attn``).
        hidden_states: ``[batch, length, hidden]``, its input (after the layer's input norm).
        attention_mask: ``[batch, length]`` (1 = real token) or None.
        rows: ``[batch, n]`` query positions; None: every position.

    Returns:
        ``A``: ``[batch, value_heads, n or length, length]`` and ``V``: ``[batch, value_heads, length, d_v]``,
        float32, differentiable.
    """
    q, k, v, beta, log_decay = delta_rule_inputs(linear_attn, hidden_states, attention_mask)
    length = q.shape[2]
    cumulative = log_decay.cumsum(dim=-1)
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    decay = (cumulative[..., :, None] - cumulative[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    lower = (beta[..., :, None] * decay * (k @ k.transpose(-1, -2))).tril(-1)
    mixing = torch.eye(length, device=q.device) + lower
    if rows is not None:  # only these query rows: gather them from q and from the decays
        index = rows[:, None, :, None].expand(-1, q.shape[1], -1, -1)
        q = torch.gather(q, 2, index.expand(-1, -1, -1, q.shape[-1]))
        decay = torch.gather(decay, 2, index.expand(-1, -1, -1, length))
    scores = (q @ k.transpose(-1, -2)) * decay
    matrix = torch.linalg.solve_triangular(mixing, scores, upper=False, left=False, unitriangular=True)
    return matrix * beta[..., None, :], v


def delta_rule_inputs(linear_attn: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None
                      ) -> tuple[torch.Tensor, ...]:
    """What a Gated DeltaNet layer's recurrence runs on, computed as the layer does (:func:`delta_rule_attention`):
    float32 ``q, k`` (``[batch, value_heads, length, d_k]``, l2-normalised, q scaled by ``d_k^-1/2``), ``v``
    (``[batch, value_heads, length, d_v]``), the write strength ``beta`` and the log decay (``[batch, value_heads,
    length]``)."""
    attn = linear_attn
    if attention_mask is not None:
        hidden_states = hidden_states * attention_mask[:, :, None].to(hidden_states.dtype)
    batch, length, _ = hidden_states.shape
    mixed = attn.in_proj_qkv(hidden_states).transpose(1, 2)
    weight = attn.conv1d.weight
    mixed = F.conv1d(mixed.to(weight.dtype), weight, attn.conv1d.bias, padding=weight.shape[-1] - 1,
                     groups=mixed.shape[1])[..., :length]
    mixed = ACT2FN[attn.activation](mixed).transpose(1, 2)
    q, k, v = torch.split(mixed, [attn.key_dim, attn.key_dim, attn.value_dim], dim=-1)
    groups = attn.num_v_heads // attn.num_k_heads
    q, k = (x.reshape(batch, length, attn.num_k_heads, attn.head_k_dim).repeat_interleave(groups, dim=2)
            .transpose(1, 2).float() for x in (q, k))
    v = v.reshape(batch, length, attn.num_v_heads, attn.head_v_dim).transpose(1, 2).float()
    q, k = (x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6) for x in (q, k))
    beta = attn.in_proj_b(hidden_states).float().sigmoid().transpose(1, 2)
    log_decay = -attn.A_log.float().exp() * F.softplus(attn.in_proj_a(hidden_states).float() + attn.dt_bias)
    return q * attn.head_k_dim ** -0.5, k, v, beta, log_decay.transpose(1, 2)
