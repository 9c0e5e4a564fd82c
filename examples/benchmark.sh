#!/usr/bin/env bash
# On a GPU machine with vLLM and this package installed: full-size random-weight Qwen3-VL-2B,
# grace_qat (format A and B) against stock vLLM on the GPTQ and BF16 exports of the same weights.
# Writes results.json, results.md and results.png under the output directory.
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/vllm_bench.py --model qwen3vl --size 2b --systems grace-a,grace-b,gptq,bf16 \
  --batches 1,8,32,128 --out "${1:-bench-out}"
