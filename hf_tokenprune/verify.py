"""The references that define correct pruning.

* **Masked** (:func:`masked_reference`, :func:`generate_masked_reference`): the unpruned model with the dropped
  tokens masked out of attention on the prefill and on every decode step, while ``generate`` numbers positions
  from the original, unmasked sequence. With ``positions="original"``, a pruned model must give the same logits.
  Holds where masking a token removes it from the computation (softmax-only decoders).
* **Pruned sequence** (:func:`pruned_sequence`, :func:`generate_pruned_sequence_reference`): the unwrapped model
  called with the already-pruned sequence, ``inputs_embeds`` with the dropped tokens removed (each sample
  re-padded on the left), the attention mask and position ids (original, or renumbered for
  ``positions="contiguous"``) sliced the same way, and every extra per-token input of the text model too. Holds
  for every family, also where a masked token still takes part (linear attention: it takes a recurrence step).

:func:`generate_reference` picks the one that applies to the model's family
(:attr:`~hf_tokenprune.adapters.Adapter.masking_removes_tokens`); where both apply they agree.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .adapters import get_adapter
from .compat import cache_kwarg
from .pruning import Slicing, contiguous_positions
from .stats import PruneStats

# the text model's own prefill arguments; every other tensor argument is a family's extra per-token input
_SEQUENCE_ARGUMENTS = ("inputs_embeds", "attention_mask", "position_ids")


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
    """Run ``model`` unpruned, with the ``[batch, length]`` positions in ``drop`` masked out of attention (in the 2-D
    mask the text model's masks are built from: :attr:`~hf_tokenprune.adapters.Adapter.mask_model`)."""
    keep = (~drop).long()
    length = drop.shape[1]

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        tokens = kwargs.get("inputs_embeds")
        if tokens is None:  # the multimodal model's call
            tokens = kwargs["input_ids"] if kwargs.get("input_ids") is not None else args[0]
        cache = cache_kwarg(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        total = past + tokens.shape[1]
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(tokens.shape[0], total, dtype=torch.long, device=tokens.device)
        mask = mask.clone()
        mask[:, :length] = mask[:, :length] * keep.to(mask.device, mask.dtype)
        return args, {**kwargs, "attention_mask": mask}

    handle = get_adapter(model).mask_model.register_forward_pre_hook(hook, with_kwargs=True)
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


class _Captured(Exception):
    """Stops a forward once the text model's prefill arguments are recorded."""


@contextlib.contextmanager
def _unpruned(model: nn.Module) -> Iterator[None]:
    """The model unpruned inside the block; a wrapped model's ``last_stats`` are kept."""
    wrapped = getattr(model, "tokenprune", None)
    if wrapped is None:
        yield
        return
    stats = wrapped.last_stats
    try:
        with wrapped.disabled():
            yield
    finally:
        wrapped.last_stats = stats


def _prefill_arguments(model: nn.Module, inputs: dict) -> dict[str, Any]:
    """The keyword arguments the text model gets on the unpruned prefill of ``generate(**inputs)`` (merged visual
    features, ``generate``'s position ids); the LLM itself does not run."""
    seen: dict[str, Any] = {}

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.update(kwargs)
        raise _Captured

    handle = get_adapter(model).text_model.register_forward_pre_hook(record, with_kwargs=True, prepend=True)
    try:
        with _unpruned(model), torch.no_grad():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    return seen


def pruned_sequence(model: nn.Module, inputs: dict, drop: torch.Tensor,
                    positions: str = "original") -> tuple[dict[str, Any], dict[str, Any]]:
    """The already-pruned prefill of ``inputs``: ``({inputs_embeds, attention_mask, position_ids}, extras)``.

    ``drop`` (``[batch, n]``, ``n`` up to the length) marks the removed tokens among the first ``n`` (a later chat
    turn's tokens are kept). Each sample keeps its other real tokens in order,
    re-padded on the left; ``positions="original"`` keeps their position ids (every M-RoPE row),
    ``"contiguous"`` renumbers them ``0, 1, 2, ...``. ``extras``: the family's other per-token text-model inputs
    (:meth:`~hf_tokenprune.adapters.Adapter.slice_extra`), sliced the same way."""
    if positions not in ("original", "contiguous"):
        raise ValueError(f"positions must be 'original' or 'contiguous', got {positions!r}")
    adapter = get_adapter(model)
    seen = _prefill_arguments(model, inputs)
    embeds = seen["inputs_embeds"]
    batch, length = embeds.shape[:2]
    mask = seen.get("attention_mask")
    real = mask.bool() if mask is not None else torch.ones(batch, length, dtype=torch.bool, device=embeds.device)
    removed = torch.zeros_like(real)
    removed[:, :drop.shape[1]] = drop.to(real.device)
    slicing = Slicing.from_keep(real & ~removed)
    rows = adapter.expand_positions(seen.get("position_ids"), batch, length, embeds.device)
    new_mask = slicing.mask(mask.dtype if mask is not None else torch.long)
    new_rows = slicing.positions(rows) if positions == "original" else contiguous_positions(new_mask, rows.shape[0])
    sequence = {"inputs_embeds": slicing.sequence(embeds), "attention_mask": new_mask,
                "position_ids": adapter.text_model_positions(new_rows)}
    extras = {k: v for k, v in seen.items() if k not in _SEQUENCE_ARGUMENTS and
              (isinstance(v, torch.Tensor) or (isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor)))}
    sliced = adapter.slice_extra({**sequence, **extras}, inputs, slicing)
    return sequence, {k: v for k, v in sliced.items() if k not in _SEQUENCE_ARGUMENTS}


def generate_pruned_sequence_reference(model: nn.Module, inputs: dict, drop: torch.Tensor | None = None, *,
                                       positions: str = "original", **generate_kwargs) -> Any:
    """``generate`` of the unwrapped model called with the already-pruned sequence (:func:`pruned_sequence`):
    ``inputs_embeds``, attention mask and position ids, plus the family's extra per-token inputs on the prefill.

    ``drop``: the removed tokens; default: those the last pruned call dropped (``last_stats``, its first rows
    when they were repeated for beams). When the last call pruned nothing this is the unpruned model as it is.
    The returned ``sequences`` start with ``inputs["input_ids"]`` (as for a ``generate`` on ``input_ids``), so they
    compare with the pruned model's directly."""
    input_ids = inputs["input_ids"]
    batch = input_ids.shape[0]
    if drop is None:
        stats = model.tokenprune.last_stats
        if stats is None:
            with _unpruned(model), torch.no_grad():
                return model.generate(**inputs, **generate_kwargs)
        repeat = len(stats.kept_indices) // batch
        drop = drop_mask(input_ids.repeat_interleave(repeat, dim=0), get_adapter(model).placeholder_ids(inputs),
                         stats)[::repeat]
    sequence, extras = pruned_sequence(model, inputs, drop, positions)

    def add_extras(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        cache = cache_kwarg(kwargs)
        if not extras or (cache is not None and cache.get_seq_length() > 0):
            return None
        return args, {**kwargs, **extras}

    handle = get_adapter(model).text_model.register_forward_pre_hook(add_extras, with_kwargs=True, prepend=True)
    try:
        with _unpruned(model), torch.no_grad():
            out = model.generate(**sequence, **generate_kwargs)
    finally:
        handle.remove()
    new = out if isinstance(out, torch.Tensor) else out.sequences
    prompt = input_ids.to(new.device).repeat_interleave(new.shape[0] // batch, dim=0)
    if isinstance(out, torch.Tensor):
        return torch.cat([prompt, new], dim=1)
    out.sequences = torch.cat([prompt, new], dim=1)
    return out


def generate_reference(model: nn.Module, inputs: dict, drop: torch.Tensor | None = None, **generate_kwargs) -> Any:
    """The reference a pruned ``generate(**inputs, **generate_kwargs)`` with ``positions="original"`` must equal:
    the masked reference where masking removes a token from the family's computation,
    :func:`generate_pruned_sequence_reference` where it does not (linear attention). ``drop``: the removed tokens
    (``[batch, n]``, the first ``n`` positions); default: those the last pruned call dropped."""
    if not get_adapter(model).masking_removes_tokens:
        return generate_pruned_sequence_reference(model, inputs, drop, **generate_kwargs)
    if drop is None:
        return generate_masked_reference(model, inputs, **generate_kwargs)
    with masked_reference(model, drop), torch.no_grad():
        return model.generate(**inputs, **generate_kwargs)
