#!/usr/bin/env bash
# One short run on a lent GPU machine (about 8 minutes): the GPU tests under that machine's torch/transformers
# (model loading, the engine's CUDA graphs and its Triton decode kernel), then the engine against model.generate at
# MobilePALO and PALO-7B shapes (random weights, bf16; batches 1, 8, 32). Writes logs to $OUT (or ./gpu-check).
# The comparison with transformers' Llava is scripts/gpu_bench.sh; training is scripts/gpu_check_train.sh.
set -u
OUT=${OUT:-./gpu-check}; mkdir -p "$OUT"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/model tests/engine 2>&1 | tail -25 | tee "$OUT/pytest.txt"
for shape in mobile 7b; do
  timeout 150 python3 scripts/bench/generate.py --shape $shape --device cuda --dtype bfloat16 --batches 1 8 32 \
      --prompt-len 64 --new-tokens 64 --repeats 3 --json "$OUT/engine_$shape.json" 2>&1 | grep -v Warning \
      | tee "$OUT/engine_$shape.txt"
done
