"""``"compressor"``: the trained CNN ``f_theta`` over the first-layer attention (the paper's method)."""

from __future__ import annotations

import torch

from ..compressor import INFERENCE_FEATURES, Compressor
from .base import ScoreInputs, Scorer


class CompressorScorer(Scorer):
    """Predicted answer relevance ``softmax(f_theta(A^0_v))``; ranks by the logits (same order). A
    ``"first_layer_head_attention"`` compressor reads ``A^0_v`` of each head of the first layer instead."""

    name = "compressor"
    distribution = "softmax"  # the logits; their softmax is the compressor's relevance R~_v

    def __init__(self, compressor: Compressor) -> None:
        if compressor.feature not in INFERENCE_FEATURES:
            raise ValueError(f"this compressor reads feature {compressor.feature!r} ({compressor.in_channels} "
                             "channels), a training ablation; pruning computes only "
                             f"{' and '.join(INFERENCE_FEATURES)}")
        self.compressor = compressor

    def features(self, inputs: ScoreInputs) -> torch.Tensor:
        """The compressor's input on this prefill: ``[batch, max_visual]`` or ``[batch, heads, max_visual]``."""
        if self.compressor.feature == "first_layer_attention":
            return inputs.first_layer_attention
        heads = inputs.first_layer_head_attention
        if heads.shape[1] != self.compressor.in_channels:
            raise ValueError(f"the compressor reads {self.compressor.in_channels} attention heads of the first layer, "
                             f"the model has {heads.shape[1]}: it was trained for another model")
        return heads[:, 0] if self.compressor.in_channels == 1 else heads

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        param = next(self.compressor.parameters())
        with torch.no_grad():
            features = self.features(inputs).to(param.device, param.dtype)
            return self.compressor(features, inputs.valid.to(param.device)).to(inputs.valid.device)
