#!/usr/bin/env bash
# GPU-machine stages, run through the device tool. The vLLM bundle is installed in /tmp/site-vllm and
# the SGLang bundle in /tmp/site-sglang (both can live on one machine); each stage picks its engine.
# Results land under $OUT (JSON, markdown, PNG, logs).
#   prepare-bg SET.. - write + convert full-size fixtures in the background; SETs: llava, qwen, qwen-w8.
#                  Sources are generated on the GPU first (/tmp/prep-gpu.done), conversions then run
#                  on the CPU with the GPU hidden (/tmp/prep.done), so nothing holds GPU memory beside
#                  an engine and no benchmark starts while a conversion loads the CPU
#   install      - this package + test wheels (after a bundle is unpacked); engine sanity
#   chain STAGE..- run stages one after another in the background, each with OUT=/tmp/res/STAGE
#   poll SECONDS - wait for the chain (at most SECONDS), then bring /tmp/res back as $OUT/res.tgz
#   crossover    - Marlin vs Machete per layer shape -> /tmp/xover/crossover.json (used by later stages)
#   marlin-variants - Marlin's atomic-add / bf16-reduce options at small M, per layer shape
#   bench-llava  - LLaVA-1.5-7B shape: grace_qat vs stock GPTQ (original and llava-hf layout) vs BF16
#   bench-qwen   - Qwen3-VL-2B: grace_qat vs stock GPTQ vs BF16 (other systems: bench-qwen --systems ..)
#   bench-w8     - Qwen3-VL-2B W8: grace_qat vs stock GPTQ int8
#   bench-hf     - Qwen3-VL-2B: plain Transformers generate on the BF16-on-grid checkpoint
#   suite        - the engine test suite on tiny fixtures + the LLaVA original-layout checks
#   tp2          - (2-GPU kind) tensor parallel 2: tiny and 2B, grace_qat vs stock GPTQ
#   load         - the HTTP load test, 4x larger, on the full-size 2B
#   sglang-jit-bg - (SGLang) build its JIT Marlin kernels once, in the background (sglang* stages wait)
#   sglang       - (SGLang) tests/gpu/sglang_serve_check.py on tiny and 2B Qwen3-VL
#   sglang-llava - (SGLang) the same on a tiny original-layout LLaVA-1.5 (local CLIP tower)
#   bench-sglang - (SGLang) SGLang + grace_qat vs stock SGLang GPTQ, 2B, batch 1..128
#   llava-check  - only the LLaVA original-layout checks of suite
#   tiny         - every format on tiny Qwen3-VL through the benchmark harness, eager
set -uo pipefail
cd "$(dirname "$0")/../.."
stage=$1; shift
case "$stage" in
  sglang|sglang-llava|bench-sglang|sglang-jit-bg) SITE=/tmp/site-sglang ;;
  *) SITE=/tmp/site-vllm ;;
esac
export PYTHONPATH=$PWD:$SITE
# FlashInfer's sampler JIT costs ~110 s per start; vLLM 0.26's V2 runner stalled >200 s pinning
# host buffers for the 151936-token vocabulary on this VM, so the (default before 0.26) V1 runner is used.
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_USE_V2_MODEL_RUNNER=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
[ -f /tmp/xover/crossover.json ] && export GRACE_QAT_CROSSOVER_FILE=/tmp/xover/crossover.json  # measured in this lease
[ -f /tmp/engine-env ] && source /tmp/engine-env
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
WORK=/tmp/grace-bench
BATCHES=1,2,4,8,16,32,64,128

