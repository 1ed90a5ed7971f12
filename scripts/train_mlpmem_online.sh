#!/usr/bin/env bash
# Train an MLP memory on hidden states computed on the fly by the frozen base model (pipeline step 5, online
# mode; no saved keys needed), released settings by default.
#   MODEL        base model (hub name or directory)                                (required)
#   DATASET      preprocessed dataset (utils/preprocess_dataset.py)                (required)
#   KNN_TARGETS  kNN target directory of the rows of $SPLIT (knn_utils.saveKNNMulti) (required)
#   OUT          output directory of the memory                                    (required)
#   SPLIT (train)  SIZE (preset --base_model_name; default: as many parameters as the base model)
#   NPROC (1)  ALPHA (0.5)  LR (5e-4)  EPOCHS (50)  WARMUP (2000, or 10% of a shorter run)  BATCH (8 windows per device)  SEED (42)
#   NPROC > 1 starts data-parallel processes with `accelerate launch --multi_gpu` (gloo without CUDA).
# Extra arguments go to train_mlpmem_online (e.g. --torch_dtype bfloat16 --init_lm_head).
# Rerun the same command to resume from the newest checkpoint in $OUT.
set -euo pipefail
source "$(dirname "$0")/env.sh"

: "${MODEL:?set MODEL to the base model}"
: "${DATASET:?set DATASET to a preprocessed dataset directory}"
: "${KNN_TARGETS:?set KNN_TARGETS to a kNN target directory}"
: "${OUT:?set OUT to the output directory}"
NPROC="${NPROC:-1}"
args=(--model_name_or_path "$MODEL" --dataset_name "$DATASET" --dataset_split_name "${SPLIT:-train}"
      --knn_save_path "$KNN_TARGETS" --output_dir "$OUT" ${SIZE:+--base_model_name "$SIZE"} --alpha "${ALPHA:-0.5}"
      --learning_rate "${LR:-5e-4}" --lr_scheduler_type linear --num_train_epochs "${EPOCHS:-50}"
      ${WARMUP:+--num_warmup_steps "$WARMUP"} --per_device_train_batch_size "${BATCH:-8}" --seed "${SEED:-42}" "$@")
if [ "$NPROC" -gt 1 ]; then
    accelerate launch --multi_gpu --num_processes "$NPROC" --num_machines 1 --mixed_precision no \
        --dynamo_backend no -m train_mlpmem_online "${args[@]}"
else
    python -m train_mlpmem_online "${args[@]}"
fi
