# Sourced by the eval scripts: the interpreter, the import path, and the settings taken from the environment
# (documented in llavabench.sh) as flags of `python -m palo.eval.run_bench`, in the array PALO_RUN_ARGS.

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-$(command -v python || command -v python3)}

PALO_RUN_ARGS=(
    --conv-mode vicuna_v1
    --temperature 0
    --batch-size "${PALO_EVAL_BATCH_SIZE:-1}"
    --max-new-tokens "${PALO_EVAL_MAX_NEW_TOKENS:-1024}"
    --parallel "${PALO_JUDGE_PARALLEL:-4}"
    --max-retries "${PALO_JUDGE_MAX_RETRIES:-5}"
    --retry-base-delay "${PALO_JUDGE_RETRY_DELAY:-1}"
    --gpus "${PALO_EVAL_GPUS:-auto}"
)
[ -n "${PALO_EVAL_IMAGE_PREPROCESS:-}" ] && PALO_RUN_ARGS+=(--image-preprocess "$PALO_EVAL_IMAGE_PREPROCESS")
[ -n "${PALO_MODEL_BASE:-}" ] && PALO_RUN_ARGS+=(--model-base "$PALO_MODEL_BASE")
[ -n "${PALO_EVAL_DEVICE:-}" ] && PALO_RUN_ARGS+=(--device "$PALO_EVAL_DEVICE")
[ -n "${PALO_EVAL_DTYPE:-}" ] && PALO_RUN_ARGS+=(--dtype "$PALO_EVAL_DTYPE")
[ "${PALO_EVAL_OVERWRITE:-0}" = 1 ] && PALO_RUN_ARGS+=(--overwrite)
[ -n "${PALO_JUDGE_MODEL:-}" ] && PALO_RUN_ARGS+=(--judge-model "$PALO_JUDGE_MODEL")
JUDGE_URL=${PALO_JUDGE_BASE_URL:-${OPENAI_BASE_URL:-}}
[ -n "$JUDGE_URL" ] && PALO_RUN_ARGS+=(--judge-base-url "$JUDGE_URL")
[ -n "${PALO_JUDGE_RULE:-}" ] && PALO_RUN_ARGS+=(--rule "$PALO_JUDGE_RULE")
[ -n "${PALO_JUDGE_CACHE:-}" ] && PALO_RUN_ARGS+=(--cache "$PALO_JUDGE_CACHE")
true  # the last test above may be false; a sourced file must not end the caller under `set -e`