wait_for() {   # wait_for MARKER SECONDS
  local t=0
  while [ ! -f "$1" ] && [ ! -f /tmp/prep.failed ] && [ $t -lt "$2" ]; do sleep 5; t=$((t + 5)); done
  [ -f "$1" ] || { echo "no $1 (prep failed or timed out)"; tail -20 /tmp/prep.log; return 1; }
}
wait_gpu() {   # fixture sources written: the GPU is the engine's alone
  [ -f /tmp/prep.sh ] || return 0
  wait_for /tmp/prep-gpu.done 400
}
wait_sglang_jit() {   # SGLang's Marlin modules built (when sglang-jit-bg started a build)
  [ -f /tmp/sglang-jit.log ] || return 0
  wait_for /tmp/sglang-jit.done 1200 || { tail /tmp/sglang-jit.log; return 1; }
}
wait_prep() {  # every conversion finished: benchmarks need a quiet CPU
  [ -f /tmp/prep.sh ] && [ "${GRACE_GPU_NO_PREP_WAIT:-0}" != 1 ] || return 0
  wait_for /tmp/prep.done "${1:-600}"
}

case "$stage" in   # an engine stage waits for its engine's bundle (installed by a later call: $SITE.done)
  prepare-bg|install|chain|poll|bench-hf|sglang-jit-bg) ;;
  *) t=0; while [ ! -f $SITE.done ] && [ $t -lt 900 ]; do sleep 5; t=$((t + 5)); done
     [ -f $SITE.done ] || { echo "no engine bundle in $SITE"; exit 1; } ;;
esac

case "$stage" in
  prepare-bg)
    rm -rf /tmp/gq-src /tmp/prep*.done /tmp/prep.failed && mkdir -p /tmp/gq-src $WORK && cp -r grace_qat benchmarks /tmp/gq-src/
    B="python3 /tmp/gq-src/benchmarks/vllm_bench.py --prepare-only --work $WORK --out /tmp/prep-out"
    gpu="" cpu=""
    for set in "$@"; do case $set in
      llava)   gpu+="$B --model llava --size 7b --systems grace-a || { touch /tmp/prep.failed; exit 1; }"$'\n'
               cpu+="( $B --model llava --size 7b --systems gptq,gptq-hf,bf16-hf || touch /tmp/prep.failed ) &"$'\n' ;;
      qwen)    gpu+="$B --model qwen3vl --size 2b --systems grace-a,grace-b || { touch /tmp/prep.failed; exit 1; }"$'\n'
               cpu+="( $B --model qwen3vl --size 2b --systems gptq,gptq-from-b || touch /tmp/prep.failed ) &"$'\n' ;;
      qwen-w8) gpu+="$B --model qwen3vl --size 2b --systems grace-a-w8 || { touch /tmp/prep.failed; exit 1; }"$'\n'
               cpu+="( $B --model qwen3vl --size 2b --systems gptq-w8 || touch /tmp/prep.failed ) &"$'\n' ;;
      *) echo "unknown fixture set $set"; exit 2 ;;
    esac; done
    cat > /tmp/prep.sh <<EOF
export OMP_NUM_THREADS=4 PYTHONPATH=/tmp/gq-src
$gpu
touch /tmp/prep-gpu.done
export CUDA_VISIBLE_DEVICES=
$cpu
wait
touch /tmp/prep.done
EOF
    setsid nohup bash /tmp/prep.sh > /tmp/prep.log 2>&1 < /dev/null &
    sleep 3; echo "background prepare started: $*"; df -h /tmp | tail -1 ;;
  install)
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 \
      || python3 -m pip install -q --no-deps --no-build-isolation --no-index --target $SITE . >/dev/null
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
  chain)
    # A copy of the tree runs, so a later call re-sending the working tree cannot change it mid-run
    rm -rf /tmp/chain-src /tmp/res/chain.done && mkdir -p /tmp/chain-src /tmp/res   # earlier results stay
    tar --exclude='./.devbundle*' --exclude='./.git' -cf - . | tar -xf - -C /tmp/chain-src
    cat > /tmp/chain.sh <<EOF
for s in $*; do
  echo "\$(date +%T) \$s start" >> /tmp/res/chain.status
  OUT=/tmp/res/\$s bash /tmp/chain-src/tests/gpu/run.sh \$s > /tmp/res/\$s.log 2>&1; rc=\$?
  echo "\$(date +%T) \$s rc=\$rc" >> /tmp/res/chain.status
