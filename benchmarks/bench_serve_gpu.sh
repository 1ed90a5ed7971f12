#!/usr/bin/env bash
# The serving benchmark (benchmarks/bench_serve.py) on one GPU, in under 8 minutes on an H100: vLLM base against
# base + memory (compiled, CUDA graphs, bfloat16), HF generate beside, batches 1, 8 and 32, 128 new tokens each.
# Run from the repository root, with ../shared/data beside it (SmolLM2-135M's GGUF file, WikiText-2):
#   bash benchmarks/bench_serve_gpu.sh                 # vllm (pip's, CUDA) importable by python3
#   WHEELS=.whl bash benchmarks/bench_serve_gpu.sh     # a machine without a package index: wheels carried in .whl
#   DRY_RUN=1 bash benchmarks/bench_serve_gpu.sh       # any machine, no GPU, no vLLM: prepare, then the plan (tests)
#   TINY=1                                             # a tiny random Llama in place of SmolLM2 (with DRY_RUN: tests)
# Results: benchmarks/results/serve_vllm_gpu.{json,md,png} (OUT_DIR to change). BUDGET_S (default 450) bounds the
# timed run; the model directories are built first under outputs/bench_serve_gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
args=(--device cuda --batch_sizes 1 8 32 --new_tokens 128 --prompt_tokens 64 --repeats 3 --enforce_eager 0
      --work_dir "${WORK_DIR:-outputs/bench_serve_gpu}" --out_dir "${OUT_DIR:-benchmarks/results}" --name serve_vllm_gpu)
[ "${TINY:-0}" = 1 ] && args+=(--tiny)
if [ "${DRY_RUN:-0}" = 1 ]; then
    exec "$python" -m benchmarks.bench_serve "${args[@]}" --dry_run
fi
if [ -n "${WHEELS:-}" ]; then  # pip's vllm and the packages it needs that the machine lacks, as wheels
    "$python" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$python" -c "import vllm, torch; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "bench_serve_gpu: needs a CUDA GPU and pip's vllm importable by $python (WHEELS=DIR installs carried wheels)" >&2
    exit 2
fi
"$python" -m benchmarks.bench_serve "${args[@]}" --stages prepare           # the GGUF dequantised, memory, joint
timeout "${BUDGET_S:-450}" "$python" -m benchmarks.bench_serve "${args[@]}"  # prepare is reused: timing only
