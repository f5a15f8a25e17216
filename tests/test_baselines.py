"""Baselines behind prune_wrap: FastV, PDrop and DART prune inside the LLM, ToMe merges at the input.

The in-LLM reference is computed without the code under test: an eager-attention twin of the model (same seed,
same weights) runs unpruned, and pre-hooks on its decoder layers mask the dropped tokens' key columns out of the
4-D attention mask in every layer from the stage's layer on, on the prefill and on every decode step. Selections
are checked against the twin's own attention weights / hidden states.
"""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, check_batch_equals_each_sample_alone, greedy, make_inputs

from hf_tokenprune import TokenPruneConfig, prune_wrap, tiny
from hf_tokenprune.adapters import ADAPTERS
from hf_tokenprune.baselines import bipartite_merge, pdrop_stages
from hf_tokenprune.compat import output_cache
from hf_tokenprune.scorers import OracleScorer

DEPTH = 4
# FastV and DART prune before layer 2 here, PDrop before layer 1: a hybrid decoder (Qwen3.5) has linear attention
# there and refuses them; it prunes before its full-attention layers instead (test_qwen3_5.py)
SOFTMAX_FAMILIES = [f for f in FAMILIES
                    if ADAPTERS[tiny.get_family(f).model_class.config_class.model_type].masking_removes_tokens]
# Gemma's text model gets prepared masks per layer type (and a sliding-window cache): in-LLM pruning refused there
# (test_gemma.py)
IN_LLM_FAMILIES = [f for f in SOFTMAX_FAMILIES if f not in ("gemma3", "gemma4")]
RATIOS = {"fastv": 0.25, "pdrop": 0.5, "dart": 0.25, "tome": 0.25}  # pdrop at 0.25 on 4 layers keeps 1 token
IN_LLM = ("fastv", "pdrop", "dart")
SHARPEN = 10.0


_DEEP: dict[tuple[str, str], torch.nn.Module] = {}


@pytest.fixture(scope="module")
def deep():
    """``(family, attn) -> model`` with DEPTH layers; the same seed gives sdpa and eager twins equal weights."""

    def get(family: str, attn: str = "sdpa"):
        if (family, attn) not in _DEEP:
            model = tiny.build_model(family, num_hidden_layers=DEPTH, attn_implementation=attn)
            with torch.no_grad():  # sharper attention: random tiny models attend almost uniformly, whatever the query
                for layer in model.model.get_decoder().layers:
                    if getattr(layer, "self_attn", None) is None:  # a linear-attention layer (Qwen3.5)
                        continue
                    layer.self_attn.q_proj.weight.mul_(SHARPEN)
                    if layer.self_attn.q_proj.bias is not None:
                        layer.self_attn.q_proj.bias.mul_(SHARPEN)
            _DEEP[family, attn] = model
        return _DEEP[family, attn]

    yield get
    _DEEP.clear()


@pytest.fixture(autouse=True)
def _unwrap_deep_models():
    yield
    from hf_tokenprune import unwrap

    for model in _DEEP.values():
        if "tokenprune" in model.__dict__:
            unwrap(model)


@pytest.fixture
def wrapped(built, deep):
    """``(family, kind="image", attn="sdpa", **prune_kw) -> (model, inputs)``: ``deep(family, attn)`` wrapped by
    ``prune_wrap(model, **prune_kw)``, and a two-sample batch of ``kind`` inputs from ``family``'s processor."""

    def get(family: str, kind: str = "image", attn: str = "sdpa", **prune_kw):
        model = deep(family, attn)
        inputs = make_inputs(built(family)[1], kind)
        prune_wrap(model, **prune_kw)
        return model, inputs

    return get


def visual_positions(model, input_ids):
    ids = [model.config.image_token_id, getattr(model.config, "video_token_id", None)]
    return torch.isin(input_ids, torch.tensor([i for i in ids if i is not None]))


def stage_drops(model, input_ids, stages) -> list[torch.Tensor | None]:
    """Per decoder layer, ``[batch, length]`` True where a visual token is dropped by then (None: nothing yet)."""
    visual = visual_positions(model, input_ids)
    drops: list[torch.Tensor | None] = [None] * DEPTH
    for stage in stages:
        drop = torch.zeros_like(visual)
        for b, kept in enumerate(stage.kept_indices):
            positions = visual[b].nonzero().flatten()
            dropped = torch.ones(len(positions), dtype=torch.bool)
            dropped[kept] = False
            drop[b, positions[dropped]] = True
        drops[stage.layer:] = [drop] * (DEPTH - stage.layer)
    return drops


