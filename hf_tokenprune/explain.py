"""Task-relevance labels of the visual tokens: gradient-weighted attention relevance (METHOD.md part 1).

Chefer et al. 2021 for a decoder-only LLM, by teacher forcing: one forward over prompt + answer with eager
attention, then for each answer token ``y_t`` (predicted at position ``p_t``) one backward pass
``g = d logits[p_t, y_t] / d A`` w.r.t. the attention probabilities ``A`` of every LLM layer, and

    R = I;  for each layer l, first to last:  Ā_l = mean_heads(clamp(g_l * A_l, min=0));  R = R + Ā_l @ R

The label of a visual token is ``R[p_t, its position]``, averaged over ``t``. Only the LLM's attention layers
count (the vision tower's do not). ``aggregation="mean"`` is the paper's head-mean ablation: ``Ā_l =
mean_heads(A_l)`` (no gradients, the same matrices for every ``t``) in the same recursion.

Only row ``p_t`` of ``R`` is needed, and ``R`` is lower triangular (causal attention), so it is computed exactly
as ``e_p (I + Ā_L) ... (I + Ā_1)`` restricted to positions ``<= p_t``: vector-matrix products, ``O(p_t^2)``
per layer. For the same reason the last answer token is not fed (no logit that is used depends on it).

**Linear-attention layers** (Qwen3.5's Gated DeltaNet) have no attention probabilities. Their recurrence is linear in
the values, so its output is exactly ``o = A v`` with ``A`` the unrolled recurrence
(:func:`~hf_tokenprune.features.delta_rule_attention`: decays, write strengths and delta-rule corrections
included; per value head, causal, signed, rows not normalised). During labelling the layer runs in that explicit
form (the same output as its own kernels) and ``A`` takes the place of the attention probabilities in the
recursion: the relevance of token ``j`` for a linear layer's output at ``t`` is the gradient-weighted weight with
which ``j``'s value enters ``t``'s read-out of the recurrent state (the "implicit attention" of gated linear RNNs,
Zimerman et al. 2024). What it does not carry: the causal conv1d mixes each token's value with the
``kernel - 1`` tokens before it (that window's credit stays with the token whose value it is), and, as for softmax
attention, relevance flows along the values only, not through the keys and gates that shape ``A``.
``aggregation="mean"`` averages ``|A|`` over the heads of such a layer (signed entries would cancel).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapters import get_adapter
from .features import delta_rule_attention

AGGREGATIONS = ("grad-weighted", "mean")


@dataclass
class RelevanceMaps:
    """Relevance of one sample's visual tokens.

    ``per_token[t, i]``: relevance of visual token ``i`` for answer token ``t``; ``answer_positions[t]``: the
    sequence position whose logits predict answer token ``t``; ``visual_positions[i]``: the prompt position of
    visual token ``i`` (images and videos, in order of appearance).
    """

    per_token: torch.Tensor  # [T, N_v] float32
    answer_positions: torch.Tensor  # [T]
    visual_positions: torch.Tensor  # [N_v]

    @property
    def mean(self) -> torch.Tensor:
        """``[N_v]``: the label, ``per_token`` averaged over the answer tokens."""
        return self.per_token.mean(dim=0)


def relevance_maps(model: nn.Module, inputs: Mapping[str, Any], answer_ids: torch.Tensor, *,
                   aggregation: str = "grad-weighted") -> RelevanceMaps:
    """Per-answer-token relevance of the visual tokens of one sample (see the module docstring).

    ``inputs``: a processor output for one prompt (batch size 1); ``answer_ids``: 1-D answer token ids (e.g. the
    model's generated answer, eos included). The model (wrapped by :func:`~hf_tokenprune.prune_wrap` or not) is
    run unpruned, in eval mode, with eager attention in its text model, and left exactly as it was.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    input_ids = inputs["input_ids"]
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"inputs must hold one sample (input_ids of shape [1, length]), got input_ids of shape "
                         f"{tuple(input_ids.shape)}; use visual_relevance_batch for several samples")
    if answer_ids.dim() != 1:
        raise ValueError(f"answer_ids must be 1-D (the answer's token ids), got shape {tuple(answer_ids.shape)}")
    if answer_ids.numel() == 0:
        raise ValueError("answer_ids is empty: there is no answer token to explain")
    adapter = get_adapter(model)
    device = input_ids.device
    visual = torch.isin(input_ids[0], torch.tensor(adapter.visual_token_ids, device=device)).nonzero().flatten()
    if visual.numel() == 0:
        raise ValueError("the prompt has no visual tokens (no image/video placeholder ids "
                         f"{adapter.visual_token_ids} in input_ids)")
    answer_ids = answer_ids.to(device=device, dtype=torch.long)
    n_answer = answer_ids.numel()
    positions = torch.arange(n_answer, device=device) + input_ids.shape[1] - 1
    grad_weighted = aggregation == "grad-weighted"
    with _explaining(model, adapter.text_model), torch.set_grad_enabled(grad_weighted):
        logits, attentions = _teacher_forced_forward(model, adapter.text_model, _append(inputs, answer_ids[:-1]),
                                                     n_answer)
        probs = [a.detach()[0] for a in attentions]  # [heads, L', L'] per layer
        head_means = None if grad_weighted else [
            (a.float().abs() if _is_linear(layer) else a.float()).mean(dim=0)
            for a, layer in zip(probs, adapter.text_model.layers, strict=True)]
        rows = []
        for t, (p, y) in enumerate(zip(positions.tolist(), answer_ids.tolist())):
            if grad_weighted:
                grads = torch.autograd.grad(logits[0, t, y], attentions, retain_graph=t < n_answer - 1)
                layers = [(g[0, :, :p + 1, :p + 1].float() * a[:, :p + 1, :p + 1].float()).clamp(min=0).mean(dim=0)
                          for g, a in zip(grads, probs)]
            else:
                layers = [m[:p + 1, :p + 1] for m in head_means]
            rows.append(_relevance_row(layers, p)[visual])
    return RelevanceMaps(torch.stack(rows), positions, visual)


