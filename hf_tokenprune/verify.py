"""The reference that defines correct pruning: the unpruned model with the dropped tokens masked out.

``with masked_reference(model, drop):`` runs the (unpruned) model with the positions in ``drop`` removed from
attention on the prefill and on every decode step, while ``generate`` numbers positions from the original,
unmasked sequence. With ``positions="original"``, a pruned model must give the same logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .adapters import get_adapter
from .compat import cache_kwarg
from .stats import PruneStats


def drop_mask(input_ids: torch.Tensor, visual_token_ids: tuple[int, ...], stats: PruneStats) -> torch.Tensor:
    """``[batch, length]`` True where a visual token (one of ``visual_token_ids``: the adapter's
    :meth:`~hf_tokenprune.adapters.Adapter.placeholder_ids` of the call) was pruned, from ``stats.kept_indices``."""
    visual = torch.isin(input_ids, torch.tensor(visual_token_ids, dtype=input_ids.dtype, device=input_ids.device))
    drop = torch.zeros_like(visual)
    for b, kept in enumerate(stats.kept_indices):
        positions = visual[b].nonzero().flatten()
        dropped = torch.ones(len(positions), dtype=torch.bool, device=positions.device)
        dropped[kept.to(positions.device)] = False
        drop[b, positions[dropped]] = True
    return drop


@contextlib.contextmanager
def masked_reference(model: nn.Module, drop: torch.Tensor) -> Iterator[None]:
    """Run ``model`` unpruned, with the ``[batch, length]`` positions in ``drop`` masked out of attention."""
    text_model = get_adapter(model).text_model
    keep = (~drop).long()
    length = drop.shape[1]

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        embeds = kwargs["inputs_embeds"]
        cache = cache_kwarg(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        total = past + embeds.shape[1]
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(embeds.shape[0], total, dtype=torch.long, device=embeds.device)
        mask = mask.clone()
        mask[:, :length] = mask[:, :length] * keep.to(mask.device, mask.dtype)
        return args, {**kwargs, "attention_mask": mask}

    handle = text_model.register_forward_pre_hook(hook, with_kwargs=True)
    wrapped = getattr(model, "tokenprune", None)
    try:
        with wrapped.disabled() if wrapped is not None else contextlib.nullcontext():
            yield
    finally:
        handle.remove()


def generate_masked_reference(model: nn.Module, inputs: dict, **generate_kwargs) -> Any:
    """``model.generate(**inputs, **generate_kwargs)`` unpruned, with the tokens the last pruned call dropped
    masked out (rows of ``last_stats`` beyond the batch, e.g. beams, repeat their sample's ids). When the last call
    pruned nothing (``last_stats`` is None, e.g. ``ratio=1.0``) this is the unpruned model as it is."""
    stats = model.tokenprune.last_stats
    if stats is None:
        with model.tokenprune.disabled(), torch.no_grad():
            return model.generate(**inputs, **generate_kwargs)
    input_ids = inputs["input_ids"]
    input_ids = input_ids.repeat_interleave(len(stats.kept_indices) // input_ids.shape[0], dim=0)
    drop = drop_mask(input_ids, get_adapter(model).placeholder_ids(inputs), stats)
    with masked_reference(model, drop), torch.no_grad():
        return model.generate(**inputs, **generate_kwargs)
