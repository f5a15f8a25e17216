"""PruneStats of a batch: per-sample retention, its mean and the printout."""

import pytest
import torch
from conftest import make_inputs

from hf_tokenprune import prune_wrap


@pytest.mark.parametrize("budget", [{"ratio": 0.25}, {"budget": "auto", "mass": 0.5}])
def test_a_sample_without_visual_tokens_has_no_retention(built, budget):
    model, processor = built("qwen2_vl")
    inputs = make_inputs(processor, "image", images_per_sample=(1, 0))
    prune_wrap(model, scorer="attention", **budget)
    with torch.no_grad():
        model(**inputs)
    stats = model.tokenprune.last_stats
    before, after = stats.visual_tokens_before, stats.visual_tokens_after
    assert before[0] > after[0] > 0 and before[1] == after[1] == 0
    assert stats.retention == [after[0] / before[0], None]
    assert stats.mean_retention == after[0] / before[0]
    assert f"(retention {after[0] / before[0]:.3f}, no visual tokens)" in str(stats)
