"""Answer accuracy per method and retention: on the toy world's shipped models, or on any Hugging Face dataset.

* :func:`world_task`: held-out questions of :mod:`hf_tokenprune.world`, scored by
  :func:`hf_tokenprune.world.evaluate.accuracy` (exact first word), for a shipped world model;
* :func:`dataset_accuracy`: a ``datasets.Dataset`` (or any sequence of dicts) with image, question and answer
  columns, for users with a real model and data: the answer counts as right when the normalised prediction starts
  with the normalised answer (any of them, for a list of reference answers).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import ProcessorMixin


@dataclass
class AccuracyTask:
    """A model, how to measure its accuracy, and the compressor its ``compressor`` method uses (None: skipped)."""

    name: str
    model: nn.Module
    evaluate: Callable[[nn.Module], dict[str, Any]]
    compressor: str | None


def world_task(family: str, samples: int, batch_size: int = 32) -> AccuracyTask:
    """The shipped ``family`` world model on ``samples`` held-out image questions.

    Raises:
        FileNotFoundError: the world model is not shipped (not trained yet).
    """
    from ..world import compressor_path, load
    from ..world.evaluate import accuracy, heldout_samples

    model, processor = load(family)
    questions = heldout_samples(samples)
    try:
        compressor = str(compressor_path(family))
    except FileNotFoundError:
        compressor = None
    return AccuracyTask(f"world-{family}", model, lambda m: accuracy(m, processor, questions, batch_size),
                        compressor)


def normalize(text: str) -> str:
    """Lower case, punctuation and articles removed, white space folded."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def is_correct(prediction: str, answers: str | Sequence[str]) -> bool:
    """The normalised prediction starts with one of the normalised answers (as whole words)."""
    words = normalize(prediction).split()
    for answer in [answers] if isinstance(answers, str) else answers:
        expected = normalize(str(answer)).split()
        if expected and words[:len(expected)] == expected:
            return True
    return False


def _image(value: Any):
    import PIL.Image

    if isinstance(value, (str, Path)):
        return PIL.Image.open(value).convert("RGB")
    return value.convert("RGB") if hasattr(value, "convert") else value


def dataset_accuracy(model: nn.Module, processor: ProcessorMixin, dataset: Any, *, image_column: str = "image",
                     question_column: str = "question", answer_column: str = "answer", batch_size: int = 8,
                     max_new_tokens: int = 8, limit: int | None = None) -> dict[str, Any]:
    """Greedy-answer accuracy of ``model`` (pruned or not) on ``dataset``.

    Args:
        dataset: a ``datasets.Dataset`` or a sequence of dicts. The image column holds PIL images or paths; the
            answer column a string or a list of acceptable strings.
        limit: evaluate the first ``limit`` rows only.

    Returns:
        ``{"accuracy", "n", "predictions"}``.
    """
    rows = range(len(dataset) if limit is None else min(limit, len(dataset)))
    processor.tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    predictions: list[str] = []
    hits: list[bool] = []
    for start in range(0, len(rows), batch_size):
        batch = [dataset[i] for i in rows[start:start + batch_size]]
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": str(row[question_column])}]}],
            add_generation_prompt=True, tokenize=False) for row in batch]
        inputs = processor(text=texts, images=[_image(row[image_column]) for row in batch], padding=True,
                           return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        predictions += [a.strip() for a in answers]
        hits += [is_correct(a, row[answer_column]) for a, row in zip(answers, batch, strict=True)]
    return {"accuracy": sum(hits) / max(len(hits), 1), "n": len(hits), "predictions": predictions}


def _split_name(spec: str) -> tuple[str, str | None, str]:
    """``name[:config]:split`` -> (name, config, split)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"--hf-dataset takes NAME:SPLIT or NAME:CONFIG:SPLIT, got {spec!r}")
    return parts[0], (parts[1] if len(parts) == 3 else None), parts[-1]


def hf_dataset_task(model_name: str, dataset_spec: str, columns: Sequence[str], limit: int,
                    batch_size: int = 8, compressor: str | None = None) -> AccuracyTask:
    """A Hub (or local) MLLM on a Hub dataset (``name[:config]:split``), ``columns`` = image, question, answer."""
    from datasets import load_dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor

    name, config, split = _split_name(dataset_spec)
    dataset = load_dataset(name, config, split=split)
    model = AutoModelForImageTextToText.from_pretrained(model_name).eval()
    processor = AutoProcessor.from_pretrained(model_name)
    image, question, answer = columns
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{model_name}-{dataset_spec}")

    def evaluate(m: nn.Module) -> dict[str, Any]:
        result = dataset_accuracy(m, processor, dataset, image_column=image, question_column=question,
                                  answer_column=answer, batch_size=batch_size, limit=limit)
        return {"accuracy": result["accuracy"], "n": result["n"]}

    return AccuracyTask(slug, model, evaluate, compressor)
