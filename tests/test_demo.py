"""``hf-tokenprune demo`` on the shipped toy-world Qwen2-VL model (fast settings): it prints each part as soon as
it is computed, prints the kept-set overlap of its two questions (compressor and attention) consistent with what
pruning keeps, and shows the dynamic budget's unpruned answer beside the pruned one."""

from __future__ import annotations

import io
import re
import sys

import pytest
import torch

from hf_tokenprune import demo
from hf_tokenprune.adapters import get_adapter
from hf_tokenprune.world import compressor_path, load
from hf_tokenprune.world.evaluate import inputs_for
from hf_tokenprune.world.evidence import answer_tokens
from hf_tokenprune.world.scenes import LOOKUP, make_samples
from hf_tokenprune.wrap import prune_wrap

SCENE = 7


class _Stdout(io.StringIO):
    """Records what had been flushed at each flush."""

    flushed = ""

    def flush(self) -> None:
        self.flushed = self.getvalue()


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """``(result, printed, events)``: ``events`` lists ``(slow step, what had been flushed when it started)``."""
    stdout, events = _Stdout(), []

    def logged(name, fn):
        def call(*args, **kwargs):
            events.append((name, stdout.flushed))
            return fn(*args, **kwargs)
        return call

    with pytest.MonkeyPatch.context() as patch:
        for name in ("kept_for_pairs", "accuracy", "_focused_and_spread", "_picture"):
            patch.setattr(demo, name, logged(name, getattr(demo, name)))
        patch.setattr(sys, "stdout", stdout)
        result = demo.run("qwen2_vl", scene=SCENE, eval_questions=2, overlap_scenes=3, ratios=(1.0, 0.25),
                          out=tmp_path_factory.mktemp("demo") / "demo.png")
    return result, stdout.getvalue(), events


def _first(events, name):
    return next(flushed for step, flushed in events if step == name)


def test_demo_prints_each_table_before_computing_the_next(ran):
    _, printed, events = ran
    answers_table = "0.25  | what colour is the circle ?"
    assert answers_table in _first(events, "kept_for_pairs")  # the answers, flushed before the kept sets run
    assert "compressor: mean kept-set overlap" in _first(events, "accuracy")
    assert "compressor | random" not in _first(events, "accuracy")
    assert "computing held-out accuracy" in _first(events, "accuracy")  # says what it computes, before it does
    assert "compressor | random" in _first(events, "_focused_and_spread")
    assert "unpruned" in _first(events, "_picture")
    assert printed.index(answers_table) < printed.index("kept-set overlap") < printed.index("compressor | random")


def test_demo_prints_the_kept_set_overlap_of_its_two_questions(ran):
    result, printed, _ = ran
    kept_sets = result["kept_sets"]
    for scorer in ("compressor", "attention"):
        row = kept_sets[scorer]
        assert f"{scorer}: kept-set overlap: {row['overlap']} of {row['kept']} tokens" in printed
        assert row["kept"] == 64 and 0 <= row["overlap"] <= 64
        over = result["kept_sets_over_scenes"][scorer]
        assert over["pairs"] == 3
        assert f"{scorer}: mean kept-set overlap: {over['mean_overlap']:.1f} of 64 tokens" in printed
    # the numbers are what pruning keeps: both questions through one wrapped prefill
    model, processor = load("qwen2_vl")
    samples = make_samples("test", SCENE, per_scene=2, kinds=LOOKUP)
    inputs = inputs_for(processor, samples)
    regions = get_adapter(model).token_regions(inputs, 0, original_sizes=[s.media.size for s in samples])
    for scorer in ("compressor", "attention"):
        prune_wrap(model, ratio=0.25, scorer=scorer, compressor=str(compressor_path("qwen2_vl")))
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        kept = model.tokenprune.last_stats.kept_indices
        row = kept_sets[scorer]
        assert row["overlap"] == len(set(kept[0].tolist()) & set(kept[1].tolist()))
        for q, s in enumerate(samples):
            evidence = answer_tokens(regions, s)
            assert row["answer_tokens"][q] == torch.nonzero(evidence).flatten().tolist()
            assert row["answer_kept"][q] == bool(evidence[kept[q]].any())
            assert row["other_question_keeps_it"][q] == bool(evidence[kept[1 - q]].any())
            state = "kept" if row["answer_kept"][q] else "DROPPED"
            assert re.search(rf"{re.escape(s.question.text)} +its {s.question.key} \(token "
                             rf"{row['answer_tokens'][q][0]}\): {state}, rank {row['answer_rank'][q]} of 256", printed)


def test_kept_ranks_an_object_by_its_best_token_for_either_question():
    evidence = (torch.tensor([True, False, False, False]), torch.tensor([False, False, True, True]))
    m = demo.Kept(("q0", "q1"), ("circle", "star"), 4, (torch.tensor([0, 1]), torch.tensor([1, 3])),
                  (torch.tensor([4.0, 3.0, 2.0, 1.0]), torch.tensor([1.0, 4.0, 2.0, 3.0])), evidence)
    assert m.overlap == 1
    assert [m.rank(0, 0), m.rank(1, 1), m.rank(0, 1), m.rank(1, 0)] == [1, 2, 4, 3]
    assert [m.is_kept(0, 0), m.is_kept(1, 1), m.is_kept(0, 1), m.is_kept(1, 0)] == [True, True, False, False]


def test_demo_dynamic_budget_rows_show_the_unpruned_answer_and_the_tokens_kept(ran):
    result, printed, _ = ran
    model, processor = load("qwen2_vl")
    for row, sample in zip(result["dynamic"], demo._focused_and_spread(SCENE), strict=True):
        assert row["question"] == sample.question.text and row["truth"] == sample.question.answer
        assert row["unpruned"] == demo._answer(model, processor, sample)
        assert row["kept/total"].startswith(f"{row['kept']}/256 (")
        assert re.search(rf"{re.escape(row['question'])} +\| {row['truth']} +\| {row['unpruned']} +\| "
                         rf"{row['answer']} +\| {re.escape(row['kept/total'])}", printed)
    assert "25% is the MEAN retention over the 160 calibration questions" in printed


def test_the_demo_reads_question_conditioning_from_its_figures():
    agnostic = {"mean_overlap": 63.1, "kept": 64, "median_answer_rank": 15, "median_rank_for_other_question": 14.5}
    conditional = {"mean_overlap": 40.0, "kept": 64, "median_answer_rank": 1, "median_rank_for_other_question": 9}
    assert "does not move it up" in demo._reading("compressor", agnostic)
    assert "mostly question-agnostic (99% shared)" in demo._reading("compressor", agnostic)
    assert "moves it up 8 places" in demo._reading("attention", conditional)
    assert "visibly different tokens (62% shared)" in demo._reading("attention", conditional)
