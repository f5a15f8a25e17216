"""The testbed's results: ``python -m hf_tokenprune.world.results --out docs/``.

On the shipped world models and held-out questions, for every scorer (compressor, raw first-layer attention,
the oracle ``R_v``, random, uniform) and retention (100 / 50 / 25 / 12.5%):

* **accuracy** of the pruned model's greedy answer (through ``generate``, as users run it);
* **answer region kept**: share of questions where at least one kept token overlaps the answer's box;
* **pointing**: share of questions whose highest-scored token overlaps the answer's box (oracle ``R_v``,
  compressor ``R~_v``, attention ``A^0_v``).

The oracle ``R_v`` is the gradient-weighted relevance of the reference answer (teacher forced): an upper
bound that needs the answer, not a pruning method. Writes ``world_results.json``, ``world_results.md`` and
``world_accuracy.png`` (matplotlib, if installed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapters import get_adapter
from ..explain import visual_relevance
from ..scorers import OracleScorer
from ..wrap import prune_wrap, score_inputs, unwrap
from . import compressor_path, load
from .evaluate import heldout_samples, inputs_for, predict
from .scenes import Sample

SCORERS = ("compressor", "attention", "oracle", "random", "uniform")
RATIOS = (1.0, 0.5, 0.25, 0.125)


def answer_tokens(regions, sample: Sample) -> torch.Tensor:
    """``[N_v]`` bool: tokens whose region overlaps the answer's box (and, for videos, its frame)."""
    frame, x0, y0, x1, y1 = sample.question.boxes[0]
    width, height = sample.scene.size
    box = torch.tensor([x0 / width, y0 / height, x1 / width, y1 / height], dtype=torch.float64)
    b = regions.boxes
    overlap = (b[:, 0] < box[2]) & (b[:, 2] > box[0]) & (b[:, 1] < box[3]) & (b[:, 3] > box[1])
    raw = frame * sample.scene.repeat if sample.is_video else 0
    in_frame = (regions.frames[:, 0] <= raw) & (raw < regions.frames[:, 1])
    return overlap & in_frame & regions.valid


def _per_sample(model, processor, samples: list[Sample], compressor: str | None) -> list[dict]:
    """Oracle relevance, first-layer attention, compressor relevance and answer tokens of every sample."""
    adapter = get_adapter(model)
    scorer = None
    if compressor is not None:
        from ..config import TokenPruneConfig
        from ..scorers import build_scorer

        scorer = build_scorer(TokenPruneConfig(scorer="compressor", compressor=compressor), adapter)
    out = []
    for s in tqdm(samples, desc="oracle relevance"):
        inputs = inputs_for(processor, [s])
        answer = torch.tensor(processor.tokenizer(s.question.answer, add_special_tokens=False)["input_ids"])
        found = score_inputs(model, inputs)
        n = found.layout.counts[0]
        row = {"oracle": visual_relevance(model, inputs, answer), "attention": found.first_layer_attention[0, :n]}
        if scorer is not None:
            with torch.no_grad():
                row["compressor"] = scorer.score(found)[0, :n].float()
        sizes = None if s.is_video else [s.media.size]
        row["answer_tokens"] = answer_tokens(adapter.token_regions(inputs, 0, original_sizes=sizes), s)
        out.append(row)
    return out


