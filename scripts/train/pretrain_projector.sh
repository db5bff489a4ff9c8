#!/usr/bin/env bash
# Stage 1: train only the projector on image-caption pairs (LLaVA-1.5's recipe; PALO used released projectors).
#   bash scripts/train/pretrain_projector.sh BASE_LLM JSON_PATH IMAGE_FOLDER PROJECTOR_TYPE OUTPUT_DIR ZERO_LEVEL LR [extra flags]
# Writes OUTPUT_DIR/mm_projector.bin for --pretrain_mm_mlp_adapter of the fine-tuning scripts.
set -euo pipefail
if [ "$#" -lt 7 ]; then
  echo "usage: $0 BASE_LLM JSON_PATH IMAGE_FOLDER PROJECTOR_TYPE OUTPUT_DIR ZERO_LEVEL LR [extra flags]" >&2
  exit 2
fi
# No cd: relative paths (the arguments, --image_folder's ./data) are the caller's, as for any command; run from
# the repository root, as the original's README did, they name the same files as the original's.
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
export PYTHONPATH="$ROOT:${PYTHONPATH:-}"
${LAUNCHER:-deepspeed} "$ROOT/palo/train/train_mem.py" \
    --deepspeed "$ROOT/scripts/zero$6.json" \
    --model_name_or_path "$1" \
    --version plain \
    --data_path "$2" \
    --image_folder "$3" \
    --vision_tower openai/clip-vit-large-patch14-336 \
    --mm_projector_type "$4" \
    --tune_mm_mlp_adapter True \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --bf16 True \
    --output_dir "$5" \
    --num_train_epochs 1 \
    --per_device_train_batch_size 32 \
    --gradient_accumulation_steps 1 \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps 24000 \
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
