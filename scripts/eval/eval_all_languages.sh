#!/usr/bin/env bash
# The multilingual LLaVA-Bench (In-the-Wild) for every PALO language, then one table across languages.
#
# Usage: bash scripts/eval/eval_all_languages.sh MODEL_PATH OUTPUT_NAME OPENAI_API_KEY
#   (pass "-" as the key to keep $OPENAI_API_KEY from the environment)
#
# Reads MULTILINGUAL_LLAVA_BENCH_PATH (default data/multilingual-llava-bench-in-the-wild) in either layout:
#   <language>/{question.jsonl, answers.jsonl, context.jsonl}           (README / Hugging Face)
#   <language>/corrected/{...}, english/{questions,answers_gpt4}.jsonl  (the original script)
# with the images in <bench>/images. Writes, under PALO_EVAL_OUTPUT_DIR (default evaluation):
#   <NAME>_<Language>.jsonl          model answers
#   reviews/<NAME>_<Language>.jsonl  judge reviews
#   <NAME>_summary.{md,csv,json,png} the table across languages and its bar chart
# PALO_LANGUAGES="english arabic" limits the languages (default: every PALO language in the bench folder).
# The model is loaded once for all languages (once per GPU with several GPUs: each answers a slice of every
# language, see PALO_EVAL_GPUS). Rerunning the same command resumes where it stopped, shard by shard.
# Generation and judge settings: the environment variables listed in scripts/eval/llavabench.sh.
set -euo pipefail

if [ "$#" -ne 3 ]; then
    echo "usage: bash $0 MODEL_PATH OUTPUT_NAME OPENAI_API_KEY" >&2
    exit 2
fi
if [ "$3" != "-" ]; then
    export OPENAI_API_KEY=$3
fi

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/eval/common.sh
source "$SCRIPT_DIR/common.sh"

languages=()
if [ -n "${PALO_LANGUAGES:-}" ]; then
    read -r -a languages <<< "$PALO_LANGUAGES"
fi

exec "$PYTHON" -m palo.eval.run_bench \
    --model-path "$1" --name "$2" \
    --bench "${MULTILINGUAL_LLAVA_BENCH_PATH:-data/multilingual-llava-bench-in-the-wild}" \
    --output-dir "${PALO_EVAL_OUTPUT_DIR:-evaluation}" \
    ${languages[@]+--languages "${languages[@]}"} \
    "${PALO_RUN_ARGS[@]}"
