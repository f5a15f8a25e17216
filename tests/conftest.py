"""Shared fixtures: tiny models of every supported family with real processors, and their inputs."""

from __future__ import annotations

import functools
import socket

import made_up_family
import pytest
import torch

from hf_tokenprune import tiny

# Every registered family, the made-up ones of made_up_family.py included: the shared invariant matrix
# (test_invariants.py) runs over these, with every input kind the family takes.
REGISTERED_FAMILIES = tuple(tiny.FAMILIES)
REGISTERED_CASES = [(f, k) for f in REGISTERED_FAMILIES for k in tiny.MODALITIES[f]]
# The families hf_tokenprune ships: the other modules, some with per-family expectations, run over these.
FAMILIES = tuple(f for f in REGISTERED_FAMILIES if f not in made_up_family.FAMILIES)
# (family, input kind) pairs the family supports: LLaVA-1.5 has images only.
CASES = [(f, k) for f in FAMILIES for k in tiny.MODALITIES[f]]


def free_port() -> int:
    """A local TCP port nobody listens on now: for a launch beside others, or a Hub endpoint that refuses."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def chat(question: str, kind: str | None, count: int = 1) -> list[dict]:
    content = [{"type": kind}] * count if kind else []
    return [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]


def image_size(b: int) -> tuple[int, int]:
    """Sample ``b``'s image size: every sample of a batch gets a different number of visual tokens."""
    return (56 + 28 * b, 56 + 56 * b)


def sample_images(b: int, count: int = 1) -> list:
    """Sample ``b``'s ``count`` images, all of size :func:`image_size` ``(b)``."""
    return [tiny.make_image(b + 10 * i, size=image_size(b)) for i in range(count)]


def make_inputs(processor, kind: str | None = "image", batch: int = 2, questions: list[str] | None = None,
                images_per_sample: tuple[int, ...] | None = None):
    """A left-padded batch: sample ``b`` has its own question and a visual input of its own size
    (``images_per_sample[b]`` images of that size, default one)."""
    processor.tokenizer.padding_side = "left"
    questions = questions or ["what colour is the circle", "what shape is left of the red square ?"][:batch]
    counts = images_per_sample or (1,) * len(questions)
    texts = [processor.apply_chat_template(chat(q, kind, n), add_generation_prompt=True, tokenize=False)
             for q, n in zip(questions, counts, strict=True)]
    visual = {}
    if kind == "image":
        visual["images"] = [image for b, n in enumerate(counts) for image in sample_images(b, n)]
    elif kind == "video":
        visual["videos"] = [tiny.make_video(b, frames=4, size=56) for b in range(len(texts))]
    return processor(text=texts, padding=True, return_tensors="pt", **visual)


@pytest.fixture(scope="session")
def built():
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = tiny.build(family)
        return cache[family]

    return get


@pytest.fixture(autouse=True)
def _unwrap_after_test(built):
    yield
    from hf_tokenprune import unwrap

    for family in REGISTERED_FAMILIES:
        model = built(family)[0]
        if "tokenprune" in model.__dict__:
            unwrap(model)


@functools.cache
def forward_error(family: str, kind: str) -> str | None:
    """transformers' error on a plain forward of ``family``'s :func:`make_inputs` of ``kind`` (the unwrapped model),
    where the installed release fails it, else None. The one case known: Gemma 4 with videos on 5.20, whose forward
    does not pass ``num_frames_per_video`` on to ``get_video_features`` (``generate`` works)."""
    if (family, kind) != ("gemma4", "video"):
        return None
    model, processor = tiny.build(family)
    try:
        with torch.no_grad():
            model(**make_inputs(processor, kind))
    except ValueError as err:
        return str(err)
    return None


def skip_where_transformers_fails_a_forward(family: str, kind: str) -> None:
    if (error := forward_error(family, kind)) is not None:
        pytest.skip(f"transformers fails a plain forward of {family} with {kind} inputs, unwrapped too: {error}")


def greedy(model, inputs, steps: int = 10):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)


@functools.cache
def images_per_sample(family: str) -> tuple[int, int]:
    """Images of the two samples of :func:`check_batch_equals_each_sample_alone`'s batch: one each, except where
    every image gets the same number of tokens (LLaVA-1.5: one crop size), so there the second sample has two."""
    processor = tiny.build_processor(family)
    text = processor.apply_chat_template(chat("what", "image"), add_generation_prompt=True, tokenize=False)
    lengths = {processor(text=[text], images=sample_images(b), return_tensors="pt")["input_ids"].shape[1]
               for b in range(2)}
    return (1, 2) if len(lengths) == 1 else (1, 1)


def check_batch_equals_each_sample_alone(model, processor, family: str, steps: int = 8,
                                        logits_atol: float | None = None):
    """Greedy generation on a left-padded two-sample batch whose samples have different visual-token counts, and
    on each sample alone: every pruning stage keeps the same tokens of each sample, and the new tokens (and, with
    ``logits_atol``, their logits) are the same. Returns the batch's ``last_stats``."""
    counts = images_per_sample(family)
    batch = make_inputs(processor, "image", images_per_sample=counts)
    together = greedy(model, batch, steps=steps)
    stats = model.tokenprune.last_stats
    assert len(set(stats.visual_tokens_before)) == 2
    questions = ["what colour is the circle", "what shape is left of the red square ?"]
    for b in range(2):
        text = processor.apply_chat_template(chat(questions[b], "image", counts[b]), add_generation_prompt=True,
                                             tokenize=False)
        alone_inputs = processor(text=[text], images=sample_images(b, counts[b]), return_tensors="pt")
        alone = greedy(model, alone_inputs, steps=steps)
        for stage_alone, stage in zip(model.tokenprune.last_stats.stages, stats.stages, strict=True):
            assert torch.equal(stage_alone.kept_indices[0], stage.kept_indices[b])
        new_tokens = together.sequences[b, batch["input_ids"].shape[1]:]
        assert torch.equal(alone.sequences[0, alone_inputs["input_ids"].shape[1]:], new_tokens)
        if logits_atol is not None:
            assert max((a[0] - t[b]).abs().max().item() for a, t in zip(alone.logits, together.logits)) < logits_atol
    return stats


def reference_greedy(model, inputs, steps: int = 10):
    """:func:`greedy` of the reference the family's pruned model must equal
    (``hf_tokenprune.verify.generate_reference``: the masked reference, or the pruned-sequence one where masking
    does not remove a token, as in Qwen3.5's linear attention)."""
    from hf_tokenprune.verify import generate_reference

    return generate_reference(model, inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)


def masked_greedy(model, inputs, steps: int = 10):
    """:func:`greedy` of the unpruned model with the tokens the last pruned call dropped masked out."""
    from hf_tokenprune.verify import generate_masked_reference

    return generate_masked_reference(model, inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                     output_logits=True, return_dict_in_generate=True)
