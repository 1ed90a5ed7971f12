#!/usr/bin/env bash
# Builds, on a machine with PyPI, what benchmarks/gpu_run.py needs on a GPU machine that has no network and takes
# at most 64 MiB with each call (this workplace's lent machines: benchmarks/gpu/README.md). Writes .gpu_carry/ in the
# repository root (ignored by git through .git/info/exclude):
#   p1/  the first 58 MiB of the SmolLM2 GGUF file
#   p2/  the rest of it, WikiText-2 (xz), and the small wheels the machine lacks (gguf, datasets, dill, multiprocess)
#   p3/  faiss-cpu and transformers (the lock's versions), and MANIFEST (sha256 of the GGUF file)
# SHARED (default ../shared/data) is where the GGUF file and WikiText-2 are.
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED="${SHARED:-$(cd .. && pwd)/shared/data}"
GGUF="$SHARED/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
exclude="$(git rev-parse --git-path info/exclude)"
grep -qx '/.gpu_carry/' "$exclude" 2>/dev/null || echo '/.gpu_carry/' >> "$exclude"
rm -rf .gpu_carry && mkdir -p .gpu_carry/p1 .gpu_carry/p2 .gpu_carry/p3
split -b 58M -d -a 1 "$GGUF" .gpu_carry/smollm2.gguf.part
mv .gpu_carry/smollm2.gguf.part0 .gpu_carry/p1/ && mv .gpu_carry/smollm2.gguf.part1 .gpu_carry/p2/
sha256sum "$GGUF" | awk '{print $1}' > .gpu_carry/p3/MANIFEST
tar -C "$SHARED" -cJf .gpu_carry/p2/wikitext-2.tar.xz wikitext-2/wiki.train.tokens wikitext-2/wiki.valid.tokens \
    wikitext-2/wiki.test.tokens
pin() { grep -i "^$1==" requirements-lock.txt; }
download() {  # download DIR PACKAGE==VERSION...: wheels for the machine's Python 3.12 on x86-64 Linux, no dependencies
    local dir="$1"; shift
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$dir" "$@"
}
download .gpu_carry/p2 "$(pin gguf)" "$(pin datasets)" "$(pin dill)" "$(pin multiprocess)" "$(pin huggingface_hub)"
download .gpu_carry/p3 "$(pin faiss-cpu)" "$(pin transformers)"
du -sh .gpu_carry/p1 .gpu_carry/p2 .gpu_carry/p3
