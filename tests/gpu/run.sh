#!/usr/bin/env bash
# GPU-machine stages (run through the device tool after the vLLM bundle is installed in /tmp/site).
#   tests/gpu/run.sh tiny   - every format on tiny Qwen3-VL: grace_qat vs stock peer, eager
#   tests/gpu/run.sh 2b     - full-size Qwen3-VL-2B: load time, weight memory, tokens/s vs GPTQ/BF16
# Results land under $OUT (JSON, markdown, PNG, logs).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
# FlashInfer's sampler JIT costs ~110 s per start; vLLM 0.26's V2 runner stalled >200 s pinning
# host buffers for the 151936-token vocabulary on this VM, so the (default before 0.26) V1 runner is used.
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_USE_V2_MODEL_RUNNER=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 \
  || python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site . >/dev/null
OUT=${OUT:-/tmp/out}
stage=$1; shift
case "$stage" in
  tiny)
    python3 benchmarks/vllm_bench.py --size tiny --eager --batches 1 --gen-tokens 32 --out "$OUT/tiny" \
      --systems gptq,grace-a,grace-a-inline,grace-a-grid,gptq-w8,grace-a-w8,gptq-from-b,grace-b,bf16 "$@" ;;
  2b)
    python3 benchmarks/vllm_bench.py --size 2b --batches 1,16,64 --out "$OUT/2b" "$@" ;;
  prepare)   # generate + convert only (CPU work), so engine runs fit in one call each
    python3 -c "
import sys; sys.path.insert(0, 'benchmarks')
from vllm_bench import prepare
for conv in (None, 'gptq', 'bf16'):
    prepare('qwen3vl', '2b', 'qat-sidecar', 4, conv, '/tmp/grace-bench')" ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
