#!/usr/bin/env bash
# Generation benchmarks on a lent GPU (random weights, bf16): the engine against model.generate at MobilePALO and
# PALO-7B shapes (batches 1, 8, 32), then PALO against transformers' Llava (batch 1 and 4).
set -u
OUT=${OUT:-./gpu-check}; mkdir -p "$OUT"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
for shape in mobile 7b; do
  timeout 240 python3 scripts/bench/generate.py --shape $shape --device cuda --dtype bfloat16 --batches 1 8 32 \
      --prompt-len 64 --new-tokens 64 --repeats 3 --json "$OUT/engine_$shape.json" 2>&1 | grep -v Warning \
      | tee "$OUT/engine_$shape.txt"
done
for shape in mobile 7b; do
  timeout 200 python3 scripts/bench/generate.py --baseline llava --shape $shape --device cuda --dtype bfloat16 --batch 4 \
      --prompt-len 64 --new-tokens 32 --repeats 9 --json "$OUT/bench_$shape.json" 2>&1 | grep -v Warning \
      | tee "$OUT/bench_$shape.txt"
done
