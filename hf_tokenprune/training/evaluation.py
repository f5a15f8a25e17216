"""Scoring compressors on stored labels against the oracle ``R_v``, beside the raw first-layer attention they read:
the validation metrics training reports each epoch, and :func:`evaluate_compressors` for compressors trained
elsewhere (on another label set, with other settings) scored on the same held-out labels."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader

from ..compressor import Compressor
from .data import LabelDataset, collate, is_validation, record_feature
from .metrics import METRICS, kl_divergence, ranking_metrics
from .store import LabelRecord, load_records

__all__ = ["evaluate_compressors"]

Scores = Callable[[dict], tuple[torch.Tensor, torch.Tensor]]


def log_q(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-softmax of ``logits`` over the real (``mask``) tokens."""
    return torch.log_softmax(logits.masked_fill(~mask, torch.finfo(logits.dtype).min), dim=-1)


def compressor_scores(model: Compressor) -> Scores:
    """A batch's ranking and log-distribution from ``model``'s logits."""
    def scores(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(batch["features"], batch["mask"]).float()
        return logits, log_q(logits, batch["mask"])

    return scores


def attention_scores(feature: str, head: int | None = None) -> Scores:
    """The raw first-layer attention ``A^0_v`` of a ``feature`` batch (the heads' mean of a per-head one, the first
    layer's of a multi-layer one; ``head``: that head's of a per-head one) as ranking and as distribution
    (``A / sum A``)."""
    def scores(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        a = batch["features"]
        if head is not None:
            a = a[:, head]
        elif a.dim() == 3:
            a = a.mean(dim=1) if feature == "first_layer_head_attention" else a[:, 0]
        return _distribution(a, batch["mask"])

    return scores


def _distribution(a: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` (0 at padding) as ranking and its log-distribution ``log(a / sum a)``."""
    a = a.clamp_min(0).masked_fill(~mask, 0)
    q = a / a.sum(dim=1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    return a, torch.log(q.clamp_min(torch.finfo(a.dtype).tiny))


@torch.no_grad()
def evaluate_scores(scores: Scores, loader: DataLoader,
                    gather: Callable[[torch.Tensor], torch.Tensor] = lambda rows: rows) -> dict[str, float]:
    """Mean of the per-sample :data:`METRICS` over ``loader``; ``gather`` collects the rows of every process
    (``accelerator.gather_for_metrics`` in a launched run)."""
    rows = []
    for batch in loader:
        ranking, log_prob = scores(batch)
        per_sample = {"kl": kl_divergence(batch["target"], log_prob, batch["mask"]),
                      **ranking_metrics(ranking, batch["relevance"], batch["mask"])}
        rows.append(gather(torch.stack([per_sample[m] for m in METRICS], dim=1)))
    return dict(zip(METRICS, torch.cat(rows).mean(dim=0).tolist(), strict=True))


def evaluate_compressors(labels: str | os.PathLike | Sequence[LabelRecord],
                         compressors: Sequence[str | os.PathLike], *, val_fraction: float | None = 0.1,
                         batch_size: int = 128) -> dict[str, dict[str, float]]:
    """The :data:`METRICS` of each compressor (keyed by its path as given) and of ``"attention"`` on ``labels``;
    per-head labels also score each head's attention alone (``"attention head 0"``, ...).

    ``val_fraction`` picks the validation split :func:`~hf_tokenprune.training.train_compressor` holds out at the
    same fraction (a hash of the sample id, so it is the same labels whichever store they sit in); None scores
    every label. Held out only for compressors trained at that fraction on labels of the same samples.

    Raises:
        ValueError: no labels to score, or a compressor reads another feature than the labels hold.
        CompressorMismatchError: a compressor was trained for another model family than the labels'.
    """
    records, summary = load_records(labels)
    if val_fraction is not None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1) or None, got {val_fraction!r}")
        records = [r for r in records if is_validation(r.sample_id, val_fraction)]
    if not records:
        raise ValueError(f"no labels to score (val_fraction={val_fraction!r})")
    (feature, layers), model_type = record_feature(records, summary["header"]), summary["header"].get("model_type")
    loaded = {}
    for path in compressors:
        model = Compressor.from_pretrained(path).eval()
        if (model.feature, model.in_channels) != (feature, layers):
            raise ValueError(f"compressor {str(path)!r} reads {model.feature} ({model.in_channels} channel(s)), "
                             f"the labels hold {feature} ({layers})")
        if model_type is not None:
            model.check_compatible(model_type)
        loaded[str(path)] = model
    loader = DataLoader(LabelDataset(records), batch_size=batch_size, collate_fn=collate)
    heads = range(layers) if feature == "first_layer_head_attention" else range(0)
    return {"attention": evaluate_scores(attention_scores(feature), loader),
            **{f"attention head {h}": evaluate_scores(attention_scores(feature, h), loader) for h in heads},
            **{name: evaluate_scores(compressor_scores(model), loader) for name, model in loaded.items()}}
