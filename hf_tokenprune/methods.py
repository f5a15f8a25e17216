"""The selection methods by name: ``TokenPruneConfig.scorer`` -> the scorer or in-LLM schedule that runs it.

The default (``scorer=None``) is the model's compressor when one is found, else :data:`FALLBACK_SCORER` with a
:class:`NoCompressorWarning`, issued once per model object (at ``prune_wrap``, not per call)."""

from __future__ import annotations

import warnings
import weakref

from torch import nn

from .adapters.base import Adapter
from .baselines import LayerSchedule, build_baseline
from .compressor import Compressor
from .config import AUTO_FALLBACK_SCORER, COMPRESSOR_SCORERS, FALLBACK_SCORER, TokenPruneConfig
from .hub import CompressorNotFoundError, find_default_compressor, load_compressor
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

__all__ = ["NoCompressorWarning", "build_scorer", "scorer_label"]

_WARNED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models already told that they have no compressor


class NoCompressorWarning(UserWarning):
    """The default scorer found no compressor for the model and prunes with a training-free scorer instead."""


def build_scorer(config: TokenPruneConfig, adapter: Adapter) -> Scorer | LayerSchedule:
    """The scorer a config asks for; loads (:func:`~hf_tokenprune.hub.load_compressor`: without ``compressor=``
    from the model's default Hub repo) and checks the compressor for ``scorer="compressor"`` and
    ``"compressor+dpp"``. ``scorer=None``: :func:`_default_scorer`. The baselines come from
    :func:`~hf_tokenprune.baselines.build_baseline`: a :class:`LayerSchedule` for in-LLM pruning."""
    if config.scorer is None:
        return _default_scorer(config, adapter)
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
    compressor = _checked(load_compressor(config.compressor, adapter.model), config, adapter)
    return CompressorDPPScorer(compressor) if config.scorer == "compressor+dpp" else CompressorScorer(compressor)


def _checked(compressor: Compressor, config: TokenPruneConfig, adapter: Adapter) -> Compressor:
    """``compressor`` checked against the model's family and moved to its device, in eval mode."""
    compressor.check_compatible(adapter.model_type, getattr(adapter.model.config, "_name_or_path", None) or None,
                                allow_mismatch=config.allow_compressor_mismatch)
    param = next(adapter.text_model.parameters())
    return compressor.to(param.device).eval()


def _default_scorer(config: TokenPruneConfig, adapter: Adapter) -> Scorer:
    """``scorer=None``: the compressor ``compressor=`` names (it must load), else the one in the model's default Hub
    repo (:func:`~hf_tokenprune.hub.find_default_compressor`: fails fast offline and on a missing repo), else
    :data:`FALLBACK_SCORER` (``budget="auto"``: :data:`AUTO_FALLBACK_SCORER`, which has a relevance distribution),
    warning once per model. A compressor that is found but invalid or for another family still raises."""
    model = adapter.model
    try:
        compressor = (load_compressor(config.compressor, model) if config.compressor is not None
                      else find_default_compressor(model))
    except CompressorNotFoundError as err:
        if config.compressor is not None:
            raise
        fallback = AUTO_FALLBACK_SCORER if config.budget == "auto" else FALLBACK_SCORER
        if model not in _WARNED:
            _WARNED.add(model)
            warnings.warn(
                f"hf_tokenprune: {err}. Pruning with the training-free scorer {fallback!r} instead (the best "
                "training-free method measured on the toy world models: docs/results.md#the-default-without-a-"
                "compressor). To prune with a compressor, train one for this model (`hf-tokenprune label --model "
                "<model> --data <data> --out labels/`, then `hf-tokenprune train --labels labels/ --out "
                "compressor/`: docs/compressors.md) and pass compressor=; pass scorer= to choose a method and "
                "silence this warning.", NoCompressorWarning, stacklevel=4)
        return build_scorer(config.replace(scorer=fallback), adapter)
    return CompressorScorer(_checked(compressor, config, adapter))


def scorer_label(config: TokenPruneConfig, scorer: Scorer | LayerSchedule) -> str:
    """The name of the method that runs (:attr:`PruneStats.scorer <hf_tokenprune.PruneStats>`): the configured
    one, or for ``scorer=None`` the compressor's or ``"<fallback> (no compressor found)"``."""
    if config.scorer is not None:
        return config.scorer_name
    return scorer.name if scorer.name in COMPRESSOR_SCORERS else f"{scorer.name} (no compressor found)"
