"""The invariants that define correct input-stage pruning, on every registered tiny family, with images and videos.

The shared matrix: every family of the ``hf_tokenprune.tiny`` registry (the made-up one of ``made_up_family.py``
too) gets every test here, with every input kind it takes: ratio 1.0 reproduces the unwrapped model, pruned ==
masked reference, a left-padded batch == each sample alone, the KV cache length, the pipeline, multi-turn
continuation and ``token_regions`` covering each image.
"""

import contextlib
import inspect
from unittest import mock

import pytest
import torch
from conftest import REGISTERED_CASES as CASES  # here: every registered family, the made-up ones too
from conftest import REGISTERED_FAMILIES as FAMILIES
from conftest import (
    chat,
    check_batch_equals_each_sample_alone,
    greedy,
    make_inputs,
    masked_greedy,
    reference_greedy,
)
from test_geometry import batch_regions, coverage, visual_count
from test_multiturn import (
    FOLLOW_UPS,
    QUESTIONS,
    answers,
    encode,
    extend,
    first_turn,
    generate,
    reference,
    text_only,
    turn_drop,
    visual_inputs,
)
from test_visionzip import VISIONZIP_FAMILIES
from transformers import pipeline

from hf_tokenprune import Compressor, prune_wrap, tiny, unwrap, verify
from hf_tokenprune.adapters import UnsupportedMethodError, get_adapter
from hf_tokenprune.compat import output_cache, with_cache
from hf_tokenprune.scorers import CompressorDPPScorer
from hf_tokenprune.verify import drop_mask, generate_pruned_sequence_reference

# the input-stage selection methods of the matrix (compressor+dpp: an untrained compressor; any relevance will do;
# visionzip: on VISIONZIP_FAMILIES, refused elsewhere)
METHODS = ["attention", "random", "divprune", "cdpruner", "visionzip",
           pytest.param(CompressorDPPScorer(Compressor(channels=(4, 8), kernel_size=3)), id="compressor+dpp")]


GREEDY_6 = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)


def max_logit_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits))


@contextlib.contextmanager
def merged_embeddings(model, inputs):
    """On the reference's prefill, the kept tokens carry the embeddings the pruned model's LLM received (a merging
    method's averages) at their original positions; the pruned model's prefill is run once to record them."""
    seen = {}
    text_model = get_adapter(model).text_model
    handle = text_model.register_forward_pre_hook(lambda m, a, k: seen.update(embeds=k["inputs_embeds"]),
                                                  with_kwargs=True)  # after the pruner's pre-hook
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    input_ids = inputs["input_ids"]
    kept = ~drop_mask(input_ids, get_adapter(model).placeholder_ids(inputs), model.tokenprune.last_stats)
    kept &= inputs["attention_mask"].bool()

    def merged(embeds):
        embeds = embeds.clone()
        for b in range(embeds.shape[0]):
            n = int(kept[b].sum())
            embeds[b, kept[b]] = seen["embeds"][b, -n:]  # the pruned sequence holds the kept tokens right-aligned
        return embeds

    def replace(module, args, kwargs):  # the masked reference's prefill
        if kwargs["inputs_embeds"].shape[1] != input_ids.shape[1]:
            return None
        return args, {**kwargs, "inputs_embeds": merged(kwargs["inputs_embeds"])}

    recorded = verify._prefill_arguments  # what the pruned-sequence reference slices

    def prefill_arguments(*args):
        seen_arguments = recorded(*args)
        return {**seen_arguments, "inputs_embeds": merged(seen_arguments["inputs_embeds"])}

    handle = text_model.register_forward_pre_hook(replace, with_kwargs=True)
    try:
        with mock.patch.object(verify, "_prefill_arguments", prefill_arguments):
            yield
    finally:
        handle.remove()


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_ratio_one_reproduces_the_unwrapped_model(built, family, kind):
    model, processor = built(family)
    inputs = make_inputs(processor, kind)
    reference = greedy(model, inputs)
    prune_wrap(model, ratio=1.0, scorer="attention")
    out = greedy(model, inputs)
    assert torch.equal(out.sequences, reference.sequences)
    assert max_logit_diff(out, reference) == 0.0


