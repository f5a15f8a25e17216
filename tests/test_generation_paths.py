"""Contiguous positions, from_pretrained and decode steps without position ids (the pipeline: test_invariants.py)."""

import pytest
import torch
from conftest import FAMILIES, greedy, make_inputs

import hf_tokenprune
from hf_tokenprune import prune_wrap, tiny
from hf_tokenprune.adapters import get_adapter
from hf_tokenprune.compat import output_cache, with_cache

# Qwen3-VL's DeepStack inputs of the text model
PASSED = ("visual_pos_masks", "deepstack_visual_embeds", "per_layer_inputs")  # beside the embeddings (DeepStack,
# Gemma 4's per-layer inputs)


def _capture_text_model_inputs(model):
    seen = []
    handle = get_adapter(model).text_model.register_forward_pre_hook(
        lambda m, a, k: seen.append({key: k.get(key) for key in ("inputs_embeds", "position_ids", "attention_mask",
                                                                 *PASSED)}),
        with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("family", FAMILIES)
def test_contiguous_positions_equal_a_model_that_never_saw_the_dropped_tokens(built, family):
    """positions='contiguous': the text model runs as if the kept sequence were the whole prompt, 0, 1, 2, ..."""
    model, processor = built(family)
    inputs = make_inputs(processor, "image", batch=1)
    prune_wrap(model, ratio=0.25, scorer="attention", positions="contiguous")
    out = greedy(model, inputs, steps=6)
    kept_length = model.tokenprune.last_stats.seq_len_after
    # reference: the unwrapped text model on the kept embeddings, positions 0..n-1, greedy by hand
    seen, handle = _capture_text_model_inputs(model)
    greedy(model, inputs, steps=1)  # records the pruned prefill embeddings
    handle.remove()
    embeds = seen[0]["inputs_embeds"]
    assert embeds.shape[1] == kept_length
    text_model, head = get_adapter(model).text_model, model.get_output_embeddings()
    rows = 3 if family in ("qwen2_vl", "qwen2_5_vl") else 1  # M-RoPE rows
    extra = {k: seen[0][k] for k in PASSED if seen[0][k] is not None}  # as the pruned prefill passed them
    if isinstance(seen[0]["attention_mask"], dict):  # masks the multimodal model builds (Gemma): as passed too
        extra["attention_mask"] = seen[0]["attention_mask"]
    with model.tokenprune.disabled(), torch.no_grad():
        cache, logits, step_embeds, start = None, [], embeds, 0
        generated = out.sequences[:, inputs["input_ids"].shape[1]:]
        for step in range(6):
            n = step_embeds.shape[1]
            positions = torch.arange(start, start + n).view(1, 1, -1).expand(rows, 1, -1)
            positions = positions[0] if rows == 1 else positions
            hidden = text_model(inputs_embeds=step_embeds, position_ids=positions, **with_cache(cache), use_cache=True,
                                **(extra if step == 0 else {}))
            cache, start = output_cache(hidden), start + n
            logits.append(head(hidden.last_hidden_state[:, -1]))
            step_embeds = model.get_input_embeddings()(generated[:, step:step + 1])
    assert max((a - b).abs().max().item() for a, b in zip(logits, out.logits)) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_decode_without_position_ids_continues_the_original_numbering(built, family):
    """Manual decode (no position ids, as in hand-written loops) gets the positions generate() would use."""
    model, processor = built(family)
    inputs = make_inputs(processor, "image")
    prune_wrap(model, ratio=0.25, scorer="attention")
    reference = greedy(model, inputs, steps=4)
    generated = reference.sequences[:, inputs["input_ids"].shape[1]:]
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        logits, mask, cache = [out.logits[:, -1]], inputs["attention_mask"], output_cache(out)
        for step in range(3):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=generated[:, step:step + 1], attention_mask=mask, **with_cache(cache), use_cache=True)
            cache = output_cache(out)
            logits.append(out.logits[:, -1])
    assert max((a - b).abs().max().item() for a, b in zip(logits, reference.logits)) < 1e-4


def test_from_pretrained_loads_a_local_directory_offline(tmp_path, monkeypatch):
    model, processor = tiny.build("qwen2_vl")
    model.save_pretrained(tmp_path / "model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    wrapped = hf_tokenprune.from_pretrained(str(tmp_path / "model"), ratio=0.5,
                                            config=hf_tokenprune.TokenPruneConfig(scorer="uniform"))
    assert type(wrapped).__name__ == "Qwen2VLForConditionalGeneration"
    assert wrapped.tokenprune.config.ratio == 0.5 and wrapped.tokenprune.config.scorer == "uniform"
    inputs = make_inputs(processor, "image")
    assert torch.equal(greedy(wrapped, inputs, steps=3).sequences,
                       greedy(wrapped, inputs, steps=3).sequences)
    assert wrapped.tokenprune.last_stats.visual_tokens_after[0] < wrapped.tokenprune.last_stats.visual_tokens_before[0]
