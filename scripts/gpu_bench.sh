#!/usr/bin/env bash
# The generation benchmark on a lent GPU at MobilePALO-like and PALO-7B shapes (random weights, bf16).
set -u
OUT=${OUT:-./gpu-check}; mkdir -p "$OUT"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
for shape in mobile 7b; do
  timeout 200 python3 scripts/bench/generate.py --shape $shape --device cuda --dtype bfloat16 --batch 4 --prompt-len 64 \
      --new-tokens 32 --repeats 9 --json "$OUT/bench_$shape.json" 2>&1 | grep -v Warning | tee "$OUT/bench_$shape.txt"
done
