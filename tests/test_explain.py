"""Gradient-weighted attention relevance labels (METHOD.md part 1) against a literal implementation."""

import pytest
import torch
from conftest import CASES, make_inputs, skip_where_transformers_fails_a_forward

from hf_tokenprune import prune_wrap, tiny
from hf_tokenprune.explain import relevance_maps, visual_relevance, visual_relevance_batch


def _answer(processor, words=("red", "circle", "<|im_end|>")) -> torch.Tensor:
    return torch.tensor(processor.tokenizer.convert_tokens_to_ids(list(words)))


def _visual_ids(model) -> list[int]:
    return [i for i in (model.config.image_token_id, getattr(model.config, "video_token_id", None)) if i]


def _literal(model, inputs, answer, aggregation="grad-weighted") -> torch.Tensor:
    """[T, N_v] by the book: an eager model's ``output_attentions`` over prompt + the whole answer, loops over
    layers and heads, the full ``L' x L'`` matrix R."""
    length, n = inputs["input_ids"].shape[1], answer.numel()
    full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], answer[None]], dim=1),
                attention_mask=torch.cat([inputs["attention_mask"], torch.ones(1, n, dtype=torch.long)], dim=1))
    if "mm_token_type_ids" in inputs:
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, n, dtype=torch.long)], 1)
    out = model(**full, output_attentions=True)
    size = length + n
    assert len(out.attentions) == model.config.text_config.num_hidden_layers
    assert all(a.shape[-2:] == (size, size) for a in out.attentions)
    visual = torch.isin(inputs["input_ids"][0], torch.tensor(_visual_ids(model)))
    rows = []
    for t in range(n):
        p = length - 1 + t
        grads = torch.autograd.grad(out.logits[0, p, answer[t]], out.attentions, retain_graph=True)
        relevance = torch.eye(size)
        for layer, attention in enumerate(out.attentions):
            heads = attention.shape[1]
            a_bar = torch.zeros(size, size)
            for h in range(heads):
                a = attention[0, h].detach()
                if aggregation == "grad-weighted":
                    a_bar += torch.clamp(grads[layer][0, h] * a, min=0) / heads
                else:
                    a_bar += a / heads
            relevance = relevance + a_bar @ relevance
        rows.append(relevance[p, :length][visual])
    return torch.stack(rows)


