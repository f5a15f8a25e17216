"""Which input-stage feature for a hybrid decoder whose layer 0 is linear attention (Qwen3.5): a measurement.

The paper's feature is layer 0's instruction->vision softmax attention ``A^0_v``; Qwen3.5's layers 0-2 are Gated
DeltaNet linear attention. Candidates, each as a ``[batch, length]`` score of the instruction rows (averaged over
heads and rows, as ``A^0_v``):

* ``full-attn q/k on embeddings``: the first full-attention layer's q/k projections (and q/k norms, rotary) on the
  input embeddings, softmax over the causal keys (:func:`~hf_tokenprune.features.first_layer_attention`);
* ``layer-0 q/k softmax``: a softmax over layer 0's own (conv'd, l2-normalised) query/key projections;
* ``layer-0 delta rule``: the magnitude of layer 0's exact token mixing (:func:`~hf_tokenprune.features.
  delta_rule_attention`: the recurrence unrolled, gates and delta-rule corrections included);
* ``full-attn, actual input`` (not an input-stage feature: it runs layers 0-2 on the whole sequence): the first
  full-attention layer's attention on its real input, the upper bound of the first candidate;
* ``random``.

**Quality** (:func:`quality`): a Qwen3.5 text model of the real layer pattern (3 linear + 1 full attention) trained
from scratch on an associative-recall task with the shape of a visual question: 64 "visual" positions, each the sum
of a key and a value embedding, then the question ``Q what ? <key>``; the answer is the value stored with that key,
so exactly one visual token is relevant. For each candidate: how often the relevant token is in its top 25%, and the
model's accuracy when only that top 25% of the visual tokens is kept (the pruned sequence, original positions).

**Cost** (:func:`cost`): each candidate's time beside the full prefill of a random-init model at Qwen3.5's
smallest width (Qwen3.5-0.8B's text config: width 1024, 8 heads of 256 with 2 KV heads, 16 x 128 linear key and
value heads, MLP 3584), one group of 3 linear + 1 full layer, 1,024 visual tokens; the 24-layer model (six groups)
is extrapolated from it. ``python -m hf_tokenprune.bench.hybrid_feature`` prints both tables.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn
from transformers import Qwen3_5TextConfig, Qwen3_5TextModel

from ..features import (
    delta_rule_attention,
    delta_rule_inputs,
    feature_layer,
    first_layer_attention,
    received_attention,
)

Feature = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _positions(embeds: torch.Tensor) -> torch.Tensor:
    """Text positions ``0, 1, 2, ...`` as the three M-RoPE rows ``rotary_emb`` takes."""
    return torch.arange(embeds.shape[1]).view(1, 1, -1).expand(3, embeds.shape[0], -1)


def full_attention_on_embeddings(text_model: nn.Module, embeds: torch.Tensor, mask: torch.Tensor,
                                 instruction: torch.Tensor) -> torch.Tensor:
    return first_layer_attention(text_model, embeds, _positions(embeds), mask, instruction)


def layer0_softmax(text_model: nn.Module, embeds: torch.Tensor, mask: torch.Tensor,
                   instruction: torch.Tensor) -> torch.Tensor:
    layer = text_model.layers[0]
    q, k, *_ = delta_rule_inputs(layer.linear_attn, layer.input_layernorm(embeds), mask)
    length = embeds.shape[1]
    logits = (q @ k.transpose(-1, -2)).masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), -torch.inf)
    return _row_mean(logits.softmax(dim=-1), instruction)


def layer0_delta_rule(text_model: nn.Module, embeds: torch.Tensor, mask: torch.Tensor,
                      instruction: torch.Tensor) -> torch.Tensor:
    layer = text_model.layers[0]
    rows = instruction.nonzero()[:, 1].view(embeds.shape[0], -1)
    matrix, _ = delta_rule_attention(layer.linear_attn, layer.input_layernorm(embeds), mask, rows)
    return matrix.abs().mean(dim=(1, 2))


def full_attention_actual(text_model: nn.Module, embeds: torch.Tensor, mask: torch.Tensor,
                          instruction: torch.Tensor) -> torch.Tensor:
    index = feature_layer(text_model)
    position_embeddings = text_model.rotary_emb(embeds, _positions(embeds))
    hidden = embeds
    for layer in text_model.layers[:index]:
        hidden = layer(hidden, position_embeddings=position_embeddings, attention_mask=None)
    return received_attention(text_model.layers[index], hidden, position_embeddings, mask, instruction)


def random_scores(text_model: nn.Module, embeds: torch.Tensor, mask: torch.Tensor,
                  instruction: torch.Tensor) -> torch.Tensor:
    return torch.rand(embeds.shape[:2])


def _row_mean(probs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``[b, heads, L, L]`` -> ``[b, L]``: mean over heads and the ``rows`` query positions."""
    probs = probs.mean(dim=1) * rows[:, :, None]
    return probs.sum(dim=1) / rows.sum(dim=1, keepdim=True)


