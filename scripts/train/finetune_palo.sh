#!/usr/bin/env bash
# Full fine-tuning (MobilePALO-1.7B), the original PALO command:
#   bash scripts/train/finetune_palo.sh BASE_LLM JSON_PATH PROJECTOR_BIN PROJECTOR_TYPE OUTPUT_DIR ZERO_LEVEL LR [extra flags]
# e.g. bash scripts/train/finetune_palo.sh "mtgv/MobileLLaMA-1.4B-Chat" data.json projector.bin "ldpnet" "results/PALO-1.7B" "2" "2e-5"
# Extra flags after the 7 arguments override the defaults below (the last occurrence of a flag wins).
# LAUNCHER overrides the launcher, e.g. LAUNCHER="torchrun --nproc_per_node 8" (default: deepspeed).
set -euo pipefail
if [ "$#" -lt 7 ]; then
  echo "usage: $0 BASE_LLM JSON_PATH PROJECTOR_BIN PROJECTOR_TYPE OUTPUT_DIR ZERO_LEVEL LR [extra flags]" >&2
  exit 2
fi
# No cd: relative paths (the arguments, --image_folder's ./data) are the caller's, as for any command; run from
# the repository root, as the original's README did, they name the same files as the original's.
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
export PYTHONPATH="$ROOT:${PYTHONPATH:-}"
${LAUNCHER:-deepspeed} "$ROOT/palo/train/train_mem.py" \
    --deepspeed "$ROOT/scripts/zero$6.json" \
    --model_name_or_path "$1" \
    --version v1 \
    --data_path "$2" \
    --image_folder ./data \
    --vision_tower openai/clip-vit-large-patch14-336 \
    --pretrain_mm_mlp_adapter "$3" \
    --mm_projector_type "$4" \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --image_aspect_ratio pad \
    --group_by_modality_length True \
    --bf16 True \
    --output_dir "$5" \
    --num_train_epochs 1 \
    --per_device_train_batch_size 16 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps 1 \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps 50000 \
    --save_total_limit 1 \
    --learning_rate "$7" \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type "cosine" \
    --logging_steps 1 \
    --tf32 True \
    --model_max_length 2048 \
    --gradient_checkpointing True \
    --dataloader_num_workers 4 \
    --lazy_preprocess True \
    --report_to none \
    "${@:8}"
