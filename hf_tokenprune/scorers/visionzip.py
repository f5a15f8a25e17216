"""``"visionzip"``: VisionZip (Yang et al., CVPR 2025), dominant plus contextual tokens; task-agnostic, input stage.

Per budget unit keeping ``k`` of its ``n`` tokens:

* **dominant**: the ``k_d = round(k * 54 / 64)`` tokens that receive the most attention inside the vision tower
  (the paper's default split of 64 kept tokens into 54 dominant and 10 contextual; ties: the earlier token). The
  attention comes from the adapter (:meth:`~hf_tokenprune.adapters.Adapter.vision_attention`): LLaVA-1.5's CLS
  attention in its CLIP feature layer (the penultimate, as the paper), and for the Qwen2-VL-style towers the
  attention each patch receives in the last block (mean over heads and the image's queries), summed over the 2 x 2
  patches merged into one LLM token. It is recomputed from that layer's input, captured by a forward pre-hook
  during the tower's ordinary run, and its own q/k projections (:mod:`hf_tokenprune.adapters.vision_attention`):
  no extra tower pass, no eager attention.
* **contextual**: the other ``k_c = k - k_d``. Targets are evenly spaced among the non-dominant tokens (every
  ``m // k_c``-th of the ``m``, as the paper's code); each other non-dominant token joins its most cosine-similar
  target (ties: the earlier target) and a target's embedding becomes the mean of its group, itself included.
  Similarity is taken on the visual embeddings entering the LLM, not on the tower layer's keys as in the paper:
  they are what is kept and merged at the LLM input, and only the layer's input is captured.

Kept tokens stay at their positions (a contextual token at its target's). The scores (the vision attention) rank
only the dominant tokens, so there is no relevance distribution: ``budget="auto"`` is refused. Families whose
tower the adapter does not map refuse at construction (:class:`~hf_tokenprune.adapters.UnsupportedMethodError`).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ..adapters.base import Adapter
from ..adapters.vision_attention import VisionAttentionCapture
from ..pruning import pack, unit_spans
from .base import ScoreInputs, Scorer

DOMINANT, KEPT = 54, 64  # the paper's default: 54 dominant + 10 contextual tokens of 64


def zip_unit(attention: torch.Tensor, embeds: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One unit of ``n`` tokens (``attention`` ``[n]``, ``embeds`` ``[n, hidden]``) keeping ``k`` (``1 <= k < n``):
    the ``[n]`` keep mask and the embeddings with each contextual target replaced by its group's mean."""
    n = attention.shape[0]
    dominant = int(k * DOMINANT / KEPT + 0.5)
    keep = torch.zeros(n, dtype=torch.bool, device=attention.device)
    keep[torch.sort(attention, descending=True, stable=True).indices[:dominant]] = True
    out = embeds.clone()
    contextual = k - dominant
    if contextual:
        rest = (~keep).nonzero().flatten()
        targets = rest[::rest.numel() // contextual][:contextual]
        keep[targets] = True
        others = rest[~keep[rest]]
        x = F.normalize(embeds.float(), dim=-1)
        assign = (x[others] @ x[targets].T).argmax(dim=1)
        sums = embeds[targets].float().index_add(0, assign, embeds[others].float())
        sizes = torch.ones(contextual, device=embeds.device).index_add(0, assign, torch.ones_like(assign,
                                                                                                   dtype=torch.float))
        out[targets] = (sums / sizes[:, None]).to(embeds.dtype)
    return keep, out


class VisionZipScorer(Scorer):
    """Scores are the vision-tower attention; :meth:`select` keeps the dominant and contextual tokens and
    :meth:`merge` returns the contextual tokens' merged embeddings.

    The capture hook is installed on the adapter's :meth:`~hf_tokenprune.adapters.Adapter.vision_attention_layer`
    when the scorer is built and records only while it is the active scorer of ``model.tokenprune`` (or while the
    model is not wrapped); :meth:`release` removes it (the wrap handle calls it on reconfiguration and unwrap).
    """

    name = "visionzip"

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        self.capture = VisionAttentionCapture(adapter.vision_attention_layer(), self._recording)
        self._last: tuple[weakref.ref, torch.Tensor, torch.Tensor] | None = None

    def _recording(self) -> bool:
        handle = getattr(self.adapter.model, "tokenprune", None)
        return handle is None or (handle.active and handle.scorer is self)

    def release(self) -> None:
        """Remove the capture hook from the vision tower."""
        self.capture.remove()

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        records = self.capture.take()
        if inputs.call is None or not records:
            raise ValueError("scorer='visionzip' needs the vision tower to run in the pruned call (pixel values, not "
                             "pre-computed visual features or inputs_embeds)")
        attention = self.adapter.vision_attention(records, inputs.call)
        return pack(attention.to(inputs.valid.device), inputs.layout.visual_mask)[0]

    def select(self, inputs: ScoreInputs, scores: torch.Tensor, counts: list[list[int]]) -> torch.Tensor:
        keep = torch.zeros_like(inputs.valid)
        embeds = inputs.visual_embeds
        merged = embeds.clone()
        for b, u, start, n in unit_spans(inputs.units):
            k = counts[b][u]
            if k >= n:
                keep[b, start:start + n] = True
            elif k:
                keep[b, start:start + n], merged[b, start:start + n] = zip_unit(
                    scores[b, start:start + n], embeds[b, start:start + n], k)
        self._last = (weakref.ref(inputs), keep, merged)
        return keep

    def merge(self, inputs: ScoreInputs, keep: torch.Tensor) -> torch.Tensor:
        last, self._last = self._last, None
        if last is None or last[0]() is not inputs or not torch.equal(last[1], keep):
            raise ValueError("VisionZipScorer.merge: the keep mask is not the one its select chose")
        return last[2]
