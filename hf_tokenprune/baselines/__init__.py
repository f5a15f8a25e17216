"""Baselines behind the same API: FastV, PyramidDrop and DART prune inside the LLM (a :class:`LayerSchedule`
run by :mod:`hf_tokenprune.inllm`); ToMe-style merging is an input-stage :class:`~hf_tokenprune.scorers.Scorer`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..adapters.base import UnsupportedMethodError
from .base import AtInput, LayerInputs, LayerSchedule, LayerScorer
from .dart import DARTScorer
from .fastv import FastVScorer
from .pdrop import PDropScorer, pdrop_stages
from .tome import ToMeScorer, bipartite_merge

if TYPE_CHECKING:
    from ..adapters.base import Adapter
    from ..config import TokenPruneConfig
    from ..scorers.base import Scorer

__all__ = ["AtInput", "DARTScorer", "FastVScorer", "LayerInputs", "LayerSchedule", "LayerScorer", "PDropScorer",
           "ToMeScorer", "bipartite_merge", "build_baseline", "pdrop_stages"]


def build_baseline(config: TokenPruneConfig, adapter: Adapter) -> Scorer | LayerSchedule:
    """The baseline ``config.scorer`` names, for this model's depth."""
    if config.scorer == "tome":
        return ToMeScorer(config.ratio, config.min_tokens)
    depth = adapter.model.config.get_text_config().num_hidden_layers
    if config.scorer == "pdrop":
        schedule = LayerSchedule(pdrop_stages(depth, config.ratio), PDropScorer())
    else:
        scorer = FastVScorer() if config.scorer == "fastv" else DARTScorer()
        layer = config.pruning_layer
        if layer >= depth:
            raise ValueError(f"scorer={config.scorer!r} prunes before layer {layer}, but the LLM has {depth} decoder "
                             f"layers: pass layer= below {depth}")
        if layer == 0:
            return AtInput(scorer)
        schedule = LayerSchedule(((layer, config.ratio),), scorer)
    for layer, _ in schedule.stages:
        if (reason := adapter.inllm_refusal(layer)) is not None:
            raise UnsupportedMethodError(f"scorer={config.scorer!r} would prune before decoder layer {layer}, which "
                                         f"is not supported: {reason}")
    return schedule
