#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, in the call that carries .gpu_carry/p3 (p1 and p2 were carried by
# the two calls before it and moved to /tmp/gpu): assembles the GGUF file, unpacks WikiText-2, installs the carried
# wheels into /tmp/site and runs benchmarks/gpu_run.py, its results and log into $OUT (benchmarks/gpu/README.md).
set -euo pipefail
mkdir -p /tmp/gpu/smollm2 "${OUT:=/tmp/gpu/out}"
mv .gpu_carry/p3/* /tmp/gpu/
cat /tmp/gpu/smollm2.gguf.part0 /tmp/gpu/smollm2.gguf.part1 > /tmp/gpu/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
echo "$(cat /tmp/gpu/MANIFEST)  /tmp/gpu/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c -
tar -C /tmp/gpu -xJf /tmp/gpu/wikitext-2.tar.xz
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/gpu/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
set -o pipefail
python3 -m benchmarks.gpu_run --out /tmp/gpu/run --model /tmp/gpu/smollm2 --data /tmp/gpu/wikitext-2 \
    --results_dir "$OUT" "$@" 2>&1 | tee "$OUT/gpu_run.log"