def evaluate(family: str, samples: list[Sample], *, batch_size: int = 32, scorers=SCORERS, ratios=RATIOS) -> dict:
    """Accuracy / answer-region-kept per scorer and ratio, and pointing, for one family and one set of samples."""
    model, processor = load(family)
    try:
        compressor = str(compressor_path(family))
    except FileNotFoundError:
        compressor, scorers = None, [s for s in scorers if s != "compressor"]
    rows = _per_sample(model, processor, samples, compressor)
    result: dict = {"n": len(samples), "pointing": {}, "accuracy": {}, "answer_region_kept": {}}
    for name in ("oracle", "compressor", "attention"):
        if name in rows[0]:
            hits = [bool(r["answer_tokens"][int(r[name].argmax())]) for r in rows]
            result["pointing"][name] = sum(hits) / len(hits)
    truth = [s.question.answer for s in samples]
    full = predict(model, processor, samples, batch_size)
    result["accuracy"]["full"] = {"1.0": sum(a == t for a, t in zip(full, truth, strict=True)) / len(truth)}
    for name in scorers:
        result["accuracy"][name], result["answer_region_kept"][name] = {}, {}
        for ratio in [r for r in ratios if r < 1.0]:
            scorer = OracleScorer() if name == "oracle" else name
            prune_wrap(model, ratio=ratio, scorer=scorer, compressor=compressor if name == "compressor" else None)
            answers, kept_region = [], []
            for i in tqdm(range(0, len(samples), batch_size), desc=f"{family} {name} {ratio}", leave=False):
                chunk = samples[i:i + batch_size]
                if name == "oracle":
                    model.tokenprune.scorer.values = [r["oracle"] for r in rows[i:i + batch_size]]
                answers += predict(model, processor, chunk, batch_size)
                # stats of the last generate call = this chunk's prefill (predict runs one call per chunk)
                for r, kept in zip(rows[i:i + batch_size], model.tokenprune.last_stats.kept_indices, strict=True):
                    kept_region.append(bool(r["answer_tokens"][kept].any()))
            unwrap(model)
            key = str(ratio)
            result["accuracy"][name][key] = sum(a == t for a, t in zip(answers, truth, strict=True)) / len(truth)
            result["answer_region_kept"][name][key] = sum(kept_region) / len(kept_region)
    return result


def markdown(results: dict) -> str:
    lines = []
    for setting, r in results["settings"].items():
        ratios = [k for k in map(str, RATIOS) if k != "1.0"]
        lines += [f"### {setting} ({r['n']} held-out questions; full token set: "
                  f"{100 * r['accuracy']['full']['1.0']:.1f}%)", "",
                  "| scorer | " + " | ".join(f"acc @{float(k) * 100:g}%" for k in ratios) + " | "
                  + " | ".join(f"answer kept @{float(k) * 100:g}%" for k in ratios) + " |",
                  "|---" * (1 + 2 * len(ratios)) + "|"]
        for name, accs in r["accuracy"].items():
            if name == "full":
                continue
            kept = r["answer_region_kept"][name]
            lines.append(f"| {name} | " + " | ".join(f"{100 * accs[k]:.1f}" for k in ratios) + " | "
                         + " | ".join(f"{100 * kept[k]:.1f}" for k in ratios) + " |")
        lines += ["", "Pointing (top token overlaps the answer box): "
                  + ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["pointing"].items()), ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> bool:
    """Accuracy vs retention per scorer, one panel per setting; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    settings = results["settings"]
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4), squeeze=False)
    for ax, (setting, r) in zip(axes[0], settings.items(), strict=True):
        full = r["accuracy"]["full"]["1.0"]
        for name, accs in r["accuracy"].items():
            if name == "full":
                continue
            xs = [1.0] + [float(k) for k in accs]
            ax.plot([100 * x for x in xs], [100 * full] + [100 * v for v in accs.values()], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks([12.5, 25, 50, 100], ["12.5", "25", "50", "100"])
        ax.set_xlabel("visual tokens kept (%)")
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_title(setting)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs")
    parser.add_argument("--images", type=int, default=300, help="held-out image questions per model")
    parser.add_argument("--videos", type=int, default=150, help="held-out video questions (Qwen2-VL)")
    parser.add_argument("--families", nargs="+", default=["qwen2_vl", "llava_onevision"])
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {}
    for family in args.families:
        settings[f"{family} images"] = evaluate(family, heldout_samples(args.images))
        if family == "qwen2_vl" and args.videos:
            settings[f"{family} videos"] = evaluate(family, heldout_samples(args.videos, video=True))
    results = {"command": "python -m hf_tokenprune.world.results " + " ".join(argv or []), "settings": settings}
    (out / "world_results.json").write_text(json.dumps(results, indent=2))
    (out / "world_results.md").write_text(markdown(results))
    plot(results, out / "world_accuracy.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
