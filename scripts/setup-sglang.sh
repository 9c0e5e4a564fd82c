#!/usr/bin/env bash
# A second virtualenv with SGLang for the SGLang plugin's CPU tests (SGLang pins its own torch, so it
# cannot share .venv with vLLM; the CUDA libraries both torches use are hard-linked from .venv by
# scripts/share_cuda_libs.py). Only what those tests import: SGLang itself goes in with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GRACE_SGLANG_VENV:-.venv-sglang}
PY=${PYTHON:-python3}
LABEL=setup-sglang
. scripts/pip-steps.sh
if ! "$VENV/bin/python" -c "import sglang.srt.server_args" >/dev/null 2>&1; then
  say "creating $VENV with SGLang 0.5.23 (a few minutes and 4 GB beside .venv)"
  "$PY" -m venv "$VENV"
  VLLM_VENV=${GRACE_VENV:-.venv}
  if [ -d "$VLLM_VENV" ]; then say "$("$VENV/bin/python" scripts/share_cuda_libs.py "$VLLM_VENV" "$VENV")"; fi
  pip_install torch==2.14.1 torchvision==0.29.1 transformers==5.19.0 tokenizers==0.23.2 apache-tvm-ffi==0.1.11 \
    compressed-tensors==0.18.0 openai==2.8.0 sentencepiece==0.2.1 orjson psutil pybase64 requests packaging \
    starlette msgspec pydantic pyzmq tqdm ipython aiohttp dill gguf datasets einops partial-json-parser protobuf \
    "pytest>=8" "hypothesis>=6" pillow pyyaml
  pip_install --no-deps sglang==0.5.23
  "$VENV/bin/python" -c "import sglang.srt.server_args" || { echo "[setup-sglang] SGLang install failed" >&2; exit 1; }
fi
if [ "$(installed_checkout "$VENV" "pytest, hypothesis, PIL, yaml, sentencepiece, numpy, humming")" = "$PWD" ]; then
  say "grace-qat (this checkout) and the test suite's dependencies already installed"
else
  pip_install --no-deps --no-build-isolation -e .
  # what the SGLang suite imports beyond the packages above (also on a venv made earlier): humming-kernels
  # is SGLang's own dependency for --quantization humming (the Python half runs on a CPU)
  pip_install "pytest>=8" "hypothesis>=6" pillow pyyaml sentencepiece==0.2.1 numpy humming-kernels==0.1.12
fi
say "ready: $VENV ($("$VENV/bin/python" -c 'import sglang; print("sglang", sglang.__version__)'))"

# The oldest supported SGLang as an overlay on the same venv (PYTHONPATH=$OLD), with the Transformers,
# tokenizers and xgrammar it pins, so the suite runs against both ends of the range (0.5.17 and 0.5.23).
OLD=${GRACE_SGLANG_OLD_DIR:-.sglang-0.5.17}
if [ ! -f "$OLD/sglang/version.py" ]; then
  say "SGLang 0.5.17 overlay in $OLD"
  pip_install --no-deps --target "$OLD" sglang==0.5.17 transformers==5.12.1 tokenizers==0.22.2 xgrammar==0.2.1
fi
PYTHONPATH=$OLD "$VENV/bin/python" -c "import sglang, sglang.srt.server_args; assert sglang.__version__ == '0.5.17'" \
  || { echo "[setup-sglang] SGLang 0.5.17 overlay install failed" >&2; exit 1; }