@pytest.mark.parametrize(("family", "kind", "aggregation"), [
    ("qwen2_vl", "image", "grad-weighted"),
    ("llava_onevision", "image", "grad-weighted"),
    ("qwen2_vl", "video", "grad-weighted"),
    ("llava_onevision", "image", "mean"),
])
def test_matches_literal_implementation(family, kind, aggregation):
    """Ours on an sdpa model (switched to eager inside) == the literal rule on the same weights built eager."""
    processor = tiny.build_processor(family)
    inputs = make_inputs(processor, kind, batch=1)
    answer = _answer(processor)
    expected = _literal(tiny.build_model(family, attn_implementation="eager"), inputs, answer, aggregation)
    model = tiny.build_model(family)
    maps = relevance_maps(model, inputs, answer, aggregation=aggregation)
    assert expected.shape[1] > 10 and expected.max() > 1e-4 and expected.std() > 1e-6
    torch.testing.assert_close(maps.per_token, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(visual_relevance(model, inputs, answer, aggregation=aggregation),
                               expected.mean(dim=0), rtol=1e-4, atol=1e-6)
    assert maps.answer_positions.tolist() == list(range(inputs["input_ids"].shape[1] - 1,
                                                        inputs["input_ids"].shape[1] + 2))


def test_mean_aggregation_differs_from_grad_weighted(built):
    model, processor = built("qwen2_vl")
    inputs, answer = make_inputs(processor, "image", batch=1), _answer(processor)
    grad = visual_relevance(model, inputs, answer)
    mean = visual_relevance(model, inputs, answer, aggregation="mean")
    assert not torch.allclose(grad / grad.sum(), mean / mean.sum(), atol=1e-3)


def test_only_the_token_the_answer_depends_on_is_relevant():
    """1-layer LLaVA (no attention biases) whose visual embeddings are all zero except token ``j``: every
    other visual token has a zero value vector, so nothing flows from it to the answer and its relevance is 0.
    The answer is the token that ``j`` raises the most (by a counterfactual forward)."""
    model, processor = tiny.build("llava", num_hidden_layers=1)
    inputs = make_inputs(processor, "image", batch=1)
    visual = inputs["input_ids"][0] == model.config.image_token_id
    positions = visual.nonzero().flatten()
    j = 23
    keep = {"j": True}

    def only_j(module, args, kwargs):
        embeds = kwargs["inputs_embeds"].clone()
        embeds[0, positions[positions != positions[j]]] = 0
        if not keep["j"]:
            embeds[0, positions[j]] = 0
        kwargs["inputs_embeds"] = embeds
        return args, kwargs

    hook = model.model.get_decoder().register_forward_pre_hook(only_j, with_kwargs=True)
    try:
        with torch.no_grad():
            with_j = model(**inputs).logits[0, -1]
            keep["j"] = False
            without_j = model(**inputs).logits[0, -1]
            keep["j"] = True
        answer = (with_j - without_j).argmax().view(1)
        relevance = visual_relevance(model, inputs, answer)
    finally:
        hook.remove()
    assert relevance.shape == (int(visual.sum()),)
    assert int(relevance.argmax()) == j and relevance[j] > 1e-4
    assert torch.all(relevance[torch.arange(len(relevance)) != j] == 0)


def _state(model):
    configs = [model.config, *(getattr(model.config, k) for k in model.config.sub_configs)]
    return ([c._attn_implementation_internal for c in configs], [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()])


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_every_family_and_model_left_unchanged(family, kind, built):
    skip_where_transformers_fails_a_forward(family, kind)
    model, processor = built(family)
    inputs, answer = make_inputs(processor, kind, batch=1), _answer(processor)
    before = _state(model)
    plain = visual_relevance(model, inputs, answer)
    n_visual = int(torch.isin(inputs["input_ids"], torch.tensor(_visual_ids(model))).sum())
    assert plain.shape == (n_visual,) and plain.dtype == torch.float32
    assert torch.isfinite(plain).all() and (plain >= 0).all() and plain.sum() > 0
    prune_wrap(model, ratio=0.5, scorer="attention")
    assert torch.equal(visual_relevance(model, inputs, answer), plain)  # run unpruned
    assert _state(model) == before and model.config.text_config._attn_implementation == "sdpa"
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        model(**inputs)  # the pruning hooks still work
    stats = model.tokenprune.last_stats
    assert stats is not None and stats.visual_tokens_after[0] < stats.visual_tokens_before[0] == n_visual


def test_train_mode_frozen_parameters_and_rope_deltas_restored():
    model, processor = tiny.build("qwen2_vl")
    inputs, answer = make_inputs(processor, "image", batch=1), _answer(processor)
    expected = visual_relevance(model, inputs, answer)
    model.train()
    model.model.visual.eval()
    model.requires_grad_(False)
    marker = torch.tensor([[7]])
    model.model.rope_deltas = marker
    before = _state(model)
    torch.testing.assert_close(visual_relevance(model, inputs, answer), expected, rtol=0, atol=0)
    assert _state(model) == before and model.model.rope_deltas is marker


def test_batch_form_is_each_sample_alone(built):
    model, processor = built("llava_onevision")
    samples = [(make_inputs(processor, kind, batch=1), _answer(processor, words)) for kind, words in
               (("image", ("red",)), ("video", ("two", "circles", "<|im_end|>")))]
    out = visual_relevance_batch(model, samples)
    assert len(out) == 2
    for got, (inputs, answer) in zip(out, samples):
        assert torch.equal(got, visual_relevance(model, inputs, answer))


def test_errors(built):
    model, processor = built("qwen2_vl")
    inputs, answer = make_inputs(processor, "image", batch=1), _answer(processor)
    with pytest.raises(ValueError, match="one sample"):
        visual_relevance(model, make_inputs(processor, "image", batch=2), answer)
    with pytest.raises(ValueError, match="empty"):
        visual_relevance(model, inputs, answer[:0])
    with pytest.raises(ValueError, match="1-D"):
        visual_relevance(model, inputs, answer[None])
    with pytest.raises(ValueError, match="no visual tokens"):
        visual_relevance(model, make_inputs(processor, None, batch=1), answer)
    with pytest.raises(ValueError, match="aggregation"):
        visual_relevance(model, inputs, answer, aggregation="rollout")
