"""Scorers: task-conditional attention, the compressor behind prune_wrap, custom scorers."""

import pytest
import torch
from conftest import greedy, make_inputs

from hf_tokenprune import Compressor, CompressorScorer, Scorer, prune_wrap, tiny


def _steer_layer0(model, strength: float = 10.0) -> None:
    """Make layer 0's q/k read hidden dim 0 into each head's lowest-frequency rotary dim (almost no rotation
    over a short prompt), so instruction->vision attention is the sign agreement of hidden dim 0."""
    text = model.model.get_decoder()
    attn = text.layers[0].self_attn
    head_dim = attn.head_dim
    with torch.no_grad():
        text.layers[0].input_layernorm.weight.fill_(1.0)
        for proj in (attn.q_proj, attn.k_proj):
            proj.weight.zero_()
            proj.bias.zero_()
            for head in range(proj.out_features // head_dim):
                proj.weight[head * head_dim + head_dim // 2 - 1, 0] = strength


def test_attention_scorer_is_task_conditional():
    model, processor = tiny.build("qwen2_vl")
    _steer_layer0(model)
    ids = processor.tokenizer
    image = model.config.image_token_id
    prefix = ids.convert_tokens_to_ids(["<|im_start|>", "user", "<|vision_start|>"])
    question = ids.convert_tokens_to_ids(["<|vision_end|>", "what", "colour", "is", "it", "<|im_end|>"])
    input_ids = torch.tensor([prefix + [image] * 16 + question])
    visual = slice(len(prefix), len(prefix) + 16)
    embeds = torch.zeros(1, input_ids.shape[1], model.config.text_config.hidden_size)
    embeds[..., 1] = 1.0
    embeds[0, visual, 0] = torch.tensor([1.0] * 8 + [-1.0] * 8)  # left half "red", right half "blue"
    instruction = slice(len(prefix) + 17, input_ids.shape[1] - 1)
    prune_wrap(model, ratio=0.5, scorer="attention")
    kept = {}
    for sign in (1.0, -1.0):  # a question about red, then about blue
        embeds[0, instruction, 0] = sign
        with torch.no_grad():
            model(input_ids=input_ids, inputs_embeds=embeds.clone())
        kept[sign] = model.tokenprune.last_stats.kept_indices[0].tolist()
    assert kept[1.0] == list(range(8))
    assert kept[-1.0] == list(range(8, 16))


def test_compressor_scorer_runs_inside_generate_and_loads_from_a_directory(tmp_path, built):
    model, processor = built("qwen2_vl")
    inputs = make_inputs(processor, "image")
    torch.manual_seed(0)
    compressor = Compressor(base_model_type="qwen2_vl")
    compressor.save_pretrained(tmp_path / "compressor")
    prune_wrap(model, ratio=0.25, compressor=str(tmp_path / "compressor"))
    assert isinstance(model.tokenprune.scorer, CompressorScorer)
    out = greedy(model, inputs, steps=4)
    from_dir = model.tokenprune.last_stats.kept_indices
    prune_wrap(model, ratio=0.25, compressor=compressor)
    assert torch.equal(greedy(model, inputs, steps=4).sequences, out.sequences)
    assert all(torch.equal(a, b) for a, b in zip(model.tokenprune.last_stats.kept_indices, from_dir))


def test_custom_scorer_decides_the_selection(built):
    """A user scorer object is used as given: reversing the attention ranking keeps a disjoint set."""
    model, processor = built("qwen2_vl")
    inputs = make_inputs(processor, "image", batch=1)

    class Reverse(Scorer):
        def __init__(self, inner):
            self.inner = inner

        def score(self, inputs):
            return -self.inner.score(inputs)

    from hf_tokenprune import AttentionScorer

    prune_wrap(model, ratio=0.25, scorer=AttentionScorer())
    greedy(model, inputs, steps=1)
    top = set(model.tokenprune.last_stats.kept_indices[0].tolist())
    prune_wrap(model, ratio=0.25, scorer=Reverse(AttentionScorer()))
    greedy(model, inputs, steps=1)
    bottom = set(model.tokenprune.last_stats.kept_indices[0].tolist())
    assert top and bottom and not top & bottom


def test_random_scorer_is_seeded(built):
    model, processor = built("llava_onevision")
    inputs = make_inputs(processor, "image")
    kept = []
    for seed in (0, 0, 1):
        prune_wrap(model, ratio=0.25, scorer="random", seed=seed)
        greedy(model, inputs, steps=1)
        kept.append(model.tokenprune.last_stats.kept_indices[0].tolist())
    assert kept[0] == kept[1] != kept[2]


def test_uniform_scorer_spreads_over_each_image_or_frame(built):
    model, processor = built("qwen2_vl")
    inputs = make_inputs(processor, "video", batch=1)
    prune_wrap(model, ratio=0.25, scorer="uniform", scope="image")
    greedy(model, inputs, steps=1)
    stats = model.tokenprune.last_stats
    kept = stats.kept_indices[0]
    frame = stats.visual_tokens_before[0] // 2  # 4 frames, temporal patch 2 -> 2 frame groups
    assert (kept < frame).sum() == (kept >= frame).sum() == -(-frame // 4)


def test_uniform_scorer_spreads_over_adjacent_llava_images(built):
    """LLaVA-1.5's ``<image><image>`` is one placeholder run: it is split into its images on generate()
    (from the encoded features) and on a plain forward (from ``pixel_values``)."""
    model, processor = built("llava")
    inputs = make_inputs(processor, "image", images_per_sample=(1, 2))
    per_image = 36  # 42 px CLIP input, patch 7
    # ratio 0.26: 10 of each image's 36 tokens; one budget over the 72-token run would keep 19
    prune_wrap(model, ratio=0.26, scorer="uniform", scope="image")
    greedy(model, inputs, steps=1)
    generated = model.tokenprune.last_stats
    with torch.no_grad():
        model(**inputs)
    forward = model.tokenprune.last_stats
    for stats in (generated, forward):
        assert stats.visual_tokens_before == [per_image, 2 * per_image]
        kept = stats.kept_indices[1]
        assert (kept < per_image).sum() == (kept >= per_image).sum() == 10
    assert all(torch.equal(a, b) for a, b in zip(generated.kept_indices, forward.kept_indices, strict=True))


def test_a_scorer_without_score_or_a_scorer_class_is_refused_before_generate(built):
    class Saliency(Scorer):
        def merge(self, inputs, keep):
            return None

    with pytest.raises(TypeError, match="Can't instantiate abstract class Saliency .*score"):
        Saliency()

    class Norm(Scorer):
        def score(self, inputs):
            return inputs.visual_embeds.norm(dim=-1)

    model = built("qwen2_vl")[0]
    with pytest.raises(TypeError, match=r"got the class Norm; pass Norm\(\)"):
        prune_wrap(model, ratio=0.5, scorer=Norm)
    assert "tokenprune" not in model.__dict__


def test_custom_scorer_with_a_wrong_shape_gets_a_clear_error(built):
    model, processor = built("qwen2_vl")

    class Bad(Scorer):
        def score(self, inputs):
            return torch.zeros(3)

    prune_wrap(model, ratio=0.5, scorer=Bad())
    with pytest.raises(ValueError, match="scorer Bad returned"):
        greedy(model, make_inputs(processor, "image"), steps=1)
