"""``hf-tokenprune demo``: the shipped toy-world model (or, ``--model realweights``, the real-LM testbed: SmolLM2-135M
+ DINOv2-small with the shipped projector, after its extra install) answers questions about a generated image,
pruned by its compressor; what each question keeps is printed and drawn into ``demo.png``. Each part is printed as
soon as it is computed.

1. Two questions about the same held-out scene, answered with the full visual token set and with 50% / 25% /
   12.5% kept by the compressor: answer, kept tokens, sequence length, KV-cache and prefill-FLOP ratios.
2. What the two questions keep at 25%, for the compressor and for the training-free first-layer attention it
   reads (``scorer="attention"``): the overlap of the two kept sets, and whether (and at which rank) each
   question's answer object is kept, for its own question and for the other one; then the same over
   ``overlap_scenes`` held-out scenes (``test`` scenes 0, 1, ...), as means.
3. Accuracy on held-out questions at each retention, compressor vs random (task-agnostic) selection.
4. ``demo.png``: per question, the oracle relevance ``R_v`` of its answer, the compressor's ``R~_v`` and the
   first-layer attention ``A^0_v``, with the tokens each scorer keeps at 25% outlined.
5. The dynamic budget (``budget="auto"``, the compressor's saved calibration): a question about one object and
   one about every object of a shape, on one scene, with their unpruned and pruned answers and the tokens kept.

Everything is local (shipped weights, generated images): no network; under a minute on 2 CPU cores for a world
model, a few minutes for the real-weights one.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import ProcessorMixin

from . import viz
from .adapters import get_adapter
from .explain import visual_relevance
from .world import compressor_path, load
from .world.evaluate import accuracy, first_word, heldout_samples, inputs_for
from .world.evidence import answer_tokens
from .world.scenes import LOOKUP, Sample, make_samples
from .wrap import prune_wrap, score_inputs, unwrap

RATIOS = (1.0, 0.5, 0.25, 0.125)
COMPARED = 0.25  # the retention at which the two questions' kept sets are compared and drawn
COMPARED_SCORERS = ("compressor", "attention")
WORLD_OBJECTS = (96, 144)  # objects per held-out scene of the world models


def _say(text: str = "") -> None:
    print(text, flush=True)


def _answer(model: nn.Module, processor: ProcessorMixin, sample: Sample) -> str:
    """Greedy answer (first word) to ``sample``."""
    inputs = inputs_for(processor, [sample])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    return first_word(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])


def _ask(model: nn.Module, processor: ProcessorMixin, sample: Sample) -> dict:
    """One table row: ``sample`` answered by the wrapped ``model``, with what its pruning kept and saved (nothing
    at ``ratio=1.0``, which records no stats)."""
    answer = _answer(model, processor, sample)
    stats = model.tokenprune.last_stats
    inputs = inputs_for(processor, [sample])
    visual = int(sum(inputs["input_ids"][0] == t for t in get_adapter(model).visual_token_ids).sum())
    row = {"question": sample.question.text, "truth": sample.question.answer, "answer": answer,
           "correct": answer == sample.question.answer, "visual_tokens": visual, "kept": visual,
           "seq_len": inputs["input_ids"].shape[1], "kv_cache": 1.0, "prefill_flops": 1.0, "scoring_ms": 0.0}
    if stats is not None:
        row.update(kept=stats.visual_tokens_after[0], seq_len=stats.seq_len_after,
                   kv_cache=round(stats.kv_cache_ratio, 3), prefill_flops=round(stats.prefill_flops_ratio, 3),
                   scoring_ms=round(1e3 * stats.scoring_time_s, 2))
    return row


@dataclass
class Kept:
    """What one scorer keeps for the two questions of one scene (question 0 and question 1)."""

    questions: tuple[str, str]
    objects: tuple[str, str]  # the answer object each question names (its key word)
    visual_tokens: int
    kept: tuple[torch.Tensor, torch.Tensor]  # kept indices among the visual tokens, per question
    scores: tuple[torch.Tensor, torch.Tensor]  # the scorer's ``[N_v]`` scores, per question
    evidence: tuple[torch.Tensor, torch.Tensor]  # ``[N_v]`` bool: the tokens showing each question's answer object

    @property
    def overlap(self) -> int:
        """Tokens kept for both questions."""
        return len(set(self.kept[0].tolist()) & set(self.kept[1].tolist()))

    def is_kept(self, obj: int, question: int) -> bool:
        """Whether a token of question ``obj``'s answer object is kept for question ``question``."""
        return bool(self.evidence[obj][self.kept[question]].any())

    def rank(self, obj: int, question: int) -> int:
        """Rank (1 = highest score) of the best-scored token of question ``obj``'s answer object when scored for
        question ``question``."""
        scores = self.scores[question]
        return int((scores > scores[self.evidence[obj]].max()).sum()) + 1

    def row(self) -> dict:
        """JSON-able summary."""
        return {"questions": list(self.questions), "visual_tokens": self.visual_tokens,
                "kept": len(self.kept[0]), "overlap": self.overlap,
                "answer_tokens": [torch.nonzero(e).flatten().tolist() for e in self.evidence],
                "answer_kept": [self.is_kept(q, q) for q in (0, 1)],
                "answer_rank": [self.rank(q, q) for q in (0, 1)],
                "other_question_keeps_it": [self.is_kept(q, 1 - q) for q in (0, 1)],
                "rank_for_other_question": [self.rank(q, 1 - q) for q in (0, 1)]}


