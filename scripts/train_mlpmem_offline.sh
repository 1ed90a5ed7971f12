#!/usr/bin/env bash
# Train an MLP memory on the saved datastore keys (pipeline step 5, offline mode), released settings by default.
#   DSTORE       datastore directory (train_base --save_knnlm_dstore)              (required)
#   KNN_TARGETS  kNN target directory of the same rows (knn_utils.saveKNNMulti)    (required)
#   OUT          output directory of the memory                                    (required)
#   MODEL        base model (default: the one recorded in $DSTORE/meta.json)
#   SIZE         memory size preset, --base_model_name: tiny small med large llama2 llama3 mistral
#                (default: as many parameters as the base model)
#   NPROC (1)  ALPHA (0.5)  LR (5e-4)  EPOCHS (50)  WARMUP (2000, or 10% of a shorter run)  BATCH (1024 rows per device)  SEED (42)
#   NPROC > 1 starts data-parallel processes with `accelerate launch --multi_gpu` (gloo on a machine
#   without CUDA; `--cpu` would start only one process).
# Extra arguments go to train_mlpmem_offline (e.g. --num_layers 2 --init_lm_head --validation_rows 5000).
# Rerun the same command to resume from the newest checkpoint in $OUT.
set -euo pipefail
source "$(dirname "$0")/env.sh"

: "${DSTORE:?set DSTORE to a datastore directory}"
: "${KNN_TARGETS:?set KNN_TARGETS to a kNN target directory}"
: "${OUT:?set OUT to the output directory}"
NPROC="${NPROC:-1}"
args=(--knn_dstore_path "$DSTORE" --knn_save_path "$KNN_TARGETS" --output_dir "$OUT" ${MODEL:+--model_name_or_path "$MODEL"}
      ${SIZE:+--base_model_name "$SIZE"} --alpha "${ALPHA:-0.5}" --learning_rate "${LR:-5e-4}" --lr_scheduler_type linear
      --num_train_epochs "${EPOCHS:-50}" ${WARMUP:+--num_warmup_steps "$WARMUP"} --per_device_train_batch_size "${BATCH:-1024}"
      --seed "${SEED:-42}" "$@")
if [ "$NPROC" -gt 1 ]; then
    accelerate launch --multi_gpu --num_processes "$NPROC" --num_machines 1 --mixed_precision no \
        --dynamo_backend no -m train_mlpmem_offline "${args[@]}"
else
    python -m train_mlpmem_offline "${args[@]}"
fi