CANDIDATES: dict[str, Feature] = {
    "full-attn q/k on embeddings": full_attention_on_embeddings,
    "layer-0 q/k softmax": layer0_softmax,
    "layer-0 delta rule": layer0_delta_rule,
    "full-attn, actual input (runs layers 0-2)": full_attention_actual,
    "random": random_scores,
}

# the recall task: token ids
PAD, BOS, QUESTION, WHAT, MARK = range(5)
KEYS, VALUES, VISUAL = 128, 16, 59


def recall_model(seed: int = 0) -> nn.Module:
    """A tiny Qwen3.5 text model with the real layer pattern and an output head over the vocabulary."""
    config = Qwen3_5TextConfig(vocab_size=5 + KEYS + VALUES, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                               linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                               linear_value_head_dim=16, max_position_embeddings=512, pad_token_id=PAD,
                               rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1],
                                                "mrope_interleaved": True, "partial_rotary_factor": 0.25})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.ModuleDict({"text": Qwen3_5TextModel(config), "head": nn.Linear(64, config.vocab_size)})
    return model


def recall_batch(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(keys, values, asked)``: per sample ``VISUAL`` distinct keys with random values, and the asked item."""
    keys = torch.stack([torch.randperm(KEYS, generator=generator)[:VISUAL] for _ in range(batch)])
    values = torch.randint(VALUES, (batch, VISUAL), generator=generator)
    return keys, values, torch.randint(VISUAL, (batch,), generator=generator)


def recall_embeds(model: nn.Module, keys: torch.Tensor, asked: torch.Tensor,
                  values: torch.Tensor) -> torch.Tensor:
    """``[BOS] [key_i + value_i] * VISUAL [Q what ? key]`` as input embeddings."""
    embed = model["text"].embed_tokens
    batch = keys.shape[0]
    visual = embed(keys + 5) + embed(values + 5 + KEYS)
    question = torch.stack([torch.full((batch,), QUESTION), torch.full((batch,), WHAT), torch.full((batch,), MARK),
                            keys[torch.arange(batch), asked] + 5], dim=1)
    return torch.cat([embed(torch.full((batch, 1), BOS)), visual, embed(question)], dim=1)


def _answer_logits(model: nn.Module, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    out = model["text"](inputs_embeds=embeds, position_ids=positions, attention_mask=torch.ones(embeds.shape[:2]))
    return model["head"](out.last_hidden_state[:, -1])


def train_recall(steps: int = 600, batch: int = 64, seed: int = 0) -> nn.Module:
    """Train :func:`recall_model` on the recall task (cross-entropy on the answer)."""
    model = recall_model(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    length = 1 + VISUAL + 4
    positions = torch.arange(length).expand(batch, -1)
    for _ in range(steps):
        keys, values, asked = recall_batch(batch, generator)
        logits = _answer_logits(model, recall_embeds(model, keys, asked, values), positions)
        loss = nn.functional.cross_entropy(logits, values[torch.arange(batch), asked] + 5 + KEYS)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    return model.eval()


@torch.no_grad()
def quality(model: nn.Module, samples: int = 512, ratio: float = 0.25, seed: int = 1) -> dict[str, dict[str, float]]:
    """Per candidate: ``recall`` (the asked item is in the top ``ratio`` of the visual tokens) and ``pruned_accuracy``
    (answers with only those visual tokens kept); ``full_accuracy`` is the unpruned model's."""
    generator = torch.Generator().manual_seed(seed)
    keys, values, asked = recall_batch(samples, generator)
    embeds = recall_embeds(model, keys, asked, values)
    batch, length = embeds.shape[:2]
    positions = torch.arange(length).expand(batch, -1)
    target = values[torch.arange(batch), asked] + 5 + KEYS
    mask = torch.ones(batch, length, dtype=torch.long)
    instruction = torch.zeros(batch, length, dtype=torch.bool)
    instruction[:, -4:] = True
    keep = round(ratio * VISUAL)
    full = (_answer_logits(model, embeds, positions).argmax(-1) == target).float().mean().item()
    results = {"full model": {"recall": 1.0, "pruned_accuracy": full}}
    torch.manual_seed(seed)
    for name, feature in CANDIDATES.items():
        scores = feature(model["text"], embeds, mask, instruction)[:, 1:1 + VISUAL]
        top = scores.topk(keep, dim=1).indices.sort(dim=1).values
        recall = (top == asked[:, None]).any(dim=1).float().mean().item()
        kept = torch.cat([torch.zeros(batch, 1, dtype=torch.long), top + 1,
                          torch.arange(length - 4, length).expand(batch, -1)], dim=1)
        pruned = torch.gather(embeds, 1, kept[..., None].expand(-1, -1, embeds.shape[-1]))
        accuracy = (_answer_logits(model, pruned, kept).argmax(-1) == target).float().mean().item()
        results[name] = {"recall": recall, "pruned_accuracy": accuracy}
    return results


def real_width_model(groups: int = 1) -> nn.Module:
    """Random-init Qwen3.5 text model at Qwen3.5-0.8B's widths, ``groups`` x (3 linear + 1 full) layers."""
    config = Qwen3_5TextConfig(vocab_size=2048, hidden_size=1024, intermediate_size=3584, num_hidden_layers=4 * groups,
                               num_attention_heads=8, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
                               linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
                               max_position_embeddings=32768,
                               rope_parameters={"rope_type": "default", "rope_theta": 1e7,
                                                "mrope_section": [11, 11, 10], "mrope_interleaved": True,
                                                "partial_rotary_factor": 0.25})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Qwen3_5TextModel(config).eval()


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def cost(visual: int = 1024, text: int = 40, instruction_rows: int = 12, repeats: int = 3) -> dict[str, float]:
    """Seconds of each input-stage candidate and of the full prefill (one 3 linear + 1 full group, and the
    24-layer model extrapolated as six groups) on a prompt of ``visual`` visual and ``text`` text tokens."""
    model = real_width_model()
    length = visual + text
    embeds = torch.randn(1, length, model.config.hidden_size) * 0.02
    mask = torch.ones(1, length, dtype=torch.long)
    instruction = torch.zeros(1, length, dtype=torch.bool)
    instruction[:, -instruction_rows - 4:-4] = True
    positions = torch.arange(length).view(1, 1, -1).expand(4, 1, -1)
    prefill = _median_time(lambda: model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask), repeats)
    out = {"full prefill, 4 layers": prefill, "full prefill, 24 layers (6 x 4)": 6 * prefill}
    for name in ("full-attn q/k on embeddings", "layer-0 q/k softmax", "layer-0 delta rule"):
        out[name] = _median_time(lambda f=CANDIDATES[name]: f(model, embeds, mask, instruction), repeats)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--skip-cost", action="store_true")
    args = parser.parse_args(argv)
    for seed in range(args.seeds):
        start = time.perf_counter()
        model = train_recall(args.steps, seed=seed)
        print(f"recall model, seed {seed}: trained {args.steps} steps in {time.perf_counter() - start:.0f} s")
        print(f"{'candidate':45s} {'recall@25%':>10s} {'acc@25%':>8s}")
        for name, row in quality(model).items():
            print(f"{name:45s} {row['recall']:10.3f} {row['pruned_accuracy']:8.3f}")
    if not args.skip_cost:
        seconds = cost()
        print(f"{'cost at 1,024 visual tokens':45s} {'seconds':>8s} {'/ 4 layers':>10s} {'/ 24 layers':>11s}")
        four, full = seconds["full prefill, 4 layers"], seconds["full prefill, 24 layers (6 x 4)"]
        for name, value in seconds.items():
            print(f"{name:45s} {value:8.4f} {value / four:10.4f} {value / full:11.4f}")


if __name__ == "__main__":
    main()
