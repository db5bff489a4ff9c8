#!/usr/bin/env bash
# LoRA fine-tuning (PALO-7B / PALO-13B), the original PALO command:
#   bash scripts/train/finetune_lora_palo.sh BASE_LLM JSON_PATH PROJECTOR_BIN PROJECTOR_TYPE OUTPUT_DIR ZERO_LEVEL LR [extra flags]
# e.g. bash scripts/train/finetune_lora_palo.sh "lmsys/vicuna-7b-v1.5" data.json mm_projector.bin "mlp2x_gelu" "results/PALO-7B" "3" "2e-4"
# The full fine-tuning command plus PALO's LoRA settings (r 128, alpha 256, projector LR 2e-5).
set -euo pipefail
if [ "$#" -lt 7 ]; then
  echo "usage: $0 BASE_LLM JSON_PATH PROJECTOR_BIN PROJECTOR_TYPE OUTPUT_DIR ZERO_LEVEL LR [extra flags]" >&2
  exit 2
fi
exec bash "$(dirname "$0")/finetune_palo.sh" "${@:1:7}" \
    --lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 \
    "${@:8}"
