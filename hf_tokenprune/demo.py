"""``hf-tokenprune demo``: the shipped world model answers questions about a generated image, pruned by its
compressor, and ``demo.png`` shows which visual tokens each question keeps.

1. Two questions about the same held-out scene, answered with the full visual token set and with 50% / 25% /
   12.5% kept by the compressor: answer, kept tokens, sequence length, KV-cache and prefill-FLOP ratios.
2. Accuracy on held-out questions at each retention, compressor vs random (task-agnostic) selection.
3. ``demo.png``: per question, the oracle relevance ``R_v`` of its answer and the compressor's prediction
   ``R~_v``, with the tokens kept at 25% outlined: different questions keep different regions.
4. The dynamic budget (``budget="auto"``, the compressor's saved calibration): a question about one object and
   one about every object of a shape, on one scene, keep different numbers of tokens.

Everything is local (shipped weights, generated images): no network, under a minute on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import viz
from .adapters import get_adapter
from .explain import visual_relevance
from .world import compressor_path, load
from .world.evaluate import accuracy, first_word, heldout_samples, inputs_for
from .world.scenes import LOOKUP, make_samples
from .wrap import prune_wrap, score_inputs, unwrap

RATIOS = (1.0, 0.5, 0.25, 0.125)


def _ask(model, processor, sample) -> tuple[str, dict]:
    inputs = inputs_for(processor, [sample])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    answer = first_word(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
    stats = model.tokenprune.last_stats if hasattr(model, "tokenprune") else None
    visual = int(sum(inputs["input_ids"][0] == t for t in get_adapter(model).visual_token_ids).sum())
    row = {"question": sample.question.text, "truth": sample.question.answer, "answer": answer,
           "correct": answer == sample.question.answer, "visual_tokens": visual, "kept": visual,
           "seq_len": inputs["input_ids"].shape[1], "kv_cache": 1.0, "prefill_flops": 1.0, "scoring_ms": 0.0}
    if stats is not None:
        row.update(kept=stats.visual_tokens_after[0], seq_len=stats.seq_len_after,
                   kv_cache=round(stats.kv_cache_ratio, 3), prefill_flops=round(stats.prefill_flops_ratio, 3),
                   scoring_ms=round(1e3 * stats.scoring_time_s, 2))
    return answer, row


def _picture(model, processor, samples, path: Path) -> None:
    adapter = get_adapter(model)
    scorer = model.tokenprune.scorer
    rows = []
    for s in samples:
        inputs = inputs_for(processor, [s])
        answer = torch.tensor(processor.tokenizer(s.question.answer, add_special_tokens=False)["input_ids"])
        oracle = visual_relevance(model, inputs, answer)
        found = score_inputs(model, inputs)
        with torch.no_grad():
            predicted = scorer.score(found)[0, : found.layout.counts[0]]
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        kept = model.tokenprune.last_stats.kept_indices[0]
        regions = adapter.token_regions(inputs, 0, original_sizes=[s.media.size])
        big = (4 * s.media.width, 4 * s.media.height)
        rows.append([
            (f"Q: {s.question.text}  A: {s.question.answer}", s.media.resize(big, 0)),
            ("oracle relevance R_v", viz.relevance_overlay(s.media, regions, oracle, size=big)),
            (f"compressor + kept at {model.tokenprune.config.ratio:.0%}",
             viz.relevance_overlay(s.media, regions, predicted, kept, size=big)),
        ])
    viz.panel(rows).save(path)


def run(family: str = "qwen2_vl", *, scene: int = 7, eval_questions: int = 64, out: str | Path = "demo.png",
        ratios: tuple[float, ...] = RATIOS) -> dict:
    """Run the demo; prints tables, writes ``out`` and returns everything as a dict."""
    model, processor = load(family)
    compressor = str(compressor_path(family))
    samples = make_samples("test", scene, per_scene=2, kinds=LOOKUP)
    answers = []
    for ratio in ratios:
        prune_wrap(model, ratio=ratio, scorer="compressor", compressor=compressor)
        for s in samples:
            answers.append({"ratio": ratio, **_ask(model, processor, s)[1]})
    heldout = heldout_samples(eval_questions, start=1000)
    table = []
    for ratio in ratios:
        row = {"kept": f"{ratio:.1%}"}
        for scorer in ("compressor", "random"):
            prune_wrap(model, ratio=ratio, scorer=scorer, compressor=compressor)
            row[scorer] = accuracy(model, processor, heldout)["accuracy"]
        table.append(row)
    prune_wrap(model, ratio=0.25, scorer="compressor", compressor=compressor)
    _picture(model, processor, samples, Path(out))
    prune_wrap(model, budget="auto", compressor=compressor)
    calibration = model.tokenprune.scorer.compressor.calibration
    dynamic = [_ask(model, processor, s)[1] for s in _focused_and_spread(scene)]
    unwrap(model)
    _print(answers, ["ratio", "question", "truth", "answer", "kept", "seq_len", "kv_cache", "prefill_flops",
                     "scoring_ms"])
    print(f"\nheld-out accuracy ({len(heldout)} questions), compressor vs random selection:")
    _print(table, ["kept", "compressor", "random"])
    print("(each answer sits in ONE visual token: random selection keeps it about as often as the retention; the "
          "compressor reads\n the first-layer attention, which on these models points at the object the question "
          "names, so the two\n questions keep different tokens: see docs/world.md, 'What this testbed shows')")
    print(f"\ndynamic budget (budget='auto' with the compressor's calibration: temperature "
          f"{calibration['temperature']:g}, mass {calibration['mass']:.4g}, {calibration['target']:.0%} kept on "
          "average): each question keeps what its relevance needs")
    _print(dynamic, ["question", "truth", "answer", "visual_tokens", "kept", "prefill_flops"])
    print(f"\nwrote {out}")
    return {"family": family, "answers": answers, "accuracy": table, "dynamic": dynamic, "picture": str(out)}


def _focused_and_spread(scene: int) -> list:
    """A question about one object and one about every object of a shape, on the first scene from ``scene`` on
    that has both."""
    for index in range(scene, scene + 100):
        spread = make_samples("test", index, kinds=("majority_colour",))
        if spread:
            return [make_samples("test", index, kinds=("colour_of_shape",))[0], spread[0]]
    raise ValueError(f"no scene from {scene} on asks majority_colour")


def _print(rows: list[dict], keys: list[str]) -> None:
    cells = [[f"{r[k]:.3f}" if isinstance(r[k], float) and k not in ("ratio",) else str(r[k]) for k in keys]
             for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print(" | ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
    print("-|-".join("-" * w for w in widths))
    for c in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))