done
touch /tmp/res/chain.done
EOF
    setsid nohup bash /tmp/chain.sh > /tmp/chain.log 2>&1 < /dev/null &
    sleep 1; echo "chain started: $*" ;;
  poll)
    t=0; while [ ! -f /tmp/res/chain.done ] && [ $t -lt "${1:-540}" ]; do sleep 5; t=$((t + 5)); done
    cat /tmp/res/chain.status; grep -v "it/s" /tmp/prep.log 2>/dev/null | tail -3
    last=$(tail -1 /tmp/res/chain.status | awk '{print $2}')
    [ -n "$last" ] && grep -h -E "^\[bench\]|passed|failed|rror|rc=" /tmp/res/$last.log 2>/dev/null | cut -c1-300 | tail -15
    tar -czf $OUT/res.tgz -C /tmp res 2>/dev/null; ls -la $OUT ;;
  crossover)
    python3 benchmarks/kernel_crossover.py --out /tmp/xover 2>&1 | tee $OUT/crossover.log
    cp /tmp/xover/* $OUT/ ;;
  marlin-variants)   # issue 9: can a Marlin setting make batch 1 faster still? (7B shapes, ~1 min)
    wait_gpu || exit 1
    python3 benchmarks/kernel_crossover.py --models llava-7b,qwen3vl-2b --tp 1 --bits 4 --marlin-variants \
      --out $OUT/variants 2>&1 | tee $OUT/variants.log | grep -v "^ *$" ;;
  bench-llava)
    wait_prep || exit 1
    PYTHONPATH=/tmp/site-tf:$PYTHONPATH python3 benchmarks/vllm_bench.py --model llava --size 7b --work $WORK \
      --systems gptq,grace-a,gptq-hf,bf16-hf --batches $BATCHES --image-batches 1,8 --timeout 300 \
      --out $OUT/llava7b "$@" ;;
  bench-qwen)
    wait_prep || exit 1
    python3 benchmarks/vllm_bench.py --model qwen3vl --size 2b --work $WORK --batches $BATCHES --image-batches 1,8 \
      --systems gptq,grace-a,bf16-grid --timeout 240 --out $OUT/qwen2b "$@" ;;
  bench-w8)
    wait_prep || exit 1
    python3 benchmarks/vllm_bench.py --model qwen3vl --size 2b --work $WORK --systems gptq-w8,grace-a-w8 \
      --batches 1,16,64 --image-batches "" --timeout 200 --out $OUT/qwen2b-w8 "$@" ;;
  bench-hf)   # what users have today: Transformers generate (the machine's own Transformers)
    wait_prep || exit 1
    python3 benchmarks/vllm_bench.py --model qwen3vl --size 2b --work $WORK --systems hf-generate \
      --batches 1,8,32,128 --image-batches "" --timeout 400 --out $OUT/qwen2b-hf "$@" ;;
  tp2)        # on the 2-GPU kind: stock GPTQ vs grace_qat with tensor parallel 2, tiny then 2B
    python3 benchmarks/vllm_bench.py --size tiny --tp 2 --eager --batches 1 --image-batches "" --timeout 200 \
      --out $OUT/tiny-tp2 --systems gptq,grace-a-single,grace-a,grace-b
    wait_prep || exit 1
    python3 benchmarks/vllm_bench.py --model qwen3vl --size 2b --tp 2 --work $WORK --batches 1,16,64 \
      --image-batches "" --timeout 200 --out $OUT/qwen2b-tp2 --systems gptq,grace-a-single ;;
  load)       # the load test at 4x its CPU size (96 requests, 32 at a time) on the full-size 2B, format A
    export PYTHONPATH=/tmp/site-test:$PYTHONPATH
    wait_prep || exit 1
    GRACE_LOAD_SCALE=4 GRACE_LOAD_MODEL=$WORK/qwen3vl-2b-qat-sidecar-w4 GRACE_LOAD_OUT=$OUT/load \
      timeout 420 python3 -m pytest -q -s -p no:cacheprovider tests/test_load.py 2>&1 | tail -60 ;;
  sglang-jit-bg)   # (after the SGLang bundle) build SGLang's JIT Marlin kernels in the background:
    # >5 min per dtype with nvcc; an engine killed mid-build loses it (tests/gpu/sglang_jit_warmup.py)
    rm -f /tmp/sglang-jit.done
    setsid nohup bash -c "PYTHONPATH=$PYTHONPATH nice -n 5 python3 tests/gpu/sglang_jit_warmup.py && touch /tmp/sglang-jit.done" \
      > /tmp/sglang-jit.log 2>&1 < /dev/null &
    sleep 2; echo "SGLang JIT warm-up started" ;;
  sglang)     # plugin vs stock SGLang GPTQ, tiny then 2B
    wait_sglang_jit || exit 1
    python3 -c "from grace_qat import fixtures; fixtures.write_qwen3vl('/tmp/sg-tiny', size='tiny')"
    wait_gpu || exit 1
    # each step (layer check, plugin engine, stock engine) gets --timeout; the first engine may still
    # JIT-compile SGLang's smaller kernels
    timeout 900 python3 tests/gpu/sglang_serve_check.py --model /tmp/sg-tiny --out $OUT/sglang-tiny.json \
      --timeout 400 "$@"
    wait_prep || exit 1
    timeout 900 python3 tests/gpu/sglang_serve_check.py --model $WORK/qwen3vl-2b-qat-sidecar-w4 \
      --reference $WORK/qwen3vl-2b-qat-sidecar-w4-gptq --out $OUT/sglang-2b.json --skip-layer-check \
      --timeout 400 "$@" ;;
  sglang-llava)   # (SGLang) original-layout LLaVA-1.5 (tiny) on SGLang's LlavaLlamaForCausalLM: local CLIP
    # tower (mm_vision_tower = a directory), --tokenizer-path from `grace-qat llava-processor`
    wait_sglang_jit || exit 1
    python3 -c "from grace_qat import fixtures, llava_hf
fixtures.write_llava('/tmp/sg-llava', size='tiny', clip_dir='/tmp/sg-clip')
llava_hf.write_processor('/tmp/sg-llava', '/tmp/sg-llava-proc')" || exit 1
    timeout 900 python3 tests/gpu/sglang_serve_check.py --model /tmp/sg-llava --tokenizer-path /tmp/sg-llava-proc \
      --out $OUT/sglang-llava-tiny.json --timeout 400 "$@" ;;
  bench-sglang)   # (SGLang bundle) the plugin vs stock SGLang GPTQ on the full-size 2B, formats A and B
    wait_sglang_jit || exit 1
    wait_prep || exit 1
    python3 benchmarks/vllm_bench.py --model qwen3vl --size 2b --work $WORK --batches $BATCHES --timeout 420 \
      --systems sglang-gptq,sglang-grace-a,sglang-grace-b --out $OUT/qwen2b-sglang "$@" ;;
  suite)
    export PYTHONPATH=/tmp/site-test:$PYTHONPATH
    wait_gpu || exit 1
    timeout 450 python3 -m pytest -q -x -p no:cacheprovider tests/test_vllm_plugin.py 2>&1 | tail -25 | tee $OUT/suite.log
    PYTHONPATH=/tmp/site-tf:$PYTHONPATH timeout 200 python3 tests/llava_reference.py --check $OUT > $OUT/llava.log 2>&1
    echo "llava rc=$?"; tail -12 $OUT/llava.log ;;
  llava-check)   # the original-layout LLaVA checks of `suite` alone
    PYTHONPATH=/tmp/site-tf:$PYTHONPATH timeout 300 python3 tests/llava_reference.py --check $OUT > $OUT/llava.log 2>&1
    echo "llava rc=$?"; tail -12 $OUT/llava.log ;;
  tiny)
    python3 benchmarks/vllm_bench.py --size tiny --eager --batches 1 --gen-tokens 32 --out "$OUT/tiny" \
      --systems gptq,grace-a,grace-a-inline,grace-a-grid,gptq-w8,grace-a-w8,gptq-from-b,grace-b,bf16 "$@" ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
