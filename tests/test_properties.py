"""Property-based tests (hypothesis): random tiny models, batches, paddings, images / videos and ratios.

Invariants: no exception; each sample keeps exactly the budget its config gives; pruned greedy tokens and logits
equal the masked reference. CI runs a fixed (derandomized) set of examples; a long random run:
``HF_TOKENPRUNE_HYPOTHESIS_EXAMPLES=300 pytest tests/test_properties.py``.
"""

import math
import os

import torch
from conftest import chat
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from hf_tokenprune import prune_wrap, score_inputs, tiny, unwrap
from hf_tokenprune.adapters import get_adapter
from hf_tokenprune.verify import generate_reference

LONG_RUN = int(os.environ.get("HF_TOKENPRUNE_HYPOTHESIS_EXAMPLES", "0"))
SETTINGS = settings(max_examples=LONG_RUN or 24, derandomize=not LONG_RUN, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck), phases=[p for p in Phase if p is not Phase.explain])
QUESTIONS = ("what colour is the circle", "which shape is left of the red square ?", "is there a star", "what")
STEPS = 3

_models: dict = {}
_processors: dict = {}


def model_for(family: str, layers: int, seed: int, attn: str):
    key = (family, layers, seed, attn)
    if key not in _models:
        _models[key] = tiny.build_model(family, num_hidden_layers=layers, seed=seed, attn_implementation=attn)
    return _models[key]


def processor_for(family: str):
    if family not in _processors:
        _processors[family] = tiny.build_processor(family)
        _processors[family].tokenizer.padding_side = "left"
    return _processors[family]


sizes = st.tuples(st.integers(28, 112), st.integers(28, 112))


@st.composite
def samples(draw, family: str, frames: st.SearchStrategy):
    """One sample: a question and 0-2 images, or (where the family takes videos) a video."""
    if "video" in tiny.MODALITIES[family] and draw(st.booleans()) and draw(st.booleans()):
        return draw(st.sampled_from(QUESTIONS)), "video", [(draw(frames), draw(sizes))]
    return draw(st.sampled_from(QUESTIONS)), "image", draw(st.lists(sizes, min_size=0, max_size=2))


@st.composite
def cases(draw):
    family = draw(st.sampled_from(tiny.FAMILIES))
    # LLaVA-OneVision's video processor stacks the videos of a batch: one frame count per batch
    frames = st.just(draw(st.sampled_from([2, 4]))) if family == "llava_onevision" else st.sampled_from([2, 4])
    return dict(
        family=family,
        model=(family, draw(st.integers(1, 3)), draw(st.integers(0, 2)), draw(st.sampled_from(["sdpa", "eager"]))),
        batch=draw(st.lists(samples(family, frames), min_size=1, max_size=4)),
        extra_padding=draw(st.integers(0, 3)),
        ratio=draw(st.one_of(st.just(1.0), st.floats(0.01, 1.0))),
        scorer=draw(st.sampled_from(["attention", "random", "uniform", "divprune", "cdpruner"])),
        scope=draw(st.sampled_from(["sample", "image"])),
        min_tokens=draw(st.integers(0, 2)),
    )


def build_inputs(family: str, batch: list, extra_padding: int, seed: int = 0) -> dict:
    """Processor output for ``batch``, with ``extra_padding`` more pad columns on the left of every row."""
    processor = processor_for(family)
    texts, images, videos = [], [], []
    for b, (question, kind, items) in enumerate(batch):
        count = len(items)
        texts.append(processor.apply_chat_template(chat(question, kind if count else None, count),
                                                   add_generation_prompt=True, tokenize=False))
        if kind == "image":
            images += [tiny.make_image(seed + 10 * b + i, size=size) for i, size in enumerate(items)]
        else:
            videos += [tiny.make_video(seed + b, frames=frames, size=size) for frames, size in items]
    visual = ({"images": images} if images else {}) | ({"videos": videos} if videos else {})
    inputs = dict(processor(text=texts, padding=True, return_tensors="pt", **visual))
    pad = processor.tokenizer.pad_token_id
    for key, fill in (("input_ids", pad), ("attention_mask", 0), ("mm_token_type_ids", 0)):
        if key in inputs:
            column = torch.full((len(batch), extra_padding), fill, dtype=inputs[key].dtype)
            inputs[key] = torch.cat([column, inputs[key]], dim=1)
    return inputs


def expected_kept(model, inputs: dict, ratio: float, min_tokens: int, scope: str) -> list[int] | None:
    """Per sample: ``ceil(ratio * n)`` (at least ``min_tokens``, at most ``n``) summed over its budget units (the
    units from the model's own layout, checked to cover exactly the placeholder tokens)."""
    found = score_inputs(model, inputs, scope=scope)
    if found is None:
        return None
    placeholders = torch.isin(inputs["input_ids"], torch.tensor(get_adapter(model).visual_token_ids))
    assert [sum(u) for u in found.units] == placeholders.sum(dim=1).tolist()  # units cover the placeholders
    return [sum(min(n, max(min_tokens, math.ceil(ratio * n - 1e-9))) for n in units) for units in found.units]


# found by the long run: on a plain forward LLaVA-OneVision took adjacent images for one budget unit
ADJACENT_IMAGES = dict(family="llava_onevision", model=("llava_onevision", 1, 0, "sdpa"),
                       batch=[("what colour is the circle", "image", [(28, 28), (28, 28)])], extra_padding=0,
                       ratio=0.125, scorer="attention", scope="image", min_tokens=0)


@SETTINGS
@given(case=cases())
@example(case=ADJACENT_IMAGES)
def test_random_batches_keep_the_budget_and_equal_the_masked_reference(case):
    model = model_for(*case["model"])
    inputs = build_inputs(case["family"], case["batch"], case["extra_padding"])
    prune_wrap(model, ratio=case["ratio"], scorer=case["scorer"], scope=case["scope"],
               min_tokens=case["min_tokens"])
    try:
        expected = expected_kept(model, inputs, case["ratio"], case["min_tokens"], case["scope"])
        greedy = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_logits=True,
                      return_dict_in_generate=True)
        with torch.no_grad():
            out = model.generate(**inputs, **greedy)
        stats = model.tokenprune.last_stats
        if expected is None or case["ratio"] == 1.0:
            assert stats is None
            with model.tokenprune.disabled(), torch.no_grad():
                reference = model.generate(**inputs, **greedy)
        else:
            assert stats.visual_tokens_after == expected
            assert [len(k) for k in stats.kept_indices] == expected
            reference = generate_reference(model, inputs, **greedy)
        assert torch.equal(out.sequences, reference.sequences)
        assert max((a - b).abs().max().item() for a, b in zip(out.logits, reference.logits)) < 1e-4
    finally:
        unwrap(model)
