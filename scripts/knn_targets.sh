#!/usr/bin/env bash
# Search the kNN targets of every datastore row (pipeline step 4) with the released settings.
#   DSTORE      datastore directory (required)       OUT        output directory (required)
#   INDEX       index directory (default: $DSTORE/index)
#   VAL         optional second datastore whose keys are the queries instead (no self-exclusion)
#   NPROC       processes (default 1). On a machine without CUDA, N CPU processes are started with
#               `accelerate launch --multi_gpu` (torchrun); `--cpu` would start only one. With an index
#               built with SHARDS=N (scripts/build_index.sh), NPROC=N gives each process one shard.
#   K (1024)  KNN_TEMP (16)  PROBE (the index's own)  BATCH_SIZE (16000)
# Extra arguments go to knn_utils.saveKNNMulti (e.g. --knn_gpu, --max_targets 256). Rerun to resume.
set -euo pipefail
source "$(dirname "$0")/env.sh"

: "${DSTORE:?set DSTORE to a datastore directory}"
: "${OUT:?set OUT to the output directory}"
NPROC="${NPROC:-1}"
args=(--dstore_path "$DSTORE" --output_path "$OUT" ${INDEX:+--index_path "$INDEX"} ${VAL:+--val_path "$VAL"}
      --k "${K:-1024}" --knn_temp "${KNN_TEMP:-16}" ${PROBE:+--probe "$PROBE"} --batch_size "${BATCH_SIZE:-16000}"
      --ignore_first True "$@")
if [ "$NPROC" -gt 1 ]; then
    accelerate launch --multi_gpu --num_processes "$NPROC" --num_machines 1 --mixed_precision no \
        --dynamo_backend no -m knn_utils.saveKNNMulti "${args[@]}"
else
    python -m knn_utils.saveKNNMulti "${args[@]}"
fi
