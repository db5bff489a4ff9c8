#!/usr/bin/env bash
# One language of LLaVA-Bench (In-the-Wild): answer with the model, judge against the reference, summarise.
#
# Usage: bash scripts/eval/llavabench.sh IMAGES MODEL QUESTIONS ANSWERS CONTEXT OUTPUT_DIR OUTPUT_FILE
#   IMAGES      folder of the bench images
#   MODEL       checkpoint folder or hub id
#   QUESTIONS   question(s).jsonl
#   ANSWERS     reference answers (answers.jsonl / answers_gpt4.jsonl), judged as Assistant 1
#   CONTEXT     context.jsonl (image descriptions for the judge)
#   OUTPUT_DIR  answers go to OUTPUT_DIR/OUTPUT_FILE.jsonl, reviews to OUTPUT_DIR/reviews/OUTPUT_FILE.jsonl
#   OUTPUT_FILE a name (a trailing .jsonl is dropped)
#
# Every step resumes: rerunning after an interruption redoes nothing that was finished.
# Environment (all optional):
#   PYTHON                     interpreter (default: python, else python3)
#   PALO_MODEL_BASE            --model-base for LoRA / stage-1 folders
#   PALO_EVAL_DEVICE           cuda, cuda:N, cpu (default: cuda when available)
#   PALO_EVAL_DTYPE            float16, bfloat16 or float32 (default: float16 on CUDA, as the original; else float32)
#   PALO_EVAL_GPUS             GPUs to answer on, one shard process each, e.g. 0,1,2,3 (default: every visible
#                              GPU: CUDA_VISIBLE_DEVICES, else all; none when PALO_EVAL_DEVICE picks one device);
#                              the shards are merged in question order, then judged once
#   PALO_EVAL_BATCH_SIZE       questions generated together (default 1)
#   PALO_EVAL_MAX_NEW_TOKENS   answer length limit (default 1024, as the original)
#   PALO_EVAL_IMAGE_PREPROCESS pad or crop (the original script); default: as the checkpoint was trained
#   PALO_EVAL_OVERWRITE        1: answer again the questions whose answers another checkpoint, other settings or
#                              an edited question file made (default: that language stops with an error saying so)
#   OPENAI_API_KEY             judge API key
#   OPENAI_BASE_URL / PALO_JUDGE_BASE_URL   OpenAI-compatible judge endpoint (default: OpenAI)
#   PALO_JUDGE_MODEL           judge model id (default gpt-4o)
#   PALO_JUDGE_RULE            an original rule.json (default: the built-in rubric)
#   PALO_JUDGE_PARALLEL        concurrent judge requests (default 4)
#   PALO_JUDGE_MAX_RETRIES     retries on 429 / 5xx / time-outs (default 5)
#   PALO_JUDGE_RETRY_DELAY     first backoff delay in seconds, doubled per retry (default 1)
#   PALO_JUDGE_CACHE           SQLite reply cache (default OUTPUT_DIR/reviews/judge_cache.sqlite)
set -euo pipefail

if [ "$#" -ne 7 ]; then
    echo "usage: bash $0 IMAGES MODEL QUESTIONS ANSWERS CONTEXT OUTPUT_DIR OUTPUT_FILE" >&2
    exit 2
fi

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/eval/common.sh
source "$SCRIPT_DIR/common.sh"

exec "$PYTHON" -m palo.eval.run_bench \
    --images "$1" --model-path "$2" --questions "$3" --answers "$4" --context "$5" \
    --output-dir "$6" --output-file "$7" \
    "${PALO_RUN_ARGS[@]}"
