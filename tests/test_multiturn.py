"""Multi-turn chat: a second ``generate()`` continues the cache a pruned first turn returned.

Semantics (docs/support.md, "Multi-turn chat"): the first turn's dropped visual tokens stay dropped; the next turn's
new tokens follow the cache with the numbering of ``positions``; a new image of the next turn is scored with that
turn's question and pruned. The reference is the unpruned model over the whole conversation with every dropped
token masked out of attention (:func:`hf_tokenprune.verify.masked_reference`).
"""

import copy

import pytest
import torch
from conftest import FAMILIES, chat

from hf_tokenprune import PrunedCacheError, prune_wrap, tiny, unwrap
from hf_tokenprune.adapters import ADAPTERS, get_adapter
from hf_tokenprune.compat import MROPE_RENUMBERS_CONTINUED_TURNS, output_cache, with_cache
from hf_tokenprune.verify import drop_mask, generate_reference

QUESTIONS = ["what colour is the circle", "what shape is left of the red square ?"]
FOLLOW_UPS = ["and the square ?", "is it left of the circle ?"]
STEPS = 5
GREEDY = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
              output_logits=True)
TEXT_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
# the M-RoPE families: transformers numbers a next turn's images with get_rope_index over the whole conversation
QWEN = tuple(f for f in FAMILIES
             if ADAPTERS[tiny.get_family(f).model_class.config_class.model_type].images_after_cached_images)


def refused_here(family: str, adds_visual: bool, positions: str = "original") -> bool:
    """Continuations that transformers < 5.23 numbers wrong on Qwen (the unpruned model too), so they are refused."""
    return family in QWEN and not MROPE_RENUMBERS_CONTINUED_TURNS and (adds_visual or positions == "contiguous")


def visual_inputs(kind: str | None, batch: int, turn: int = 0) -> dict:
    """Sample ``b``'s visual input of turn ``turn``: large enough that the Qwen turn-2 prefill generate() slices by
    the pruned cache length starts inside the first turn's image. First-turn images differ in size (and token count)
    between samples; later ones do not, so that every row of a batch grows by the same number of tokens."""
    if kind == "image":
        return {"images": [tiny.make_image(b + 10 * turn, size=(112 + 28 * b * (turn == 0), 140))
                           for b in range(batch)]}
    if kind == "video":
        return {"videos": [tiny.make_video(b + 10 * turn, frames=4, size=56) for b in range(batch)]}
    return {}


def encode(processor, conversations: list[list[dict]], visual: dict):
    """The processor's left-padded batch of the conversations, with a generation prompt."""
    processor.tokenizer.padding_side = "left"
    texts = [processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    return processor(text=texts, padding=True, return_tensors="pt", **visual)


def extend(conversations: list[list[dict]], answers: list[str], kind: str | None = None,
           question: str = FOLLOW_UPS[0]) -> list[list[dict]]:
    """Each conversation plus its answer and ``question`` (after a new visual input of ``kind``). Every row grows by
    the same number of tokens, so the processor pads the batch as in the previous turn."""
    return [c + [{"role": "assistant", "content": [{"type": "text", "text": a}]}, *chat(question, kind)]
            for c, a in zip(conversations, answers, strict=True)]


def answers(processor, out, prompt_length: int) -> list[str]:
    return processor.batch_decode(out.sequences[:, prompt_length:])


def generate(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, **GREEDY, **kwargs)


def text_only(inputs) -> dict:
    """The inputs of a turn whose visual inputs are all in the cache: the unpruned model refuses them again."""
    return {k: v for k, v in inputs.items() if k in TEXT_INPUTS}


def max_logit_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits, strict=True))


def first_turn(built, family: str, kind: str | None = "image", batch: int = 1, **config) -> tuple:
    """``(model, processor, conversations, visual inputs, inputs, output)`` of a first turn pruned with ``config``
    (default ratio 0.25, attention scorer)."""
    model, processor = built(family)
    conversations = [chat(q, kind) for q in QUESTIONS[:batch]]
    visual = visual_inputs(kind, batch)
    inputs = encode(processor, conversations, visual)
    prune_wrap(model, **{"ratio": 0.25, "scorer": "attention", **config})
    return model, processor, conversations, visual, inputs, generate(model, inputs)


