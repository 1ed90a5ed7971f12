#!/usr/bin/env bash
# The MLP Memory pipeline from a recipe (scripts/recipes/*.yaml), one stage after another:
#   preprocess -> base perplexity -> datastore over train -> FAISS index -> kNN targets
#   -> kNN-LM perplexity -> MLP memory -> base + memory perplexity (lmbda chosen on validation) -> summary
# (the stages a recipe lists; the quickstart's adds its corpus, a base model trained from scratch, QA, judgments).
#     bash scripts/pipeline.sh scripts/recipes/smollm2_wikitext2_tenth_cpu.yaml
#     bash scripts/pipeline.sh RECIPE out=outputs/mine shared.model=gpt2 knn_targets.k=128   # overrides on top
#     bash scripts/pipeline.sh RECIPE --dry_run          # the plan: stages, which are done, disk and hours
#     bash scripts/pipeline.sh RECIPE --rebuild [STAGE]  # remake stages made with other settings
#     bash scripts/pipeline.sh compare RUN_A RUN_B       # what differs between two runs' ledgers
# Every stage writes a self-describing directory under the recipe's out and is skipped when it is complete with
# the same settings, so an interrupted run picks up where it stopped; a complete stage made with other settings
# is refused, naming them. OUT/ledger.json records everything. docs/pipeline.md has the recipe reference.
# (The environment variables OUT, MODEL, K, ... of earlier versions are now recipe keys: docs/pipeline.md.)
set -euo pipefail
# Paths given here (the recipe, compare's run directories) are read from where the command is typed; env.sh moves to
# the repository root, which relative paths inside a recipe (out, files) are read from.
args=()
for arg in "$@"; do
    if [ -e "$arg" ]; then args+=("$(cd "$(dirname "$arg")" && pwd)/$(basename "$arg")"); else args+=("$arg"); fi
done
set -- ${args[@]+"${args[@]}"}
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

if [ $# -eq 0 ]; then
    echo "usage: bash scripts/pipeline.sh RECIPE [section.key=value ...] [--dry_run] [--rebuild [STAGE ...]]" >&2
    echo "       bash scripts/pipeline.sh compare RUN_A RUN_B" >&2
    echo "recipes: $(ls scripts/recipes/*.yaml | tr '\n' ' ')" >&2
    exit 2
fi
exec python -m scripts.pipeline "$@"
