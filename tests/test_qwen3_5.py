"""Qwen3.5 (dense and MoE): input-stage pruning of a hybrid Gated DeltaNet / full-attention decoder.

The shared matrix (test_invariants.py) compares these families with the pruned-sequence reference; here: the
left-padding mask in the linear layers, the linear layers' conv and recurrent states after a pruned prefill and a
decode step, the scoring feature, the exact token mixing that labels go through, and in-LLM pruning, which these
layer types allow only before a full-attention layer.
"""

import copy

import pytest
import torch
from conftest import chat, greedy, make_inputs
from test_labels import STEPS, predict, write_jsonl

from hf_tokenprune import UnsupportedGenerationError, cli, prune_wrap, score_inputs, tiny
from hf_tokenprune.adapters import get_adapter
from hf_tokenprune.bench import hybrid_feature
from hf_tokenprune.compat import TRANSFORMERS_VERSION, output_cache, with_cache
from hf_tokenprune.explain import _explicit_linear_attention
from hf_tokenprune.features import delta_rule_attention, feature_layer, first_layer_attention
from hf_tokenprune.training.labels import build_prompt, load_jsonl
from hf_tokenprune.training.store import read_labels
from hf_tokenprune.verify import drop_mask, generate_reference, pruned_sequence

FAMILIES = ("qwen3_5", "qwen3_5_moe")


def linear_layers(model) -> list[int]:
    return [i for i, kind in enumerate(model.config.get_text_config().layer_types) if kind == "linear_attention"]


