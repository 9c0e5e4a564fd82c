#!/usr/bin/env bash
# Diagnose a slow engine start: run one system in the background, py-spy dump every python process.
# usage: tests/gpu/diag.sh MODEL_DIR [QUANT] [SECONDS]
export PYTHONPATH=$PWD:/tmp/site-vllm VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; model=$1; quant=${2:-}; secs=${3:-240}
python3 -m pip install -q --no-index --no-deps --target /tmp/spy .whl/py_spy-*.whl >/dev/null 2>&1
args=(--model "$model" --eager --batches 1); [ -n "$quant" ] && args+=(--quantization "$quant")
python3 benchmarks/vllm_run.py "${args[@]}" > $OUT/diag_run.log 2>&1 &
pid=$!
for t in 40 80 120 160 200; do
  [ $t -gt $secs ] && break
  sleep 40; kill -0 $pid 2>/dev/null || break
  echo "=== t=$t" >> $OUT/spy.txt
  for p in $(pgrep -f "python3"); do /tmp/spy/bin/py-spy dump --pid $p >> $OUT/spy.txt 2>&1; done
done
wait_s=0; while kill -0 $pid 2>/dev/null && [ $wait_s -lt $((secs-200)) ]; do sleep 5; wait_s=$((wait_s+5)); done
kill -0 $pid 2>/dev/null && { echo "still running, killing"; kill $pid; }
grep -v "it/s\]" $OUT/diag_run.log | grep -E "took|grace_qat|Kernel|RESULT|Error|error" | tail -20