def kept_for_pairs(model: nn.Module, processor: ProcessorMixin, pairs: list[list[Sample]], *, scorer: str,
                   compressor: str, ratio: float = COMPARED, batch_pairs: int = 16) -> list[Kept]:
    """For each pair of questions about one image: the tokens ``scorer`` keeps at ``ratio`` for each question
    (from the pruned prefill of ``generate``), its scores, and the tokens of each question's answer object."""
    prune_wrap(model, ratio=ratio, scorer=scorer, compressor=compressor)
    adapter = get_adapter(model)
    out = []
    for start in range(0, len(pairs), batch_pairs):
        chunk = [s for pair in pairs[start:start + batch_pairs] for s in pair]
        inputs = inputs_for(processor, chunk)
        with torch.no_grad():
            found = score_inputs(model, inputs, scope=model.tokenprune.config.scope)
            scores = model.tokenprune.scorer.score(found).float()
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        kept = model.tokenprune.last_stats.kept_indices
        sizes = [s.media.size for s in chunk]
        for j in range(0, len(chunk), 2):
            n = found.layout.counts[j]
            regions = adapter.token_regions(inputs, j, original_sizes=sizes)
            a, b = chunk[j], chunk[j + 1]
            out.append(Kept((a.question.text, b.question.text), (a.question.key, b.question.key), n,
                            (kept[j], kept[j + 1]), (scores[j, :n], scores[j + 1, :n]),
                            (answer_tokens(regions, a), answer_tokens(regions, b))))
    return out


def _summary(measured: list[Kept]) -> dict:
    own = [m.is_kept(q, q) for m in measured for q in (0, 1)]
    other = [m.is_kept(q, 1 - q) for m in measured for q in (0, 1)]
    return {"pairs": len(measured), "kept": statistics.mean(len(m.kept[0]) for m in measured),
            "visual_tokens": statistics.mean(m.visual_tokens for m in measured),
            "mean_overlap": statistics.mean(m.overlap for m in measured),
            "answer_kept": sum(own) / len(own), "other_question_keeps_it": sum(other) / len(other),
            "median_answer_rank": statistics.median(m.rank(q, q) for m in measured for q in (0, 1)),
            "median_rank_for_other_question": statistics.median(m.rank(q, 1 - q) for m in measured for q in (0, 1))}


def _print_pair(scorer: str, m: Kept) -> None:
    _say(f"{scorer}: kept-set overlap: {m.overlap} of {len(m.kept[0])} tokens")
    width = max(len(q) for q in m.questions)
    for q in (0, 1):
        tokens = ", ".join(str(i) for i in torch.nonzero(m.evidence[q]).flatten().tolist())
        _say(f"  {m.questions[q].ljust(width)}  its {m.objects[q]} (token {tokens}): "
             f"{'kept' if m.is_kept(q, q) else 'DROPPED'}, rank {m.rank(q, q)} of {m.visual_tokens} | when the "
             f"{m.objects[1 - q]} question is asked: {'kept' if m.is_kept(q, 1 - q) else 'dropped'}, rank "
             f"{m.rank(q, 1 - q)}")


