"""Does a shipped world model's first-layer attention ``A^0_v`` depend on the question?

For held-out scenes with two different lookup questions each, prints the correlation of the two questions'
``A^0_v`` and the overlap of their top-25% tokens (1.0 = the same tokens whatever the question).

    python examples/world_question_dependence.py --family llava_onevision --scenes 20
"""

import argparse

import torch

from hf_tokenprune.world import load
from hf_tokenprune.world.evaluate import inputs_for
from hf_tokenprune.world.scenes import LOOKUP, make_samples
from hf_tokenprune.wrap import score_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen2_vl", choices=["qwen2_vl", "llava_onevision"])
    parser.add_argument("--scenes", type=int, default=20)
    args = parser.parse_args()
    model, processor = load(args.family)
    correlations, overlaps = [], []
    for index in range(args.scenes):
        pair = make_samples("test", 2000 + index, per_scene=2, kinds=LOOKUP)
        if len(pair) < 2:
            continue
        a, b = (score_inputs(model, inputs_for(processor, [s])).first_layer_attention[0] for s in pair)
        k = len(a) // 4
        correlations.append(torch.corrcoef(torch.stack([a, b]))[0, 1].item())
        overlaps.append(len(set(a.topk(k).indices.tolist()) & set(b.topk(k).indices.tolist())) / k)
    n = len(correlations)
    print(f"{args.family}: {n} scenes, A^0_v correlation between two questions: mean {sum(correlations) / n:.3f} "
          f"(min {min(correlations):.3f}); top-25% overlap: mean {sum(overlaps) / n:.3f}")


if __name__ == "__main__":
    main()
