"""Relevance labels, compressor training and pruning with the trained compressor (fixed and auto budgets), end to end
on the tiny families of issues #17 (Qwen3-VL, Qwen3-VL-MoE, GLM-4.1V, GLM-4.5V) and #18 (LLaVA-NeXT, LLaVA-NeXT-Video,
Mistral 3, LLaVA with a Pixtral tower, SmolVLM, Idefics3, InternVL, Gemma 3, Gemma 4): images and, where the family
takes them, a video."""

import pytest
import torch
from conftest import forward_error, greedy, make_inputs, masked_greedy
from test_labels import STEPS, not_wrong, write_jsonl

from hf_tokenprune import prune_wrap, tiny
from hf_tokenprune.compressor import Compressor
from hf_tokenprune.training import train_compressor
from hf_tokenprune.training.evaluation import evaluate_compressors
from hf_tokenprune.training.labels import generate_labels, load_jsonl
from hf_tokenprune.training.store import LabelRecord, read_labels

# video frames as separate timestamped runs; Qwen-style (t, h, w) token grids
TIMESTAMPED = ("qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe")
FAMILIES = (*TIMESTAMPED, "llava_next", "llava_next_video", "mistral3", "llava_pixtral", "smolvlm", "idefics3",
            "internvl", "gemma3", "gemma4")


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_train_and_prune_end_to_end(built, family, tmp_path):
    model, processor = built(family)
    samples = [s for s in load_jsonl(write_jsonl(tmp_path / "data", 6))  # every third answer "wrong"; s04 a video
               if s.video is None or "video" in tiny.MODALITIES[family]]
    summary = generate_labels(model, processor, samples, tmp_path / "labels", judge=not_wrong, max_new_tokens=STEPS,
                              progress=False)
    # where transformers fails a plain forward of the family's video, unwrapped too, labelling s04 fails (recorded)
    failed = int(any(s.video is not None for s in samples) and forward_error(family, "video") is not None)
    assert (summary.labels_added, summary.dropped, summary.failed) == (len(samples) - 2 - failed, 2, failed)
    records = {r.sample_id: r for r in read_labels(tmp_path / "labels")}
    if family in TIMESTAMPED:  # 56x56 px: 4x4 merged tokens per image, per 2 video frames
        assert records["s00"].grid.tolist() == [[1, 4, 4]] and records["s04"].grid.tolist() == [[2, 4, 4]]
    for record in records.values():
        assert bool(record.relevance.isfinite().all()) and record.relevance.abs().sum() > 0
        assert record.feature.shape == record.relevance.shape == (int(record.grid.prod(dim=1).sum()),)
    result = train_compressor(list(records.values()), tmp_path / "compressor", epochs=2, seed=0,
                              base_model_type=model.config.model_type, channels=(4, 8), kernel_size=3, batch_size=4,
                              val_fraction=0.5, progress=False)
    assert Compressor.from_pretrained(result.directory).base_model_type == model.config.model_type
    inputs = make_inputs(processor, "image")
    for budget in ({"ratio": 0.25}, {"budget": "auto", "mass": 0.5}):
        prune_wrap(model, compressor=str(result.directory), **budget)
        pruned = greedy(model, inputs, steps=4)
        stats = model.tokenprune.last_stats
        assert stats.scorer == "compressor" and all(a < b for a, b in zip(stats.visual_tokens_after,
                                                                            stats.visual_tokens_before))
        reference = masked_greedy(model, inputs, steps=4)
        assert torch.equal(pruned.sequences, reference.sequences)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision", "gemma3"])
def test_head_feature_compressor_end_to_end(built, family, tmp_path):
    """Per-head labels train a ``first_layer_head_attention`` compressor (one input channel per query head of the
    first layer); pruning computes that feature and equals the full model with the dropped tokens masked out. A
    compressor for another head count is refused before the LLM runs."""
    model, processor = built(family)
    samples = [s for s in load_jsonl(write_jsonl(tmp_path / "data", 6)) if s.video is None]
    generate_labels(model, processor, samples, tmp_path / "mean", judge=not_wrong, max_new_tokens=STEPS,
                    progress=False)
    generate_labels(model, processor, samples, tmp_path / "labels", judge=not_wrong, max_new_tokens=STEPS,
                    progress=False, feature="first_layer_head_attention")
    heads = model.config.text_config.num_attention_heads
    assert all(r.feature.shape[0] == heads for r in read_labels(tmp_path / "labels"))
    result = train_compressor(tmp_path / "labels", tmp_path / "compressor", epochs=2, seed=0, channels=(4, 8),
                              kernel_size=3, batch_size=4, val_fraction=0.5, progress=False)
    compressor = Compressor.from_pretrained(result.directory)
    assert (compressor.feature, compressor.in_channels) == ("first_layer_head_attention", heads)
    # the attention baseline of per-head labels is A^0_v (the heads' mean), not one head
    scores = evaluate_compressors(tmp_path / "labels", [result.directory], val_fraction=None)
    assert scores["attention"] == pytest.approx(evaluate_compressors(tmp_path / "mean", [], val_fraction=None)[
        "attention"], abs=1e-6)
    for h in range(heads):  # and each head alone: the attention of labels holding only that head
        one = [LabelRecord(r.sample_id, r.feature[h], r.relevance, r.grid) for r in read_labels(tmp_path / "labels")]
        assert scores[f"attention head {h}"] == pytest.approx(
            evaluate_compressors(one, [], val_fraction=None)["attention"], abs=1e-6)
    assert f"attention head {heads}" not in scores
    inputs = make_inputs(processor, "image")
    prune_wrap(model, compressor=str(result.directory), ratio=0.25)
    pruned = greedy(model, inputs, steps=4)
    assert model.tokenprune.last_stats.scorer == "compressor"
    assert torch.equal(pruned.sequences, masked_greedy(model, inputs, steps=4).sequences)
    other = Compressor(channels=(4,), kernel_size=3, base_model_type=model.config.model_type,
                       feature="first_layer_head_attention", in_channels=heads + 1)
    other.save_pretrained(tmp_path / "other")
    prune_wrap(model, compressor=str(tmp_path / "other"), ratio=0.25)
    with pytest.raises(ValueError, match=f"reads {heads + 1} attention heads of the first layer, the model has "
                                         f"{heads}"):
        greedy(model, inputs, steps=1)
