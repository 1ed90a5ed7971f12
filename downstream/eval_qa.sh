#!/usr/bin/env bash
# Closed-book QA (greedy; EM / F1 / contains, has_answer under webqa) with downstream.eval_qa.
#   MODEL    base model directory or hub name                          (required)
#   DATA     QA file, .json or .jsonl (NQ-open, TriviaQA, WebQuestions, PopQA, HaluEval layouts)   (required)
#   PROTOCOL released (NQ-open, HotpotQA), webqa (WebQuestions, TriviaQA) or default   (default: default);
#            nq, hotpotqa, webquestions, triviaqa: with the authors' lmbda, dtype and batch size for that set
#   OUT      output directory                                          (required)
#   MEMORY   the memory: adds --memory "$MEMORY"; the base alone is answered in the same run (optional)
#   LMBDA    weight(s) of the memory, e.g. "0.25 0.5" (default: the protocol's, else models/joint/settings.py's, 0.5)
#   MEMORY_TEMP  temperature of the memory's logits (default: models/joint/settings.py's, 1; KNN_TEMP, the released
#            name, is read too)
#   GGUF     GGUF file name inside $MODEL (optional)
#   BATCH    questions per batch (default: the protocol's, else 8)      MAX_SAMPLES (optional)
# Extra arguments go to downstream.eval_qa (e.g. --batch_stop, --num_shards 4 --shard_index 0, --num_fewshot 5
# --fewshot_file F).
set -euo pipefail
source "$(dirname "$0")/../scripts/env.sh"

: "${MODEL:?set MODEL to the base model}"
: "${DATA:?set DATA to a .json/.jsonl QA file}"
: "${OUT:?set OUT to the output directory}"
args=(--model_name_or_path "$MODEL" --data_file "$DATA" --output_dir "$OUT" --protocol "${PROTOCOL:-default}"
      ${BATCH:+--per_device_eval_batch_size "$BATCH"} ${GGUF:+--gguf_file "$GGUF"} ${MAX_SAMPLES:+--max_samples "$MAX_SAMPLES"})
if [ -n "${MEMORY:-}" ]; then
    # shellcheck disable=SC2206
    temp="${MEMORY_TEMP:-${KNN_TEMP:-}}"
    args+=(--memory "$MEMORY" ${LMBDA:+--lmbda $LMBDA} ${temp:+--memory_temp "$temp"})
fi
python -m downstream.eval_qa "${args[@]}" "$@"
