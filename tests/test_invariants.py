"""The invariants that define correct input-stage pruning, on every adapter, with images and videos."""

import pytest
import torch
from conftest import CASES, FAMILIES, check_batch_equals_each_sample_alone, greedy, make_inputs, masked_greedy

from hf_tokenprune import prune_wrap, tiny, unwrap
from hf_tokenprune.compat import output_cache


def max_logit_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits))


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
@pytest.mark.parametrize("scorer", ["attention", "random"])
def test_pruned_equals_masked_reference(built, family, kind, scorer):
    model, processor = built(family)
    inputs = make_inputs(processor, kind)
    prune_wrap(model, ratio=0.25, scorer=scorer)
    pruned = greedy(model, inputs, steps=10)
    stats = model.tokenprune.last_stats
    assert all(a < b for a, b in zip(stats.visual_tokens_after, stats.visual_tokens_before))
    reference = masked_greedy(model, inputs, steps=10)
    assert torch.equal(pruned.sequences, reference.sequences)
    assert max_logit_diff(pruned, reference) < 1e-4
    # and the check is sensitive: without the mask the logits differ
    with model.tokenprune.disabled():
        unmasked = greedy(model, inputs, steps=1)
    assert (unmasked.logits[0] - reference.logits[0]).abs().max() > 1e-4


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
    reference = masked_greedy(model, inputs, steps=6)
    assert torch.equal(pruned.sequences, reference.sequences)
    assert max_logit_diff(pruned, reference) < 1e-4
