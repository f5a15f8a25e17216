#!/usr/bin/env bash
# Toy-world accuracy of every method at 100 / 50 / 25 / 12.5% retention, for the shipped world models
# (skipped with a message while hf_tokenprune/world/assets has none). Re-running resumes.
set -euo pipefail
out=${1:-benchmarks/results}
export OMP_NUM_THREADS=1
hf-tokenprune bench --part accuracy --samples 200 --threads 1 --out "$out"