@pytest.mark.parametrize(("family", "kind"), CASES)
@pytest.mark.parametrize("scorer", METHODS)
def test_pruned_equals_masked_reference(built, family, kind, scorer):
    """Pruned == the family's reference over 10 greedy steps: the masked one, or where masking does not remove a
    token (linear attention) the unwrapped model run on the already-pruned sequence."""
    model, processor = built(family)
    inputs = make_inputs(processor, kind)
    if scorer == "visionzip" and family not in VISIONZIP_FAMILIES:
        with pytest.raises(UnsupportedMethodError, match=f"not supported on {model.config.model_type}: "):
            prune_wrap(model, ratio=0.25, scorer=scorer)
        return
    prune_wrap(model, ratio=0.25, scorer=scorer)
    pruned = greedy(model, inputs, steps=10)
    stats = model.tokenprune.last_stats
    assert all(a < b for a, b in zip(stats.visual_tokens_after, stats.visual_tokens_before))
    # a merging method's kept tokens carry merged embeddings: the reference gets them too
    with merged_embeddings(model, inputs) if scorer == "visionzip" else contextlib.nullcontext():
        reference = reference_greedy(model, inputs, steps=10)
    assert torch.equal(pruned.sequences, reference.sequences)
    assert max_logit_diff(pruned, reference) < 1e-4
    # and the check is sensitive: without the mask the logits differ
    with model.tokenprune.disabled():
        unmasked = greedy(model, inputs, steps=1)
    assert (unmasked.logits[0] - reference.logits[0]).abs().max() > 1e-4


@pytest.mark.parametrize("positions", ["original", "contiguous"])
@pytest.mark.parametrize(("family", "kind"), CASES)
def test_pruned_sequence_reference_holds_and_agrees_with_the_masked_one(built, family, kind, positions):
    """The unwrapped model run on the already-pruned sequence (inputs_embeds without the dropped tokens, the mask,
    the original or renumbered positions and the family's extra inputs sliced alike) gives the pruned model's tokens
    and logits on every family. Where masking removes a token (softmax attention only) the masked reference agrees
    with it; where it does not (a linear-attention layer still takes a recurrence step for a masked token) they
    differ, which is why those families are compared with the pruned-sequence reference."""
    model, processor = built(family)
    if "inputs_embeds" not in inspect.signature(model.prepare_inputs_for_generation).parameters:
        pytest.skip(f"transformers' {type(model).__name__}.generate takes no inputs_embeds: no pruned-sequence "
                    "reference (the masked reference is the one for softmax families)")
    inputs = make_inputs(processor, kind)
    prune_wrap(model, ratio=0.25, scorer="attention", positions=positions)
    pruned = greedy(model, inputs, steps=6)
    sequence = generate_pruned_sequence_reference(model, inputs, positions=positions, **GREEDY_6)
    assert torch.equal(pruned.sequences, sequence.sequences)
    assert max_logit_diff(pruned, sequence) < 1e-4
    if positions == "contiguous":
        return
    masked = masked_greedy(model, inputs, steps=6)
    if get_adapter(model).masking_removes_tokens:
        assert torch.equal(masked.sequences, sequence.sequences)
        assert max_logit_diff(masked, sequence) < 1e-4
    else:
        assert max_logit_diff(masked, sequence) > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_holds_exactly_the_kept_length(built, family):
    model, processor = built(family)
    inputs = make_inputs(processor, "image")
    prune_wrap(model, ratio=0.25, scorer="attention")
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    stats = model.tokenprune.last_stats
    assert output_cache(out).get_seq_length() == stats.seq_len_after
    assert out.logits.shape[1] == stats.seq_len_after
    longest = max(int(m.sum()) - b + a for m, b, a in
                  zip(inputs["attention_mask"], stats.visual_tokens_before, stats.visual_tokens_after))
    assert stats.seq_len_after == longest
    steps = greedy(model, inputs, steps=3)
    assert output_cache(steps).get_seq_length() == stats.seq_len_after + 2