def turn_drop(model, turns: list[tuple]) -> torch.Tensor:
    """The ``[batch, length]`` drop mask of a conversation: ``turns`` lists ``(start, input_ids, stats)`` of each
    pruned prefill, ``input_ids`` the tokens it added from unpruned position ``start``."""
    ids = get_adapter(model).visual_token_ids
    end = max(start + t.shape[1] for start, t, _ in turns)
    drop = torch.zeros(turns[0][1].shape[0], end, dtype=torch.bool)
    for start, input_ids, stats in turns:
        drop[:, start:start + input_ids.shape[1]] = drop_mask(input_ids, ids, stats)
    return drop


def reference(model, inputs, drop: torch.Tensor):
    """The unpruned model over the whole conversation with the dropped tokens masked out (original positions); where
    masking does not remove a token (linear attention), the unwrapped model on the conversation with the dropped
    tokens removed (:func:`hf_tokenprune.verify.generate_pruned_sequence_reference`)."""
    return generate_reference(model, inputs, drop, **GREEDY)


@pytest.mark.parametrize("positions", ["original", "contiguous"])
@pytest.mark.parametrize("family", FAMILIES)
def test_continuing_equals_pruning_the_whole_conversation_at_once(built, family, positions):
    """With a question-independent selection (``uniform``, one budget per image) the cached first turn keeps the
    tokens a single prefill of the whole conversation keeps; continuing it gives that prefill's logits, for either
    numbering of positions."""
    model, processor, conversations, visual, inputs, first = first_turn(built, family, scorer="uniform",
                                                                        scope="image", positions=positions)
    kept = model.tokenprune.last_stats.kept_indices
    follow = encode(processor, extend(conversations, answers(processor, first, inputs["input_ids"].shape[1])), visual)
    if refused_here(family, adds_visual=False, positions=positions):
        with pytest.raises(PrunedCacheError, match="fixed in transformers 5.23"):
            generate(model, text_only(follow), **with_cache(output_cache(first)))
        return
    # the name older transformers use (5.24+: a deprecated alias of ``cache``) works too
    continued = generate(model, text_only(follow), past_key_values=output_cache(first))
    at_once = generate(model, follow)
    assert all(torch.equal(a, b) for a, b in zip(model.tokenprune.last_stats.kept_indices, kept, strict=True))
    assert torch.equal(continued.sequences, at_once.sequences)
    assert max_logit_diff(continued, at_once) < 1e-4


def new_visual_inputs(processor, kind: str, batch: int) -> dict:
    """The visual inputs of the next turn's new images only (the earlier ones are in the cache), as the processor
    passes them on (InternVL's, Gemma 3's and Gemma 4's drop their image processor's tile / crop / token counts)."""
    out = processor.image_processor(visual_inputs(kind, batch, turn=1)["images"], return_tensors="pt")
    return {key: value for key, value in out.items()
            if key not in ("num_patches", "num_crops", "num_soft_tokens_per_image")}


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(("family", "history"), [(f, h) for f in FAMILIES for h in (None, "image") if
                                                 not (f in QWEN and h == "image")])
def test_a_new_image_in_the_next_turn_is_pruned_with_its_question(built, family, history, batch):
    """The next turn's image is scored with the next turn's question (on the new tokens alone) and pruned; logits
    equal the masked reference with the dropped tokens of both turns masked out."""
    model, processor, conversations, visual, inputs, first = first_turn(built, family, history, batch)
    turns = [(0, inputs["input_ids"], model.tokenprune.last_stats)] if history else []
    conversations = extend(conversations, answers(processor, first, inputs["input_ids"].shape[1]), "image")
    both = {"images": visual.get("images", []) + visual_inputs("image", batch, turn=1)["images"]}
    if history:  # images in the processor's order: each sample's first, then its new one
        both["images"] = [image for b in range(batch) for image in both["images"][b::batch]]
    follow = encode(processor, conversations, both)
    covered = output_cache(first).get_seq_length() + (turns[0][2].seq_len_before - turns[0][2].seq_len_after
                                                         if history else 0)
    new_turn = {**text_only(follow), **new_visual_inputs(processor, "image", batch)}
    if refused_here(family, adds_visual=True):
        with pytest.raises(PrunedCacheError, match="fixed in transformers 5.23"):
            generate(model, new_turn, **with_cache(output_cache(first)))
        return
    out = generate(model, new_turn, **with_cache(output_cache(first)))
    stats = model.tokenprune.last_stats
    assert stats.seq_len_before == follow["input_ids"].shape[1] - covered  # the new tokens only
    assert all(a < b for a, b in zip(stats.visual_tokens_after, stats.visual_tokens_before))
    ref = reference(model, follow, turn_drop(model, [*turns, (covered, follow["input_ids"][:, covered:], stats)]))
    assert torch.equal(out.sequences, ref.sequences)
    assert max_logit_diff(out, ref) < 1e-4


