"""The method on the real-LM testbed (SmolLM2-135M + DINOv2-small, trained projector), held-out scenes:

``python -m hf_tokenprune.testbed.results --scenes 0:150 --out docs/testbed``

For every method at 50 / 25 / 12.5% retention, and the compressor with ``budget="auto"`` calibrated to 25% on
other held-out scenes (``--calibration-scenes``): accuracy (overall and per question kind), answer region kept,
achieved retention and measured prefill FLOPs (relative to the full model's; in-LLM methods pay for the layers
before they prune), and the pointing accuracy of the oracle ``R_v``, the compressor and first-layer attention
(:func:`hf_tokenprune.world.results.evaluate`). ``--scenes`` is a range of the world's *test* split (scene
indices the projector and the compressor never trained on: they use the train split); pick any other range to
check the figures on scenes nobody tuned on. Writes ``testbed_results.json`` / ``.md``, ``testbed_accuracy.png``
(vs retention) and ``testbed_flops.png`` (vs prefill FLOPs) to ``--out`` and, with ``--results-md``, replaces
that file's section between the markers :data:`BEGIN` and :data:`END`.

``--full-only``: the full model's held-out accuracy alone (no pruning), per question kind, and how often it gave
each answer.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

from ..world import results as world_results
from ..world.evaluate import heldout_samples, predict, score_answers
from ..world.scenes import Sample
from .model import ASSETS, load
from .train import KINDS, OBJECTS

SCORERS = ("compressor", "compressor+dpp", "attention", "oracle", "cdpruner", "divprune", "visionzip", "fastv",
           "pdrop", "dart", "tome", "random", "uniform")
RATIOS = (0.5, 0.25, 0.125)
COMPRESSOR = ASSETS.parent / "llava-smollm2-dinov2-compressor"
BEGIN, END = "<!-- testbed results: begin -->", "<!-- testbed results: end -->"


def scene_range(text: str) -> range:
    """``"A:B"`` -> ``range(A, B)`` (test-split scene indices)."""
    start, _, stop = text.partition(":")
    try:
        scenes = range(int(start), int(stop))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a scene range is START:STOP, got {text!r}") from None
    if not len(scenes) or scenes.start < 0:
        raise argparse.ArgumentTypeError(f"empty or negative scene range {text!r}")
    return scenes


def samples_of(scenes: range, kinds: tuple[str, ...]) -> list[Sample]:
    """One question of ``kinds`` about each held-out scene of ``scenes`` (the testbed's object counts)."""
    return heldout_samples(len(scenes), start=scenes.start, kinds=kinds, n_objects=OBJECTS)


def answer_counts(samples: list[Sample], answers: list[str]) -> dict[str, dict[str, int]]:
    """How often each answer was given, per question kind (most frequent first): a kind the model has not learned
    shows as one answer given to every question."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for s, a in zip(samples, answers, strict=True):
        counts[s.question.kind][a] += 1
    return {kind: dict(c.most_common()) for kind, c in sorted(counts.items())}


def replace_section(path: Path, text: str) -> None:
    """Put ``text`` between :data:`BEGIN` and :data:`END` in ``path`` (both markers must be there)."""
    current = path.read_text()
    if BEGIN not in current or END not in current:
        raise ValueError(f"{path} lacks the markers {BEGIN!r} and {END!r}")
    head, rest = current.split(BEGIN, 1)
    path.write_text(f"{head}{BEGIN}\n{text}\n{END}{rest.split(END, 1)[1]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=scene_range, default=scene_range("0:150"),
                        help="held-out (test-split) scene range START:STOP, one question each")
    parser.add_argument("--calibration-scenes", type=scene_range, default=scene_range("100000:100060"),
                        help="other held-out scenes on which budget='auto' chooses its temperature")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), help="question kinds")
    parser.add_argument("--model", default=str(ASSETS), help="trained projector directory")
    parser.add_argument("--compressor", default=str(COMPRESSOR), help="compressor directory")
    parser.add_argument("--scorers", nargs="+", default=list(SCORERS))
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    parser.add_argument("--auto", nargs="*", default=["compressor"], help="scorers also run with budget='auto'")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="docs/testbed")
    parser.add_argument("--results-md", default=None, help="markdown file whose testbed section is replaced")
    parser.add_argument("--add", action="store_true", help="add these rows to the testbed_results.json in --out")
    parser.add_argument("--full-only", action="store_true", help="only the full model's accuracy")
    args = parser.parse_args(argv)
    model, processor = load(args.model)
    samples = samples_of(args.scenes, tuple(args.kinds))
    command = " ".join(["python -m hf_tokenprune.testbed.results", *(sys.argv[1:] if argv is None else argv)])
    if args.full_only:
        answers = predict(model, processor, samples, args.batch_size)
        print(json.dumps({"command": command, "n": len(samples), **score_answers(samples, answers),
                          "answers": answer_counts(samples, answers)}, indent=1))
        return
    compressor = args.compressor if Path(args.compressor, "config.json").exists() else None
    setting = world_results.evaluate(
        model, processor, samples, label="testbed", compressor=compressor, batch_size=args.batch_size,
        scorers=args.scorers, ratios=args.ratios, auto_scorers=args.auto, targets=(0.25,),
        calibration=samples_of(args.calibration_scenes, tuple(args.kinds)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"real-weights LLaVA (SmolLM2-135M + DINOv2-small), test scenes {args.scenes.start}:{args.scenes.stop}"
    result = {"command": command, "settings": {name: setting}}
    if args.add:
        result = world_results.add_rows(json.loads((out / "testbed_results.json").read_text()), result)
    (out / "testbed_results.json").write_text(json.dumps(result, indent=2))
    table = world_results.markdown(result)
    (out / "testbed_results.md").write_text(table)
    world_results.plot(result, out / "testbed_accuracy.png")
    world_results.plot(result, out / "testbed_flops.png", x="prefill_flops")
    if args.results_md:
        replace_section(Path(args.results_md), f"```bash\n{result['command']}\n```\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
