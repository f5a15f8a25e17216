"""The selection methods by name: ``TokenPruneConfig.scorer`` -> the scorer or in-LLM schedule that runs it."""

from __future__ import annotations

from .adapters.base import Adapter
from .baselines import LayerSchedule, build_baseline
from .config import TokenPruneConfig
from .hub import load_compressor
from .scorers import (
    AttentionScorer,
    CDPrunerScorer,
    CompressorDPPScorer,
    CompressorScorer,
    DivPruneScorer,
    RandomScorer,
    Scorer,
    UniformScorer,
    VisionZipScorer,
)

__all__ = ["build_scorer"]


def build_scorer(config: TokenPruneConfig, adapter: Adapter) -> Scorer | LayerSchedule:
    """The scorer a config asks for; loads (:func:`~hf_tokenprune.hub.load_compressor`: without ``compressor=``
    from the model's default Hub repo) and checks the compressor for ``scorer="compressor"`` and
    ``"compressor+dpp"``. The baselines come from :func:`~hf_tokenprune.baselines.build_baseline`: a
    :class:`LayerSchedule` for in-LLM pruning."""
    if not isinstance(config.scorer, str):
        return config.scorer
    if config.scorer in ("fastv", "pdrop", "dart", "tome"):
        return build_baseline(config, adapter)
    if config.scorer == "attention":
        return AttentionScorer()
    if config.scorer == "random":
        return RandomScorer(config.seed)
    if config.scorer == "uniform":
        return UniformScorer()
    if config.scorer == "divprune":
        return DivPruneScorer()
    if config.scorer == "cdpruner":
        return CDPrunerScorer()
    if config.scorer == "visionzip":
        return VisionZipScorer(adapter)
    compressor = load_compressor(config.compressor, adapter.model)
    compressor.check_compatible(adapter.model_type, getattr(adapter.model.config, "_name_or_path", None) or None,
                                allow_mismatch=config.allow_compressor_mismatch)
    param = next(adapter.text_model.parameters())
    compressor.to(param.device).eval()
    return CompressorDPPScorer(compressor) if config.scorer == "compressor+dpp" else CompressorScorer(compressor)
