"""What the in-LLM baselines share: the inputs of a decoder layer, the layer-scorer interface, the pruning
schedule, and the adapter that runs a layer scorer at the LLM input (layer 0) as an ordinary :class:`Scorer`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..features import feature_layer, layer_rotary
from ..pruning import pack
from ..scorers.base import ScoreInputs, Scorer


def last_true(mask: torch.Tensor) -> torch.Tensor:
    """``[batch, length]`` one-hot of the last True of each row of ``mask`` (all False where the row has none)."""
    idx = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask.bool(), idx, -1).amax(dim=1, keepdim=True)
    return idx[None, :] == last


@dataclass
class LayerInputs:
    """A prefill as decoder layer ``layer`` is about to see it (earlier stages already removed their tokens).

    ``hidden_states`` is the layer's input ``[batch, n, hidden]``, ``position_embeddings`` the ``(cos, sin)`` it
    receives; ``attention_mask`` (True = real token), ``visual_mask`` (visual tokens still present) and
    ``instruction_mask`` (see :meth:`~hf_tokenprune.adapters.Adapter.layout`) are ``[batch, n]`` bool.
    """

    layer: nn.Module
    hidden_states: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    attention_mask: torch.Tensor
    visual_mask: torch.Tensor
    instruction_mask: torch.Tensor


class LayerScorer:
    """Scores the visual tokens of a prefill before a decoder layer (higher = keep)."""

    name: ClassVar[str] = "custom"

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        """``[batch, n]`` scores; only the entries of ``inputs.visual_mask`` are used."""
        raise NotImplementedError


@dataclass(frozen=True)
class LayerSchedule:
    """Where an in-LLM method prunes: ``stages`` are ``(layer, keep)`` in increasing layer order, ``keep`` the
    fraction of each budget unit's ORIGINAL visual tokens still present from that layer on (budgeted as
    :func:`~hf_tokenprune.pruning.budget`)."""

    stages: tuple[tuple[int, float], ...]
    scorer: LayerScorer

    @property
    def name(self) -> str:
        return self.scorer.name


class AtInput(Scorer):
    """A layer scorer run on the LLM input with layer 0: the method's ``layer=0`` case is input-stage pruning."""

    def __init__(self, scorer: LayerScorer) -> None:
        self.scorer = scorer
        self.name = scorer.name

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        text_model, embeds, layout = inputs.text_model, inputs.inputs_embeds, inputs.layout
        mask = inputs.attention_mask
        real = mask.bool() if mask is not None else torch.ones(embeds.shape[:2], dtype=torch.bool,
                                                               device=embeds.device)
        # layer 0, or where the first layers are linear attention the first softmax one (as for A^0_v)
        index = feature_layer(text_model)
        with torch.no_grad():
            position_embeddings = layer_rotary(text_model, embeds, inputs.rotary_positions, index)
        layer_inputs = LayerInputs(text_model.layers[index], embeds, position_embeddings, real, layout.visual_mask,
                                   layout.instruction_mask)
        return pack(self.scorer.score(layer_inputs), layout.visual_mask)[0]
