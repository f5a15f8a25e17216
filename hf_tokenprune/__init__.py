"""hf_tokenprune: question-aware visual-token pruning at the LLM input for Hugging Face multimodal LLMs."""

from .adapters import MalformedVisualInputError, UnsupportedModelError
from .calibrate import Calibration, calibrate, save_calibration
from .compressor import Compressor, CompressorMismatchError, InvalidCompressorError
from .config import TokenPruneConfig
from .guards import UnsupportedGenerationError
from .hub import CompressorNotFoundError
from .inllm import PrunedLayerCacheError
from .scorers import AttentionScorer, CompressorScorer, RandomScorer, ScoreInputs, Scorer, UniformScorer
from .stats import PruneStats
from .wrap import PrunedCacheError, from_pretrained, prune_wrap, score_inputs, unwrap

__version__ = "0.1.0"

__all__ = [
    "AttentionScorer",
    "Calibration",
    "Compressor",
    "CompressorMismatchError",
    "CompressorNotFoundError",
    "CompressorScorer",
    "InvalidCompressorError",
    "MalformedVisualInputError",
    "PruneStats",
    "PrunedCacheError",
    "PrunedLayerCacheError",
    "RandomScorer",
    "ScoreInputs",
    "Scorer",
    "TokenPruneConfig",
    "UniformScorer",
    "UnsupportedGenerationError",
    "UnsupportedModelError",
    "calibrate",
    "from_pretrained",
    "prune_wrap",
    "save_calibration",
    "score_inputs",
    "unwrap",
]
