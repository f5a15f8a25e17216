"""Calibration of ``budget="auto"``: the relevance-mass threshold that gives a target mean retention.

The scores of a calibration set are computed once (the LLM itself never runs: :func:`~hf_tokenprune.score_inputs`
stops at its input); the mean retention is a non-decreasing step function of the threshold, so bisection finds the
step nearest the target. Mean retention is the mean over samples of each sample's kept fraction of its visual
tokens (:attr:`hf_tokenprune.PruneStats.retention`), exactly what ``prune_wrap(model, budget="auto")`` keeps on the
same samples. :func:`save_calibration` writes the result to a compressor directory's ``config.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import get_adapter
from .atomic import write_atomic
from .compressor import Compressor, validate_calibration
from .config import COMPRESSOR_SCORERS, TokenPruneConfig, check_fraction
from .methods import build_scorer
from .pruning import cumulative_mass, mass_counts, unit_distribution
from .scorers import CompressorScorer, Scorer
from .wrap import resolve_budget, score_inputs

__all__ = ["Calibration", "calibrate", "save_calibration"]

BISECTION_STEPS = 60


@dataclass(frozen=True)
class Calibration:
    """A calibrated ``budget="auto"`` threshold: ``mass``, the clamp, scope and distribution ``temperature`` it was
    chosen for, the ``target`` mean retention and the ``retention`` it achieves on the ``samples`` calibration
    samples."""

    mass: float
    min_ratio: float
    max_ratio: float
    min_tokens: int
    scope: str
    target: float
    retention: float
    samples: int
    temperature: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _scorer(model: nn.Module, config: TokenPruneConfig) -> Scorer:
    """The scorer ``config`` names; for a model wrapped with a compressor and no ``compressor=``, that one."""
    wrapped = getattr(model.__dict__.get("tokenprune"), "scorer", None)
    if config.scorer in COMPRESSOR_SCORERS and config.compressor is None and isinstance(wrapped, CompressorScorer):
        config = config.replace(compressor=wrapped.compressor)
    scorer = build_scorer(config, get_adapter(model))
    resolve_budget(config.replace(mass=1.0), scorer)  # refuses a scorer without a relevance distribution
    return scorer


def calibrate(model: nn.Module, batches: Iterable[Mapping[str, Any]], target: float = 0.25, *,
              scorer: str | Scorer = "compressor", compressor: str | os.PathLike | Compressor | None = None,
              scope: str = "sample", min_ratio: float = 0.0, max_ratio: float = 1.0, min_tokens: int = 1,
              temperature: float = 1.0, progress: bool = False) -> Calibration:
    """The relevance-mass threshold whose mean retention on ``batches`` is nearest ``target``.

    Args:
        model: a supported MLLM, wrapped or not (a wrapped one's compressor is used when ``compressor`` is None).
        batches: processor outputs (one or more samples each), as passed to ``generate``.
        target: the mean fraction of visual tokens to keep, in (0, 1].
        scorer, compressor, scope, min_ratio, max_ratio, min_tokens, temperature: as in :class:`TokenPruneConfig`
            with ``budget="auto"``.
        progress: show a tqdm bar over the batches (with a total when ``batches`` has a length).

    Returns:
        The :class:`Calibration`; its ``retention`` may miss ``target`` by the size of a step (few samples or
        tokens) or when the clamp cannot reach it.

    Raises:
        ValueError: invalid arguments, a scorer without a relevance distribution, or no visual tokens in
            ``batches``.
    """
    target = check_fraction("target", target)
    config = TokenPruneConfig(budget="auto", scorer=scorer, compressor=compressor, scope=scope, min_ratio=min_ratio,
                              max_ratio=max_ratio, min_tokens=min_tokens, temperature=temperature)
    built = _scorer(model, config)
    samples: list[tuple[list[torch.Tensor], int]] = []
    for batch in tqdm(batches, desc="calibrate", unit="batch", disable=not progress):
        inputs = score_inputs(model, dict(batch), scope=scope)
        if inputs is None:
            continue
        with torch.no_grad():
            scores = built.score(inputs).to(inputs.valid.device)
        distribution = unit_distribution(scores, inputs.units, built.distribution, config.temperature)
        cumulative = cumulative_mass(distribution, inputs.units)
        samples += [(c, n) for c, n in zip(cumulative, inputs.layout.counts, strict=True) if n]
    if not samples:
        raise ValueError("the calibration batches hold no visual tokens")

    def retention(mass: float) -> float:
        counts = mass_counts([c for c, _ in samples], mass, min_ratio, max_ratio, min_tokens)
        return sum(sum(k) / n for k, (_, n) in zip(counts, samples, strict=True)) / len(samples)

    low, high = 0.0, 1.0  # retention(low) < target <= retention(high), unless the clamp or step says otherwise
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        if retention(middle) < target:
            low = middle
        else:
            high = middle
    candidates = [high] + ([low] if low > 0 else [])
    mass = min(candidates, key=lambda m: (abs(retention(m) - target), candidates.index(m)))
    return Calibration(mass=mass, min_ratio=float(min_ratio), max_ratio=float(max_ratio), min_tokens=min_tokens,
                       scope=scope, temperature=config.temperature, target=target, retention=retention(mass),
                       samples=len(samples))


def save_calibration(directory: str | os.PathLike, calibration: Calibration | Mapping[str, Any]) -> Path:
    """Write ``calibration`` into the compressor directory's ``config.json`` (replaced atomically), so that
    ``prune_wrap(model, budget="auto", compressor=directory)`` uses it; returns the file's path.

    Raises:
        ValueError: an invalid calibration, or ``directory`` is not a loadable compressor
            (:class:`~hf_tokenprune.CompressorNotFoundError` when it does not exist or lacks a file).
    """
    values = calibration.to_dict() if isinstance(calibration, Calibration) else dict(calibration)
    values = validate_calibration(values)
    path = Path(directory) / "config.json"
    Compressor.from_pretrained(Path(directory))  # a local directory only; refuses one that is no valid compressor
    config = json.loads(path.read_text())
    config["calibration"] = values
    write_atomic(path, json.dumps(config, sort_keys=True, indent=2).encode())
    return path
