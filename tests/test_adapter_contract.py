"""The adapter contract's extension points (``adapters/base.py``): the prefill slices a family's extra per-token
text-model inputs through ``Adapter.slice_extra``."""

import torch
from conftest import make_inputs

from hf_tokenprune import prune_wrap
from hf_tokenprune.adapters import ADAPTERS
from hf_tokenprune.adapters.base import PlaceholderAdapter
from hf_tokenprune.adapters.llava import LlavaAdapter
from hf_tokenprune.pruning import Slicing


class _WithTokenTypes(LlavaAdapter):
    token_tensors = ("token_type_ids", "per_token_features")


def test_shipped_adapters_are_placeholder_adapters():
    assert all(issubclass(cls, PlaceholderAdapter) for cls in ADAPTERS.values())


def test_slice_extra_slices_the_token_tensors_with_zero_on_the_row_padding():
    keep = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    slicing = Slicing.from_keep(keep)
    types = torch.arange(10).view(2, 5) + 1
    features = torch.randn(2, 5, 3)
    out = _WithTokenTypes(None).slice_extra({"token_type_ids": types, "per_token_features": features,
                                             "other": types}, {}, slicing)
    assert out["token_type_ids"].tolist() == [[1, 3, 4], [0, 0, 7]]
    assert torch.equal(out["per_token_features"][0], features[0, [0, 2, 3]])
    assert torch.equal(out["per_token_features"][1], torch.cat([torch.zeros(2, 3), features[1, [1]]]))
    assert out["other"] is types  # not a token tensor of the family
    unchanged = {"token_type_ids": None}
    assert _WithTokenTypes(None).slice_extra(unchanged, {}, slicing) is unchanged


def test_the_prefill_calls_slice_extra_after_slicing(built):
    model, processor = built("llava")
    inputs = make_inputs(processor, "image")
    prune_wrap(model, ratio=0.25, scorer="attention")
    adapter, seen = model.tokenprune.adapter, []

    def record(kwargs, call, slicing):
        seen.append((kwargs["inputs_embeds"].shape[1], call.get("input_ids"), slicing.length))
        return kwargs

    adapter.slice_extra = record
    with torch.no_grad():
        model(**inputs)
    stats = model.tokenprune.last_stats
    assert len(seen) == 1
    length, input_ids, sliced = seen[0]
    assert length == sliced == stats.seq_len_after
    assert torch.equal(input_ids, inputs["input_ids"])
