#!/usr/bin/env bash
# Set everything up from scratch if needed, then run the whole test suite on the real CPU engine.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
if [ -x scripts/setup-sglang.sh ]; then ./scripts/setup-sglang.sh; fi
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_CPU_INT4_W4A8=0
exec "${GRACE_VENV:-.venv}/bin/python" -m pytest -q -rs "$@"
