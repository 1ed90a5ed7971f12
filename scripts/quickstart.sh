#!/usr/bin/env bash
# The whole pipeline on the embedded default corpus, on CPU, in a few minutes:
#   embedded corpus -> preprocess -> base model (trained from scratch)
#   -> scripts/pipeline.sh: base evaluation, datastore, FAISS index, kNN targets, kNN-LM, MLP memory,
#      base + memory perplexity (kNN-LM and memory: lmbda swept on validation and on test)
#   -> closed-book QA with and without the memory (lmbda chosen on the validation questions)
#   -> yes/no questions and hallucination judgments about the test facts, after a few-shot prompt of train-only
#      facts, with and without the memory
#   -> a test question whose answer the memory corrects -> summary.json and a table
# Every stage writes a self-describing directory under $OUT and is skipped when that directory is
# already complete, so an interrupted run picks up where it stopped.
#   OUT            output directory (default: outputs/quickstart)
#   BASE_EPOCHS    training epochs of the tiny base model (default: 30)
#   K, KNN_TEMP    kNN settings (defaults: 64, 10)
#   JOINT_LMBDAS   lmbda values of the perplexity sweeps, memory and kNN-LM (default: "0.25 0.5 0.75")
#   QA_LMBDAS      lmbda values tried on the validation questions (default: "0.25 0.5 0.75")
set -euo pipefail
source "$(dirname "$0")/env.sh"

export OUT="${OUT:-outputs/quickstart}"
BASE_EPOCHS="${BASE_EPOCHS:-30}"
BASE_CONFIG=num_hidden_layers=2,hidden_size=128,intermediate_size=384,num_attention_heads=4,num_key_value_heads=4
BASE_CONFIG=$BASE_CONFIG,max_position_embeddings=256,tie_word_embeddings=true
QA_LMBDAS="${QA_LMBDAS:-0.25 0.5 0.75}"
mkdir -p "$OUT"
start=$(date +%s)

# (The marker is the newest file of the corpus: a corpus written before the judgment items or their few-shot prompts
# gets them written.)
stage "embedded corpus" "$OUT/corpus/halueval_fewshot.txt" \
    python -m utils.embedded_corpus --output_dir "$OUT/corpus"

stage "preprocess" "$OUT/dataset/meta.json" \
    python -m utils.preprocess_dataset --tokenizer_path "$OUT/corpus/tokenizer" \
        --train_file "$OUT/corpus/train.txt" --validation_file "$OUT/corpus/validation.txt" \
        --test_file "$OUT/corpus/test.txt" --block_size 256 --stride 128 --output_dir "$OUT/dataset"

# A 2-layer Llama (RoPE: no absolute position in the hidden states, so a question's key meets the keys of
# the training lines that ask the same fact wherever they sat in a window), width 128. Label smoothing
# keeps the long training from making it overconfident on the eval splits' unseen sentences.
stage "train the base model" "$OUT/base/train_results.json" \
    python -m train_base --model_type llama --tokenizer_name "$OUT/corpus/tokenizer" \
        --config_overrides "$BASE_CONFIG" --dataset_name "$OUT/dataset" --do_train --num_train_epochs "$BASE_EPOCHS" \
        --per_device_train_batch_size 8 --learning_rate 2e-3 --warmup_steps 20 --lr_scheduler_type cosine \
        --weight_decay 0.01 --label_smoothing_factor 0.1 --save_strategy no --logging_steps 100 --seed 0 \
        --report_to none --disable_tqdm true --output_dir "$OUT/base"

# The shared stages: base perplexity on test, datastore over train, exact index, kNN targets, kNN-LM on
# validation and test, the memory (offline, on the datastore keys), base + memory on validation and test;
# both lmbdas are chosen on validation, from the same grid. Settings of
# pipeline.sh that would change what the summary reads are fixed here, not taken from the environment.
env -u KNN_TARGETS -u GGUF_FILE -u TOKENIZER -u EVAL_WINDOWS \
    MODEL="$OUT/base" DATASET="$OUT/dataset" BLOCK=256 STRIDE=128 INDEX_TYPE=flat \
    K="${K:-64}" KNN_TEMP="${KNN_TEMP:-10}" EVAL_BATCH=16 \
    EVAL_SPLIT=test JOINT_SPLITS="validation test" JOINT_LMBDAS="${JOINT_LMBDAS:-0.25 0.5 0.75}" MEMORY_TEMP=1 \
    KNNLM_SPLITS="validation test" KNNLM_LMBDAS="${JOINT_LMBDAS:-0.25 0.5 0.75}" \
    MEMORY_ARGS="--num_train_epochs 8 --num_warmup_steps 50 --learning_rate 5e-3 --disable_tqdm true" \
    bash scripts/pipeline.sh

