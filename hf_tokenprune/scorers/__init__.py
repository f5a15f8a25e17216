"""Scorers: one ``score(inputs) -> [batch, max_visual]`` method each (higher = keep)."""

from __future__ import annotations

from .attention import AttentionScorer
from .base import ScoreInputs, Scorer
from .compressor import CompressorScorer
from .oracle import OracleScorer
from .random import RandomScorer
from .uniform import UniformScorer

__all__ = ["AttentionScorer", "CompressorScorer", "OracleScorer", "RandomScorer", "ScoreInputs", "Scorer",
           "UniformScorer"]