@pytest.mark.parametrize("family", QWEN)
def test_qwen_new_image_after_cached_images_is_refused_before_compute(built, family):
    model, processor, conversations, _, inputs, first = first_turn(built, family)
    follow = encode(processor, extend(conversations, answers(processor, first, inputs["input_ids"].shape[1]), "image"),
                    {"images": visual_inputs("image", 1)["images"] + visual_inputs("image", 1, turn=1)["images"]})
    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(PrunedCacheError, match="get_rope_index"):
        generate(model, {**text_only(follow), **new_visual_inputs(processor, "image", 1)},
                 **with_cache(output_cache(first)))
    hook.remove()
    assert not calls


@pytest.fixture
def two_turns(built):
    """``get(family, batch)``: (model wrapped at 0.25, turn-1 output, turn-2 inputs of the whole conversation)."""

    def get(family: str = "qwen2_vl", batch: int = 1):
        model, processor, conversations, visual, inputs, first = first_turn(built, family, "image", batch)
        follow = encode(processor, extend(conversations, answers(processor, first, inputs["input_ids"].shape[1])),
                        visual)
        return model, first, follow

    return get


def test_copies_of_a_pruned_cache_and_interleaved_conversations_each_continue_their_own(built, two_turns):
    model, first, follow = two_turns()
    alone = generate(model, text_only(follow), **with_cache(copy.deepcopy(output_cache(first))))
    # another conversation in between, then the first one continued from a copy and from the original
    other = encode(built("qwen2_vl")[1], [chat(QUESTIONS[1], "image")], {"images": [tiny.make_image(5, size=84)]})
    generate(model, other)
    for cache in (copy.deepcopy(output_cache(first)), output_cache(first)):
        again = generate(model, text_only(follow), **with_cache(cache))
        assert torch.equal(again.sequences, alone.sequences)
        assert max_logit_diff(again, alone) == 0.0


def _edit_prefix(follow, first, batch):
    ids = follow["input_ids"].clone()
    ids[0, 3] = (ids[0, 3] + 1) % 50 + 10
    return {**text_only(follow), "input_ids": ids}


def _repad(follow, first, batch):
    mask = follow["attention_mask"].clone()
    ids = torch.cat([follow["input_ids"][:, :1], follow["input_ids"]], dim=1)
    mask = torch.cat([torch.zeros_like(mask[:, :1]), mask], dim=1)
    extra = {"mm_token_type_ids": torch.cat([follow["mm_token_type_ids"][:, :1], follow["mm_token_type_ids"]], 1)}
    return {"input_ids": ids, "attention_mask": mask, **extra}


def _one_row(follow, first, batch):
    return {k: v[:1] for k, v in text_only(follow).items()}


def _nothing_new(follow, first, batch):
    covered = first.sequences.shape[1] - 1
    return {k: v[:, :covered] for k, v in text_only(follow).items()}


def _images_again(follow, first, batch):
    return dict(follow)


@pytest.mark.parametrize(("batch", "edit", "message"), [
    (1, _edit_prefix, "do not repeat the conversation"),
    (2, _repad, "attention mask over the cached part"),
    (2, _one_row, "has 2"),
    (1, _nothing_new, "no new token"),
    (1, _images_again, "visual inputs of the new images"),
])
def test_a_next_turn_that_does_not_extend_the_cached_conversation_is_refused(two_turns, batch, edit, message):
    model, first, follow = two_turns(batch=batch)
    with pytest.raises(PrunedCacheError, match=message):
        generate(model, edit(follow, first, batch), **with_cache(output_cache(first)))


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: prune_wrap(m, m.tokenprune.config, positions="contiguous"), "positions='original'"),
    (lambda m: prune_wrap(m, m.tokenprune.config, ratio=1.0), "pruning was active"),
    (lambda m: prune_wrap(unwrap(m), ratio=0.25, scorer="attention"), "another wrapped model"),
])
def test_a_pruned_cache_continues_only_under_the_wrapping_that_pruned_it(two_turns, change, message):
    model, first, follow = two_turns()
    change(model)
    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(PrunedCacheError, match=message):
        generate(model, text_only(follow), **with_cache(output_cache(first)))
    hook.remove()
    assert not calls
    if message != "another wrapped model":
        prune_wrap(model, ratio=0.25, scorer="attention", positions="original")
        with model.tokenprune.disabled(), pytest.raises(PrunedCacheError, match="pruning was active"):
            generate(model, text_only(follow), **with_cache(output_cache(first)))