def visual_relevance(model: nn.Module, inputs: Mapping[str, Any], answer_ids: torch.Tensor, *,
                     aggregation: str = "grad-weighted") -> torch.Tensor:
    """``[N_v]`` float32 relevance of one sample's visual tokens for its answer: :func:`relevance_maps` ``.mean``."""
    return relevance_maps(model, inputs, answer_ids, aggregation=aggregation).mean


def visual_relevance_batch(model: nn.Module, samples: Iterable[tuple[Mapping[str, Any], torch.Tensor]], *,
                           aggregation: str = "grad-weighted") -> list[torch.Tensor]:
    """:func:`visual_relevance` of each ``(inputs, answer_ids)`` sample, one sample at a time."""
    return [visual_relevance(model, inputs, answer, aggregation=aggregation) for inputs, answer in samples]


def box_relevance(model: nn.Module, inputs: Mapping[str, Any], boxes: Sequence[Sequence[float]],
                  size: tuple[int, int]) -> torch.Tensor:
    """``[N_v]`` float32 relevance from annotated evidence: uniform over the visual tokens whose region overlaps
    one of ``boxes`` (``[frame, x0, y0, x1, y1]`` in pixels of the sample's one image or video frame of ``size``
    = ``(width, height)``; ``frame``: the raw video frame, 0 for an image), 0 elsewhere.

    For datasets that mark the evidence (grounded VQA, OCR boxes): the labels then say how many tokens a
    question needs, which the gradient-weighted relevance of a small model may not (docs/world.md).

    Raises:
        ValueError: more than one image or video in ``inputs``, no boxes, or no token overlaps them.
    """
    regions = get_adapter(model).token_regions(inputs, 0, original_sizes=[size])
    if len(regions.items) != 1:
        raise ValueError(f"evidence boxes need one image or video per sample, got {len(regions.items)}")
    if not len(boxes):
        raise ValueError("the sample has no evidence boxes")
    width, height = size
    normalised = torch.tensor([(f, x0 / width, y0 / height, x1 / width, y1 / height) for f, x0, y0, x1, y1 in boxes],
                              dtype=torch.float64)
    hit = regions.overlapping(normalised)
    if not hit.any():
        raise ValueError(f"no visual token overlaps the evidence boxes {list(map(list, boxes))} of a {size} image")
    return hit.float() / hit.sum()


def _relevance_row(layers: list[torch.Tensor], p: int) -> torch.Tensor:
    """Row ``p`` of ``(I + Ā_L) ... (I + Ā_1)`` (``layers`` first to last, restricted to positions ``<= p``)."""
    row = torch.zeros(p + 1, device=layers[0].device)
    row[p] = 1.0
    for a in reversed(layers):
        row = row + row @ a
    return row