def _picture(model: nn.Module, processor: ProcessorMixin, samples: list[Sample], kept: dict[str, Kept],
             path: Path) -> None:
    adapter = get_adapter(model)
    rows = []
    for q, s in enumerate(samples):
        inputs = inputs_for(processor, [s])
        answer = torch.tensor(processor.tokenizer(s.question.answer, add_special_tokens=False)["input_ids"])
        regions = adapter.token_regions(inputs, 0, original_sizes=[s.media.size])
        big = (4 * s.media.width, 4 * s.media.height)
        rows.append([(f"Q: {s.question.text}  A: {s.question.answer}", s.media.resize(big, 0)),
                     ("oracle relevance R_v", viz.relevance_overlay(s.media, regions,
                                                                    visual_relevance(model, inputs, answer), size=big))]
                    + [(f"{name} + kept at {COMPARED:.0%} (overlap {m.overlap}/{len(m.kept[0])})",
                        viz.relevance_overlay(s.media, regions, m.scores[q], m.kept[q], size=big))
                       for name, m in kept.items()])
    viz.panel(rows).save(path)


def _shipped(family: str, model_name: str) -> tuple[nn.Module, ProcessorMixin, str, tuple[int, int], str]:
    """``(model, processor, compressor directory, objects per scene, description)`` of the shipped world model of
    ``family`` (``model_name="world"``) or of the real-LM testbed (``"realweights"``)."""
    if model_name == "realweights":
        from .testbed.model import load as load_testbed
        from .testbed.results import COMPRESSOR
        from .testbed.train import OBJECTS

        model, processor = load_testbed()
        return model, processor, str(COMPRESSOR), OBJECTS, "real-weights LLaVA (SmolLM2-135M + DINOv2-small)"
    if model_name != "world":
        raise ValueError(f"model must be 'world' or 'realweights', got {model_name!r}")
    model, processor = load(family)
    return model, processor, str(compressor_path(family)), WORLD_OBJECTS, f"toy-world {family} model"


def _reading(name: str, o: dict) -> str:
    """What :func:`_summary`'s figures ``o`` of scorer ``name`` say about question-conditioning, from the figures."""
    share = o["mean_overlap"] / o["kept"]
    shift = o["median_rank_for_other_question"] - o["median_answer_rank"]
    moves = (f"asking about an object moves it up {shift:g} places in the median" if shift > 0
             else "asking about an object does not move it up the ranking (median)")
    keeps = ("the two questions keep nearly the same tokens: the selection is mostly question-agnostic"
             if share >= 0.9 else "the two questions keep visibly different tokens")
    return f"{name}: {moves}; at {COMPARED:.0%} {keeps} ({share:.0%} shared)."