@contextlib.contextmanager
def masked_layers(model, drops):
    """Mask ``drops[i]`` out of layer ``i``'s 4-D eager attention mask (the prompt's columns), unpruned."""

    def hook(i, module, args, kwargs):
        if drops[i] is None:
            return None
        mask = kwargs["attention_mask"]
        assert mask is not None and mask.dim() == 4 and mask.is_floating_point()
        length = drops[i].shape[1]
        mask = mask.clone()
        mask[..., :length] = mask[..., :length].masked_fill(drops[i][:, None, None, :], torch.finfo(mask.dtype).min)
        return args, {**kwargs, "attention_mask": mask}

    layers = model.model.get_decoder().layers
    handles = [layer.register_forward_pre_hook(lambda m, a, k, i=i: hook(i, m, a, k), with_kwargs=True)
               for i, layer in enumerate(layers)]
    wrapped = model.__dict__.get("tokenprune")  # the eager case: the twin is the pruned model itself
    try:
        with wrapped.disabled() if wrapped is not None else contextlib.nullcontext():
            yield
    finally:
        for handle in handles:
            handle.remove()


def max_logit_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits, strict=True))


def budgets(stats, keep):
    return [math.ceil(keep * n - 1e-9) for n in stats.visual_tokens_before]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", IN_LLM)
@pytest.mark.parametrize("family", IN_LLM_FAMILIES)
def test_in_llm_pruning_equals_the_layer_masked_reference(wrapped, deep, family, method, attn):
    model, inputs = wrapped(family, attn=attn, ratio=RATIOS[method], scorer=method)
    twin = deep(family, "eager")
    pruned = greedy(model, inputs, steps=6)
    stats = model.tokenprune.last_stats
    stages = pdrop_stages(DEPTH, RATIOS[method]) if method == "pdrop" else ((2, RATIOS[method]),)
    assert [s.layer for s in stats.stages] == [layer for layer, _ in stages]
    for stage, (_, keep) in zip(stats.stages, stages, strict=True):
        assert [len(k) for k in stage.kept_indices] == budgets(stats, keep)
    drops = stage_drops(twin, inputs["input_ids"], stats.stages)
    with masked_layers(twin, drops):
        reference = greedy(twin, inputs, steps=6)
    assert torch.equal(pruned.sequences, reference.sequences)
    assert max_logit_diff(pruned, reference) < 1e-4
    # the comparison is sensitive: masking other tokens (the kept ones shifted by one) changes the logits
    shifted = [None if d is None else d.roll(1, dims=1) & visual_positions(twin, inputs["input_ids"]) for d in drops]
    with masked_layers(twin, shifted):
        other = greedy(twin, inputs, steps=1)
    assert (other.logits[0] - reference.logits[0]).abs().max() > 1e-4


def last_instruction(input_ids, im_end):
    """The last token before the user turn's ``<|im_end|>`` (the tiny templates' last instruction token)."""
    idx = torch.arange(input_ids.shape[1])
    return torch.where(input_ids == im_end, idx, -1).amax(dim=1) - 1


@pytest.mark.parametrize("method", ["fastv", "pdrop"])
@pytest.mark.parametrize("family", IN_LLM_FAMILIES)
def test_attention_ranking_matches_the_reference_attention_weights(wrapped, deep, family, method):
    """Each stage keeps the visual tokens with the highest head-mean attention from the query token in the
    eager reference's own attention weights (earlier stages' drops masked)."""
    model, inputs = wrapped(family, ratio=RATIOS[method], scorer=method)
    twin = deep(family, "eager")
    greedy(model, inputs, steps=1)
    stats = model.tokenprune.last_stats
    ids = inputs["input_ids"]
    query = (torch.full((ids.shape[0],), ids.shape[1] - 1) if method == "fastv"
             else last_instruction(ids, tiny.special_token_ids()["<|im_end|>"]))
    visual = visual_positions(twin, ids)
    for s, stage in enumerate(stats.stages):
        earlier = stage_drops(twin, ids, stats.stages[:s])  # what the stage's layer sees: earlier stages' drops
        with masked_layers(twin, earlier), torch.no_grad():
            attentions = twin(**inputs, output_attentions=True).attentions
        for b, kept in enumerate(stage.kept_indices):
            received = attentions[stage.layer][b, :, query[b]].mean(dim=0)[visual[b]]
            if earlier[stage.layer] is not None:
                received[earlier[stage.layer][b][visual[b]]] = -1.0
            expected = received.topk(len(kept)).indices.sort().values
            assert torch.equal(kept, expected), (stage.layer, b)


