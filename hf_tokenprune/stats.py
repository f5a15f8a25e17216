"""PruneStats: what one prefill pruned, and the KV-cache bytes and prefill FLOPs it saved (from the config)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class PruneStage:
    """One pruning step of a prefill: before decoder layer ``layer`` (0: at the LLM input) the visual tokens
    ``kept_indices[b]`` of sample ``b`` remain (as in :class:`PruneStats`); layers from ``layer`` on run on
    ``seq_len`` positions."""

    layer: int
    kept_indices: list[torch.Tensor]
    seq_len: int


@dataclass
class PruneStats:
    """Record of one pruned prefill.

    ``kept_indices[b]`` are the kept positions among sample ``b``'s visual tokens (counted in order of
    appearance, ascending). Sequence lengths are the batch's padded lengths, which is what the LLM runs on;
    KV-cache bytes and FLOPs are for the whole batch. ``stages`` lists the pruning steps in layer order (one at
    layer 0 for input-stage pruning, one or more inside the LLM for FastV / PDrop / DART); ``kept_indices`` and
    ``seq_len_after`` are those of the last. ``ratio`` is the configured fraction of the fixed budget (None with
    ``budget="auto"``, where ``mass`` is the relevance-mass threshold and ``temperature`` that of its distribution);
    :attr:`retention` is what each sample kept: None for a sample without visual tokens (e.g. a text-only sample of
    a batch), which :attr:`mean_retention` leaves out and the printout shows as "no visual tokens".
    """

    scorer: str
    ratio: float | None
    kept_indices: list[torch.Tensor]
    visual_tokens_before: list[int]
    visual_tokens_after: list[int]
    seq_len_before: int
    seq_len_after: int
    kv_cache_bytes_before: int
    kv_cache_bytes_after: int
    prefill_flops_before: float
    prefill_flops_after: float
    scoring_time_s: float
    stages: list[PruneStage] = field(default_factory=list)
    budget: str = "fixed"
    mass: float | None = None
    temperature: float | None = None

    @property
    def retention(self) -> list[float | None]:
        """Per sample: the fraction of its visual tokens kept; None if it has none."""
        return [after / before if before else None
                for after, before in zip(self.visual_tokens_after, self.visual_tokens_before, strict=True)]

    @property
    def mean_retention(self) -> float | None:
        """Mean of :attr:`retention` over the samples with visual tokens (None if there are none)."""
        retention = [r for r in self.retention if r is not None]
        return sum(retention) / len(retention) if retention else None

    @property
    def prefill_flops_ratio(self) -> float:
        return self.prefill_flops_after / self.prefill_flops_before if self.prefill_flops_before else 1.0

    @property
    def kv_cache_ratio(self) -> float:
        return self.kv_cache_bytes_after / self.kv_cache_bytes_before if self.kv_cache_bytes_before else 1.0

    def __str__(self) -> str:
        budget = (f"ratio={self.ratio:g}" if self.ratio is not None
                  else f"budget=auto mass={self.mass:g} temperature={self.temperature:g}")
        retention = ", ".join("no visual tokens" if r is None else f"{r:.3f}" for r in self.retention)
        return (f"PruneStats(scorer={self.scorer}, {budget}, visual tokens {self.visual_tokens_before}"
                f" -> {self.visual_tokens_after} (retention {retention}), "
                f"sequence {self.seq_len_before} -> {self.seq_len_after}, "
                f"KV cache {self.kv_cache_bytes_before / 2**20:.2f} -> {self.kv_cache_bytes_after / 2**20:.2f} MiB, "
                f"prefill FLOPs x{self.prefill_flops_ratio:.3f}, scoring {1e3 * self.scoring_time_s:.1f} ms)")


def layer_lengths(num_layers: int, length: int, stages: Sequence[PruneStage]) -> list[int]:
    """The sequence length each of ``num_layers`` decoder layers runs on: ``length`` until the first stage."""
    out = [length] * num_layers
    for stage in stages:
        out[stage.layer:] = [stage.seq_len] * (num_layers - stage.layer)
    return out


def _per_layer(text_config, length: int | Sequence[int]) -> list[int]:
    return [length] * text_config.num_hidden_layers if isinstance(length, int) else list(length)


# the token mixer of decoder layer i: a "linear_attention" layer (Gated DeltaNet) keeps a constant-size state; every
# other layer type attends with softmax and keeps keys and values
LINEAR_ATTENTION = "linear_attention"
# text models whose full-attention q_proj also gives a sigmoid output gate per head (twice the query width)
GATED_ATTENTION_MODEL_TYPES = ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next")


def _layer_types(text_config) -> list[str]:
    return list(getattr(text_config, "layer_types", None) or ["full_attention"] * text_config.num_hidden_layers)


def _attention_shape(text_config, layer: int) -> tuple[int, int, int]:
    """``(heads, kv_heads, head_dim)`` of decoder layer ``layer``: its own where they vary per layer (Gemma 4's
    global layers have wider heads)."""
    if getattr(text_config, "is_heterogeneous", False):
        text_config = text_config.per_layer_config[layer]
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return heads, getattr(text_config, "num_key_value_heads", None) or heads, head_dim


def kv_cache_bytes(text_config, batch: int, length: int | Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of keys and values for ``batch x length`` tokens over all softmax-attention layers (``length``: one per
    layer, or the same for all). Linear-attention layers keep no keys and values: their conv and recurrent states
    have a constant size, whatever the length, and are not counted; nor are layers that reuse an earlier layer's
    (Gemma 4's shared KV layers)."""
    layers = _per_layer(text_config, length)
    sharing = getattr(text_config, "kv_sharing_modes", None) or [None] * len(layers)
    values = sum(2 * math.prod(_attention_shape(text_config, i)[1:]) * n
                 for i, (n, kind) in enumerate(zip(layers, _layer_types(text_config), strict=True))
                 if kind != LINEAR_ATTENTION and sharing[i] != "reuse")
    return values * batch * torch.empty((), dtype=dtype).element_size()


