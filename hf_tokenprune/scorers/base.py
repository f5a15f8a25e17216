"""The scorer interface: one method that scores every visual token of a batch (higher = keep)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch
from torch import nn

from ..adapters.base import VisualLayout
from ..features import first_layer_attention
from ..pruning import pack


@dataclass
class ScoreInputs:
    """Everything a scorer may look at on a prefill call, before the first LLM layer.

    Per-visual-token tensors are packed: ``[batch, max_visual]``, each sample's visual tokens in order of
    appearance, padded at the end (``valid`` marks the real entries). ``units[b]`` are the lengths of the
    budget units of sample ``b`` (the whole sample, or each image / video frame), consecutive in that order.
    """

    text_model: nn.Module
    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor | None
    rotary_positions: torch.Tensor
    layout: VisualLayout
    units: list[list[int]]

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
    def visual_embeds(self) -> torch.Tensor:
        """The visual embeddings entering the LLM, ``[batch, max_visual, hidden]``."""
        mask = self.layout.visual_mask
        width = self.valid.shape[1]
        out = self.inputs_embeds.new_zeros((mask.shape[0], width, self.inputs_embeds.shape[-1]))
        out[self.valid] = self.inputs_embeds[mask]
        return out


class Scorer(ABC):
    """Scores visual tokens; the pruner keeps the top ``ratio`` of each budget unit.

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

    def merge(self, inputs: ScoreInputs, keep: torch.Tensor) -> torch.Tensor | None:
        """Optional, for merging methods (ToMe): the ``[batch, max_visual, hidden]`` visual embeddings that replace
        the kept tokens' (``keep``: the packed keep mask chosen from :meth:`score`). None (default): unchanged."""
        return None
