"""``hf-tokenprune check``: prune a tiny offline VLM of every supported family end to end and check it.

Builds each family's tiny random-weight model with its real transformers processor (no download), runs
``generate`` on a left-padded batch of two images of different sizes with a question each (and on a batch of
two videos, for the families that take videos: ``tiny.MODALITIES``), pruned to
``ratio`` by the chosen scorer, and checks the answer against the family's reference
(:func:`~hf_tokenprune.verify.generate_reference`): the unpruned model with the dropped tokens masked out of
attention, or, where masking does not remove a token (Qwen3.5's linear attention), the unwrapped model run on the
already-pruned sequence (the ``reference`` column). A case passes when the tokens are identical and the logits within
:data:`LOGIT_TOLERANCE` of the reference (exactly equal when nothing is pruned, e.g. ``ratio=1.0``: the reference is
then the unpruned model). Prints the transformers and torch versions first and a pass/fail summary last. Random
weights answer gibberish; the demo shows the mechanics and their cost.
"""

from __future__ import annotations

import torch

from . import tiny
from .adapters import get_adapter
from .compat import versions
from .verify import generate_reference
from .wrap import prune_wrap

QUESTIONS = ("what colour is the circle ?", "what shape is left of the red square ?")
LOGIT_TOLERANCE = 1e-4  # max |Δlogit| against the reference, as in tests/test_invariants.py


def _inputs(processor, kind: str):
    processor.tokenizer.padding_side = "left"
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": q}]}],
        add_generation_prompt=True, tokenize=False) for q in QUESTIONS]
    if kind == "image":
        visual = {"images": [tiny.make_image(0, size=56), tiny.make_image(1, size=(84, 112))]}
    else:
        visual = {"videos": [tiny.make_video(0, frames=4), tiny.make_video(1, frames=4)]}
    return processor(text=texts, padding=True, return_tensors="pt", **visual)


def run(ratio: float = 0.25, scorer: str = "attention", max_new_tokens: int = 16) -> list[dict]:
    """One row per family and input kind it supports (``passed``: see the module doc); prints the versions, a
    table and a summary line."""
    print(f"hf-tokenprune check: {versions()}, ratio {ratio}, scorer {scorer}")
    rows = []
    for family in tiny.FAMILIES:
        model, processor = tiny.build(family)
        for kind in tiny.MODALITIES[family]:
            inputs = _inputs(processor, kind)
            prune_wrap(model, ratio=ratio, scorer=scorer)
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     output_logits=True, return_dict_in_generate=True)
            stats = model.tokenprune.last_stats  # None: nothing was pruned
            ref = generate_reference(model, inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     output_logits=True, return_dict_in_generate=True)
            same = bool(torch.equal(out.sequences, ref.sequences))
            diff = max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits))
            answer = processor.batch_decode(out.sequences[:, inputs["input_ids"].shape[1]:],
                                            skip_special_tokens=True)[0]
            if stats is None:
                visual = torch.isin(inputs["input_ids"], torch.tensor(get_adapter(model).placeholder_ids(inputs)))
                length = inputs["input_ids"].shape[1]
                cost = {"visual_tokens": visual.sum(dim=1).tolist(), "kept": visual.sum(dim=1).tolist(),
                        "seq_len": f"{length}->{length}", "kv_cache_ratio": 1.0, "prefill_flops_ratio": 1.0,
                        "scoring_ms": 0.0}
            else:
                cost = {"visual_tokens": stats.visual_tokens_before, "kept": stats.visual_tokens_after,
                        "seq_len": f"{stats.seq_len_before}->{stats.seq_len_after}",
                        "kv_cache_ratio": round(stats.kv_cache_ratio, 3),
                        "prefill_flops_ratio": round(stats.prefill_flops_ratio, 3),
                        "scoring_ms": round(1e3 * stats.scoring_time_s, 2)}
            rows.append({
                "family": family, "input": kind, **cost,
                "reference": "masked" if get_adapter(model).masking_removes_tokens else "pruned sequence",
                "same_tokens_as_reference": same,
                "max_logit_diff": diff, "passed": same and diff <= (LOGIT_TOLERANCE if stats is not None else 0.0),
                "answer[0]": answer[:40],
            })
    _print(rows)
    failed = sum(not r["passed"] for r in rows)
    print(f"check: {len(rows) - failed} passed, {failed} failed ({versions()})")
    return rows


def _print(rows: list[dict]) -> None:
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    print(" | ".join(k.ljust(widths[k]) for k in keys))
    print("-|-".join("-" * widths[k] for k in keys))
    for r in rows:
        print(" | ".join(str(r[k]).ljust(widths[k]) for k in keys))