def _append(inputs: Mapping[str, Any], tokens: torch.Tensor) -> dict[str, Any]:
    """``inputs`` with ``tokens`` appended to the sequence (attended text tokens)."""
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], tokens[None]], dim=1)
    for key, fill in (("attention_mask", 1), ("mm_token_type_ids", 0), ("token_type_ids", 0)):
        if inputs.get(key) is not None:
            out[key] = torch.cat([inputs[key], inputs[key].new_full((1, tokens.numel()), fill)], dim=1)
    return out


def _teacher_forced_forward(model: nn.Module, text_model: nn.Module, inputs: dict[str, Any],
                            n_logits: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of the last ``n_logits`` positions and the attention probabilities of every LLM layer.

    The attentions are taken from the text model's attention modules themselves (the tensors the eager forward
    multiplies with the values); a linear-attention layer runs in its explicit form and gives its unrolled
    recurrence (:func:`_explicit_linear_attention`). The text model's input embeddings become a fresh leaf that
    requires grad, so the graph exists even with frozen parameters and does not reach into the vision tower.
    """
    attentions: list[torch.Tensor] = []

    def leaf(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        kwargs["inputs_embeds"] = kwargs["inputs_embeds"].detach().requires_grad_()
        return args, kwargs

    def record(module: nn.Module, args: tuple, output: tuple) -> None:
        attentions.append(output[1])

    hooks = [text_model.register_forward_pre_hook(leaf, with_kwargs=True),
             *(layer.self_attn.register_forward_hook(record) for layer in text_model.layers if not _is_linear(layer))]
    linear = [layer.linear_attn for layer in text_model.layers if _is_linear(layer)]
    for module in linear:
        module.forward = _explicit_linear_attention(module, attentions.append)
    try:
        logits = model(**inputs, use_cache=False, logits_to_keep=n_logits).logits
    finally:
        for hook in hooks:
            hook.remove()
        for module in linear:
            del module.forward
    if len(attentions) != len(text_model.layers) or any(a is None for a in attentions):
        raise RuntimeError(f"expected attention probabilities from each of the {len(text_model.layers)} LLM layers")
    return logits, attentions


def _is_linear(layer: nn.Module) -> bool:
    """Whether a decoder layer mixes tokens with linear attention (Qwen3.5's Gated DeltaNet) instead of softmax."""
    return getattr(layer, "linear_attn", None) is not None


def _explicit_linear_attention(attn: nn.Module, record: Callable[[torch.Tensor], None]) -> Callable[..., torch.Tensor]:
    """A forward for Gated DeltaNet layer ``attn`` (without a cache) that computes its recurrence as the explicit
    product ``A @ V`` (:func:`~hf_tokenprune.features.delta_rule_attention`), hands ``A`` to ``record`` and then
    applies the layer's gated norm and output projection: the layer's own output, with ``A`` in the graph."""

    def forward(hidden_states: torch.Tensor, *args: Any, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        matrix, values = delta_rule_attention(attn, hidden_states, attention_mask)
        record(matrix)
        if attention_mask is not None:
            hidden_states = hidden_states * attention_mask[:, :, None].to(hidden_states.dtype)
        batch, length, _ = hidden_states.shape
        core = (matrix @ values).transpose(1, 2).to(hidden_states.dtype).reshape(-1, attn.head_v_dim)
        gate = attn.in_proj_z(hidden_states).reshape(-1, attn.head_v_dim)
        return attn.out_proj(attn.norm(core, gate).reshape(batch, length, -1))

    return forward


@contextlib.contextmanager
def _explaining(model: nn.Module, text_model: nn.Module) -> Iterator[None]:
    """Unpruned (if wrapped), eval mode, eager attention in the text model; everything restored on exit
    (including Qwen's cached ``rope_deltas``, which a forward overwrites and a later decode step reads)."""
    modes = {module: module.training for module in model.modules()}
    rope_deltas = getattr(model.model, "rope_deltas", None)
    key = next(k for k in model.config.sub_configs if getattr(model.config, k) is text_model.config)
    previous = text_model.config._attn_implementation
    handle = model.__dict__.get("tokenprune")
    with handle.disabled() if handle is not None else contextlib.nullcontext():
        try:
            model.eval()
            model.set_attn_implementation({key: "eager"})
            yield
        finally:
            model.set_attn_implementation({key: previous})
            for module, training in modes.items():
                module.training = training
            if hasattr(model.model, "rope_deltas"):
                model.model.rope_deltas = rope_deltas