def states(cache, model) -> list[torch.Tensor]:
    """Every layer's cached state: conv and recurrent states of the linear layers, keys and values of the others."""
    out = []
    for i, layer in enumerate(cache.layers):
        if i in linear_layers(model):
            out += [layer.conv_states[0], layer.recurrent_states[0]]
        else:
            out += [layer.keys, layer.values]
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_is_exact_in_the_linear_layers(built, family):
    """Unpruned, a left-padded batch gives each sample's logits alone: the linear layers zero the padding's inputs,
    so their conv and recurrent states are still zero when a sample's first token arrives."""
    model, processor = built(family)
    inputs = make_inputs(processor, "image")
    assert (inputs["attention_mask"] == 0).any()
    with torch.no_grad():
        together = model(**inputs).logits
    for b, question in enumerate(["what colour is the circle", "what shape is left of the red square ?"]):
        text = processor.apply_chat_template(chat(question, "image"), add_generation_prompt=True, tokenize=False)
        alone = processor(text=[text], images=[tiny.make_image(b, size=(56 + 28 * b, 56 + 56 * b))],
                          return_tensors="pt")
        with torch.no_grad():
            logits = model(**alone).logits[0]
        assert (together[b, -logits.shape[0]:] - logits).abs().max() < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_states_after_a_pruned_prefill_and_a_decode_step_equal_the_reference(built, family):
    """After a pruned prefill, and after one decode step on it, every linear layer's conv and recurrent state and
    every full-attention layer's keys and values equal those of the unwrapped model run on the already-pruned
    sequence, and so do the logits."""
    model, processor = built(family)
    inputs = make_inputs(processor, "image")
    prune_wrap(model, ratio=0.25, scorer="attention")
    with torch.no_grad():
        pruned = model(**inputs, use_cache=True)
    drop = drop_mask(inputs["input_ids"], get_adapter(model).placeholder_ids(inputs), model.tokenprune.last_stats)
    sequence, extras = pruned_sequence(model, inputs, drop)
    assert not extras
    with model.tokenprune.disabled(), torch.no_grad():
        reference = model(**sequence, use_cache=True)
    assert (pruned.logits - reference.logits).abs().max() < 1e-5
    for ours, theirs in zip(states(output_cache(pruned), model), states(output_cache(reference), model), strict=True):
        assert ours.shape == theirs.shape and (ours - theirs).abs().max() < 1e-5
    step = pruned.logits[:, -1].argmax(-1, keepdim=True)
    with torch.no_grad():  # the pruner supplies the position ids
        ours = model(input_ids=step, attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(step)], 1),
                     use_cache=True, **with_cache(output_cache(pruned)))
        with model.tokenprune.disabled():
            theirs = model(input_ids=step, attention_mask=torch.cat([sequence["attention_mask"], torch.ones_like(step)],
                                                                    1),
                           position_ids=sequence["position_ids"][..., -1:] + 1, use_cache=True,
                           **with_cache(output_cache(reference)))
    assert (ours.logits - theirs.logits).abs().max() < 1e-5
    for a, b in zip(states(output_cache(ours), model), states(output_cache(theirs), model), strict=True):
        assert (a - b).abs().max() < 1e-5
    # sensitive: the masked (unpruned-length) run leaves other recurrent states
    with model.tokenprune.disabled(), torch.no_grad():
        unpruned = model(**inputs, use_cache=True)
    layer = linear_layers(model)[0]
    assert (output_cache(unpruned).layers[layer].recurrent_states[0]
            - output_cache(reference).layers[layer].recurrent_states[0]).abs().max() > 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_the_feature_is_the_first_full_attention_layer_on_the_input_embeddings(family):
    """A^0_v of a model whose first layers are linear attention: the eager attention probabilities of its first
    full-attention layer applied to the input embeddings, averaged over heads and instruction rows."""
    model = tiny.build_model(family, num_hidden_layers=4, attn_implementation="eager")
    inputs = make_inputs(tiny.build_processor(family), "image")
    adapter = get_adapter(model)
    text_model = adapter.text_model
    assert feature_layer(text_model) == 3 and linear_layers(model) == [0, 1, 2]
    seen = {}
    handle = text_model.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    embeds, mask = seen["inputs_embeds"], inputs["attention_mask"]
    positions = adapter.expand_positions(seen.get("position_ids"), *embeds.shape[:2], embeds.device)
    layout = adapter.layout(dict(inputs), mask, positions)
    ours = first_layer_attention(text_model, embeds, adapter.rotary_positions(positions), mask,
                                 layout.instruction_mask)
    length = embeds.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()[None] & mask.bool()[:, None, :]
    bias = torch.zeros(causal.shape).masked_fill(~causal, torch.finfo(torch.float32).min)[:, None]
    layer = text_model.layers[3]
    with torch.no_grad():
        _, weights = layer.self_attn(layer.input_layernorm(embeds),
                                     text_model.rotary_emb(embeds, adapter.rotary_positions(positions)), bias)
    rows = layout.instruction_mask.unsqueeze(-1).float()
    expected = (weights.mean(dim=1) * rows).sum(dim=1) / rows.sum(dim=1)
    assert torch.allclose(ours, expected, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_unrolled_recurrence_is_the_layers_own_computation(family):
    """``delta_rule_attention``'s ``A @ V`` is the Gated DeltaNet kernel's output (left padding included), and the
    explicit form labels run in gives the layer's output; both fail for a perturbed matrix."""
    model = tiny.build_model(family)
    layer = model.model.get_decoder().layers[0]
    attn = layer.linear_attn
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger weights than the init's, so that gates and delta corrections matter
        for weight in (attn.in_proj_qkv.weight, attn.in_proj_a.weight, attn.in_proj_b.weight):
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
    hidden = torch.randn(2, 150, model.config.get_text_config().hidden_size, generator=generator)
    mask = torch.ones(2, 150, dtype=torch.long)
    mask[0, :17] = 0
    cores = []
    handle = attn.norm.register_forward_pre_hook(lambda m, args: cores.append(args[0]))
    with torch.no_grad():
        expected = attn(hidden, attention_mask=mask)
        handle.remove()
        matrix, values = delta_rule_attention(attn, hidden, mask)
        explicit = _explicit_linear_attention(attn, lambda a: None)(hidden, attention_mask=mask)
    core = cores[0].reshape(2, 150, attn.num_v_heads, attn.head_v_dim).transpose(1, 2)
    scale = core.abs().max()
    assert (matrix @ values - core).abs().max() < 1e-4 * scale  # float32: a 150-token solve vs 64-token chunks
    assert (explicit - expected).abs().max() < 1e-4 * expected.abs().max()
    assert ((matrix * 1.01) @ values - core).abs().max() > 1e-3 * scale
    rows = torch.tensor([[20, 149], [3, 100]])
    assert torch.allclose(delta_rule_attention(attn, hidden, mask, rows)[0],
                          torch.gather(matrix, 2, rows[:, None, :, None].expand(-1, matrix.shape[1], -1, 150)))


@pytest.mark.parametrize("scorer", ["fastv", "dart"])
def test_in_llm_pruning_before_a_full_attention_layer_equals_running_the_rest_on_the_kept_tokens(scorer):
    """layer=3 (full attention) of an 8-layer model: layers 0-2 see every token, layers 3-7 (linear layers 4-6
    included) only the kept ones at their original positions; the first token's logits equal the unwrapped
    model's layers 3-7 run by hand on the kept hidden states."""
    model = tiny.build_model("qwen3_5", num_hidden_layers=8)
    inputs = make_inputs(tiny.build_processor("qwen3_5"), "image", batch=1)
    prune_wrap(model, ratio=0.25, scorer=scorer, layer=3)
    pruned = greedy(model, inputs, steps=3)
    stats = model.tokenprune.last_stats
    assert [s.layer for s in stats.stages] == [3]
    text_model = get_adapter(model).text_model
    with model.tokenprune.disabled(), torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[3]  # the input of layer 3
        keep = ~drop_mask(inputs["input_ids"], (model.config.image_token_id,), stats)[0]
        x = hidden[:, keep]
        rotary = text_model.rotary_emb(x, model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"])[0][:, :, keep])
        for layer in text_model.layers[3:]:
            x = layer(x, position_embeddings=rotary, attention_mask=None)
        logits = model.lm_head(text_model.norm(x)[:, -1])
    assert (pruned.logits[0] - logits).abs().max() < 1e-4
    # the full-attention layers from the stage on cache the kept tokens only
    assert output_cache(pruned).get_seq_length(7) == stats.stages[0].seq_len + 2


@pytest.mark.parametrize("family", FAMILIES)
def test_fastv_at_the_llm_input_ranks_with_the_first_full_attention_layer(built, family):
    """layer=0 runs FastV's last-token ranking on the input embeddings with the first full-attention layer's q/k
    (as A^0_v): input-stage pruning, equal to the pruned-sequence reference."""
    model, processor = built(family)
    inputs = make_inputs(processor, "image")
    prune_wrap(model, ratio=0.25, scorer="fastv", layer=0)
    pruned = greedy(model, inputs, steps=4)
    assert [s.layer for s in model.tokenprune.last_stats.stages] == [0]
    reference = generate_reference(model, inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True)
    assert torch.equal(pruned.sequences, reference.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(pruned.logits, reference.logits, strict=True)) < 1e-4


@pytest.mark.parametrize(("scorer", "layer"), [("fastv", None), ("dart", 1), ("pdrop", None)])
def test_in_llm_pruning_before_a_linear_layer_is_refused_naming_why(scorer, layer):
    model = tiny.build_model("qwen3_5", num_hidden_layers=8)
    config = {"layer": layer} if layer is not None else {}
    with pytest.raises(ValueError, match=r"Gated DeltaNet linear-attention layer.*layer= one of \[3, 7\]"):
        prune_wrap(model, ratio=0.25, scorer=scorer, **config)


def test_command_line_labels_train_a_compressor_that_prunes(tmp_path, capsys):
    """End to end from a saved model: ``hf-tokenprune label`` (relevance through the linear layers' unrolled
    recurrence), ``hf-tokenprune train``, then pruning with the trained compressor (fixed and automatic budgets) ==
    the pruned-sequence reference. Each label's feature is the A^0_v the compressor will see."""
    model, processor = tiny.build("qwen3_5")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    samples = load_jsonl(write_jsonl(tmp_path / "probe", 6))
    answers = [predict(model, processor, sample)[0] for sample in samples]
    jsonl = write_jsonl(tmp_path / "data", 6, answers)  # the model's own answers, except every third ("wrong")
    assert cli.main(["label", "--model", str(tmp_path / "model"), "--data", str(jsonl), "--out",
                     str(tmp_path / "labels"), "--max-new-tokens", str(STEPS)]) == 0
    assert '"labels_added": 4' in capsys.readouterr().out
    records = read_labels(tmp_path / "labels")
    for record in records:
        assert bool(record.relevance.isfinite().all()) and record.relevance.abs().sum() > 0
        assert record.feature.shape == record.relevance.shape
    video = next(r for r in records if r.sample_id == "s04")
    found = score_inputs(model, build_prompt(processor, load_jsonl(jsonl)[4]))
    assert torch.equal(video.feature, found.first_layer_attention[0, found.valid[0]])
    assert cli.main(["train", "--labels", str(tmp_path / "labels"), "--out", str(tmp_path / "compressor"),
                     "--epochs", "2", "--channels", "4,8", "--kernel-size", "3", "--val-fraction", "0.5",
                     "--quiet"]) == 0
    inputs = make_inputs(processor, "image")
    for budget in ({"ratio": 0.25}, {"budget": "auto", "mass": 0.5}):
        prune_wrap(model, compressor=str(tmp_path / "compressor"), **budget)
        pruned = greedy(model, inputs, steps=4)
        stats = model.tokenprune.last_stats
        assert stats.scorer == "compressor"
        assert all(a < b for a, b in zip(stats.visual_tokens_after, stats.visual_tokens_before, strict=True))
        reference = generate_reference(model, inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                       output_logits=True, return_dict_in_generate=True)
        assert torch.equal(pruned.sequences, reference.sequences)
    # the per-head feature of the same labels (no new relevance pass), its compressor, pruning with it
    assert cli.main(["label", "--model", str(tmp_path / "model"), "--data", str(jsonl), "--out",
                     str(tmp_path / "heads"), "--feature", "first_layer_head_attention", "--relevance-from",
                     str(tmp_path / "labels")]) == 0
    assert '"labels_added": 4' in capsys.readouterr().out
    heads = model.config.text_config.num_attention_heads
    assert [r.feature.shape for r in read_labels(tmp_path / "heads")] == [(heads, *r.feature.shape) for r in records]
    assert cli.main(["train", "--labels", str(tmp_path / "heads"), "--out", str(tmp_path / "head_compressor"),
                     "--epochs", "2", "--channels", "4,8", "--kernel-size", "3", "--val-fraction", "0.5",
                     "--quiet"]) == 0
    prune_wrap(model, compressor=str(tmp_path / "head_compressor"), ratio=0.25)
    pruned = greedy(model, inputs, steps=4)
    assert model.tokenprune.last_stats.scorer == "compressor"
    reference = generate_reference(model, inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True)
    assert torch.equal(pruned.sequences, reference.sequences)


def test_transformers_rolls_a_rejected_block_back_past_its_accepted_token_unpruned():
    """Why prompt lookup on these families is compared with a looser logit tolerance (test_generation_matrix.py):
    on the UNPRUNED model, verifying one right and three wrong candidates in one forward and cropping the three
    (``cache.crop(-3)``, as assisted generation does) restores the recurrent state from before the block, so the
    next logits differ from plain greedy decoding (measured 9.2e-4 here). If transformers keeps the accepted token's
    state one day, this fails and the tolerance can go."""
    model, processor = tiny.build("qwen3_5")
    if getattr(model, "_is_stateful", False):
        pytest.skip(f"transformers {TRANSFORMERS_VERSION} refuses assisted generation of models with a recurrent "
                    "state (and its cache cannot keep intermediate recurrent states)")
    inputs = make_inputs(processor, "video", batch=1)
    new = greedy(model, inputs, steps=3).sequences[:, inputs["input_ids"].shape[1]:]
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        base = output_cache(model(**inputs, use_cache=True))
        deltas = model.model.rope_deltas

        def positions(start: int, n: int) -> torch.Tensor:
            text = torch.arange(length + start, length + start + n).view(1, 1, -1)
            return torch.cat([text, (text + deltas).expand(3, 1, -1)])

        stepwise = copy.deepcopy(base)
        for t in range(3):
            logits = model(input_ids=new[:, t:t + 1], position_ids=positions(t, 1), use_cache=True,
                           **with_cache(stepwise)).logits[:, -1]
        block = copy.deepcopy(base)
        block.activate_past_recording(recurrent_states_to_keep=3)
        model(input_ids=new[:, :1], position_ids=positions(0, 1), use_cache=True, **with_cache(block))
        block.crop(0)
        wrong = torch.tensor([[5, 6, 7]])
        model(input_ids=torch.cat([new[:, 1:2], wrong], 1), position_ids=positions(1, 4), use_cache=True,
              **with_cache(block))
        block.crop(-3)
        after = model(input_ids=new[:, 2:3], position_ids=positions(2, 1), use_cache=True,
                      **with_cache(block)).logits[:, -1]
    assert 1e-4 < (after - logits).abs().max() < 2e-3


def test_the_feature_measurement_runs():
    """``python -m hf_tokenprune.bench.hybrid_feature`` (docs/design.md) end to end on two training steps: every
    candidate scores the visual tokens of the recall task; untrained, the full model's accuracy is near chance."""
    model = hybrid_feature.train_recall(steps=2, batch=8)
    results = hybrid_feature.quality(model, samples=64)
    assert set(results) == {"full model", *hybrid_feature.CANDIDATES}
    assert all(0.0 <= r["recall"] <= 1.0 and 0.0 <= r["pruned_accuracy"] <= 1.0 for r in results.values())
    assert results["full model"]["pruned_accuracy"] < 0.5


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_is_refused_where_transformers_scrambles_the_pictures(built, family):
    """transformers 5.20 declares no image input for Qwen3.5, so generate() repeats pixel values patch by patch for
    beams: unpruned, the first beam logits then differ from a plain forward; the pruned model refuses such calls.
    From 5.21 on beams see the right pictures and the pruned model runs them (test_generation_matrix.py)."""
    model, processor = built(family)
    inputs = make_inputs(processor, "image")
    with torch.no_grad():
        forward = model(**inputs).logits[:, -1]
        beams = model.generate(**inputs, num_beams=2, max_new_tokens=1, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    scrambled = (beams.logits[0][::2] - forward).abs().max() > 1e-3
    assert scrambled == ("image" not in getattr(model, "input_modalities", ()))
    prune_wrap(model, ratio=0.25, scorer="attention")
    if scrambled:
        with pytest.raises(UnsupportedGenerationError, match="patch by patch"):
            model.generate(**inputs, num_beams=2, max_new_tokens=1)
    else:
        assert get_adapter(model).expansion_refusal(dict(inputs)) is None
