"""Prefill wall time and KV cache, full vs pruned, on a random-weight Qwen2-VL with 2B-like LLM widths.

    python examples/prefill_speed.py --layers 4 --image 896 --repeats 5 --out prefill_speed.json

Builds Qwen2VLForConditionalGeneration from a config (no download): LLM width 1536, 12 heads, 2 KV heads,
MLP 8960 (Qwen2-VL-2B), ``--layers`` layers; a one-block vision tower so the LLM dominates. One image of
``--image`` pixels (896 -> 1024 visual tokens) and a short question. Every ratio is timed in the same process,
interleaved with the full model, ``--repeats`` times; the table reports median time ratios (pruned / full).

The model comes from :mod:`hf_tokenprune.bench.models`; ``hf-tokenprune bench`` measures the same model with every
method and more figures (LLM prefill alone, TTFT, decode speed, memory): see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hf_tokenprune import prune_wrap
from hf_tokenprune.bench.models import qwen2vl_2b_like, qwen2vl_inputs


def prefill_seconds(model, inputs) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(**inputs, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--image", type=int, default=896)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    parser.add_argument("--scorer", default="attention")
    parser.add_argument("--out", default="prefill_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    model = qwen2vl_2b_like(args.layers)
    inputs = qwen2vl_inputs(model, args.image)
    prefill_seconds(model, inputs)  # warm-up
    rows = []
    for ratio in args.ratios:
        prune_wrap(model, ratio=ratio, scorer=args.scorer)
        prefill_seconds(model, inputs)  # warm-up at this length
        full, pruned, scoring = [], [], []
        for _ in range(args.repeats):
            with model.tokenprune.disabled():
                full.append(prefill_seconds(model, inputs))
            pruned.append(prefill_seconds(model, inputs))
            scoring.append(model.tokenprune.last_stats.scoring_time_s)
        stats = model.tokenprune.last_stats
        ratios = [p / f for p, f in zip(pruned, full)]
        rows.append({
            "ratio": ratio, "scorer": args.scorer, "visual_tokens": stats.visual_tokens_before[0],
            "kept": stats.visual_tokens_after[0], "seq_len": [stats.seq_len_before, stats.seq_len_after],
            "prefill_time_ratio_median": statistics.median(ratios),
            "prefill_time_ratio_min_max": [min(ratios), max(ratios)],
            "scoring_share_of_full_prefill": statistics.median(s / f for s, f in zip(scoring, full)),
            "kv_cache_ratio": stats.kv_cache_ratio, "prefill_flops_ratio": stats.prefill_flops_ratio,
            "repeats": args.repeats, "layers": args.layers, "threads": torch.get_num_threads(),
        })
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)
    print("| ratio | visual tokens | kept | seq len |"
          " forward time incl. vision + scoring (pruned/full, median [min-max]) | FLOPs ratio |"
          " KV cache ratio | scoring / full prefill |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["prefill_time_ratio_min_max"]
        print(f"| {r['ratio']} | {r['visual_tokens']} | {r['kept']} | {r['seq_len'][0]}->{r['seq_len'][1]} | "
              f"{r['prefill_time_ratio_median']:.3f} [{lo:.3f}-{hi:.3f}] | {r['prefill_flops_ratio']:.3f} | "
              f"{r['kv_cache_ratio']:.3f} | {r['scoring_share_of_full_prefill']:.4f} |")


if __name__ == "__main__":
    main()
