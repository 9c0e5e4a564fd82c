#!/usr/bin/env bash
# Set everything up from scratch if needed, then run the whole test suite: the core and the vLLM
# plugin against a real vLLM engine on CPU (.venv), and the SGLang plugin against SGLang (.venv-sglang).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/setup-sglang.sh
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_CPU_INT4_W4A8=0
status=0
"${GRACE_VENV:-.venv}/bin/python" -m pytest -q -rs -m "not sglang" --ignore=tests/test_sglang_plugin.py "$@" || status=$?
"${GRACE_SGLANG_VENV:-.venv-sglang}/bin/python" -m pytest -q -rs -m sglang tests/test_sglang_plugin.py || status=$?
exit $status
