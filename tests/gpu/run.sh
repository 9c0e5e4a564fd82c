#!/usr/bin/env bash
# GPU-machine stages, run through the device tool after (or while) the vLLM bundle is installed in
# /tmp/site. Results land under $OUT (JSON, markdown, PNG, logs).
#   prepare-bg   - start writing + converting the full-size fixtures in the background (CPU/GPU, no vLLM)
#   install      - (after the last bundle part is unpacked) this package + test wheels; engine sanity
#   crossover    - Marlin vs Machete per layer shape -> /tmp/xover/crossover.json (used by later stages)
#   marlin-variants - Marlin's atomic-add / bf16-reduce options at small M, per layer shape
#   bench-llava  - LLaVA-1.5-7B shape: grace_qat (dual, single) vs stock GPTQ vs BF16, batch 1..128
#   bench-qwen   - Qwen3-VL-2B: the same plus format B and W8
#   suite        - the engine test suite on tiny fixtures + the LLaVA original-layout checks
#   tp2          - (2-GPU kind) tensor parallel 2: tiny and 2B, grace_qat vs stock GPTQ
#   load         - the HTTP load test, 4x larger, on the full-size 2B
#   sglang       - (SGLang bundle in /tmp/site) tests/gpu/sglang_serve_check.py on tiny and 2B Qwen3-VL
#   bench-sglang - (SGLang bundle) SGLang + grace_qat vs stock SGLang GPTQ, 2B, batch 1..128
#   tiny         - every format on tiny Qwen3-VL through the benchmark harness, eager
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
# FlashInfer's sampler JIT costs ~110 s per start; vLLM 0.26's V2 runner stalled >200 s pinning
# host buffers for the 151936-token vocabulary on this VM, so the (default before 0.26) V1 runner is used.
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_USE_V2_MODEL_RUNNER=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export GRACE_QAT_CROSSOVER_FILE=/tmp/xover/crossover.json   # measured in this lease (if it was)
[ -f /tmp/engine-env ] && source /tmp/engine-env
OUT=${OUT:-/tmp/out}
WORK=/tmp/grace-bench
BATCHES=1,2,4,8,16,32,64,128
stage=$1; shift

wait_for() {   # wait_for MARKER SECONDS
  local t=0
  while [ ! -f "$1" ] && [ $t -lt "$2" ]; do sleep 5; t=$((t + 5)); done
  [ -f "$1" ] || { echo "timed out waiting for $1"; tail -20 /tmp/prep.log; return 1; }
}

case "$stage" in
  prepare-bg)
    # Fixture writing needs torch + this package only (no vLLM); conversion is CPU work, 4 threads
    # per chain. The W8 2B set is written later (bench-qwen), once the 7B set is gone (disk).
    rm -rf /tmp/gq-src && mkdir -p /tmp/gq-src $WORK && cp -r grace_qat benchmarks /tmp/gq-src/
    B="python3 /tmp/gq-src/benchmarks/vllm_bench.py --prepare-only --work $WORK --out /tmp/prep-out"
    cat > /tmp/prep.sh <<EOF
export OMP_NUM_THREADS=4 PYTHONPATH=/tmp/gq-src
$([ "${1:-}" = qwen-only ] && echo "export CUDA_VISIBLE_DEVICES=   # engines start next to it" \
   || echo "( $B --model llava --size 7b --systems grace-a,gptq,gptq-hf && touch /tmp/prep-llava.done ) &")
( $B --model qwen3vl --size 2b --systems grace-a,gptq$([ "${1:-}" = qwen-only ] || echo ,grace-b,gptq-from-b) \
  && touch /tmp/prep-qwen.done ) &
wait
EOF
    cat > /tmp/prep-w8.sh <<EOF
