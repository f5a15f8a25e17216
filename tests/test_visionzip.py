"""VisionZip (``scorer="visionzip"``): the vision-tower attention it recomputes, its selection and merging, padded
batches, per-image budgets and the refusals. The shared matrix (``test_invariants.py``) runs it on every family."""

import sys

import made_up_family
import pytest
import torch
import torch.nn.functional as F
from conftest import check_batch_equals_each_sample_alone, greedy, make_inputs
from test_selection import random_sample, synthetic_inputs

from hf_tokenprune import TokenPruneConfig, prune_wrap, score_inputs, tiny, unwrap
from hf_tokenprune.adapters import UnsupportedMethodError, get_adapter
from hf_tokenprune.adapters.vision_attention import VisionAttentionCapture
from hf_tokenprune.pruning import budget
from hf_tokenprune.scorers import VisionZipScorer

# the families whose vision-tower attention the adapters map to LLM tokens (docs/design.md), and the made-up
# LLaVA-1.5 of made_up_family.py; the others refuse
VISIONZIP_FAMILIES = ("qwen2_vl", "llava", "qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe", "qwen3_5",
                      "qwen3_5_moe", *made_up_family.FAMILIES)
EAGER_CASES = [("llava", "image"), ("llava_dinov2", "image"), ("qwen2_vl", "image"), ("qwen2_vl", "video"),
               ("qwen3_vl", "image"), ("glm4v", "video"), ("qwen3_5", "image")]


def eager_layer_attention(model, layer, monkeypatch) -> list[torch.Tensor]:
    """Record the attention probabilities the model's own eager attention computes inside ``layer``: one
    ``[batch, heads, queries, keys]`` tensor per call (per image / frame in the Qwen-style towers)."""
    attention = getattr(layer, "self_attn", None) or getattr(layer, "attention", None) or layer.attn
    module = sys.modules[type(attention).__module__]
    eager, seen, inside = module.eager_attention_forward, [], []

    def recording(*args, **kwargs):
        out = eager(*args, **kwargs)
        if inside:
            seen.append(out[1].detach())
        return out

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    layer.register_forward_pre_hook(lambda *_: inside.append(True))
    layer.register_forward_hook(lambda *_: inside.clear())
    return seen


def llava_with_dinov2_tower(config_scale: int = 1):
    """The tiny LLaVA-1.5 with a tiny DINOv2 tower (CLS token, layer scale, ``encoder.layer``) in place of CLIP, its
    last layer's patches as features: the real-weights testbed's architecture (``bench/realweights.py``).
    ``config_scale``: the tower's configured image size over the processor's (DINOv2 interpolates its position
    embeddings; the real-weights one is configured for 518 px and runs at 224)."""
    from transformers import Dinov2Config, LlavaConfig, LlavaForConditionalGeneration

    cfg = tiny.build_model("llava").config
    vision = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                          patch_size=cfg.vision_config.patch_size,
                          image_size=cfg.vision_config.image_size * config_scale)
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=cfg.text_config.to_dict(),
                         image_token_index=cfg.image_token_index, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", image_seq_length=cfg.image_seq_length)
    config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlavaForConditionalGeneration(config).eval()


@pytest.mark.parametrize(("family", "kind"), EAGER_CASES)
def test_recomputed_vision_attention_equals_eager_attention(family, kind, monkeypatch):
    """The attention recomputed from the captured layer input equals the probabilities of the tower's own eager
    attention in that layer (CLS row for CLIP and DINOv2; mean over heads and queries of each image / frame, summed
    per merged 2 x 2 group, for the Qwen-style towers), at the call's visual tokens in order."""
    if family == "llava_dinov2":
        model, family = llava_with_dinov2_tower(), "llava"
    else:
        model = tiny.build_model(family, attn_implementation="eager")
    processor = tiny.build_processor(family)
    inputs = make_inputs(processor, kind)
    adapter = get_adapter(model)
    layer = adapter.vision_attention_layer()
    eager = eager_layer_attention(model, layer, monkeypatch)
    capture = VisionAttentionCapture(layer, lambda: True)
    with torch.no_grad():
        model(**inputs)
    records = capture.take()
    capture.remove()
    assert records and eager, "the capture hook or the tower's eager attention did not run"
    got = adapter.vision_attention(records, inputs)
    if family == "llava":
        values = torch.cat([w[:, :, 0, 1:].mean(dim=1).flatten() for w in eager])
    else:
        merge = model.config.vision_config.spatial_merge_size ** 2
        values = torch.cat([w[0].mean(dim=(0, 1)) for w in eager]).view(-1, merge).sum(-1)
    (token,) = adapter.placeholder_ids(inputs)  # GLM-4V marks video tokens with the image token id
    expected = torch.zeros(inputs["input_ids"].shape)
    expected[inputs["input_ids"] == token] = values.float()
    assert torch.allclose(got, expected, atol=1e-6)
    assert got[inputs["input_ids"] == token].std() > 0  # not uniform: the comparison can fail


def test_token_regions_follow_the_processed_image_not_the_towers_configured_size():
    model, processor = llava_with_dinov2_tower(config_scale=2), tiny.build_processor("llava")
    inputs = make_inputs(processor, "image")
    sizes = [(64, 48), (48, 64)]  # make_inputs' images are resized by the processor anyway
    regions = get_adapter(model).token_regions(inputs, 0, original_sizes=sizes)
    (token,) = get_adapter(model).placeholder_ids(inputs)
    assert len(regions) == int((inputs["input_ids"][0] == token).sum())
    with torch.no_grad():  # and the model runs at that size
        model(**inputs)


