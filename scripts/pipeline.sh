#!/usr/bin/env bash
# The MLP Memory pipeline for any base model and corpus, one stage after another:
#   preprocess -> base perplexity -> datastore over train -> FAISS index -> kNN targets
#   -> kNN-LM perplexity -> MLP memory (offline) -> base + memory perplexity (a sweep over lmbda)
# Every stage writes a self-describing directory under $OUT and is skipped when that directory is
# already complete, so an interrupted run picks up where it stopped. Settings come from the
# environment; the real run on SmolLM2-135M + WikiText-2 is scripts/configs/smollm2_wikitext2.sh:
#     bash scripts/pipeline.sh scripts/configs/smollm2_wikitext2.sh
#
#   OUT               output directory (required)
#   MODEL             base model: a directory or hub name (required)
#   GGUF_FILE         GGUF file inside MODEL, for quantised checkpoints (optional)
#   TOKENIZER         tokenizer directory/hub name (default: MODEL)
#   TRAIN_FILE VALIDATION_FILE TEST_FILE   local text files (or DATASET_NAME [DATASET_CONFIG] for the hub)
#   DATASET           an existing preprocessed dataset directory: skips preprocessing
#   MAX_CHARS         keep the first N characters of each split (default: everything)
#   BLOCK STRIDE      windows (default 1024 / 512)
#   EVAL_SPLIT        split the perplexities are reported on (default: test)
#   EVAL_WINDOWS      evaluate only the first N windows of EVAL_SPLIT (default: all)
#   EVAL_BATCH        windows per forward pass (default 8)
#   INDEX_TYPE        auto | flat | ivfpq (default auto), with NCENTROIDS CODE_SIZE PROBE for ivfpq
#   K KNN_TEMP LMBDA  kNN targets and kNN-LM settings (defaults 64, 16, 0.25); KNN_TEMP is the temperature
#                     of the kNN distribution over neighbour distances, softmax(-d / KNN_TEMP)
#   KNNLM_LMBDAS      lmbda values of the kNN-LM, all scored in one pass (default: LMBDA)
#   KNNLM_SPLITS      splits the kNN-LM runs on (default: EVAL_SPLIT; "validation $EVAL_SPLIT" to choose
#                     its lmbda on validation, as the memory's is)
#   KNN_TARGETS       existing kNN targets to train the memory on (a retriever that shares the
#                     tokenizer and the train rows); skips the index, the search and the kNN-LM stage
#   MEMORY_ARGS       extra flags of train_mlpmem_offline (size, epochs, learning rate ...)
#   JOINT_LMBDAS      lmbda values of the base + memory sweep (default "0.25 0.5 0.75")
#   JOINT_SPLITS      splits the sweep runs on (default "validation $EVAL_SPLIT": choose on validation)
#   MEMORY_TEMP       temperature of the memory's logits in the interpolation (--memory_temp, default 1)
#   NPROC             processes for the datastore and the kNN search (default 1)
#   KNN_GPU           1: the kNN search and the kNN-LM search on the GPU (--knn_gpu: faiss-gpu, or with faiss-cpu
#                     an exact torch search for a flat index); default 0, the CPU
set -euo pipefail
if [ $# -ge 1 ]; then
    # shellcheck disable=SC1090
    source "$1"
fi
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

: "${OUT:?set OUT to the output directory}"
: "${MODEL:?set MODEL to the base model (a directory or hub name)}"
BLOCK="${BLOCK:-1024}"
STRIDE="${STRIDE:-512}"
EVAL_SPLIT="${EVAL_SPLIT:-test}"
EVAL_BATCH="${EVAL_BATCH:-8}"
INDEX_TYPE="${INDEX_TYPE:-auto}"
K="${K:-64}"
KNN_TEMP="${KNN_TEMP:-16}"
LMBDA="${LMBDA:-0.25}"
JOINT_LMBDAS="${JOINT_LMBDAS:-0.25 0.5 0.75}"
MEMORY_TEMP="${MEMORY_TEMP:-1}"
JOINT_SPLITS="${JOINT_SPLITS:-validation $EVAL_SPLIT}"
KNNLM_LMBDAS="${KNNLM_LMBDAS:-$LMBDA}"
KNNLM_SPLITS="${KNNLM_SPLITS:-$EVAL_SPLIT}"
NPROC="${NPROC:-1}"
KNN_GPU="${KNN_GPU:-0}"
DATASET="${DATASET:-$OUT/dataset}"
mkdir -p "$OUT"
start=$(date +%s)

model_flags=(--model_name_or_path "$MODEL" ${GGUF_FILE:+--gguf_file "$GGUF_FILE"})
eval_limit=(${EVAL_WINDOWS:+--max_eval_samples "$EVAL_WINDOWS"})
knn_gpu_flag=()
if [ "$KNN_GPU" = 1 ]; then
    knn_gpu_flag=(--knn_gpu)
fi

# Several processes through accelerate (on CPU: --multi_gpu starts N gloo processes).
launch() {
    if [ "$NPROC" -gt 1 ]; then
        accelerate launch --multi_gpu --num_processes "$NPROC" --num_machines 1 --mixed_precision no \
            --dynamo_backend no -m "$@"
    else
        python -m "$@"
    fi
}

corpus_flags=()
if [ -n "${DATASET_NAME:-}" ]; then
    corpus_flags=(--dataset_name "$DATASET_NAME" ${DATASET_CONFIG:+--dataset_config_name "$DATASET_CONFIG"})
else
    corpus_flags=(${TRAIN_FILE:+--train_file "$TRAIN_FILE"} ${VALIDATION_FILE:+--validation_file "$VALIDATION_FILE"}
                  ${TEST_FILE:+--test_file "$TEST_FILE"})
fi
stage "preprocess" "$DATASET/meta.json" \
    python -m utils.preprocess_dataset --tokenizer_path "${TOKENIZER:-$MODEL}" ${GGUF_FILE:+--gguf_file "$GGUF_FILE"} \
        "${corpus_flags[@]}" ${MAX_CHARS:+--max_chars "$MAX_CHARS"} --block_size "$BLOCK" --stride "$STRIDE" \
        --output_dir "$DATASET"

stage "base model on $EVAL_SPLIT" "$OUT/eval_base_$EVAL_SPLIT/eval_results.json" \
    python -m train_base "${model_flags[@]}" --dataset_name "$DATASET" --do_eval --eval_subset "$EVAL_SPLIT" \
        "${eval_limit[@]}" --per_device_eval_batch_size "$EVAL_BATCH" --report_to none \
        --output_dir "$OUT/eval_base_$EVAL_SPLIT"

stage "datastore over train" "$OUT/dstore/meta.json" \
    launch train_base "${model_flags[@]}" --dataset_name "$DATASET" --do_eval --eval_subset train \
        --per_device_eval_batch_size "$EVAL_BATCH" --report_to none --output_dir "$OUT/eval_base_train" \
        --save_knnlm_dstore --dstore_dir "$OUT/dstore"

if [ -z "${KNN_TARGETS:-}" ]; then
    KNN_TARGETS="$OUT/knn_targets"
    stage "FAISS index ($INDEX_TYPE)" "$OUT/dstore/index/meta.json" \
        python -m knn_utils.build_index --dstore_path "$OUT/dstore" --index_type "$INDEX_TYPE" \
            ${NCENTROIDS:+--ncentroids "$NCENTROIDS"} ${CODE_SIZE:+--code_size "$CODE_SIZE"} ${PROBE:+--probe "$PROBE"}

    stage "kNN targets of every datastore row" "$KNN_TARGETS/meta.json" \
        launch knn_utils.saveKNNMulti --dstore_path "$OUT/dstore" --output_path "$KNN_TARGETS" \
            --k "$K" --knn_temp "$KNN_TEMP" --ignore_first True "${knn_gpu_flag[@]}"

    for split in $KNNLM_SPLITS; do
        # shellcheck disable=SC2086
        stage "kNN-LM on $split" "$OUT/eval_knnlm_$split/knnlm_results.json" \
            python -m knn_utils.knnlm "${model_flags[@]}" --dataset_name "$DATASET" --eval_subset "$split" \
                "${eval_limit[@]}" --dstore_dir "$OUT/dstore" --k "$K" --knn_temp "$KNN_TEMP" --lmbda $KNNLM_LMBDAS \
                --per_device_eval_batch_size "$EVAL_BATCH" --output_dir "$OUT/eval_knnlm_$split" "${knn_gpu_flag[@]}"
    done
fi

# shellcheck disable=SC2086
stage "MLP memory (offline: datastore keys -> kNN targets)" "$OUT/memory/meta.json" \
    python -m train_mlpmem_offline --knn_dstore_path "$OUT/dstore" --knn_save_path "$KNN_TARGETS" \
        --output_dir "$OUT/memory" ${MEMORY_ARGS:-}

# The sweep runs on every split of JOINT_SPLITS: pick lmbda on validation, report it on test.
for split in $JOINT_SPLITS; do
    # shellcheck disable=SC2086
    stage "base + memory on $split" "$OUT/eval_joint_$split/joint_results.json" \
        python -m evaluate_joint "${model_flags[@]}" --dataset_name "$DATASET" --dataset_split_name "$split" \
            "${eval_limit[@]}" --per_device_eval_batch_size "$EVAL_BATCH" --output_dir "$OUT/eval_joint_$split" \
            --memory_temp "$MEMORY_TEMP" --lmbda $JOINT_LMBDAS --memory "$OUT/memory" --report_to none
done

echo "Pipeline finished in $(( $(date +%s) - start )) s; everything is under $OUT"
