#!/usr/bin/env bash
# One call: (a) harness sanity on tiny, (b) where a full-size 2B start spends its time (py-spy on
# the engine core), (c) the LLaVA original-layout checks on vLLM 0.26.
export PYTHONPATH=$PWD:/tmp/site-vllm VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_USE_V2_MODEL_RUNNER=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/spy .whl/py_spy-*.whl >/dev/null 2>&1
echo "== (a) tiny"
python3 -c "from grace_qat import synthetic; synthetic.write_qwen3vl('/tmp/tiny-a', size='tiny')"
timeout 150 python3 benchmarks/vllm_run.py --model /tmp/tiny-a --quantization grace_qat --eager --batches 1,16 > $OUT/tiny.log 2>&1
grep -E "^RESULT|grace_qat: using|took" $OUT/tiny.log | cut -c1-300
echo "== (b) 2b"
python3 -c "from grace_qat import synthetic; synthetic.write_qwen3vl('/tmp/q2b', size='2b')"
setsid python3 benchmarks/vllm_run.py --model /tmp/q2b --quantization grace_qat --eager --batches 1 > $OUT/q2b.log 2>&1 &
run=$!
for t in 45 45 45; do sleep $t; for p in $(pgrep -f EngineCore); do echo "-- spy $p"; /tmp/spy/bin/py-spy dump --pid $p 2>&1 | grep -v "threading.py\|selectors.py\|queue.py" | head -25; done; done > $OUT/spy2b.txt
kill -- -$run 2>/dev/null   # the run and its engine core (its own process group)
grep -E "took|grace_qat: using|RESULT" $OUT/q2b.log | cut -c1-200; head -60 $OUT/spy2b.txt
echo "== (c) llava"
timeout 200 python3 tests/llava_reference.py --check $OUT > $OUT/llava.log 2>&1; echo "llava rc=$?"; tail -15 $OUT/llava.log