def _mlp_params(text_config, layer: int) -> int:
    """Weights one token passes through in layer ``layer``'s MLP: the gated MLP, or for a sparse MoE layer the
    router, ``num_experts_per_tok`` experts and the shared experts: Qwen's one behind a sigmoid gate, or GLM-4.5V's
    ``n_shared_experts`` ungated ones (GLM-4.5V's first ``first_k_dense_replace`` layers are dense)."""
    hidden = text_config.hidden_size
    experts = getattr(text_config, "num_experts", None) or getattr(text_config, "n_routed_experts", None)
    step = getattr(text_config, "decoder_sparse_step", 1) or 1
    dense = layer in (getattr(text_config, "mlp_only_layers", None) or []) or (layer + 1) % step != 0 \
        or layer < (getattr(text_config, "first_k_dense_replace", 0) or 0)
    sparse = experts and not dense
    if not sparse:
        return 3 * hidden * text_config.intermediate_size
    moe = text_config.moe_intermediate_size
    gated = getattr(text_config, "shared_expert_intermediate_size", 0) or 0
    shared = (getattr(text_config, "n_shared_experts", 0) or 0) * moe
    return (hidden * experts + text_config.num_experts_per_tok * 3 * hidden * moe
            + (3 * hidden * gated + hidden if gated else 0) + 3 * hidden * shared)


def _layer_flops(text_config, layer: int, kind: str, n: int) -> float:
    """Forward FLOPs of decoder layer ``layer`` (of type ``kind``) on ``n`` tokens of one sample."""
    hidden = text_config.hidden_size
    mlp = 2 * _mlp_params(text_config, layer) * n
    if kind == LINEAR_ATTENTION:  # Gated DeltaNet: projections, depthwise conv, one delta-rule step per token
        key_dim = text_config.linear_num_key_heads * text_config.linear_key_head_dim
        value_heads, value_dim = text_config.linear_num_value_heads, text_config.linear_value_head_dim
        conv_dim = 2 * key_dim + value_heads * value_dim
        params = hidden * (conv_dim + 2 * value_heads + 2 * value_heads * value_dim)  # qkv, a, b, z, out
        # per value head: decay, read (k^T S), rank-1 write and output read of the d_k x d_v state
        state = 4 * value_heads * text_config.linear_key_head_dim * value_dim
        return float(mlp + 2 * params * n + 2 * conv_dim * text_config.linear_conv_kernel_dim * n + 2 * state * n)
    heads, kv_heads, head_dim = _attention_shape(text_config, layer)
    gate = 2 if getattr(text_config, "model_type", None) in GATED_ATTENTION_MODEL_TYPES else 1
    params = hidden * head_dim * ((1 + gate) * heads + 2 * kv_heads)
    return float(mlp + 2 * params * n + 2 * n * n * heads * head_dim)


def prefill_flops(text_config, batch: int, length: int | Sequence[int]) -> float:
    """Forward FLOPs of the decoder layers on a ``batch x length`` prefill (multiply-add = 2 FLOPs); ``length``:
    one per layer, or the same for all.

    Per layer and token: q/k/v/o projections and the gated MLP (``2 * params``; a MoE layer counts the router, the
    experts a token is routed to and the shared expert), plus causal attention scores and weighted sum
    (``2 * 2 * length / 2 * heads * head_dim``); a linear-attention layer instead counts its projections, its
    depthwise conv and one delta-rule step of its state per token. Embeddings and the LM head (one token under
    ``generate``) are left out.
    """
    return float(batch * sum(_layer_flops(text_config, i, kind, n) for i, (n, kind) in
                             enumerate(zip(_per_layer(text_config, length), _layer_types(text_config), strict=True))))
