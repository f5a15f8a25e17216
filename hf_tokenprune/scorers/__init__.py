"""Scorers: ``score(inputs) -> [batch, max_visual]`` (higher = keep) and ``select`` (default: the top scores; set
selection for divprune, cdpruner, compressor+dpp); see :mod:`.base`."""

from __future__ import annotations

from .attention import AttentionScorer
from .base import ScoreInputs, Scorer, SetSelection
from .cdpruner import CDPrunerScorer
from .compressor import CompressorScorer
from .compressor_dpp import CompressorDPPScorer
from .divprune import DivPruneScorer
from .oracle import OracleScorer
from .random import RandomScorer
from .uniform import UniformScorer
from .visionzip import VisionZipScorer

__all__ = ["AttentionScorer", "CDPrunerScorer", "CompressorDPPScorer", "CompressorScorer", "DivPruneScorer",
           "OracleScorer", "RandomScorer", "ScoreInputs", "Scorer", "SetSelection", "UniformScorer",
           "VisionZipScorer"]