def reference_zip(attention: torch.Tensor, embeds: torch.Tensor, k: int) -> tuple[set[int], torch.Tensor]:
    """VisionZip on one unit, written plainly: the top ``round(k * 54 / 64)`` by attention (ties: earlier), targets
    every ``m // k_c``-th non-dominant token, each other non-dominant token to its most cosine-similar target (ties:
    earlier target), a target's embedding the mean of its group."""
    n = len(attention)
    dominant = int(k * 54 / 64 + 0.5)
    order = sorted(range(n), key=lambda i: (-float(attention[i]), i))
    kept = set(order[:dominant])
    rest = [i for i in range(n) if i not in kept]
    contextual = k - dominant
    out = embeds.clone()
    if contextual:
        targets = [rest[j] for j in range(0, len(rest), len(rest) // contextual)][:contextual]
        groups = {t: [t] for t in targets}
        for i in rest:
            if i not in groups:
                similarity = [float(F.cosine_similarity(embeds[i], embeds[t], dim=0)) for t in targets]
                best = max(range(contextual), key=lambda j: (similarity[j], -j))
                groups[targets[best]].append(i)
        for t, members in groups.items():
            out[t] = embeds[members].mean(dim=0)
        kept |= set(targets)
    return kept, out


@pytest.fixture
def scorer(built):
    """A VisionZipScorer on the tiny LLaVA-1.5 (its select / merge use only the ScoreInputs)."""
    scorer = VisionZipScorer(get_adapter(built("llava")[0]))
    yield scorer
    scorer.release()


@pytest.mark.parametrize("scope", ["sample", "image"])
def test_selection_and_merge_equal_a_plain_reference(scorer, scope):
    inputs = synthetic_inputs([random_sample(0, [40, 24]), random_sample(1, [30])], scope)
    g = torch.Generator().manual_seed(3)
    attention = torch.rand(inputs.valid.shape, generator=g, dtype=torch.float64)
    counts = [[max(1, n // 4) for n in units] for units in inputs.units]
    counts[0][0] = 19  # 16 dominant + 3 contextual in one unit
    keep = scorer.select(inputs, attention, counts)
    merged = scorer.merge(inputs, keep)
    embeds = inputs.visual_embeds
    for b, units in enumerate(inputs.units):
        start = 0
        for u, n in enumerate(units):
            kept, out = reference_zip(attention[b, start:start + n], embeds[b, start:start + n], counts[b][u])
            assert set(keep[b, start:start + n].nonzero().flatten().tolist()) == kept
            assert torch.allclose(merged[b, start:start + n], out, atol=1e-12)
            start += n
    assert not torch.equal(merged[inputs.valid], embeds[inputs.valid])  # contextual tokens were merged
    with pytest.raises(ValueError, match="not the one its select chose"):
        scorer.merge(inputs, keep)  # merge pairs with the last select only


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_left_padded_batch_equals_each_sample_alone(built, family):
    model, processor = built(family)
    prune_wrap(model, ratio=0.25, scorer="visionzip")
    check_batch_equals_each_sample_alone(model, processor, family, steps=6)


def test_per_frame_budgets_with_scope_image(built):
    model, processor = built("qwen2_vl")
    inputs = make_inputs(processor, "video")
    units = score_inputs(model, inputs, scope="image").units
    assert all(len(u) > 1 for u in units)
    prune_wrap(model, ratio=0.25, scorer="visionzip", scope="image")
    greedy(model, inputs, steps=2)
    for kept, lengths in zip(model.tokenprune.last_stats.kept_indices, units, strict=True):
        bounds = torch.tensor([0, *lengths]).cumsum(0)
        per_frame = [int(((kept >= s) & (kept < e)).sum()) for s, e in zip(bounds[:-1], bounds[1:])]
        assert per_frame == [budget(n, 0.25, 1) for n in lengths]


def test_auto_budget_is_refused_by_name():
    with pytest.raises(ValueError, match="scorer 'visionzip' gives none"):
        TokenPruneConfig(scorer="visionzip", budget="auto")


@pytest.mark.parametrize("family", [f for f in tiny.FAMILIES if f not in VISIONZIP_FAMILIES])
def test_unsupported_families_refuse_with_the_reason(built, family):
    model = built(family)[0]
    with pytest.raises(UnsupportedMethodError, match=f"scorer='visionzip' is not supported on "
                                                     f"{model.config.model_type}: .+"):
        prune_wrap(model, ratio=0.25, scorer="visionzip")
    assert "tokenprune" not in model.__dict__


def test_the_capture_hook_lives_while_the_scorer_is_used(built):
    model, processor = built("qwen2_vl")
    layer = get_adapter(model).vision_attention_layer()
    before = len(layer._forward_pre_hooks)
    prune_wrap(model, ratio=0.25, scorer="visionzip")
    assert len(layer._forward_pre_hooks) == before + 1
    with model.tokenprune.disabled(), torch.no_grad():  # tower runs while disabled are not recorded
        model(**make_inputs(processor, "image"))
    assert model.tokenprune.scorer.capture.records == []
    prune_wrap(model, ratio=0.25, scorer="attention")
    assert len(layer._forward_pre_hooks) == before
    prune_wrap(model, ratio=0.25, scorer="visionzip")
    unwrap(model)
    assert len(layer._forward_pre_hooks) == before