# Closed-book QA: choose lmbda on the validation entities' questions, report the test questions. The
# prompt is the form of the QA lines in the corpus's train split: eval_qa reads it from corpus/meta.json.
# One run per split answers under the base alone and under base + memory at each lmbda, into OUT/qa_<split>/base
# and OUT/qa_<split>/lmbda_<l> (downstream.qa_results).
qa() {  # qa OUTPUT_DIR QA_FILE [eval_qa flags...]
    local dir="$1" data="$2"; shift 2
    stage "QA: $dir" "$dir/qa_results.json" \
        python -m downstream.eval_qa --model_name_or_path "$OUT/base" --data_file "$data" \
            --per_device_eval_batch_size 64 --output_dir "$dir" "$@"
}
# shellcheck disable=SC2086
qa "$OUT/qa_validation" "$OUT/corpus/qa_validation.jsonl" --memory "$OUT/memory" --lmbda $QA_LMBDAS
QA_LMBDA=$(python -m downstream.choose_lmbda "$OUT"/qa_validation/lmbda_*)
echo "== QA lmbda chosen on the validation questions: $QA_LMBDA"
qa "$OUT/qa_test" "$OUT/corpus/qa_test.jsonl" --memory "$OUT/memory" --lmbda "$QA_LMBDA"

# Yes/no questions (BIG-bench form, read as StrategyQA) and hallucination judgments (HaluEval "qa" form) about the
# test facts, each answer read from the log-likelihoods of " Yes" and " No", with and without the memory at the QA
# lmbda. Train holds no yes/no question, so each comes after a fixed few-shot prompt of solved examples about
# train-only facts: the yes/no file's task_prefix (8 lines), and for HaluEval corpus/halueval_fewshot.txt (4 judged
# samples) in place of HaluEval's long instruction, which would not fit the base model's 256 positions.
stage "yes/no questions" "$OUT/yes_no_fewshot_test/strategyqa_results.json" \
    python -m downstream.strategyqa --model_name_or_path "$OUT/base" --data_file "$OUT/corpus/yes_no_test.json" \
        --memory "$OUT/memory" --lmbda "$QA_LMBDA" --per_device_eval_batch_size 64 \
        --output_dir "$OUT/yes_no_fewshot_test"
stage "hallucination judgments" "$OUT/halueval_fewshot_test/halueval_results.json" \
    python -m downstream.halueval --model_name_or_path "$OUT/base" --data_file "$OUT/corpus/halueval_test.json" \
        --instruction "$OUT/corpus/halueval_fewshot.txt" --memory "$OUT/memory" --lmbda "$QA_LMBDA" \
        --per_device_eval_batch_size 64 --output_dir "$OUT/halueval_fewshot_test"

stage "a test question the memory corrects" "$OUT/correction.json" \
    python -m demo.generation_example --quickstart_dir "$OUT" --find_correction --scan 100000 --num_examples 1 \
        --lmbda "$QA_LMBDA" --output_file "$OUT/correction.json"

python -m downstream.summary --output_dir "$OUT"
# CPU time of every stage (this shell's children), as well as the wall time: on a busy machine the two differ.
times_file=$(mktemp)
times > "$times_file"  # `times` in a pipe or $(...) would run in a subshell, which has no children
cpu=$(tail -n 1 "$times_file" | awk '{ split($1, u, /[ms]/); split($2, s, /[ms]/); printf "%d", u[1] * 60 + u[2] + s[1] * 60 + s[2] }')
rm -f "$times_file"
echo "Quickstart finished in $(( $(date +%s) - start )) s wall time, ${cpu} s CPU time; everything is under $OUT"
