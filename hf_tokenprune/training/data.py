"""Training data from label records: the target ``R*_v``, a deterministic train/validation split, padded batches."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from ..pruning import budget
from .store import LabelRecord

__all__ = ["EpochShuffle", "LabelDataset", "collate", "feature_layers", "is_validation", "record_feature",
           "relevance_target"]

TARGET_KEEP = 0.5


def relevance_target(relevance: torch.Tensor, keep: float = TARGET_KEEP) -> torch.Tensor:
    """``R*_v``: the top ``ceil(keep * N)`` entries of ``R_v`` (``[N]``), the rest zeroed, renormalised to sum 1."""
    top = relevance.topk(budget(relevance.numel(), keep, 1)).indices
    target = torch.zeros_like(relevance)
    target[top] = relevance[top]
    return target / target.sum()


def is_validation(sample_id: str, fraction: float) -> bool:
    """Whether a sample belongs to the validation split: the first 8 bytes of ``sha256(sample_id)`` as a number in
    [0, 1) are below ``fraction``. Stable across runs, machines and dataset orderings."""
    return int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "big") / 2**64 < fraction


def feature_layers(records: Sequence[LabelRecord]) -> int:
    """Input channels of the records' features: 1 for ``[N_v]`` (or ``[1, N_v]``), ``K`` for ``[K, N_v]``."""
    layers = {1 if r.feature.dim() == 1 else r.feature.shape[0] for r in records}
    if len(layers) != 1:
        raise ValueError(f"label records mix features of {sorted(layers)} layers")
    return layers.pop()


def record_feature(records: Sequence[LabelRecord], header: dict) -> tuple[str, int]:
    """The compressor feature and input channels the records hold: the label header's ``feature`` for per-head
    features (``"first_layer_head_attention"``), else ``"first_layer_attention"`` for ``[N_v]`` and the
    multi-layer ``"layer_attention"`` for ``[K, N_v]``."""
    channels = feature_layers(records)
    if header.get("feature") == "first_layer_head_attention":
        return "first_layer_head_attention", channels
    return ("first_layer_attention" if channels == 1 else "layer_attention"), channels


class LabelDataset(Dataset):
    """``(feature, target R*_v, relevance R_v)`` per record; the feature is ``[N_v]`` or ``[K, N_v]``."""

    def __init__(self, records: Sequence[LabelRecord]) -> None:
        layers = feature_layers(records) if records else 1
        self.items = [(r.feature.reshape(-1) if layers == 1 else r.feature, relevance_target(r.relevance),
                       r.relevance) for r in records]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.items[i]


def collate(items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample: ``features`` ``[B, N]`` or ``[B, K, N]``, ``target``, ``relevance``
    ``[B, N]`` (0 at padding) and ``mask`` ``[B, N]`` (True at real tokens)."""
    n = max(t.numel() for _, t, _ in items)
    first = items[0][0]
    features = first.new_zeros((len(items), *first.shape[:-1], n))
    target = torch.zeros(len(items), n)
    relevance = torch.zeros(len(items), n)
    mask = torch.zeros(len(items), n, dtype=torch.bool)
    for i, (f, t, r) in enumerate(items):
        features[i, ..., : t.numel()] = f
        target[i, : t.numel()] = t
        relevance[i, : t.numel()] = r
        mask[i, : t.numel()] = True
    return {"features": features, "target": target, "relevance": relevance, "mask": mask}


class EpochShuffle(Sampler[int]):
    """A permutation drawn from ``seed + epoch``: the order of an epoch does not depend on what ran before, so a
    resumed run sees the same batches as an uninterrupted one (and every process draws the same order)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size