def run(family: str = "qwen2_vl", *, model_name: str = "world", scene: int = 7, eval_questions: int = 64,
        overlap_scenes: int = 50, out: str | Path = "demo.png", ratios: tuple[float, ...] = RATIOS) -> dict:
    """Run the demo on the shipped toy-world ``family`` model (``model_name="realweights"``: on the real-LM
    testbed): prints each table as soon as it is computed, writes ``out`` and returns everything as a dict."""
    model, processor, compressor, objects, description = _shipped(family, model_name)
    samples = make_samples("test", scene, per_scene=2, kinds=LOOKUP, n_objects=objects)
    _say(f"{description}, held-out scene {scene}: two questions with "
         f"{', '.join(f'{r:.1%}' for r in ratios)} of the visual tokens kept by the compressor ...")
    answers = []
    for ratio in ratios:
        prune_wrap(model, ratio=ratio, scorer="compressor", compressor=compressor)
        answers += [{"ratio": ratio, **_ask(model, processor, s)} for s in samples]
    _print(answers, ["ratio", "question", "truth", "answer", "kept", "seq_len", "kv_cache", "prefill_flops",
                     "scoring_ms"])

    _say(f"\nwhich tokens the two questions keep at {COMPARED:.0%}, compressor and first-layer attention "
         "(scorer='attention', training-free):")
    pairs = [make_samples("test", i, per_scene=2, kinds=LOOKUP, n_objects=objects) for i in range(overlap_scenes)]
    kept, overall = {}, {}
    for name in COMPARED_SCORERS:
        kept[name] = kept_for_pairs(model, processor, [samples], scorer=name, compressor=compressor)[0]
        _print_pair(name, kept[name])
    _say(f"computing the same over {overlap_scenes} held-out scenes (test 0-{overlap_scenes - 1}, two colour "
         "questions each) ...")
    for name in COMPARED_SCORERS:
        overall[name] = _summary(kept_for_pairs(model, processor, pairs, scorer=name, compressor=compressor))
        o = overall[name]
        _say(f"{name}: mean kept-set overlap: {o['mean_overlap']:.1f} of {o['kept']:g} tokens "
             f"({o['mean_overlap'] / o['kept']:.0%}); answer object kept for its question: {o['answer_kept']:.0%} "
             f"(median rank {o['median_answer_rank']:g}), for the other question: {o['other_question_keeps_it']:.0%}"
             f" (median rank {o['median_rank_for_other_question']:g})")
    for name, o in overall.items():
        _say(_reading(name, o))

    heldout = heldout_samples(eval_questions, start=1000, n_objects=objects)
    _say(f"\ncomputing held-out accuracy ({len(heldout)} questions, test scenes 1000-{999 + eval_questions}), "
         "compressor vs random selection ...")
    table = []
    for ratio in ratios:
        row = {"kept": f"{ratio:.1%}"}
        for scorer in ("compressor", "random"):
            prune_wrap(model, ratio=ratio, scorer=scorer, compressor=compressor)
            row[scorer] = accuracy(model, processor, heldout)["accuracy"]
        table.append(row)
    _print(table, ["kept", "compressor", "random"])
    _say("(each answer sits in ONE visual token: random selection keeps it about as often as the retention)")

    prune_wrap(model, budget="auto", compressor=compressor)
    calibration = model.tokenprune.scorer.compressor.calibration
    _say(f"\ndynamic budget (budget='auto', the compressor's calibration: temperature {calibration['temperature']:g}"
         f", mass {calibration['mass']:.4g}), a one-object and an every-object question on one scene ...")
    dynamic = []
    for s in _focused_and_spread(scene, objects):
        row = _ask(model, processor, s)
        with model.tokenprune.disabled():
            row["unpruned"] = _answer(model, processor, s)
        row["kept/total"] = f"{row['kept']}/{row['visual_tokens']} ({row['kept'] / row['visual_tokens']:.0%})"
        dynamic.append(row)
    _print(dynamic, ["question", "truth", "unpruned", "answer", "kept/total", "prefill_flops"])
    _say(f"({calibration['target']:.0%} is the MEAN retention over the {calibration['samples']} calibration "
         "questions of every kind: a single question keeps more or less, and its answer may change; 'answer' is "
         "the pruned one)")

    _say(f"\ndrawing {out} ...")
    _picture(model, processor, samples, kept, Path(out))
    unwrap(model)
    _say(f"wrote {out}")
    return {"model": description, "answers": answers,
            "kept_sets": {"scene": scene, "ratio": COMPARED, **{k: m.row() for k, m in kept.items()}},
            "kept_sets_over_scenes": {"scenes": f"test 0-{overlap_scenes - 1}", "ratio": COMPARED, **overall},
            "accuracy": table, "dynamic": dynamic, "picture": str(out)}


def _focused_and_spread(scene: int, objects: tuple[int, int] = (96, 144)) -> list[Sample]:
    """A question about one object and one about every object of a shape, on the first scene from ``scene`` on
    (of ``objects`` objects) that has both."""
    for index in range(scene, scene + 100):
        spread = make_samples("test", index, kinds=("majority_colour",), n_objects=objects)
        if spread:
            return [make_samples("test", index, kinds=("colour_of_shape",), n_objects=objects)[0], spread[0]]
    raise ValueError(f"no scene from {scene} on asks majority_colour")


def _print(rows: list[dict], keys: list[str]) -> None:
    cells = [[f"{r[k]:.3f}" if isinstance(r[k], float) and k not in ("ratio",) else str(r[k]) for k in keys]
             for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = [" | ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)), "-|-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)) for c in cells]
    _say("\n".join(lines))
