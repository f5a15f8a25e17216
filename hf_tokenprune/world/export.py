"""Write world samples as a JSONL dataset with PNG files: the input ``hf-tokenprune label --data`` reads.

``python -m hf_tokenprune.world.export --split train --scenes 1000 --questions 2 --out data/world-train``
writes ``data.jsonl`` (fields ``id``, ``question``, ``answer``, ``image`` or ``video`` paths relative to the
file, and ``meta`` with the question kind and its evidence boxes, answer box first: ``[raw frame, x0, y0, x1,
y1]`` in pixels) and the media next to it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm.auto import tqdm

from .scenes import KINDS, Sample, make_samples


def export(out: str | Path, *, split: str = "train", scenes: int = 1000, questions: int = 2, videos: int = 0,
           seed: int = 0, start: int = 0, objects: tuple[int, int] = (96, 144),
           kinds: tuple[str, ...] = KINDS) -> Path:
    """Write ``scenes`` image scenes of ``objects`` objects (and ``videos`` video scenes) with ``questions``
    questions of ``kinds`` each; returns the JSONL path."""
    out = Path(out)
    (out / "media").mkdir(parents=True, exist_ok=True)
    path = out / "data.jsonl"
    with path.open("w") as f:
        jobs = [(i, False) for i in range(start, start + scenes)] + [(i, True) for i in range(start, start + videos)]
        for index, video in tqdm(jobs, desc=f"export {split}"):
            samples = make_samples(split, index, seed=seed, video=video, per_scene=questions, n_objects=objects,
                                   kinds=kinds)
            stem = f"{'video' if video else 'image'}-{split}-{index}"
            if video:
                media = [f"media/{stem}-{t}.png" for t in range(len(samples[0].media))]
                for name, frame in zip(media, samples[0].media, strict=True):
                    frame.save(out / name)
            else:
                media = f"media/{stem}.png"
                samples[0].media.save(out / media)
            for s in samples:
                row = {"id": s.sample_id, "question": s.question.text, "answer": s.question.answer,
                       "video" if video else "image": media,
                       "meta": {"kind": s.question.kind, "boxes": _pixel_boxes(s)}}
                f.write(json.dumps(row) + "\n")
    return path


def _pixel_boxes(sample: Sample) -> list[list[int]]:
    """The question's evidence boxes as ``hf-tokenprune label --relevance boxes`` reads them: ``[raw frame, x0,
    y0, x1, y1]`` in pixels (a video shows each distinct frame ``repeat`` times)."""
    repeat = sample.scene.repeat if sample.is_video else 0
    return [[f * repeat, x0, y0, x1, y1] for f, x0, y0, x1, y1 in sample.question.boxes]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--split", default="train", choices=["train", "test"])
    parser.add_argument("--scenes", type=int, default=1000, help="image scenes")
    parser.add_argument("--videos", type=int, default=0, help="video scenes")
    parser.add_argument("--questions", type=int, default=2, help="questions per scene")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="first scene index")
    parser.add_argument("--objects", type=int, nargs=2, default=(96, 144), metavar=("MIN", "MAX"),
                        help="objects per image scene")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), help="question kinds")
    args = parser.parse_args(argv)
    print(export(args.out, split=args.split, scenes=args.scenes, questions=args.questions, videos=args.videos,
                 seed=args.seed, start=args.start, objects=tuple(args.objects), kinds=tuple(args.kinds)))


if __name__ == "__main__":
    main()