@pytest.mark.parametrize("family", IN_LLM_FAMILIES)
def test_dart_keeps_pivots_and_the_tokens_least_like_them(wrapped, deep, family):
    model, inputs = wrapped(family, ratio=0.25, scorer="dart")
    twin = deep(family, "eager")
    greedy(model, inputs, steps=1)
    stats = model.tokenprune.last_stats
    with torch.no_grad():
        hidden = twin(**inputs, output_hidden_states=True).hidden_states[2]  # the input of layer 2
        layer = twin.model.get_decoder().layers[2]
        key_norm = layer.self_attn.k_proj(layer.input_layernorm(hidden)).abs().sum(-1)
    visual = visual_positions(twin, inputs["input_ids"])
    for b, kept in enumerate(stats.kept_indices):
        tokens, norms = hidden[b, visual[b]], key_norm[b, visual[b]]
        pivots = norms.topk(8).indices
        redundancy = (F.normalize(tokens, dim=-1) @ F.normalize(tokens[pivots], dim=-1).T).amax(dim=1)
        redundancy[pivots] = -2.0 - torch.arange(8, 0, -1.0)  # pivots first, the largest key norm first
        expected = (-redundancy).topk(len(kept)).indices.sort().values
        assert set(pivots[:len(kept)].tolist()) <= set(kept.tolist())
        assert torch.equal(kept, expected)


@pytest.mark.parametrize(("family", "method"), [(f, m) for f in FAMILIES for m in [*IN_LLM, "tome"]
                                                if m == "tome" or f in SOFTMAX_FAMILIES])
def test_ratio_one_reproduces_the_unwrapped_model(built, deep, family, method):
    processor = built(family)[1]
    model = deep(family)
    inputs = make_inputs(processor, "image")
    reference = greedy(model, inputs, steps=4)
    prune_wrap(model, ratio=1.0, scorer=method)
    out = greedy(model, inputs, steps=4)
    assert torch.equal(out.sequences, reference.sequences)
    assert max_logit_diff(out, reference) == 0.0
    assert model.tokenprune.last_stats is None


@pytest.mark.parametrize(("family", "method"), [(f, m) for f in FAMILIES for m in [*IN_LLM, "tome"]
                                                if m == "tome" or f in IN_LLM_FAMILIES])
def test_left_padded_batch_equals_each_sample_alone(built, deep, family, method):
    processor = built(family)[1]
    model = deep(family)
    prune_wrap(model, ratio=RATIOS[method], scorer=method)
    check_batch_equals_each_sample_alone(model, processor, family, steps=6)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
@pytest.mark.parametrize("method", IN_LLM)
def test_video_per_frame_budgets_inside_the_llm(wrapped, deep, family, method):
    model, inputs = wrapped(family, "video", ratio=RATIOS[method], scorer=method, scope="image")
    twin = deep(family, "eager")
    pruned = greedy(model, inputs, steps=4)
    stats = model.tokenprune.last_stats
    with masked_layers(twin, stage_drops(twin, inputs["input_ids"], stats.stages)):
        reference = greedy(twin, inputs, steps=4)
    assert torch.equal(pruned.sequences, reference.sequences)
    assert max_logit_diff(pruned, reference) < 1e-4


@pytest.mark.parametrize("family", IN_LLM_FAMILIES)
def test_kv_cache_is_shortened_from_the_pruning_layer_on(wrapped, family):
    model, inputs = wrapped(family, ratio=0.5, scorer="pdrop")
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    stats = model.tokenprune.last_stats
    lengths = [output_cache(out).get_seq_length(i) for i in range(DEPTH)]
    assert lengths == [stats.seq_len_before] + [s.seq_len for s in stats.stages]
    assert out.logits.shape[1] == stats.seq_len_after
    assert stats.kv_cache_ratio == pytest.approx(sum(lengths) / (DEPTH * stats.seq_len_before))
    assert 0 < stats.prefill_flops_ratio < 1


