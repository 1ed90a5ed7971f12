#!/usr/bin/env bash
# Closed-book QA (greedy; EM / F1 / contains, has_answer under webqa) with downstream.eval_qa.
#   MODEL    base model directory or hub name                          (required)
#   DATA     QA file, .json or .jsonl (NQ-open, TriviaQA, WebQuestions, PopQA, HaluEval layouts)   (required)
#   PROTOCOL released (NQ-open, HotpotQA), webqa (WebQuestions, TriviaQA) or default   (default: default);
#            nq, hotpotqa, webquestions, triviaqa: with the authors' lmbda, dtype and batch size for that set
#   OUT      output directory                                          (required)
#   MEMORY   MLP memory directory: adds --use_neural_knn --knn_generator_path "$MEMORY" (optional)
#   LMBDA    weight of the memory (default: the protocol's, else 0.5)   KNN_TEMP (default 1.0)
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
    args+=(--use_neural_knn --knn_generator_path "$MEMORY" ${LMBDA:+--lmbda "$LMBDA"} --knn_temp "${KNN_TEMP:-1.0}")
fi
python -m downstream.eval_qa "${args[@]}" "$@"
