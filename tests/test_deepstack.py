"""Qwen3-VL's DeepStack inputs: ``visual_pos_masks`` and every ``deepstack_visual_embeds`` tensor are sliced with the
kept tokens, the masked-reference invariant sees it when they are not, and in-LLM pruning before the last DeepStack
layer is refused."""

import pytest
import test_invariants
import torch
from conftest import greedy, make_inputs, masked_greedy
from test_invariants import max_logit_diff

from hf_tokenprune import prune_wrap, tiny
from hf_tokenprune.adapters.base import Adapter
from hf_tokenprune.adapters.qwen3_vl import Qwen3VLAdapter
from hf_tokenprune.tiny import qwen3_vl as tiny_qwen3_vl


def _mask_only(self, kwargs, call, slicing):
    """The bug: ``visual_pos_masks`` sliced, the DeepStack rows of the first kept-count visual tokens instead of the
    kept ones (the right shapes, the wrong features on the wrong tokens)."""
    mask = slicing.sequence(kwargs["visual_pos_masks"]) & slicing.slot_valid
    return {**kwargs, "visual_pos_masks": mask,
            "deepstack_visual_embeds": [e[:int(mask.sum())] for e in kwargs["deepstack_visual_embeds"]]}


@pytest.fixture
def two_deepstack_layers(monkeypatch):
    """A 3-layer tiny Qwen3-VL whose vision blocks 0 and 1 feed DeepStack after decoder layers 0 and 1."""
    monkeypatch.setattr(tiny_qwen3_vl, "QWEN3_DEEPSTACK_INDEXES", [0, 1])
    model = tiny.build_model("qwen3_vl", num_hidden_layers=3)
    assert Qwen3VLAdapter(model).deepstack_layers == 2
    return model


@pytest.mark.parametrize("kind", ["image", "video"])
def test_the_masked_reference_invariant_sees_unsliced_deepstack_inputs(built, monkeypatch, kind):
    """The shared invariant passes with the adapter's slicing and fails without it: left unsliced, transformers
    cannot index the shorter hidden states with the mask; with the wrong DeepStack rows, the logits leave the
    masked reference."""
    invariant = test_invariants.test_pruned_equals_masked_reference
    invariant(built, "qwen3_vl", kind, "attention")
    with monkeypatch.context() as patch:
        patch.setattr(Qwen3VLAdapter, "slice_extra", Adapter.slice_extra)  # DeepStack inputs left as they are
        with pytest.raises(IndexError, match="shape of the mask"):
            invariant(built, "qwen3_vl", kind, "attention")
    with monkeypatch.context() as patch:
        patch.setattr(Qwen3VLAdapter, "slice_extra", _mask_only)
        with pytest.raises(AssertionError):
            invariant(built, "qwen3_vl", kind, "attention")


def test_every_deepstack_layer_is_sliced(two_deepstack_layers, built, monkeypatch):
    model = two_deepstack_layers
    inputs = make_inputs(built("qwen3_vl")[1], "image")
    prune_wrap(model, ratio=0.25, scorer="attention")
    seen = []  # what the text model receives, after the pruning hook
    model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["inputs_embeds"].shape[1], kwargs["visual_pos_masks"],
                                                  kwargs["deepstack_visual_embeds"])), with_kwargs=True)
    pruned = greedy(model, inputs, steps=6)
    stats = model.tokenprune.last_stats
    length, mask, embeds = seen[0]
    assert length == stats.seq_len_after and mask.shape == (2, length)
    assert int(mask.sum()) == sum(stats.visual_tokens_after)
    assert [e.shape[0] for e in embeds] == [sum(stats.visual_tokens_after)] * 2
    reference = masked_greedy(model, inputs, steps=6)
    assert torch.equal(pruned.sequences, reference.sequences)
    assert max_logit_diff(pruned, reference) < 1e-4
    monkeypatch.setattr(Qwen3VLAdapter, "slice_extra", _mask_only)
    assert max_logit_diff(greedy(model, inputs, steps=6), reference) > 1e-4


def test_in_llm_pruning_before_the_last_deepstack_layer_is_refused(two_deepstack_layers, built):
    model = two_deepstack_layers
    inputs = make_inputs(built("qwen3_vl")[1], "image")
    with pytest.raises(ValueError, match="DeepStack .* after decoder layers 0-1"):
        prune_wrap(model, ratio=0.25, scorer="fastv", layer=1)
    with pytest.raises(ValueError, match="before decoder layer 1"):
        prune_wrap(model, ratio=0.5, scorer="pdrop")  # PDrop's first stage on 3 layers: layer 1
    for layer in (0, 2):  # the LLM input, and after the last DeepStack layer
        prune_wrap(model, ratio=0.25, scorer="fastv", layer=layer)
        greedy(model, inputs, steps=2)
        assert model.tokenprune.last_stats.stages[-1].layer == layer
