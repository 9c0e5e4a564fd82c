#!/usr/bin/env bash
# The demo: set up (if needed), then serve a GRACE checkpoint with vLLM + grace_qat and answer an
# image+text chat request. No argument: a tiny GRACE checkpoint is generated and served on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_CPU_INT4_W4A8=${VLLM_CPU_INT4_W4A8:-0}
exec "${GRACE_VENV:-.venv}/bin/grace-qat" demo "$@"
