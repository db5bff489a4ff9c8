#!/usr/bin/env bash
# One short run on a lent GPU machine: the suite under that machine's torch/transformers (GPU tests included),
# then the generation benchmark at PALO-7B shapes (random weights, bf16) against transformers' Llava.
# Writes logs to $OUT (or ./gpu-check) so they come back.
set -u
OUT=${OUT:-./gpu-check}; mkdir -p "$OUT"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/model tests/engine tests/test_mm_utils.py tests/test_conversation.py 2>&1 | tail -25 | tee "$OUT/pytest.txt"
timeout 120 python3 scripts/bench/generate.py --baseline llava --shape mobile --device cuda --dtype bfloat16 --batch 4 --prompt-len 64 \
    --new-tokens 32 --repeats 5 --json "$OUT/bench_mobile.json" 2>&1 | grep -v Warning | tee "$OUT/bench_mobile.txt"
timeout 240 python3 scripts/bench/generate.py --baseline llava --shape 7b --device cuda --dtype bfloat16 --batch 4 --prompt-len 64 \
    --new-tokens 32 --repeats 5 --json "$OUT/bench_7b.json" 2>&1 | grep -v Warning | tee "$OUT/bench_7b.txt"
