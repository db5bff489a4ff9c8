#!/usr/bin/env bash
# Every open GPU target in one run that fits a short lent session (at most ~9 minutes, one command), most important
# first, each step cut to what is left of the deadline so a slow step cannot starve the ones after it of a clean stop:
#   1. engine vs model.generate at PALO-7B shapes, batches 1 and 32   (issue 11: >= 200 tok/s, TTFT <= 30 ms, >= 4,000)
#   2. training mix at MobilePALO shapes: padded / packed / rows with Liger, and transformers' Llava padded
#                                                                      (issue 12: >= 50 % MFU, padding < 2 %, memory)
#   3. engine vs model.generate at MobilePALO shapes, batch 1         (issue 11: >= 600 tok/s)
#   4. training mix at PALO-7B shapes, LoRA r128 + gradient checkpointing (issue 12: >= 9,000 real tokens/s)
#   5. the GPU-marked tests of the engine and model (CUDA graphs, Triton decode kernel, half precision)
#   6. the engine's host time per decode step on this machine's CPU
# Liger is not on the lent machine's image: before the run, `pip download liger-kernel==0.8.5 --no-deps -d .whl` here
# and pass `carry: [".whl"]`; without it step 2 and 4 run without --liger and say so. Results: $OUT (or ./gpu-check).
# GPU_SESSION_DRY_RUN=1 runs the same steps with the same flags on this CPU at tiny shapes, so a lent session never
# finds a broken step (tests/test_gpu_session.py does it).
set -u
OUT=${OUT:-./gpu-check}; mkdir -p "$OUT"
if [[ ${GPU_SESSION_DRY_RUN:-0} == 1 ]]; then
  ON="--device cpu --dtype float32"; BIG=tiny; MOBILE=tiny; SLACK=4  # a 2-core CPU, maybe shared: wider limits
  MIX_LEN="--model-max-length 512"  # the mixes' samples cut to fit: the same steps in under half the CPU time
  MIX_MOBILE=1; MIX_LORA=1  # timed steps of the mixes after the warm-up: one runs the same code as several
else
  ON="--device cuda --dtype bfloat16"; BIG=7b; MOBILE=mobile; SLACK=1; MIX_LEN=""; MIX_MOBILE=3; MIX_LORA=2
fi
DEADLINE=$(( $(date +%s) + ${GPU_SESSION_SECONDS:-540} ))
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [[ ${GPU_SESSION_DRY_RUN:-0} == 1 ]]; then echo "dry run on the CPU" > "$OUT/gpu.txt"
else nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"; fi
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
# What the steps import beyond torch/transformers/triton (the 2026-11 image lacked liger-kernel): a missing one
# fails its step, and this line says why. Carry its wheel in .whl (pip download --no-deps) if the image lacks it.
python3 -c "
import importlib.util as u
def has(m):
    try: return u.find_spec(m) is not None
    except ImportError: return False
print('modules:', ' '.join(m + ('' if has(m) else '=MISSING') for m in
      ('PIL', 'peft', 'accelerate', 'sentencepiece', 'google.protobuf', 'pytest', 'liger_kernel')))" | tee -a "$OUT/gpu.txt"
LIGER=""
if python3 -c "from palo.model.kernels import liger_available as a; import sys; sys.exit(0 if a()[0] else 1)"; then
  LIGER="--liger"
else
  echo "liger-kernel not importable: training mixes run without --liger" | tee -a "$OUT/gpu.txt"
fi

# step NAME SECONDS COMMAND...: run COMMAND for at most SECONDS, and never past the deadline.
step() {
  local name=$1 want=$(( $2 * SLACK )); shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  local limit=$(( want < left ? want : left ))
  if (( left < 20 )); then echo "## $name: skipped, ${left}s left" | tee -a "$OUT/summary.txt"; return; fi
  local start=$(date +%s)
  timeout "$limit" "$@" 2>&1 | grep -v Warning | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "## $name: rc $rc in $(( $(date +%s) - start ))s (limit ${limit}s)" | tee -a "$OUT/summary.txt"
}

step engine_7b 150 python3 scripts/bench/generate.py --shape $BIG $ON --batches 1 32 \
  --prompt-len 64 --new-tokens 64 --repeats 3 --json "$OUT/engine_7b.json"
step train_mix_mobile 170 python3 scripts/bench/train_step.py --workload llava665k --shape $MOBILE $ON \
  --batch 16 --repeats $MIX_MOBILE --packing-rows 6 $LIGER $MIX_LEN --llava-baseline --json "$OUT/train_mix_mobile.json"
step engine_mobile 60 python3 scripts/bench/generate.py --shape $MOBILE $ON --batches 1 \
  --prompt-len 64 --new-tokens 64 --repeats 3 --json "$OUT/engine_mobile.json"
step train_mix_7b_lora 120 python3 scripts/bench/train_step.py --workload llava665k --shape $BIG --lora \
  --gradient-checkpointing $ON --batch 8 --repeats $MIX_LORA --packing-rows 3 $LIGER $MIX_LEN \
  --json "$OUT/train_mix_7b_lora.json"
step pytest_gpu 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/engine tests/model
# 6. the engine's host time per decode step on this machine's CPU (decode forward stubbed; issue 11's 32 streams
#    leave 8 ms a step for everything): set against step 1's batch-32 decode step
step engine_host 60 python3 scripts/bench/engine_host.py --against none --streams 32 --tokens 128 1024 --rounds 1 \
  --json "$OUT/engine_host.json"
cat "$OUT/summary.txt"
