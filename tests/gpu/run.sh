#!/usr/bin/env bash
# GPU-machine stages (run through the device tool after the vLLM bundle is installed in /tmp/site).
#   tests/gpu/run.sh tiny   - every format on tiny Qwen3-VL: grace_qat vs stock peer, eager
#   tests/gpu/run.sh 2b     - full-size Qwen3-VL-2B: load time, weight memory, tokens/s vs GPTQ/BF16
# Results land under $OUT (JSON, markdown, PNG, logs).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 \
  || python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site . >/dev/null
OUT=${OUT:-/tmp/out}
stage=$1; shift
case "$stage" in
  tiny)
    python3 benchmarks/vllm_bench.py --size tiny --eager --batches 1 --gen-tokens 32 --out "$OUT/tiny" \
      --systems gptq,grace-a,grace-a-inline,grace-a-grid,gptq-w8,grace-a-w8,gptq-from-b,grace-b,bf16 "$@" ;;
  2b)
    python3 benchmarks/vllm_bench.py --size 2b --batches 1,8,32,128 --out "$OUT/2b" "$@" ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
