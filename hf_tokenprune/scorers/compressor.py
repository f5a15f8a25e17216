"""``"compressor"``: the trained CNN ``f_theta`` over the first-layer attention (the paper's method)."""

from __future__ import annotations

import torch

from ..compressor import Compressor
from .base import ScoreInputs, Scorer


class CompressorScorer(Scorer):
    """Predicted answer relevance ``softmax(f_theta(A^0_v))``; ranks by the logits (same order)."""

    name = "compressor"
    distribution = "softmax"  # the logits; their softmax is the compressor's relevance R~_v

    def __init__(self, compressor: Compressor) -> None:
        if compressor.feature != "first_layer_attention":
            raise ValueError(f"this compressor reads feature {compressor.feature!r} ({compressor.in_channels} "
                             "channels), a training ablation; pruning computes only 'first_layer_attention'")
        self.compressor = compressor

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        param = next(self.compressor.parameters())
        with torch.no_grad():
            features = inputs.first_layer_attention.to(param.device, param.dtype)
            return self.compressor(features, inputs.valid.to(param.device)).to(inputs.valid.device)
