"""PruneStats: what one prefill pruned, and the KV-cache bytes and prefill FLOPs it saved (from the config)."""

from __future__ import annotations

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


def kv_cache_bytes(text_config, batch: int, length: int | Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of keys and values for ``batch x length`` tokens over all layers (``length``: one per layer, or the
    same for all)."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    per_token = 2 * kv_heads * head_dim
    return per_token * batch * sum(_per_layer(text_config, length)) * torch.empty((), dtype=dtype).element_size()


def prefill_flops(text_config, batch: int, length: int | Sequence[int]) -> float:
    """Forward FLOPs of the decoder layers on a ``batch x length`` prefill (multiply-add = 2 FLOPs); ``length``:
    one per layer, or the same for all.

    Per layer and token: q/k/v/o projections and the gated MLP (``2 * params``), plus causal attention
    scores and weighted sum (``2 * 2 * length / 2 * heads * head_dim``). Embeddings and the LM head
    (one token under ``generate``) are left out.
    """
    hidden = text_config.hidden_size
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    params = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * text_config.intermediate_size
    return float(batch * sum(2 * params * n + 2 * n * n * heads * head_dim for n in _per_layer(text_config, length)))
