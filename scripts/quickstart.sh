#!/usr/bin/env bash
# The whole pipeline on the embedded default corpus, on CPU, in a few minutes:
#   embedded corpus -> preprocess -> base model (trained from scratch) -> evaluation -> datastore
#   -> FAISS index -> kNN targets -> kNN-LM evaluation -> MLP memory trained on the kNN targets
#   -> base + memory evaluation (a sweep over lmbda)
# Every stage writes a self-describing directory under $OUT and is skipped when that directory is
# already complete, so an interrupted run picks up where it stopped.
#   OUT            output directory (default: outputs/quickstart)
#   BASE_EPOCHS    training epochs of the tiny base model (default: 3)
#   K, KNN_TEMP, LMBDA   kNN settings (defaults: 64, 10, 0.25)
set -euo pipefail
source "$(dirname "$0")/env.sh"

OUT="${OUT:-outputs/quickstart}"
BASE_EPOCHS="${BASE_EPOCHS:-3}"
K="${K:-64}"
KNN_TEMP="${KNN_TEMP:-10}"
LMBDA="${LMBDA:-0.25}"
BLOCK=256
STRIDE=128
mkdir -p "$OUT"
start=$(date +%s)

# Run a stage unless the file that marks it complete exists.
stage() {
    local name="$1" done_file="$2"; shift 2
    if [ -e "$done_file" ]; then
        echo "== $name: already done ($done_file)"
        return
    fi
    echo "== $name"
    local t0; t0=$(date +%s)
    "$@"
    echo "== $name took $(( $(date +%s) - t0 )) s"
}

stage "embedded corpus" "$OUT/corpus/meta.json" \
    python -m utils.embedded_corpus --output_dir "$OUT/corpus"

stage "preprocess" "$OUT/dataset/meta.json" \
    python -m utils.preprocess_dataset --tokenizer_path "$OUT/corpus/tokenizer" \
        --train_file "$OUT/corpus/train.txt" --validation_file "$OUT/corpus/validation.txt" \
        --test_file "$OUT/corpus/test.txt" --block_size $BLOCK --stride $STRIDE --output_dir "$OUT/dataset"

stage "train the base model" "$OUT/base/train_results.json" \
    python -m train_base --model_type gpt2 --tokenizer_name "$OUT/corpus/tokenizer" \
        --config_overrides n_layer=2,n_embd=128,n_head=4,n_positions=$BLOCK \
        --dataset_name "$OUT/dataset" --do_train --num_train_epochs "$BASE_EPOCHS" \
        --per_device_train_batch_size 8 --learning_rate 2e-3 --warmup_steps 20 --lr_scheduler_type cosine \
        --weight_decay 0.01 --save_strategy no --logging_steps 50 --seed 0 --report_to none \
        --disable_tqdm true --output_dir "$OUT/base"

stage "evaluate the base model on test" "$OUT/eval_base_test/eval_results.json" \
    python -m train_base --model_name_or_path "$OUT/base" --dataset_name "$OUT/dataset" --do_eval \
        --eval_subset test --per_device_eval_batch_size 16 --report_to none --output_dir "$OUT/eval_base_test"

stage "datastore over train" "$OUT/dstore/meta.json" \
    python -m train_base --model_name_or_path "$OUT/base" --dataset_name "$OUT/dataset" --do_eval \
        --eval_subset train --per_device_eval_batch_size 16 --report_to none --output_dir "$OUT/eval_base_train" \
        --save_knnlm_dstore --dstore_dir "$OUT/dstore"

stage "FAISS index (exact: the datastore is small)" "$OUT/dstore/index/meta.json" \
    python -m knn_utils.build_index --dstore_path "$OUT/dstore" --index_type flat

stage "kNN targets of every datastore row" "$OUT/knn_targets/meta.json" \
    python -m knn_utils.saveKNNMulti --dstore_path "$OUT/dstore" --output_path "$OUT/knn_targets" \
        --k "$K" --knn_temp "$KNN_TEMP" --ignore_first True

stage "kNN-LM on test" "$OUT/eval_knnlm_test/knnlm_results.json" \
    python -m knn_utils.knnlm --model_name_or_path "$OUT/base" --dataset_name "$OUT/dataset" --eval_subset test \
        --dstore_dir "$OUT/dstore" --k "$K" --knn_temp "$KNN_TEMP" --lmbda "$LMBDA" \
        --per_device_eval_batch_size 16 --output_dir "$OUT/eval_knnlm_test"

stage "MLP memory (offline: datastore keys -> kNN targets)" "$OUT/memory/meta.json" \
    python -m train_mlpmem_offline --knn_dstore_path "$OUT/dstore" --knn_save_path "$OUT/knn_targets" \
        --output_dir "$OUT/memory" --num_train_epochs 8 --num_warmup_steps 50 --learning_rate 5e-3 \
        --disable_tqdm true

stage "base + memory on test" "$OUT/eval_joint_test/joint_results.json" \
    python -m evaluate_joint --do_test --model_name_or_path "$OUT/base" --dataset_name "$OUT/dataset" \
        --dataset_split_name test --per_device_eval_batch_size 16 --output_dir "$OUT/eval_joint_test" \
        --knn_temp 1 --lmbda 0.25 0.5 0.75 --knn_generator_path "$OUT/memory" --report_to none

python -m utils.summary --output_dir "$OUT"
echo "Quickstart finished in $(( $(date +%s) - start )) s; everything is under $OUT"
