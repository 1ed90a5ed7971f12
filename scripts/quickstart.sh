#!/usr/bin/env bash
# The whole pipeline on the embedded default corpus, on CPU, in a few minutes: the recipe
# scripts/recipes/quickstart.yaml, run by scripts/pipeline.sh:
#   embedded corpus -> preprocess -> base model (trained from scratch) -> base evaluation, datastore, exact index,
#   kNN targets, kNN-LM, MLP memory, base + memory perplexity (lmbda chosen on validation)
#   -> closed-book QA with and without the memory (one run per split: the base alone and base + memory at each
#      lmbda; lmbda chosen on the validation questions)
#   -> yes/no questions and hallucination judgments about the test facts, after a few-shot prompt of train-only
#      facts, with and without the memory
#   -> a test question whose answer the memory corrects -> summary.json and a table
# Every stage writes a self-describing directory under outputs/quickstart and is skipped when it is complete with the
# same settings, so an interrupted run picks up where it stopped. Extra arguments are recipe overrides, e.g.
#     bash scripts/quickstart.sh out=outputs/qs2 shared.k=32 train_base.num_train_epochs=10
#   OUT            output directory (the recipe's out=, default outputs/quickstart); an out= argument wins
set -euo pipefail
source "$(dirname "$0")/env.sh"

start=$(date +%s)
python -m scripts.pipeline scripts/recipes/quickstart.yaml ${OUT:+"out=$OUT"} "$@"
# CPU time of every stage (this shell's children), as well as the wall time: on a busy machine the two differ.
times_file=$(mktemp)
times > "$times_file"  # `times` in a pipe or $(...) would run in a subshell, which has no children
cpu=$(tail -n 1 "$times_file" | awk '{ split($1, u, /[ms]/); split($2, s, /[ms]/); printf "%d", u[1] * 60 + u[2] + s[1] * 60 + s[2] }')
rm -f "$times_file"
echo "Quickstart finished in $(( $(date +%s) - start )) s wall time, ${cpu} s CPU time"
