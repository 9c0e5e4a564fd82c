#!/usr/bin/env bash
# Set everything up from scratch if needed, then run the whole test suite: the core and the vLLM
# plugin against a real vLLM engine on CPU (.venv), and the SGLang plugin against SGLang 0.5.23
# (.venv-sglang) and 0.5.17 (an overlay on that venv).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/setup-sglang.sh
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_CPU_INT4_W4A8=0
# a test dependency the set-up failed to install fails the run instead of skipping a file (tests/requires.py)
export CI=${CI:-true}
status=0
# each run announced and followed by its exit status, so that the three pytest summaries are told apart
run() {
  local name=$1 rc=0
  shift
  echo "[test] run: $name"
  "$@" || rc=$?
  echo "[test] $name: $([ $rc -eq 0 ] && echo passed || echo "FAILED (pytest exit $rc)")"
  [ $rc -eq 0 ] || status=$rc
}
run "vLLM and core" "${GRACE_VENV:-.venv}/bin/python" -m pytest -q -rs -m "not sglang" \
  --ignore=tests/test_sglang_plugin.py --ignore=tests/test_sglang_hub.py "$@"
SGPY="${GRACE_SGLANG_VENV:-.venv-sglang}/bin/python"
SGLANG_TESTS=(tests/test_sglang_plugin.py tests/test_sglang_hub.py tests/test_gpu_harness.py)
GRACE_EXPECT_SGLANG=0.5.23 run "SGLang 0.5.23" "$SGPY" -m pytest -q -rs -m sglang "${SGLANG_TESTS[@]}"
# the oldest supported SGLang, overlaid on the same venv (scripts/setup-sglang.sh)
GRACE_EXPECT_SGLANG=0.5.17 PYTHONPATH="${GRACE_SGLANG_OLD_DIR:-.sglang-0.5.17}" \
  run "SGLang 0.5.17" "$SGPY" -m pytest -q -rs -m sglang "${SGLANG_TESTS[@]}"
exit $status
