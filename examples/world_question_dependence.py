"""Does a shipped world model's first-layer attention ``A^0_v`` depend on the question?

For held-out scenes with two different lookup questions each, prints the correlation of the two questions'
``A^0_v``, the overlap of their top-25% tokens (1.0 = the same tokens whatever the question), and how often
``A^0_v``'s highest token shows the object the question names (pointing).

    python examples/world_question_dependence.py --family llava_onevision --scenes 20 [--model DIR]
"""

import argparse

import torch

from hf_tokenprune.adapters import get_adapter
from hf_tokenprune.world import load
from hf_tokenprune.world.evaluate import inputs_for
from hf_tokenprune.world.evidence import answer_tokens
from hf_tokenprune.world.scenes import LOOKUP, make_samples
from hf_tokenprune.wrap import score_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen2_vl", choices=["qwen2_vl", "llava_onevision"])
    parser.add_argument("--scenes", type=int, default=20)
    parser.add_argument("--model", help="a world model directory (default: the shipped one of --family)")
    args = parser.parse_args()
    model, processor = load(args.family, args.model)
    correlations, overlaps, pointing = [], [], []
    for index in range(args.scenes):
        pair = make_samples("test", 2000 + index, per_scene=2, kinds=LOOKUP)
        if len(pair) < 2:
            continue
        attention = []
        for s in pair:
            inputs = inputs_for(processor, [s])
            a = score_inputs(model, inputs).first_layer_attention[0]
            named = answer_tokens(get_adapter(model).token_regions(inputs, 0, original_sizes=[s.media.size]), s)
            pointing.append(bool(named[int(a[:len(named)].argmax())]))
            attention.append(a)
        a, b = attention
        k = len(a) // 4
        correlations.append(torch.corrcoef(torch.stack([a, b]))[0, 1].item())
        overlaps.append(len(set(a.topk(k).indices.tolist()) & set(b.topk(k).indices.tolist())) / k)
    n = len(correlations)
    print(f"{args.family}: {n} scenes, A^0_v correlation between two questions: mean {sum(correlations) / n:.3f} "
          f"(min {min(correlations):.3f}); top-25% overlap: mean {sum(overlaps) / n:.3f}; top token shows the "
          f"named object: {sum(pointing)}/{len(pointing)}")


if __name__ == "__main__":
    main()
