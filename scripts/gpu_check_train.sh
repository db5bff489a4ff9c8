#!/usr/bin/env bash
# Short GPU session: the CUDA tests (half precision, 4/8-bit through bitsandbytes carried as a wheel in .whl/),
# then the training-step benchmark at PALO-7B shapes with LoRA in bf16 against transformers' Llava.
set -u
OUT=${OUT:-./gpu-check}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/model/test_cuda.py 2>&1 | tail -15 | tee "$OUT/pytest_cuda.txt"
timeout 100 python3 scripts/bench/train_step.py --shape 7b --lora --gradient-checkpointing --device cuda --dtype bfloat16 \
    --batch 2 --repeats 3 --json "$OUT/train_step_7b_lora.json" 2>&1 | grep -v Warning | tail -8 | tee "$OUT/train_step_7b_lora.txt"
# Packing on a LLaVA-665K-like mix at MobilePALO shapes: padded vs --packing vs --packing_rows (issue targets: 50 % MFU,
# padding under 2 %, peak memory no higher than padded).
timeout 240 python3 scripts/bench/train_step.py --workload llava665k --shape mobile --device cuda --dtype bfloat16 \
    --batch 16 --repeats 4 --packing-rows 6 --json "$OUT/train_step_mobile_mix.json" 2>&1 | grep -v Warning | tail -10 \
    | tee "$OUT/train_step_mobile_mix.txt"
