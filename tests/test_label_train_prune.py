"""Relevance labels, compressor training and pruning with the trained compressor, end to end on the tiny families
of issue #17 (Qwen3-VL, Qwen3-VL-MoE, GLM-4.1V, GLM-4.5V): images and a timestamped video."""

import pytest
import torch
from conftest import greedy, make_inputs, masked_greedy
from test_labels import STEPS, not_wrong, write_jsonl

from hf_tokenprune import prune_wrap
from hf_tokenprune.compressor import Compressor
from hf_tokenprune.training import train_compressor
from hf_tokenprune.training.labels import generate_labels, load_jsonl
from hf_tokenprune.training.store import read_labels


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe"])
def test_labels_train_and_prune_end_to_end(built, family, tmp_path):
    model, processor = built(family)
    summary = generate_labels(model, processor, load_jsonl(write_jsonl(tmp_path / "data", 6)), tmp_path / "labels",
                              judge=not_wrong, max_new_tokens=STEPS, progress=False)
    assert (summary.labels_added, summary.dropped, summary.failed) == (4, 2, 0)
    records = {r.sample_id: r for r in read_labels(tmp_path / "labels")}
    # 56x56 px: 4x4 merged tokens per image, per 2 video frames (the video's frames are separate runs)
    assert records["s00"].grid.tolist() == [[1, 4, 4]] and records["s04"].grid.tolist() == [[2, 4, 4]]
    for record in records.values():
        assert bool(record.relevance.isfinite().all()) and record.relevance.abs().sum() > 0
        assert record.feature.shape == record.relevance.shape == (int(record.grid.prod(dim=1).sum()),)
    result = train_compressor(list(records.values()), tmp_path / "compressor", epochs=2, seed=0,
                              base_model_type=model.config.model_type, channels=(4, 8), kernel_size=3, batch_size=4,
                              val_fraction=0.5, progress=False)
    assert Compressor.from_pretrained(result.directory).base_model_type == family
    inputs = make_inputs(processor, "image")
    prune_wrap(model, ratio=0.25, compressor=str(result.directory))
    pruned = greedy(model, inputs, steps=4)
    assert model.tokenprune.last_stats.scorer == "compressor"
    reference = masked_greedy(model, inputs, steps=4)
    assert torch.equal(pruned.sequences, reference.sequences)
