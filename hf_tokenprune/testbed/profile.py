"""Where the real-LM testbed loses its answers: ``python -m hf_tokenprune.testbed.profile --model DIR``.

Two measurements, printed as JSON:

* **vision**: how well a linear probe reads each visual token's cell (shape, colour; empty counts as a class) from
  the frozen DINOv2-small features the projector receives, trained on train-split scenes and scored on test-split
  scenes. High figures mean the answer is in the visual tokens; what is missing is the LM finding it.
* **accuracy**: the trained model's held-out accuracy with all tokens, per question kind, on scenes with few, middle
  and many objects. A kind that stays near chance with few objects fails in the lookup, not in crowding.
* **selection**: where the oracle ``R_v``'s, the compressor's and first-layer attention's top tokens lie on held-out
  questions: the share of the kept tokens that show an object (beside the share of all tokens that do, what a random
  pick gets), and the share in the grid's first and last row, the two ends of the visual sequence.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from ..world.evaluate import accuracy, heldout_samples
from ..world.results import per_sample
from ..world.scenes import Sample, make_samples
from .model import base, load
from .results import COMPRESSOR, samples_of, scene_range
from .train import KINDS, OBJECTS, cell_labels

OBJECT_RANGES = ((8, 16), OBJECTS, (48, 96))
GRID = 16  # visual tokens per row: one DINOv2 patch per 8-pixel cell of the 128-pixel scene


def vision_features(model: nn.Module, processor, samples: list[Sample]) -> torch.Tensor:
    """``[scenes * 256, hidden]``: the vision tower's patch features (as the projector reads them) of each sample's
    scene, in :func:`~.train.cell_labels` order."""
    images = [s.media for s in {id(s.scene): s for s in samples}.values()]
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model.model.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:].flatten(0, 1)


def probe_accuracy(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                   steps: int = 300, seed: int = 0) -> dict[str, dict[str, float]]:
    """A linear probe per cell attribute (shape, colour), fitted with Adam on ``train`` = ``(features, cells)``
    from an initialisation drawn with ``seed``; its accuracy on ``test``, over all tokens and over the tokens that
    show an object."""
    features, cells = train
    mean, std = features.mean(0), features.std(0) + 1e-5
    test_features, test_cells = (test[0] - mean) / std, test[1]
    shows_object = test_cells[:, 0] > 0
    out = {}
    for column, name in enumerate(("shape", "colour")):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            probe = nn.Linear(features.shape[1], int(cells[:, column].max()) + 1)
        optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
        for _ in range(steps):
            loss = nn.functional.cross_entropy(probe((features - mean) / std), cells[:, column])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            hit = probe(test_features).argmax(-1) == test_cells[:, column]
        out[name] = {"all_tokens": round(hit.float().mean().item(), 4),
                     "object_tokens": round(hit[shows_object].float().mean().item(), 4)}
    return out


def kept_cells(scores: torch.Tensor, objects: torch.Tensor, ratio: float) -> dict[str, float]:
    """Of the ``round(ratio * N)`` top-``scores`` tokens of a ``GRID``-wide grid (``objects``: ``[N]`` bool, the
    token shows an object): the share that shows an object and the share in the first or last row."""
    top = scores.topk(round(ratio * scores.numel())).indices
    edge = (top < GRID) | (top >= scores.numel() - GRID)
    return {"objects": objects[top].float().mean().item(), "first_last_row": edge.float().mean().item()}


def selection(model: nn.Module, processor, samples: list[Sample], compressor: str,
              ratios: tuple[float, ...] = (0.25, 0.125)) -> dict:
    """:func:`kept_cells` of the oracle ``R_v`` (of the reference answer), the compressor and first-layer attention,
    averaged over ``samples``, beside the share of all tokens that show an object."""
    rows: dict[str, dict[float, list[dict[str, float]]]] = {"oracle": {}, "compressor": {}, "attention": {}}
    shown = []
    for sample, scores in zip(samples, per_sample(model, processor, samples, compressor), strict=True):
        objects = cell_labels([sample])[:, 0] > 0
        shown.append(objects.float().mean().item())
        for name, by_ratio in rows.items():
            for ratio in ratios:
                by_ratio.setdefault(ratio, []).append(kept_cells(scores[name], objects, ratio))
    mean = {name: {f"{ratio:g}": {key: round(sum(r[key] for r in kept) / len(kept), 4) for key in kept[0]}
                   for ratio, kept in by_ratio.items()} for name, by_ratio in rows.items()}
    return {"questions": len(samples), "all_tokens_objects": round(sum(shown) / len(shown), 4), **mean}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="trained projector directory (default: only the probe)")
    parser.add_argument("--probe-scenes", type=int, default=150, help="train-split scenes for the probe")
    parser.add_argument("--scenes", type=int, default=48, help="test-split scenes per object range")
    parser.add_argument("--selection-scenes", type=scene_range, default=scene_range("1000:1160"),
                        help="held-out scenes START:STOP of the selection profile (default: the results table's)")
    parser.add_argument("--compressor", default=str(COMPRESSOR), help="compressor directory (selection profile)")
    args = parser.parse_args(argv)
    model, processor = base()

    def scenes(split: str, n: int) -> list[Sample]:
        return [s for i in range(n) for s in make_samples(split, i, per_scene=1, n_objects=OBJECTS,
                                                          kinds=("colour_of_shape",))]

    sets = {split: scenes(split, n) for split, n in (("train", args.probe_scenes), ("test", args.scenes))}
    data = {split: (torch.cat([vision_features(model, processor, [s]) for s in samples]), cell_labels(samples))
            for split, samples in sets.items()}
    report: dict = {"vision_probe": {"objects": list(OBJECTS), **probe_accuracy(data["train"], data["test"])}}
    if args.model:
        model, processor = load(args.model)
        report["accuracy"] = {f"{low}-{high} objects": accuracy(
            model, processor, heldout_samples(args.scenes, kinds=KINDS, n_objects=(low, high)), batch_size=16)
            for low, high in OBJECT_RANGES}
        report["selection"] = selection(model, processor, samples_of(args.selection_scenes, KINDS), args.compressor)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
