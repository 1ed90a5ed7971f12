#!/usr/bin/env bash
# Build the FAISS index of a datastore (pipeline step 3) with the released settings.
#   DSTORE      datastore directory (required; written by train_base --save_knnlm_dstore)
#   INDEX       index directory (default: $DSTORE/index)
#   NCENTROIDS  IVF lists (default 4096)     CODE_SIZE  PQ sub-quantizers (default 64)
#   PROBE       default nprobe (default 32)   TRAIN_SIZE training sample (default 1000000)
#   INDEX_TYPE  auto | ivfpq | flat (default auto: flat for datastores too small for NCENTROIDS)
#   SHARDS      index shards (default 1): one index per contiguous row range, searched by SHARDS processes
#               (NPROC=SHARDS bash scripts/knn_targets.sh) or by one process shard after shard
# Extra arguments go to knn_utils.build_index (e.g. --knn_gpu). Rerun the same command to resume.
set -euo pipefail
source "$(dirname "$0")/env.sh"

: "${DSTORE:?set DSTORE to a datastore directory}"
python -m knn_utils.build_index --dstore_path "$DSTORE" ${INDEX:+--index_path "$INDEX"} \
    --index_type "${INDEX_TYPE:-auto}" --ncentroids "${NCENTROIDS:-4096}" --code_size "${CODE_SIZE:-64}" \
    --probe "${PROBE:-32}" --train_size "${TRAIN_SIZE:-1000000}" --num_keys_to_add_at_a_time 1000000 \
    --index_shards "${SHARDS:-1}" "$@"
