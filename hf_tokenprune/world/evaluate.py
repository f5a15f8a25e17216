"""Held-out answer accuracy of a world model (pruned or not), through ``generate`` like any user would."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from transformers import ProcessorMixin

from .scenes import LOOKUP, Sample, make_samples


def chat_prompts(processor: ProcessorMixin, samples: list[Sample]) -> list[str]:
    """The chat-template prompt (with generation prompt) of each sample: its image or video, then the question."""
    return [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video" if s.is_video else "image"},
                                      {"type": "text", "text": s.question.text}]}],
        add_generation_prompt=True, tokenize=False) for s in samples]


def heldout_samples(n: int, *, video: bool = False, seed: int = 0, start: int = 0,
                    kinds: tuple[str, ...] = LOOKUP, n_objects: tuple[int, int] = (96, 144)) -> list[Sample]:
    """``n`` held-out samples: one question of ``kinds`` about each of the test scenes ``start .. start + n - 1``
    (``n_objects`` objects on 16x16 cells)."""
    return [s for i in range(start, start + n)
            for s in make_samples("test", i, seed=seed, video=video, kinds=kinds, n_objects=n_objects)]


def inputs_for(processor: ProcessorMixin, samples: list[Sample]) -> dict[str, torch.Tensor]:
    """A left-padded processor batch for ``samples`` (all images or all videos)."""
    processor.tokenizer.padding_side = "left"
    key = "videos" if samples[0].is_video else "images"
    return processor(text=chat_prompts(processor, samples), padding=True, return_tensors="pt",
                     **{key: [s.media for s in samples]})


def first_word(text: str) -> str:
    """The answer a world question is scored on: the first word of the generated text."""
    return (text.split() or [""])[0]


def predict(model: nn.Module, processor: ProcessorMixin, samples: list[Sample], batch_size: int = 32) -> list[str]:
    """Greedy answers (first word) for ``samples``."""
    device = next(model.parameters()).device
    answers: list[str] = []
    for i in range(0, len(samples), batch_size):
        inputs = inputs_for(processor, samples[i:i + batch_size]).to(device)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        answers += [first_word(t) for t in texts]
    return answers


def accuracy(model: nn.Module, processor: ProcessorMixin, samples: list[Sample], batch_size: int = 32) -> dict:
    """Overall and per-question-kind accuracy on ``samples``."""
    return score_answers(samples, predict(model, processor, samples, batch_size))


def score_answers(samples: list[Sample], answers: list[str]) -> dict:
    """Overall and per-question-kind accuracy of ``answers`` to ``samples``."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for s, a in zip(samples, answers, strict=True):
        hits[s.question.kind].append(a == s.question.answer)
    every = [h for v in hits.values() for h in v]
    return {"accuracy": sum(every) / len(every), "n": len(every),
            "per_kind": {k: round(sum(v) / len(v), 4) for k, v in sorted(hits.items())}}


def answer_accuracy(model: nn.Module, processor: ProcessorMixin, n: int, *, family: str) -> dict:
    """Held-out accuracy on ``n`` :data:`~.scenes.LOOKUP` image questions and ``n // 4`` each of
    ``shape_of_colour``, ``left_of``, ``count_of_colour`` and ``majority_colour`` (for Qwen2-VL also ``n // 2``
    video lookups and ``n // 4`` ``frame_of_shape``)."""
    few = max(1, n // 4)
    out = {"image": accuracy(model, processor, heldout_samples(n)),
           "shape_of_colour": accuracy(model, processor, heldout_samples(few, kinds=("shape_of_colour",))),
           "left_of": accuracy(model, processor, heldout_samples(few, kinds=("left_of",))),
           "count_of_colour": accuracy(model, processor, heldout_samples(few, kinds=("count_of_colour",))),
           "majority_colour": accuracy(model, processor, heldout_samples(few, kinds=("majority_colour",)))}
    if family == "qwen2_vl":
        out["video"] = accuracy(model, processor, heldout_samples(max(1, n // 2), video=True))
        out["frame_of_shape"] = accuracy(model, processor, heldout_samples(few, video=True, kinds=("frame_of_shape",)))
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m hf_tokenprune.world.evaluate --family F --questions N``: :func:`answer_accuracy` of the shipped
    ``F`` world model, as JSON (per setting: accuracy and question count)."""
    import argparse
    import json

    from . import load

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--family", default="qwen2_vl", choices=["qwen2_vl", "llava_onevision"])
    parser.add_argument("--questions", type=int, default=300, help="held-out lookups (other kinds: a quarter each)")
    args = parser.parse_args(argv)
    model, processor = load(args.family)
    result = answer_accuracy(model, processor, args.questions, family=args.family)
    print(json.dumps({k: {"accuracy": round(v["accuracy"], 4), "n": v["n"]} for k, v in result.items()}))


if __name__ == "__main__":
    main()
