#!/usr/bin/env bash
# Inspect a GRACE checkpoint, then export it to formats stock engines load without the plugin.
set -euo pipefail
CKPT=${1:?usage: convert.sh CKPT_DIR OUT_PREFIX}; OUT=${2:?usage: convert.sh CKPT_DIR OUT_PREFIX}
grace-qat inspect "$CKPT"                                  # format, bits, code histogram, verification
grace-qat convert "$CKPT" "$OUT-gptq" --to gptq            # vLLM / SGLang GPTQ-Marlin
grace-qat convert "$CKPT" "$OUT-ct" --to compressed-tensors   # vLLM, Transformers (+compressed-tensors)
grace-qat convert "$CKPT" "$OUT-bf16" --to bf16            # the dequantized reference
grace-qat convert "$CKPT" "$OUT-tagged" --to grace_qat     # same files, no --quantization flag needed
# An original-layout LLaVA-1.5 GRACE checkpoint in the llava-hf layout, for stock engines' own LLaVA
# (add --clip-dir /models/clip-vit-large-patch14-336 when the checkpoint does not carry the tower):
#   grace-qat convert "$CKPT" "$OUT-llava-hf-gptq" --to gptq --layout llava-hf
