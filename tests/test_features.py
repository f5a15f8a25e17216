"""A^0_v from layer 0's projections equals the attention an eager forward actually computes."""

import pytest
import torch
from conftest import CASES, make_inputs, skip_where_transformers_fails_a_forward

from hf_tokenprune import tiny
from hf_tokenprune.adapters import get_adapter
from hf_tokenprune.features import first_layer_attention


@pytest.mark.parametrize(("family", "kind"), [(f, k) for f, k in CASES if f not in ("qwen3_5", "qwen3_5_moe")])
def test_matches_eager_layer0_attention(family, kind):
    """(Qwen3.5's layer 0 is linear attention: its feature is the first full-attention layer's, test_qwen3_5.py.)"""
    skip_where_transformers_fails_a_forward(family, kind)
    model = tiny.build_model(family, attn_implementation="eager")
    processor = tiny.build_processor(family)
    inputs = make_inputs(processor, kind)
    adapter = get_adapter(model)
    seen = {}

    def spy(module, args, kwargs):
        seen.update(kwargs)

    handle = adapter.text_model.register_forward_pre_hook(spy, with_kwargs=True)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    handle.remove()
    embeds, mask = seen["inputs_embeds"], inputs["attention_mask"]
    batch, length = embeds.shape[:2]
    positions = adapter.expand_positions(seen.get("position_ids"), batch, length, embeds.device)
    layout = adapter.layout(dict(inputs), mask, positions)
    ours = first_layer_attention(adapter.text_model, embeds, adapter.rotary_positions(positions), mask,
                                 layout.instruction_mask)
    eager = out.attentions[0].mean(dim=1)  # [batch, query, key]
    rows = layout.instruction_mask.unsqueeze(-1).float()
    expected = (eager * rows).sum(dim=1) / rows.sum(dim=1)
    assert torch.allclose(ours, expected, atol=1e-6)
    assert layout.instruction_mask.sum() > 0
    heads = first_layer_attention(adapter.text_model, embeds, adapter.rotary_positions(positions), mask,
                                  layout.instruction_mask, per_head=True)
    per_head = (out.attentions[0] * rows.unsqueeze(1)).sum(dim=2) / rows.sum(dim=1).unsqueeze(1)
    assert heads.shape == per_head.shape == (batch, out.attentions[0].shape[1], length)
    assert torch.allclose(heads, per_head, atol=1e-6)


def test_instruction_tokens_exclude_template_specials_and_padding():
    model, processor = tiny.build("qwen2_vl")
    inputs = make_inputs(processor, "image")
    adapter = get_adapter(model)
    ids = inputs["input_ids"]
    positions = adapter.expand_positions(None, *ids.shape, ids.device)
    layout = adapter.layout(dict(inputs), inputs["attention_mask"], positions)
    tokenizer = processor.tokenizer
    for b in range(ids.shape[0]):
        words = tokenizer.convert_ids_to_tokens(ids[b][layout.instruction_mask[b]].tolist())
        assert "<|im_end|>" not in words and "<|im_start|>" not in words and "[PAD]" not in words
        last_visual = int(layout.visual_mask[b].nonzero().max())
        assert int(layout.instruction_mask[b].nonzero().min()) > last_visual
    assert "colour" in tokenizer.convert_ids_to_tokens(ids[0][layout.instruction_mask[0]].tolist())


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_score_inputs_is_what_the_pruner_scores(family, kind, built):
    """``score_inputs`` (no LLM run) gives the A^0_v the attention scorer ranks on a real pruned prefill."""
    skip_where_transformers_fails_a_forward(family, kind)
    from hf_tokenprune import prune_wrap, score_inputs

    model, processor = built(family)
    inputs = make_inputs(processor, kind)
    captured = score_inputs(model, inputs)
    assert captured.layout.counts == [int(n) for n in captured.valid.sum(dim=1)]
    feature = captured.first_layer_attention
    heads = captured.first_layer_head_attention  # packed like A^0_v, one row per head
    assert heads.shape == (feature.shape[0], adapter_heads(model), feature.shape[1])
    assert torch.allclose(heads.mean(dim=1), feature, atol=1e-7)
    assert not heads.masked_select(~captured.valid.unsqueeze(1)).any()
    prune_wrap(model, ratio=0.5, scorer="attention")
    with torch.no_grad():
        model(**inputs)
    for b, kept in enumerate(model.tokenprune.last_stats.kept_indices):
        n = captured.layout.counts[b]
        expected = torch.topk(feature[b, :n], k=len(kept)).indices.sort().values
        assert torch.equal(kept, expected)
    assert score_inputs(model, inputs).first_layer_attention.equal(feature)  # wrapped: same, hooks intact
    assert "tokenprune" in model.__dict__


def adapter_heads(model) -> int:
    """Query heads of the layer A^0_v is computed from."""
    from hf_tokenprune.features import feature_layer

    text_model = get_adapter(model).text_model
    return text_model.layers[feature_layer(text_model)].self_attn.config.num_attention_heads


def test_score_inputs_without_visual_tokens_is_none(built):
    from hf_tokenprune import score_inputs

    model, processor = built("qwen2_vl")
    inputs = make_inputs(processor, None, batch=1)
    assert score_inputs(model, inputs) is None
