"""The model card (``README.md``) of a trained compressor directory."""

from __future__ import annotations

import os
from typing import Any

from huggingface_hub import ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .result import TrainResult

__all__ = ["model_card"]


def _hub_id(name: str | None) -> str | None:
    """``name`` if it is a Hub repo id (not a local path), for the card's ``base_model`` field."""
    if not name or os.path.exists(name) or name.count("/") != 1:
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _row(name: str, metrics: dict[str, float]) -> str:
    return (f"| {name} | {metrics['kl']:.4f} | {metrics['recall@25']:.3f} | {metrics['recall@50']:.3f} | "
            f"{metrics['pointing']:.3f} |")


def model_card(result: TrainResult, settings: dict[str, Any], summary: dict[str, Any], epochs: int) -> str:
    """Markdown with Hub metadata: base model, label data, training settings, validation metrics next to the
    raw-attention baseline, and how to use the compressor."""
    base = settings["base_model_name"] or settings["base_model_type"] or "an unspecified model"
    data = ModelCardData(library_name="hf_tokenprune", tags=["token-pruning", "vision-language", "hf_tokenprune"],
                         base_model=_hub_id(settings["base_model_name"]))
    counts = summary["counts"]
    skipped = ", ".join(f"{reason}: {n}" for reason, n in counts.get("skip_reasons", {}).items()) or "none recorded"
    header = "".join(f"| {k} | `{v}` |\n" for k, v in sorted(summary["header"].items()))
    header = f"| label header | value |\n|---|---|\n{header}\n" if header else ""
    family = (f"It was trained for `model_type={settings['base_model_type']!r}` and is refused for other model "
              "families." if settings["base_model_type"] else "It records no base model type.")
    return f"""---
{data.to_yaml()}
---

# Visual-token compressor for {base}

A small 1-D CNN that predicts, from the first LLM layer's instruction-to-vision attention, which visual tokens
matter for the question, so that `hf_tokenprune` can drop the others at the LLM input
("Task-Related Token Compression in MLLMs from an Explainability Perspective", ICLR 2026).
{family}

## How to use

```python
from hf_tokenprune import prune_wrap

model = prune_wrap(model, ratio=0.25, compressor="<this directory or its Hub repo id>")
```

## Label data

{counts["kept"]} labelled samples ({settings["data"]["train"]} training, {settings["data"]["val"]} validation,
split by a hash of the sample id); samples without a label: {counts.get("skipped", 0)} ({skipped}).

{header}## Training

| setting | value |
|---|---|
| feature | `{settings["feature"]}` (input channels: {settings["in_channels"]}) |
| channels | {settings["channels"]} |
| kernel size | {settings["kernel_size"]} |
| loss | KL(R* ‖ softmax(f(A))), R* = oracle relevance with its bottom 50% zeroed, renormalised |
| optimiser | Adam, lr {settings["lr"]}, batch size {settings["batch_size"]} |
| epochs | {len(result.history)} of {epochs} run, best (lowest validation KL): epoch {result.best_epoch} |
| seed | {settings["seed"]} |

## Validation metrics

KL: KL(R* ‖ predicted distribution), lower is better. recall@p: share of the oracle top-p tokens among the
predicted top-p. pointing: the top predicted token is in the oracle top 5%.

| scorer | KL | recall@25% | recall@50% | pointing |
|---|---|---|---|---|
{_row("compressor (this model)", result.metrics)}
{_row("attention (raw first-layer attention)", result.baseline)}

Per-epoch values: `training_log.json`.
"""
