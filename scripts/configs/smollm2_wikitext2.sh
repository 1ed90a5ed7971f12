# The real run: SmolLM2-135M-Instruct (Q4_1 GGUF, Llama architecture) on WikiText-2, sized for a
# 2-core CPU (about an hour and a half there). Used by benchmarks/bench_real.py; by hand:
#     bash scripts/pipeline.sh scripts/configs/smollm2_wikitext2.sh
# Any variable already set in the environment wins, e.g. MAX_CHARS= (empty: all of WikiText-2 train,
# for a GPU) or OUT=elsewhere.
SHARED="${SHARED:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)/shared/data}"
OUT="${OUT:-outputs/smollm2_wikitext2}"
MODEL="${MODEL:-$SHARED/smollm2-135m-instruct}"
GGUF_FILE="${GGUF_FILE-SmolLM2-135M-Instruct.Q4_1.gguf}"
TRAIN_FILE="${TRAIN_FILE:-$SHARED/wikitext-2/wiki.train.tokens}"
VALIDATION_FILE="${VALIDATION_FILE:-$SHARED/wikitext-2/wiki.valid.tokens}"
TEST_FILE="${TEST_FILE:-$SHARED/wikitext-2/wiki.test.tokens}"
# The first 10^6 characters of each split: about 244k train tokens (the datastore's rows).
MAX_CHARS="${MAX_CHARS-1000000}"
# 512-token chunks, no overlap: every datastore row costs one forward token.
BLOCK="${BLOCK:-512}"
STRIDE="${STRIDE:-512}"
EVAL_WINDOWS="${EVAL_WINDOWS:-50}"
EVAL_BATCH="${EVAL_BATCH:-4}"
INDEX_TYPE="${INDEX_TYPE:-flat}"
K="${K:-64}"
KNN_TEMP="${KNN_TEMP:-4}"
LMBDA="${LMBDA:-0.25}"
# Two SwiGLU blocks, head and final norm initialised from the base model's (tied) embedding and norm.
MEMORY_ARGS="${MEMORY_ARGS:---num_layers 2 --init_lm_head True --num_train_epochs 1 --learning_rate 1e-3 --num_warmup_steps 100 --per_device_train_batch_size 512}"
JOINT_LMBDAS="${JOINT_LMBDAS:-0.2 0.3 0.4 0.5 0.6}"