@pytest.mark.parametrize("family", SOFTMAX_FAMILIES)
def test_fastv_at_layer_zero_is_input_stage_pruning_by_last_token_attention(wrapped, deep, family):
    model, inputs = wrapped(family, ratio=0.25, scorer="fastv", layer=0)
    twin = deep(family, "eager")
    greedy(model, inputs, steps=1)
    fastv = model.tokenprune.last_stats
    assert [s.layer for s in fastv.stages] == [0]
    with torch.no_grad():
        attention = twin(**inputs, output_attentions=True).attentions[0][:, :, -1].mean(dim=1)
    visual = visual_positions(twin, inputs["input_ids"])
    prune_wrap(model, ratio=0.25, scorer=OracleScorer([attention[b][visual[b]] for b in range(2)]))
    greedy(model, inputs, steps=1)
    oracle = model.tokenprune.last_stats
    assert all(torch.equal(a, b) for a, b in zip(fastv.kept_indices, oracle.kept_indices, strict=True))


def test_bipartite_merge_merges_duplicates_first():
    torch.manual_seed(0)
    distinct = torch.randn(6, 16)
    x = distinct.repeat_interleave(2, dim=0)  # each token twice, side by side
    dest = bipartite_merge(x, 6)
    survivors = (dest == torch.arange(12)).nonzero().flatten()
    assert len(survivors) == 6
    assert torch.equal(dest[0::2], dest[1::2])  # every pair merged together
    assert torch.equal(bipartite_merge(x, 12), torch.arange(12))


def llm_input(model, inputs):
    """The ``inputs_embeds`` the text model runs on (after the pruner's pre-hook) in a forward of ``inputs``."""
    seen = {}
    text_model = model.model.get_decoder()
    handle = text_model.register_forward_pre_hook(lambda m, a, k: seen.update(embeds=k["inputs_embeds"]),
                                                  with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["embeds"]


@pytest.mark.parametrize("family", FAMILIES)
def test_tome_keeps_the_budget_and_feeds_merged_embeddings(wrapped, family):
    model, inputs = wrapped(family, ratio=0.25, scorer="tome")
    pruned = llm_input(model, inputs)
    stats = model.tokenprune.last_stats
    assert stats.visual_tokens_after == budgets(stats, 0.25)
    with model.tokenprune.disabled():
        full = llm_input(model, inputs)
    visual = visual_positions(model, inputs["input_ids"])
    for b, kept in enumerate(stats.kept_indices):
        originals = full[b][visual[b]]
        # the last text tokens follow the kept visual tokens: those slots are the visual ones
        n_text_after = int((~visual[b]).long().flip(0).cumprod(0).sum())
        slots = pruned[b, -(n_text_after + len(kept)):-n_text_after]
        same = (slots - originals[kept]).abs().amax(dim=-1) < 1e-6
        assert not same.all()  # some kept tokens absorbed others: they carry the average, not their own embedding
    out = greedy(model, inputs, steps=4)
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"scorer": "fastv", "positions": "contiguous"}, "positions='original'"),
        ({"scorer": "pdrop", "layer": 3}, "layer applies to"),
        ({"scorer": "attention", "layer": 1}, "layer applies to"),
        ({"scorer": "dart", "layer": -1}, "layer must be"),
    ],
)
def test_invalid_baseline_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        TokenPruneConfig(**overrides)


def test_pruning_layer_beyond_the_depth_is_refused(deep):
    with pytest.raises(ValueError, match="decoder layers"):
        prune_wrap(deep("qwen2_vl"), ratio=0.25, scorer="fastv", layer=DEPTH)


def test_static_cache_gets_a_clear_error(built, deep):
    model = deep("qwen2_vl")
    inputs = make_inputs(built("qwen2_vl")[1], "image")
    prune_wrap(model, ratio=0.25, scorer="fastv")
    with pytest.raises(ValueError, match="DynamicCache|2-D attention mask"), torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, cache_implementation="static")