@pytest.mark.parametrize("family", FAMILIES)
def test_stats_describe_the_cut(built, family):
    model, processor = built(family)
    inputs = make_inputs(processor, "image")
    prune_wrap(model, ratio=0.25, scorer="uniform")
    greedy(model, inputs, steps=2)
    stats = model.tokenprune.last_stats
    for kept, before, after in zip(stats.kept_indices, stats.visual_tokens_before, stats.visual_tokens_after):
        assert len(kept) == after == -(-before // 4)
        assert torch.all(kept[1:] > kept[:-1]) and kept.max() < before
    assert stats.kv_cache_bytes_after / stats.kv_cache_bytes_before == pytest.approx(
        stats.seq_len_after / stats.seq_len_before)
    assert 0 < stats.prefill_flops_ratio < 1
    assert stats.scoring_time_s >= 0


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_inputs_pass_through(built, family):
    model, processor = built(family)
    inputs = make_inputs(processor, None)
    reference = greedy(model, inputs)
    prune_wrap(model, ratio=0.25, scorer="attention")
    greedy(model, make_inputs(processor, "image"), steps=1)
    assert model.tokenprune.last_stats is not None
    out = greedy(model, inputs)
    assert torch.equal(out.sequences, reference.sequences)
    assert model.tokenprune.last_stats is None


@pytest.mark.parametrize("family", FAMILIES)
def test_unwrap_restores_and_other_instances_are_unaffected(built, family):
    model, processor = built(family)
    twin = tiny.build_model(family)
    inputs = make_inputs(processor, "image")
    reference = greedy(model, inputs)
    prune_wrap(model, ratio=0.25, scorer="attention")
    prune_wrap(model, ratio=0.5, scorer="attention")  # re-configures, does not stack
    assert len(model.tokenprune._hooks) == 4
    assert model.tokenprune.config.ratio == 0.5
    assert not hasattr(twin, "tokenprune")
    assert torch.equal(greedy(twin, inputs).sequences, reference.sequences)
    unwrap(model)
    assert not hasattr(model, "tokenprune")
    assert torch.equal(greedy(model, inputs).sequences, reference.sequences)
    assert not model.model.get_decoder()._forward_pre_hooks


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_generates_on_the_pruned_sequence(built, family):
    model, processor = built(family)
    inputs = make_inputs(processor, "image")
    prune_wrap(model, ratio=0.25, scorer="attention")
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=True, top_k=20)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 16)
    assert model.tokenprune.last_stats.seq_len_after < inputs["input_ids"].shape[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_each_sample_alone(built, family):
    model, processor = built(family)
    prune_wrap(model, ratio=0.25, scorer="attention")
    check_batch_equals_each_sample_alone(model, processor, family, steps=8)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_equals_masked_reference_with_eager_attention(family):
    model = tiny.build_model(family, attn_implementation="eager")
    inputs = make_inputs(tiny.build_processor(family), "image")
    prune_wrap(model, ratio=0.25, scorer="attention")
    pruned = greedy(model, inputs, steps=6)
    reference = reference_greedy(model, inputs, steps=6)
    assert torch.equal(pruned.sequences, reference.sequences)
    assert max_logit_diff(pruned, reference) < 1e-4


@pytest.mark.parametrize("family", [f for f, k in CASES if k == "video"])
def test_left_padded_video_batch_equals_each_sample_alone(built, family):
    model, processor = built(family)
    inputs = make_inputs(processor, "video")
    prune_wrap(model, ratio=0.25, scorer="attention")
    assert (inputs["attention_mask"] == 0).any()
    together = greedy(model, inputs, steps=6).sequences
    kept_together = model.tokenprune.last_stats.kept_indices
    for b, question in enumerate(["what colour is the circle", "what shape is left of the red square ?"]):
        text = processor.apply_chat_template(chat(question, "video"), add_generation_prompt=True, tokenize=False)
        alone = processor(text=[text], videos=[tiny.make_video(b, frames=4, size=56)], return_tensors="pt")
        out = greedy(model, alone, steps=6).sequences
        assert torch.equal(model.tokenprune.last_stats.kept_indices[0], kept_together[b])
        assert torch.equal(out[0, alone["input_ids"].shape[1]:], together[b, inputs["input_ids"].shape[1]:])


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_runs_on_the_pruned_model(built, family):
    model, processor = built(family)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    messages = [{"role": "user", "content": [{"type": "image", "image": tiny.make_image(3, size=84)},
                                             {"type": "text", "text": "what colour is the circle"}]}]
    reference = pipe(text=messages, max_new_tokens=16, do_sample=False)
    prune_wrap(model, ratio=0.25, scorer="attention")
    out = pipe(text=messages, max_new_tokens=16, do_sample=False)
    stats = model.tokenprune.last_stats
    assert stats.visual_tokens_after[0] == -(-stats.visual_tokens_before[0] // 4)
    assert isinstance(out[0]["generated_text"], list | str)
    assert type(out[0]["generated_text"]) is type(reference[0]["generated_text"])


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(("family", "kind"), CASES)
def test_next_turns_continue_the_pruned_cache_like_the_masked_reference(built, family, kind, batch):
    """Three turns, the later ones text-only: the first turn's dropped tokens stay out of the cache, and each turn's
    logits equal the unpruned model over the whole conversation with those tokens masked out (Qwen3.5: the
    unwrapped model over the conversation with them removed, test_multiturn.reference)."""
    model, processor, conversations, visual, inputs, out = first_turn(built, family, kind, batch)
    stats = model.tokenprune.last_stats
    assert all(a < b for a, b in zip(stats.visual_tokens_after, stats.visual_tokens_before))
    drop = turn_drop(model, [(0, inputs["input_ids"], stats)])
    dropped = inputs["input_ids"].shape[1] - stats.seq_len_after
    for question in FOLLOW_UPS:
        prompt_length = inputs["input_ids"].shape[1]
        conversations = extend(conversations, answers(processor, out, prompt_length), question=question)
        inputs = encode(processor, conversations, visual)
        assert torch.equal(inputs["input_ids"][:, :out.sequences.shape[1]], out.sequences)  # the chat round trip
        out = generate(model, text_only(inputs), **with_cache(output_cache(out)))
        assert model.tokenprune.last_stats is None  # nothing new to prune
        ref = reference(model, inputs, drop)
        assert torch.equal(out.sequences, ref.sequences)
        assert max_logit_diff(out, ref) < 1e-4
        # the masked reference's cache holds the dropped tokens too, the pruned-sequence one does not
        held = dropped if get_adapter(model).masking_removes_tokens else 0
        assert output_cache(ref).get_seq_length() - output_cache(out).get_seq_length() == held
    # and the check is sensitive: unmasked, the logits differ (through generate: on transformers 5.20 a plain forward
    # of Gemma 4 with videos fails, unpruned too, not passing num_frames_per_video on)
    with model.tokenprune.disabled(), torch.no_grad():
        unmasked = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
    assert (unmasked.logits[0] - ref.logits[0]).abs().max() > 1e-4


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_multi_turn_at_ratio_one_equals_the_unwrapped_model(built, family, batch):
    model, processor = built(family)
    conversations = [chat(q, "image") for q in QUESTIONS[:batch]]
    visual = visual_inputs("image", batch)
    inputs = encode(processor, conversations, visual)
    runs = []
    for wrap in (False, True):
        if wrap:
            prune_wrap(model, ratio=1.0, scorer="attention")
        first = generate(model, inputs)
        follow = encode(processor, extend(conversations, answers(processor, first, inputs["input_ids"].shape[1])),
                        visual)
        runs.append((first, generate(model, text_only(follow), **with_cache(output_cache(first)))))
    for (unwrapped, wrapped) in zip(*runs, strict=True):
        assert torch.equal(wrapped.sequences, unwrapped.sequences)
        assert all(torch.equal(a, b) for a, b in zip(wrapped.logits, unwrapped.logits, strict=True))


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_one_region_per_placeholder_and_items_in_order(built, family, kind):
    adapter, inputs, sizes, batch = batch_regions(built, family, kind)
    for b, regions in enumerate(batch):
        assert len(regions) == visual_count(adapter, inputs, b)
        assert [(i.kind, i.index, i.start, i.stop) for i in regions.items] == [(kind, b, 0, len(regions))]
        assert bool((regions.item == 0).all())
        valid = regions.boxes[regions.valid]
        assert bool(((valid >= 0) & (valid <= 1)).all()) and bool((valid[:, 2:] > valid[:, :2]).all())


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_regions_tile_each_image_and_frame(built, family, kind):
    _, _, sizes, batch = batch_regions(built, family, kind)
    # LLaVA-1.5 center-crops the whole image (anyres processors crop each tile, already of the crop size)
    processor = built(family)[1].image_processor
    center_crop = getattr(processor, "do_center_crop", False) and not hasattr(processor, "image_grid_pinpoints")
    for b, regions in enumerate(batch):
        for frame in range(regions.items[0].num_frames):
            on = regions.on(0, frame)
            for level in regions.level[on].unique().tolist():
                cover = coverage(regions.boxes[on & (regions.level == level)])
                assert cover.max() == 1  # no overlaps within one resolution level
                if center_crop:
                    width, height = sizes[b]
                    assert cover.mean() == pytest.approx(min(width, height) / max(width, height), abs=0.03)
                elif level == 1:  # LLaVA-OneVision's unpadding can cut a strip of the image off
                    assert cover.mean() > 0.85
                else:
                    assert cover.min() == 1
