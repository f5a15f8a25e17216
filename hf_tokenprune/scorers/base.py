"""The scorer interface: how a method chooses the visual tokens a prefill keeps, per budget unit.

On every prefill the pruner (:class:`~hf_tokenprune.prefill.PrefillPruner`) runs::

    scores = scorer.score(inputs)                  # [batch, max_visual]
    counts = ...                                   # counts[b][u]: tokens kept in unit u of sample b
    keep = scorer.select(inputs, scores, counts)   # [batch, max_visual] bool, exactly counts[b][u] per unit
    merged = scorer.merge(inputs, keep)            # None, or the embeddings that replace the kept tokens'

``counts`` are ``budget(n, ratio, min_tokens)`` per unit, or under ``budget="auto"`` the relevance-mass counts of
the scores' :attr:`Scorer.distribution`, which ``select`` then receives instead of the raw scores (same order).
Three kinds of methods fit:

* **score-then-top-k** (compressor, attention, random, uniform): implement :meth:`Scorer.score`; the default
  :meth:`Scorer.select` keeps each unit's highest scores (ties: the earlier token).
* **set selection** (divprune, cdpruner, compressor+dpp): a :class:`SetSelection` picks each unit's tokens jointly
  (a diverse set is no top-k of per-token scores); its scores are only what ``budget="auto"`` counts from.
* **merging** (tome, visionzip): :meth:`Scorer.merge` also replaces the kept tokens' embeddings.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch
from torch import nn

from ..adapters.base import VisualLayout
from ..features import first_layer_attention
from ..pruning import pack, select_counts, unit_spans


@dataclass
class ScoreInputs:
    """Everything a scorer may look at on a prefill call, before the first LLM layer.

    Per-visual-token tensors are packed: ``[batch, max_visual]``, each sample's visual tokens in order of
    appearance, padded at the end (``valid`` marks the real entries). ``units[b]`` are the lengths of the
    budget units of sample ``b`` (the whole sample, or each image / video frame), consecutive in that order.
    ``call``: the multimodal call's kwargs (``input_ids``, visual inputs), for scorers that read more of the model
    than the LLM input (VisionZip's vision-tower attention).
    """

    text_model: nn.Module
    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor | None
    rotary_positions: torch.Tensor
    layout: VisualLayout
    units: list[list[int]]
    call: Mapping[str, Any] | None = None

    @cached_property
    def valid(self) -> torch.Tensor:
        return pack(self.layout.visual_mask.float(), self.layout.visual_mask)[1]

    @cached_property
    def first_layer_attention(self) -> torch.Tensor:
        """``A^0_v``: layer-0 attention from the instruction tokens to each visual token, ``[batch, max_visual]``."""
        attention = first_layer_attention(self.text_model, self.inputs_embeds, self.rotary_positions,
                                          self.attention_mask, self.layout.instruction_mask)
        return pack(attention, self.layout.visual_mask)[0]

    @cached_property
    def first_layer_head_attention(self) -> torch.Tensor:
        """``A^0_v`` of each query head (not averaged over heads), ``[batch, heads, max_visual]``."""
        attention = first_layer_attention(self.text_model, self.inputs_embeds, self.rotary_positions,
                                          self.attention_mask, self.layout.instruction_mask, per_head=True)
        return pack(attention.transpose(1, 2), self.layout.visual_mask)[0].transpose(1, 2)

    @cached_property
    def visual_embeds(self) -> torch.Tensor:
        """The visual embeddings entering the LLM, ``[batch, max_visual, hidden]``."""
        return pack(self.inputs_embeds, self.layout.visual_mask)[0]


class Scorer(ABC):
    """Scores visual tokens and selects the kept ones of each budget unit (the module doc: the three kinds).

    Subclasses implement :meth:`score` (a subclass without it cannot be instantiated: TypeError). ``name`` is how
    ``TokenPruneConfig(scorer=...)`` refers to built-ins.
    ``distribution`` says how ``budget="auto"`` reads the scores as a relevance distribution over each budget
    unit (:func:`~hf_tokenprune.pruning.unit_distribution`): ``"softmax"`` (logits), ``"sum"`` (non-negative
    relevance, normalised by its sum), or None (no relevance mass: ``budget="auto"`` is refused).
    """

    name: ClassVar[str] = "custom"
    distribution: ClassVar[str | None] = None

    @abstractmethod
    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """Return ``[batch, max_visual]`` scores (entries where ``inputs.valid`` is False are ignored)."""

    def select(self, inputs: ScoreInputs, scores: torch.Tensor, counts: list[list[int]]) -> torch.Tensor:
        """The packed ``[batch, max_visual]`` keep mask with exactly ``counts[b][u]`` tokens in unit ``u`` of sample
        ``b`` (``scores``: :meth:`score`'s, or under ``budget="auto"`` their per-unit distribution). Default: the
        highest scores of each unit, ties to the earlier token."""
        return select_counts(scores, inputs.valid, inputs.units, counts)

    def merge(self, inputs: ScoreInputs, keep: torch.Tensor) -> torch.Tensor | None:
        """Optional, for merging methods (ToMe): the ``[batch, max_visual, hidden]`` visual embeddings that replace
        the kept tokens' (``keep``: the packed keep mask chosen by :meth:`select`). None (default): unchanged."""
        return None


class SetSelection(Scorer):
    """A set-selection method: :meth:`select_unit` chooses the kept tokens of each unit jointly, from the unit's
    visual embeddings (``inputs.visual_embeds``, in the LLM's space) and scores."""

    @abstractmethod
    def select_unit(self, embeds: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
        """Indices of the ``k`` (``1 <= k < n``) tokens kept among a unit's ``n`` tokens (``embeds``:
        ``[n, hidden]``, ``scores``: ``[n]``)."""

    def select(self, inputs: ScoreInputs, scores: torch.Tensor, counts: list[list[int]]) -> torch.Tensor:
        keep = torch.zeros_like(inputs.valid)
        embeds = inputs.visual_embeds
        for b, u, start, n in unit_spans(inputs.units):
            k = counts[b][u]
            if k >= n:
                keep[b, start:start + n] = True
            elif k:
                keep[b, start + self.select_unit(embeds[b, start:start + n], scores[b, start:start + n], k)] = True
        return keep
