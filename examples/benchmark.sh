#!/usr/bin/env bash
# On a GPU machine with vLLM and this package installed: full-size random-weight Qwen3-VL-2B,
# grace_qat (format A and B) against stock vLLM on the GPTQ and BF16 exports of the same weights.
# Writes results.json, results.md and results.png under the output directory.
set -euo pipefail
cd "$(dirname "$0")/.."
# grace-a: Marlin/Machete by batch size (two packed copies); grace-a-single: one copy, vLLM's kernel;
# bf16-grid: stock vLLM on format A's own BF16 files.
python benchmarks/vllm_bench.py --model qwen3vl --size 2b \
  --systems gptq,grace-a,grace-a-single,grace-b,gptq-from-b,bf16-grid \
  --batches 1,2,4,8,16,32,64,128 --out "${1:-bench-out}"
# LLaVA-1.5-7B shape (original layout, CLIP tower inside the checkpoint); gptq-hf / bf16-hf: stock vLLM's
# own LLaVA on the llava-hf exports of the same weights. What is measured and how: benchmarks/README.md
python benchmarks/vllm_bench.py --model llava --size 7b --systems gptq,grace-a,gptq-hf,bf16-hf \
  --batches 1,2,4,8,16,32,64,128 --out "${1:-bench-out}-llava"