# on the CPU: an engine profiling GPU memory next to it fails when another process frees some
export OMP_NUM_THREADS=4 PYTHONPATH=/tmp/gq-src CUDA_VISIBLE_DEVICES=
$B --model qwen3vl --size 2b --systems grace-a-w8,gptq-w8 && touch /tmp/prep-qwen-w8.done
EOF
    setsid nohup bash /tmp/prep.sh > /tmp/prep.log 2>&1 < /dev/null &
    sleep 3; echo "background prepare started"; df -h /tmp | tail -1 ;;
  install)
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 \
      || python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site . >/dev/null
    ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-test .whl/*.whl
    # vLLM 0.26's LLaVA/Pixtral code needs Transformers 5.5 (5.17 renamed a class it imports)
    ls .whl/tf/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-tf .whl/tf/*.whl
    [ "${GRACE_GPU_SANITY:-1}" = 0 ] && exit 0
    python3 -c "from grace_qat import fixtures; fixtures.write_qwen3vl('/tmp/tiny-a', size='tiny')"
    # Engine sanity: the forked engine core once hung here; spawn it, else run it in-process.
    if timeout 150 python3 benchmarks/vllm_run.py --model /tmp/tiny-a --quantization grace_qat --batches 1 > $OUT/sanity.log 2>&1; then
      echo "engine sanity (spawned engine core): ok"; : > /tmp/engine-env
    else
      echo "spawned engine core failed/hung; trying in-process"; tail -5 $OUT/sanity.log
      echo "export VLLM_ENABLE_V1_MULTIPROCESSING=0" > /tmp/engine-env; source /tmp/engine-env
      timeout 150 python3 benchmarks/vllm_run.py --model /tmp/tiny-a --quantization grace_qat --batches 1 > $OUT/sanity2.log 2>&1 \
        && echo "in-process engine: ok" || tail -20 $OUT/sanity2.log
    fi
    grep -E "^RESULT" $OUT/sanity*.log | cut -c1-300; grep -h "grace_qat: " $OUT/sanity*.log | cut -c1-250 | head -8
    cat /tmp/prep.log | grep -v "it/s" | tail -5 ;;
  crossover)
    python3 benchmarks/kernel_crossover.py --out /tmp/xover 2>&1 | tee $OUT/crossover.log
    cp /tmp/xover/* $OUT/ ;;
  marlin-variants)   # issue 9: can a Marlin setting make batch 1 faster still? (7B shapes, ~1 min)
    python3 benchmarks/kernel_crossover.py --models llava-7b,qwen3vl-2b --tp 1 --bits 4 --marlin-variants \
      --out $OUT/variants 2>&1 | tee $OUT/variants.log | grep -v "^ *$" ;;
  bench-llava)
    wait_for /tmp/prep-llava.done 400 || exit 1
    PYTHONPATH=/tmp/site-tf:$PYTHONPATH python3 benchmarks/vllm_bench.py --model llava --size 7b --work $WORK \
      --systems gptq,gptq-hf,grace-a,bf16-grid,grace-a-single --batches $BATCHES --image-batches 1,8 --timeout 300 \
      --out $OUT/llava7b "$@" ;;
  bench-qwen)
    wait_for /tmp/prep-qwen.done 400 || exit 1
    rm -rf $WORK/llava-*      # the 7B set is done with; make room for the W8 2B set (bench-w8)
    setsid nohup bash /tmp/prep-w8.sh > /tmp/prep-w8.log 2>&1 < /dev/null &
    python3 benchmarks/vllm_bench.py --model qwen3vl --size 2b --work $WORK --batches $BATCHES --image-batches 1,8 \
      --timeout 240 --out $OUT/qwen2b "$@" ;;
  bench-w8)
    wait_for /tmp/prep-qwen-w8.done 300 || { tail /tmp/prep-w8.log; exit 1; }
    python3 benchmarks/vllm_bench.py --model qwen3vl --size 2b --work $WORK --systems gptq-w8,grace-a-w8 \
      --batches 1,16,64 --image-batches "" --timeout 200 --out $OUT/qwen2b-w8 "$@" ;;
  tp2)        # on the 2-GPU kind: stock GPTQ vs grace_qat with tensor parallel 2, tiny then 2B
    python3 benchmarks/vllm_bench.py --size tiny --tp 2 --eager --batches 1 --image-batches "" --timeout 200 \
      --out $OUT/tiny-tp2 --systems gptq,grace-a-single,grace-a,grace-b
    wait_for /tmp/prep-qwen.done 400 || exit 1
    python3 benchmarks/vllm_bench.py --model qwen3vl --size 2b --tp 2 --work $WORK --batches 1,16,64 \
      --image-batches "" --timeout 200 --out $OUT/qwen2b-tp2 --systems gptq,grace-a-single ;;
  load)       # the load test at 4x its CPU size (96 requests, 32 at a time) on the full-size 2B, format A
    export PYTHONPATH=/tmp/site-test:$PYTHONPATH
    wait_for /tmp/prep-qwen.done 300 || exit 1
    GRACE_LOAD_SCALE=4 GRACE_LOAD_MODEL=$WORK/qwen3vl-2b-qat-sidecar-w4 GRACE_LOAD_OUT=$OUT/load \
      timeout 420 python3 -m pytest -q -s -p no:cacheprovider tests/test_load.py 2>&1 | tail -60 ;;
  sglang)     # with the SGLang bundle in /tmp/site instead: plugin vs stock SGLang GPTQ, tiny then 2B
    python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site . >/dev/null
    python3 -c "from grace_qat import fixtures; fixtures.write_qwen3vl('/tmp/sg-tiny', size='tiny')"
    timeout 300 python3 tests/gpu/sglang_serve_check.py --model /tmp/sg-tiny --out $OUT/sglang-tiny.json "$@"
    wait_for /tmp/prep-qwen.done 300 || exit 1
    timeout 280 python3 tests/gpu/sglang_serve_check.py --model $WORK/qwen3vl-2b-qat-sidecar-w4 \
      --out $OUT/sglang-2b.json --skip-layer-check "$@" ;;
  bench-sglang)   # (SGLang bundle) the plugin vs stock SGLang GPTQ on the full-size 2B, formats A and B
    wait_for /tmp/prep-qwen.done 400 || exit 1
    python3 benchmarks/vllm_bench.py --model qwen3vl --size 2b --work $WORK --batches $BATCHES --timeout 300 \
      --systems sglang-gptq,sglang-grace-a,sglang-grace-b --out $OUT/qwen2b-sglang "$@" ;;
  suite)
    export PYTHONPATH=/tmp/site-test:$PYTHONPATH
    timeout 330 python3 -m pytest -q -x -p no:cacheprovider tests/test_vllm_plugin.py 2>&1 | tail -25 | tee $OUT/suite.log
    PYTHONPATH=/tmp/site-tf:$PYTHONPATH timeout 200 python3 tests/llava_reference.py --check $OUT > $OUT/llava.log 2>&1
    echo "llava rc=$?"; tail -12 $OUT/llava.log ;;
  tiny)
    python3 benchmarks/vllm_bench.py --size tiny --eager --batches 1 --gen-tokens 32 --out "$OUT/tiny" \
      --systems gptq,grace-a,grace-a-inline,grace-a-grid,gptq-w8,grace-a-w8,gptq-from-b,grace-b,bf16 "$@" ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
