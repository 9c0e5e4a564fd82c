#!/usr/bin/env bash
# GPU-machine stages, run through the device tool or on a GPU runner. Engine: a bundle unpacked into
# $SITES/site-vllm or $SITES/site-sglang (marker $SITE.done; SITES=/tmp unless GRACE_GPU_SITES) is
# used when present; otherwise the engine already installed in this python3 (a published image). With
# neither, a stage waits up to GRACE_GPU_BUNDLE_WAIT s (900) for a bundle a later call unpacks
# (GRACE_GPU_ENGINE=bundle: always wait for the bundle). Results land under $OUT (relative: to the
# caller's directory). Every stage exits non-zero when its check fails.
# Background jobs (prepare-bg, sglang-jit-bg, chain) run from a copy of the tree under /tmp/grace-run
# with their logs there: each device call lays the working tree anew, and a job whose working
# directory is the tree dies with it. `poll` brings the logs and /tmp/res back under $OUT.
#   engine       - which vLLM the vLLM stages use (bundle or installed), its version, torch, GPU
#   sglang-engine - the same for the SGLang stages
#   prepare-bg SET.. - write + convert full-size fixtures in the background; SETs: llava, llava-gptq,
#                  llava-gptq-fp16 (SGLang's LLaVA reference), qwen, qwen-w8. Sources are generated on
#                  the GPU first (/tmp/prep-gpu.done), conversions then run on the CPU with the GPU
#                  hidden (/tmp/prep.done), so nothing holds GPU memory beside an engine and no
#                  benchmark starts while a conversion loads the CPU
#   install      - this package + test wheels (after a bundle is unpacked); engine sanity
#   chain STAGE..- run stages one after another in the background, each with OUT=/tmp/res/STAGE
#   poll SECONDS - wait for the chain (at most SECONDS), then bring /tmp/res back as $OUT/res.tgz and
#                  the background logs as $OUT/bg/; exits 1 when a finished stage failed
#   crossover    - every mixed-precision kernel per layer shape and M -> /tmp/xover/kernel_table.json (this
#                  device and vLLM version; used by later stages; GRACE_CROSSOVER_ARGS narrows it to what
#                  a lease's benches run, e.g. "--tp 1 --bits 4"; the CUDA GEMV runs, and the table carries,
#                  the launch configs of the `gemv` stage's sweep where one ran before, else its own)
#   sglang-crossover - (SGLang) grace_qat's kernels vs SGLang's Marlin per layer shape and M ->
#                  /tmp/xover-sglang/kernel_table.json (this device and SGLang version; used by later SGLang stages)
#   marlin-variants - Marlin's atomic-add / bf16-reduce options at small M, per layer shape
#   bench-llava  - LLaVA-1.5-7B shape: grace_qat vs stock GPTQ (original and llava-hf layout) vs BF16
#   bench-qwen   - Qwen3-VL-2B: grace_qat vs stock GPTQ with each one-flag kernel (default, humming,
#                  marlin) vs BF16 (GRACE_BENCH_SYSTEMS / GRACE_BENCH_BATCHES narrow it)
#   profile-qwen - Qwen3-VL-2B batch 1: GPU kernels per decode step (torch profiler) of stock Humming and
#                  grace_qat (GRACE_PROFILE_SYSTEMS: which systems; default gptq-humming,gptq-marlin,grace-a:
#                  two stock kernels bound the plugin's gap on Humming, which is not reproducible)
#   profile-load - where an engine start goes, function by function (cProfile, benchmarks/startup_profile.py):
#                  the plugin on the 2B format A and stock vLLM on its GPTQ export with the kernel the plugin
#                  chose, each with empty caches of its own -> $OUT/startup-{plugin,stock}.json
#   bench-w8     - Qwen3-VL-2B W8: grace_qat vs stock GPTQ int8
#   bench-hf     - Qwen3-VL-2B: plain Transformers generate on the BF16-on-grid checkpoint
#   suite        - (vLLM) the engine test suite on tiny fixtures + the LLaVA original-layout checks
#   serve-qwen-w4a - (vLLM) full-size HTTP serve check: grace_qat vs stock on the GPTQ export, image+text
#                  and text chats, greedy tokens must be identical -> $OUT/serve-FORMAT.json; likewise
#   serve-qwen-w4b - Qwen3-VL-2B format B (AWQ-packed) vs its GPTQ export
#   serve-qwen-w8a - Qwen3-VL-2B W8 format A
#   serve-llava-w4a - LLaVA-1.5-7B (original layout) W4 format A
#   sglang-serve-qwen-w4a - (SGLang) the same four over SGLang's HTTP server -> $OUT/sglang-serve-FORMAT.json
#   sglang-serve-qwen-w4b - (SGLang) format B: AWQ-Marlin vs the export's GPTQ-Marlin (tokens reported only)
#   sglang-serve-qwen-w8a - (SGLang) W8 format A
#   sglang-serve-llava-w4a - (SGLang) LLaVA-1.5-7B, tokenizer from `grace-qat llava-processor`
#   tp2          - (2-GPU kind) tensor parallel 2: tiny and 2B, grace_qat vs stock GPTQ
#   load         - the HTTP load test, 4x larger, on the full-size 2B
#   sglang-jit-bg - (SGLang) build its JIT Marlin kernels once, in the background (sglang* stages wait),
#                  after unpacking a cache an earlier lease saved (carried to /tmp/sglang-jit-in)
#   sglang-jit-save - (SGLang) this machine's SGLang JIT cache -> $OUT as checksummed parts (a call of its
#                  own at the end of a lease; keep them outside the checkout, e.g. ~/.cache, and copy
#                  them to .jit-cache/sglang-VERSION/ to carry to the next lease)
#   sglang-tiny  - (SGLang) tests/gpu/sglang_serve_check.py on tiny Qwen3-VL (layer check, plugin vs stock)
#   sglang       - (SGLang) tests/gpu/sglang_serve_check.py on tiny and 2B Qwen3-VL
#   sglang-llava - (SGLang) the same on a tiny original-layout LLaVA-1.5 (local CLIP tower)
#   bench-sglang - (SGLang) SGLang + grace_qat vs stock SGLang GPTQ, 2B, batch 1..128
#   bench-sglang-llava - (SGLang) the same on LLaVA-1.5-7B (original layout, fp16 as SGLang runs it; text
#                  prompts; needs the `llava-gptq` fixtures)
#   llava-check  - only the LLaVA original-layout checks of suite
#   tiny         - every format on tiny Qwen3-VL through the benchmark harness, eager
#   gemv         - the CUDA decode GEMV (grace_qat/kernels/cuda_gemv.py): its `-m gpu` tests, its benchmark
#                  next to BF16, the Triton kernel and (when a vLLM is there) Marlin/Machete/Humming -> $OUT/gemv/
#                  small_m.json, and Nsight Compute profiles of every layer shape at M=1, each with what bounds
#                  it (DRAM, SM, latency) -> $OUT/gemv/ncu.json and into small_m.json; no
#                  engine needed (GRACE_GEMV_BENCH_ARGS adds benchmark flags, e.g. "--bits 4,8 --tp 1,2")
#   sglang-gpu-tests - (SGLang) the `-m "sglang and gpu"` tests of tests/test_sglang_plugin.py: each plugin layer
#                  equal bit for bit to stock SGLang's on the GPTQ export, with Marlin and with Humming
#   gpu-tests    - (vLLM) the `-m gpu` tests of tests/test_vllm_plugin.py (exact codes after the repack) and
#                  tests/test_small_m_kernel.py (the Triton kernel, exact)
#   workflow-vllm - the vllm job of .github/workflows/engine-images.yml, step by step as written, with the
#                  engine seen as installed (the bundle marker hidden; tests/gpu/workflow_steps.py)
#   sglang-workflow - the same for its sglang job
set -uo pipefail
OUT=${OUT:-/tmp/out}
case "$OUT" in /*) ;; *) OUT=$PWD/$OUT ;; esac
cd "$(dirname "$0")/../.."
ROOT=$PWD
stage=${1:-}; shift || true
case "$stage" in
  sglang*|bench-sglang|bench-sglang-llava) ENGINE=sglang ;;
  *) ENGINE=vllm ;;
esac
SITES=${GRACE_GPU_SITES:-/tmp}
SITE=$SITES/site-$ENGINE
BG=${GRACE_GPU_BG:-/tmp/grace-run}   # background jobs: tree copies, logs, pids
RES=${GRACE_GPU_RES:-/tmp/res}      # the chain's results
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}   # an engine reachable through PYTHONPATH counts as installed
# FlashInfer's sampler JIT costs ~110 s per start.
export VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
XOVER=/tmp/xover; [ "$ENGINE" = sglang ] && XOVER=/tmp/xover-sglang   # kernel tables measured in this lease
[ -f $XOVER/kernel_table.json ] && export GRACE_QAT_CROSSOVER_FILE=$XOVER/kernel_table.json
[ -f /tmp/engine-env ] && source /tmp/engine-env
mkdir -p "$OUT"
WORK=/tmp/grace-bench
BATCHES=1,2,4,8,16,32,64,128
# what a bench stage times; GRACE_BENCH_BATCHES / GRACE_BENCH_IMAGE_BATCHES (may be empty) narrow it to a lease
BENCH_BATCHES=${GRACE_BENCH_BATCHES:-$BATCHES} BENCH_IMAGE_BATCHES=${GRACE_BENCH_IMAGE_BATCHES-1,8}

engine_importable() {   # engine_importable MODULE: installed in this python3 (without importing it)
  python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('$1') is None)" 2>/dev/null
}
use_engine() {   # use_engine WAIT_S: the bundle once unpacked, else the installed engine, else wait
  local t=0
  while :; do
    if [ -f "$SITE.done" ]; then export PYTHONPATH=$ROOT:$SITE; ENGINE_FROM="bundle $SITE"; return 0; fi
    if [ "${GRACE_GPU_ENGINE:-auto}" != bundle ] && engine_importable "$ENGINE"; then
      ENGINE_FROM="installed"; return 0
    fi
    [ "$t" -ge "$1" ] && break
    sleep 5; t=$((t + 5))
  done
  echo "no $ENGINE for stage $stage: no bundle ($SITE.done) and no $ENGINE importable by $(command -v python3)"
  return 1
}
v1_runner_exists() {   # vLLM's model runner V1 (gone in 0.34): its file, found without importing vLLM
  python3 - <<'PY' 2>/dev/null
import importlib.util, os, sys
spec = importlib.util.find_spec("vllm")
sys.exit(not (spec and any(os.path.exists(os.path.join(d, "v1", "worker", "gpu_model_runner.py"))
                           for d in spec.submodule_search_locations or ())))
PY
}
cuda_visible() {   # GPU stages fail, not skip everything, where no CUDA device is visible
  python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null && return 0
  echo "no CUDA device visible to $(command -v python3): every GPU test would skip"; return 1
}
engine_env() {   # variables only some engine versions accept: set by feature, never by version number
  # vLLM 0.26's V2 runner stalled >200 s pinning host buffers for the 151936-token vocabulary on this
  # VM, so the V1 runner is chosen where it exists; vLLM 0.34 removed it and refuses the variable.
  if [ "$ENGINE" = vllm ] && v1_runner_exists; then export VLLM_USE_V2_MODEL_RUNNER=0; else unset VLLM_USE_V2_MODEL_RUNNER; fi
}
snapshot() {   # snapshot NAME: a fresh copy of the tree in $BG/NAME for a background job; prints its path
  local d=$BG/$1
  rm -rf "$d" && mkdir -p "$d" \
    && tar --exclude=./.git --exclude='./.devbundle*' --exclude='./.venv*' --exclude='./.sglang-*' --exclude=./.whl \
           --exclude=./.jit-cache --exclude=./.hypothesis --exclude=./.pytest_cache -cf - . | tar -xf - -C "$d" \
    && echo "$d"
}
start_bg() {   # start_bg NAME DIR COMMAND: bash COMMAND in its own session, working directory DIR, log $BG/NAME.log
  mkdir -p "$BG"
  ( cd "$2" || exit 1
    setsid nohup bash -c "echo \$\$ > '$BG/$1.pid'; $3" > "$BG/$1.log" 2>&1 < /dev/null & )
  sleep 0.5
}
wait_for() {   # wait_for MARKER SECONDS
  local t=0
  while [ ! -f "$1" ] && [ ! -f /tmp/prep.failed ] && [ $t -lt "$2" ]; do sleep 5; t=$((t + 5)); done
  [ -f "$1" ] || { echo "no $1 (prep failed or timed out)"; tail -20 $BG/prep.log 2>/dev/null; return 1; }
}
wait_gpu() {   # fixture sources written: the GPU is the engine's alone
  [ -f /tmp/prep.sh ] || return 0
  wait_for /tmp/prep-gpu.done 400
}
wait_sglang_jit() {   # SGLang's Marlin modules built (when sglang-jit-bg started a build)
  [ -f $BG/sglang-jit.log ] || return 0
  wait_for /tmp/sglang-jit.done 1200 || { tail $BG/sglang-jit.log; return 1; }
}
wait_prep() {  # every conversion finished: benchmarks need a quiet CPU
  [ -f /tmp/prep.sh ] && [ "${GRACE_GPU_NO_PREP_WAIT:-0}" != 1 ] || return 0
  wait_for /tmp/prep.done "${1:-600}"
}
llava_check() {   # the original-layout LLaVA checks (vLLM 0.26 needs the Transformers 5.5 in /tmp/site-tf)
  PYTHONPATH=/tmp/site-tf:$PYTHONPATH timeout "${1:-200}" python3 tests/llava_reference.py --check $OUT > $OUT/llava.log 2>&1
  local rc=$?; echo "llava rc=$rc"; tail -12 $OUT/llava.log; return $rc
}
sglang_llava_inputs() {   # sglang_llava_inputs MODEL-DIR SIZE: what SGLang needs beside an original-layout LLaVA
  # a tokenizer with <image> (LLaVA's own has none) in MODEL-DIR-proc; and, since SGLang's LLaVA (stock and
  # plugin) loads the CLIP tower by the hub id mm_vision_tower names, one of this size in the Hugging Face
  # cache, as a user who downloaded it has it
  python3 -m grace_qat.cli llava-processor $1 $1-proc || return 1
  python3 -c "import sys; sys.path.insert(0, 'tests'); import llava_fixtures; print('CLIP tower:', llava_fixtures.cache_clip('$2'))"
}
prepared() {   # prepared MODEL SIZE SYSTEM..: "DIR.." of each system, written where missing (vllm_bench names them)
  local model=$1 size=$2 log; shift 2; log=$(mktemp)
  python3 benchmarks/vllm_bench.py --prepare-only --model $model --size $size --work $WORK \
    --systems "$(IFS=,; echo "$*")" --out /tmp/prep-out > $log 2>&1 || { tail -5 $log >&2; rm -f $log; return 1; }
  for sys in "$@"; do awk -v s="$sys" '$1 == "[prepared]" && $2 == s {print $3}' $log; done | xargs
  rm -f $log
}
serve_fixture() {   # serve_fixture ENGINE FORMAT: "MODEL SIZE SOURCE-SYSTEM GPTQ-SYSTEM" of a serve stage
  case "$1 $2" in
    *" qwen-w4a")  echo "qwen3vl 2b grace-a gptq" ;;
    *" qwen-w4b")  echo "qwen3vl 2b grace-b gptq-from-b" ;;
    *" qwen-w8a")  echo "qwen3vl 2b grace-a-w8 gptq-w8" ;;
    # SGLang runs original-layout LLaVA-1.5 in fp16 whatever config.json says (its dtype comes from the
    # text config, which has none): the plugin rounds the fp32 steps once to fp16, so stock gets the
    # export written for fp16; the default bf16 export gives it fp16(bf16(step)) (lease 5: tokens differed)
    "sglang llava-w4a") echo "llava 7b grace-a gptq-fp16" ;;
    *" llava-w4a") echo "llava 7b grace-a gptq" ;;
    *) return 1 ;;
  esac
}

case "$stage" in   # the engine a stage runs on (bundle or installed; see the top)
  prepare-bg|chain|poll|bench-hf) ;;
  gemv) use_engine 0 > /dev/null || ENGINE_FROM="" ;;
  engine|sglang-engine|sglang-jit-bg|sglang-jit-save) use_engine 0 || exit 1 ;;
  install) use_engine 0 || [ "${GRACE_GPU_SANITY:-1}" = 0 ] || exit 1 ;;
  crossover|sglang-crossover|marlin-variants|bench-llava|bench-qwen|profile-qwen|profile-load|bench-w8|suite|llava-check|tiny|tp2|load|gpu-tests|\
  workflow-vllm|sglang-workflow|\
  serve-qwen-w4a|serve-qwen-w4b|serve-qwen-w8a|serve-llava-w4a|sglang-serve-qwen-w4a|sglang-serve-qwen-w4b|\
  sglang-serve-qwen-w8a|sglang-serve-llava-w4a|sglang-tiny|sglang|sglang-llava|bench-sglang|bench-sglang-llava|sglang-gpu-tests)
    use_engine "${GRACE_GPU_BUNDLE_WAIT:-900}" || exit 1 ;;
  *) echo "unknown stage '$stage' (stages: the comment at the top of $0)"; exit 2 ;;
esac
[ -n "${ENGINE_FROM:-}" ] && engine_env

case "$stage" in
  engine|sglang-engine)
    python3 - "$ENGINE" "$ENGINE_FROM" <<'PY'
import sys
engine, where = sys.argv[1], sys.argv[2]
import importlib
import torch
mod = importlib.import_module(engine)
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"engine: {engine} {mod.__version__} ({where}); torch {torch.__version__}; {gpu}")
PY
    echo "engine env: VLLM_USE_V2_MODEL_RUNNER=${VLLM_USE_V2_MODEL_RUNNER-unset}"
    ;;
  prepare-bg)
    rm -rf /tmp/prep*.done /tmp/prep.failed && mkdir -p $WORK
    D=$(snapshot prep) || exit 1
    B="python3 $D/benchmarks/vllm_bench.py --prepare-only --work $WORK --out /tmp/prep-out"
    gpu="" cpu=""
    for set in "$@"; do case $set in
      llava)   gpu+="$B --model llava --size 7b --systems grace-a || { touch /tmp/prep.failed; exit 1; }"$'\n'
               cpu+="( $B --model llava --size 7b --systems gptq,gptq-hf,bf16-hf || touch /tmp/prep.failed ) &"$'\n' ;;
      llava-gptq)  # what serve-llava-w4a needs, without the llava-hf exports of bench-llava
               gpu+="$B --model llava --size 7b --systems grace-a || { touch /tmp/prep.failed; exit 1; }"$'\n'
               cpu+="( $B --model llava --size 7b --systems gptq || touch /tmp/prep.failed ) &"$'\n' ;;
      llava-gptq-fp16)  # what sglang-serve-llava-w4a needs (its stock reference is the fp16 export)
               gpu+="$B --model llava --size 7b --systems grace-a || { touch /tmp/prep.failed; exit 1; }"$'\n'
               cpu+="( $B --model llava --size 7b --systems gptq-fp16 || touch /tmp/prep.failed ) &"$'\n' ;;
      qwen)    gpu+="$B --model qwen3vl --size 2b --systems grace-a,grace-b || { touch /tmp/prep.failed; exit 1; }"$'\n'
               cpu+="( $B --model qwen3vl --size 2b --systems gptq,gptq-from-b || touch /tmp/prep.failed ) &"$'\n' ;;
      qwen-w8) gpu+="$B --model qwen3vl --size 2b --systems grace-a-w8 || { touch /tmp/prep.failed; exit 1; }"$'\n'
               cpu+="( $B --model qwen3vl --size 2b --systems gptq-w8 || touch /tmp/prep.failed ) &"$'\n' ;;
      *) echo "unknown fixture set $set"; exit 2 ;;
    esac; done
    cat > /tmp/prep.sh <<EOF
export OMP_NUM_THREADS=4 PYTHONPATH=$D
$gpu
touch /tmp/prep-gpu.done
export CUDA_VISIBLE_DEVICES=
$cpu
wait
touch /tmp/prep.done
EOF
    start_bg prep "$D" "bash /tmp/prep.sh"
    sleep 3; echo "background prepare started from $D: $*"; df -h /tmp | tail -1 ;;
  install)
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 \
      || python3 -m pip install -q --no-deps --no-build-isolation --no-index --target $SITE . >/dev/null
    ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-test .whl/*.whl
    # vLLM 0.26's LLaVA/Pixtral code needs Transformers 5.5 (5.17 renamed a class it imports)
    ls .whl/tf/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-tf .whl/tf/*.whl
    [ "${GRACE_GPU_SANITY:-1}" = 0 ] && exit 0
    python3 -c "from grace_qat import synthetic; synthetic.write_qwen3vl('/tmp/tiny-a', size='tiny')"
    # Engine sanity: the forked engine core once hung here; spawn it, else run it in-process.
    if timeout 150 python3 benchmarks/vllm_run.py --model /tmp/tiny-a --quantization grace_qat --batches 1 > $OUT/sanity.log 2>&1; then
      echo "engine sanity (spawned engine core): ok"; : > /tmp/engine-env
    else
      echo "spawned engine core failed/hung; trying in-process"; tail -5 $OUT/sanity.log
      echo "export VLLM_ENABLE_V1_MULTIPROCESSING=0" > /tmp/engine-env; source /tmp/engine-env
      timeout 150 python3 benchmarks/vllm_run.py --model /tmp/tiny-a --quantization grace_qat --batches 1 > $OUT/sanity2.log 2>&1 \
        && echo "in-process engine: ok" || { tail -20 $OUT/sanity2.log; exit 1; }
    fi
    grep -E "^RESULT" $OUT/sanity*.log | cut -c1-300; grep -h "grace_qat: " $OUT/sanity*.log | cut -c1-250 | head -8
    grep -v "it/s" $BG/prep.log 2>/dev/null | tail -5; exit 0 ;;
  chain)
    # A copy of the tree runs, so a later call re-laying the working tree can neither change nor kill it
    rm -f $RES/chain.done && mkdir -p $RES   # earlier results stay
    D=$(snapshot chain) || exit 1
    cat > $BG/chain.sh <<EOF
for s in $*; do
  echo "\$(date +%T) \$s start" >> $RES/chain.status
  OUT=$RES/\$s bash $D/tests/gpu/run.sh \$s > $RES/\$s.log 2>&1; rc=\$?
  echo "\$(date +%T) \$s rc=\$rc" >> $RES/chain.status
  # A stage leaves the GPU empty: a timed-out engine's core can outlive its parent and hold ~120 GiB,
  # which made every later engine refuse to start (H200, 2026-12-01: the suite's LLaVA check timed out).
  left=\$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | tr -d ' ')
  if [ -n "\$left" ]; then echo "\$(date +%T) \$s left GPU processes \$left: ended" >> $RES/chain.status
    kill \$left 2>/dev/null; sleep 5; kill -9 \$left 2>/dev/null; sleep 2; fi
done
touch $RES/chain.done
EOF
    start_bg chain "$D" "bash $BG/chain.sh"
    sleep 1; echo "chain started from $D: $*" ;;
  poll)
    # no chain here: a fresh machine (the last one went back 30 s after a call) holds nothing to wait for
    [ -f $RES/chain.status ] || { echo "poll: no chain on this machine (a fresh one? each call must follow the last within 30 s)"; exit 4; }
    t=0; while [ ! -f $RES/chain.done ] && [ $t -lt "${1:-540}" ]; do sleep 5; t=$((t + 5)); done
    cat $RES/chain.status; grep -v "it/s" $BG/prep.log 2>/dev/null | tail -3
    last=$(tail -1 $RES/chain.status | awk '{print $2}')
    [ -n "$last" ] && grep -h -E "^\[bench\]|passed|failed|FAILED|rror|rc=" $RES/$last.log 2>/dev/null | cut -c1-300 | tail -15
    tar -czf $OUT/res.tgz -C "$(dirname $RES)" "$(basename $RES)" 2>/dev/null
    mkdir -p $OUT/bg && cp $BG/*.log $OUT/bg/ 2>/dev/null; ls -la $OUT
    [ -f $RES/chain.done ] || { echo "poll: the chain has not finished (waited ${1:-540} s); poll again at once"; exit 3; }
    grep -E " rc=[1-9]" $RES/chain.status && exit 1
    exit 0 ;;
  crossover|sglang-crossover)
    [ "$ENGINE" = sglang ] && { wait_sglang_jit || exit 1; }
    wait_gpu || exit 1
    # the GEMV's launch configs from this lease's `gemv` sweep, where that stage ran before
    tuned=$(dirname $OUT)/gemv/gemv/small_m.json; [ -f $tuned ] && set -- --gemv-configs $tuned "$@"
    python3 benchmarks/kernel_crossover.py --engine $ENGINE --out $XOVER ${GRACE_CROSSOVER_ARGS:-} "$@" > $OUT/crossover.log 2>&1; rc=$?
    cat $OUT/crossover.log; cp $XOVER/* $OUT/ 2>/dev/null; exit $rc ;;
  marlin-variants)   # issue 9: can a Marlin setting make batch 1 faster still? (7B shapes, ~1 min)
    wait_gpu || exit 1
    python3 benchmarks/kernel_crossover.py --models llava-7b,qwen3vl-2b --tp 1 --bits 4 --marlin-variants \
      --out $OUT/variants > $OUT/variants.log 2>&1; rc=$?
    grep -v "^ *$" $OUT/variants.log; exit $rc ;;
  bench-llava)
    wait_prep || exit 1
    # GRACE_LLAVA_SYSTEMS narrows it (the llava-hf systems need `prepare-bg llava`, not llava-gptq)
    PYTHONPATH=/tmp/site-tf:$PYTHONPATH python3 benchmarks/vllm_bench.py --model llava --size 7b --work $WORK \
      --systems "${GRACE_LLAVA_SYSTEMS:-gptq,gptq-humming,grace-a,gptq-hf,bf16-hf}" \
      --batches "$BENCH_BATCHES" --image-batches "$BENCH_IMAGE_BATCHES" --timeout 300 --out $OUT/llava7b "$@" ;;
  bench-qwen)
    wait_prep || exit 1
    # GRACE_BENCH_SYSTEMS / _BATCHES / _IMAGE_BATCHES narrow a run to what a lease has time for
    python3 benchmarks/vllm_bench.py --model qwen3vl --size 2b --work $WORK --batches "$BENCH_BATCHES" \
      --image-batches "$BENCH_IMAGE_BATCHES" --timeout 300 --out $OUT/qwen2b \
      --systems "${GRACE_BENCH_SYSTEMS:-gptq,gptq-humming,gptq-marlin,grace-a,grace-a-single,grace-a-humming,bf16-grid}" "$@" ;;
  profile-qwen)
    wait_prep || exit 1
    stamp=$(mktemp); rc=0; systems=${GRACE_PROFILE_SYSTEMS:-gptq-humming,gptq-marlin,grace-a}
    profile() {   # OUT-DIR SYSTEMS [more vllm_bench options]
      python3 benchmarks/vllm_bench.py --model qwen3vl --size 2b --work $WORK --batches 1 --image-batches "" \
        --profile-tokens 16 --timeout 300 --out "$1" --systems "$2" "${@:3}"
    }
    profile $OUT/qwen2b-profile "$systems" "$@" || rc=$?
    # the first system compiled and profiled once more: how far two compiles of one system differ
    # (Inductor picks combo kernels by timing them), the yardstick for the systems' difference
    profile $OUT/qwen2b-profile-again "${systems%%,*}" "$@" || rc=$?
    # the modules Inductor generated for each system (kernel sources inside), to diff what the profile
    # shows apart: $OUT/qwen2b-profile/compiled-<system>-<ns>.tgz
    for d in $(find $WORK/vllm-cache -mindepth 1 -maxdepth 1 -newer $stamp 2>/dev/null); do
      (cd $d && grep -rl --include='*.py' "def call(" . | tar -czf $OUT/qwen2b-profile/compiled-$(basename $d).tgz -T -)
    done
    exit $rc ;;
  profile-load)   # where a start goes, by function: the plugin on the 2B format A, stock on its GPTQ export
    # with the kernel the plugin chose (Humming JIT-builds at a first start, Machete does not), each
    # side with empty caches of its own (compile, Humming), so that the two starts compare like for like
    wait_prep || exit 1
    rc=0 model=$WORK/qwen3vl-2b-qat-sidecar-w4
    profile_start() {   # SIDE MODEL [startup_profile.py options]
      local c=$WORK/startup-cache/$1; rm -rf $c
      VLLM_CACHE_ROOT=$c/vllm HUMMING_CACHE_DIR=$c/humming timeout 600 python3 benchmarks/startup_profile.py \
        --model $2 "${@:3}" --out $OUT/startup-$1.json > $OUT/startup-$1.log 2>&1 || { rc=1; tail -20 $OUT/startup-$1.log; }
      grep -A13 "^start" $OUT/startup-$1.log
    }
    profile_start plugin $model --quantization grace_qat "$@"
    k=$(grep -oE "grace_qat: using [A-Za-z]+LinearKernel" $OUT/startup-plugin.log | head -1 | awk '{print $3}')
    b=$(printf %s "$k" | sed -n 's/LinearKernel$//p' | tr A-Z a-z)    # MacheteLinearKernel -> machete
    case $b in machete|marlin|humming) q=(--linear-backend $b) ;; *) q=() ;; esac
    echo "stock starts on the plugin's kernel: ${k:-not in its log} (${q[*]:-the engine default})"
    profile_start stock $model-gptq "${q[@]}" "$@"
    exit $rc ;;
  bench-w8)
    wait_prep || exit 1
    python3 benchmarks/vllm_bench.py --model qwen3vl --size 2b --work $WORK --systems gptq-w8,grace-a-w8 \
      --batches 1,16,64 --image-batches "" --timeout 200 --out $OUT/qwen2b-w8 "$@" ;;
  bench-hf)   # what users have today: Transformers generate (the machine's own Transformers)
    wait_prep || exit 1
    python3 benchmarks/vllm_bench.py --model qwen3vl --size 2b --work $WORK --systems hf-generate \
      --batches 1,8,32,128 --image-batches "" --timeout 400 --out $OUT/qwen2b-hf "$@" ;;
  tp2)        # on the 2-GPU kind: stock GPTQ vs grace_qat with tensor parallel 2, tiny then 2B
    rc=0
    python3 benchmarks/vllm_bench.py --size tiny --tp 2 --eager --batches 1 --image-batches "" --timeout 200 \
      --out $OUT/tiny-tp2 --systems gptq,grace-a-single,grace-a,gptq-from-b,grace-b || rc=1
    wait_prep || exit 1
    python3 benchmarks/vllm_bench.py --model qwen3vl --size 2b --tp 2 --work $WORK --batches 1,16,64 \
      --image-batches "" --timeout 200 --out $OUT/qwen2b-tp2 --systems gptq,grace-a-single || rc=1
    exit $rc ;;
  load)       # the load test at 4x its CPU size (96 requests, 32 at a time) on the full-size 2B, format A
    export PYTHONPATH=/tmp/site-test:$PYTHONPATH
    wait_prep || exit 1
    GRACE_LOAD_SCALE=4 GRACE_LOAD_MODEL=$WORK/qwen3vl-2b-qat-sidecar-w4 GRACE_LOAD_OUT=$OUT/load \
      timeout 420 python3 -m pytest -q -s -p no:cacheprovider tests/test_load.py > $OUT/load.log 2>&1; rc=$?
    tail -60 $OUT/load.log; echo "pytest rc=$rc"; exit $rc ;;
  serve-qwen-w4a|serve-qwen-w4b|serve-qwen-w8a|serve-llava-w4a|sglang-serve-qwen-w4a|sglang-serve-qwen-w4b|sglang-serve-qwen-w8a|sglang-serve-llava-w4a)
    fmt=${stage#sglang-}; fmt=${fmt#serve-}
    read -r model size src_sys ref_sys <<< "$(serve_fixture "$ENGINE" "$fmt")"
    [ "$ENGINE" = sglang ] && { wait_sglang_jit || exit 1; }
    wait_prep || exit 1
    read -r dir ref_dir <<< "$(prepared $model $size $src_sys $ref_sys)"   # prepare-bg wrote them, usually
    [ -n "$ref_dir" ] || exit 1
    extra=()
    if [ "$ENGINE" = sglang ] && [ "$model" = llava ]; then
      sglang_llava_inputs $dir $size || exit 1
      extra=(--tokenizer-path $dir-proc)
    fi
    [ "$model" = llava ] && export PYTHONPATH=/tmp/site-tf:$PYTHONPATH
    # both servers start at once where each can have a fixed KV cache: vLLM >= 0.34
    # (--kv-cache-memory-bytes), SGLang (--max-total-tokens)
    if [ "$ENGINE" = sglang ] || python3 -c "import vllm.engine.arg_utils as a, sys; sys.exit('kv_cache_memory_bytes' not in a.EngineArgs.__dataclass_fields__)" 2>/dev/null; then
      extra+=(--side-by-side)
    fi
    timeout 1500 python3 tests/gpu/serve_check.py --engine $ENGINE --model $dir --reference $ref_dir \
      --out "$OUT/${stage%-$fmt}-$fmt.json" --startup-timeout 600 ${extra[@]+"${extra[@]}"} "$@" ;;
  sglang-jit-bg)   # (after the SGLang bundle) build SGLang's JIT Marlin kernels in the background:
    # >5 min per dtype with nvcc; an engine killed mid-build loses it (tests/gpu/sglang_jit_warmup.py)
    rm -f /tmp/sglang-jit.done
    D=$(snapshot jit) || exit 1
    # a cache saved by an earlier lease's sglang-jit-save, carried to /tmp/sglang-jit-in, is unpacked first
    start_bg sglang-jit "$D" "PYTHONPATH=$D${PYTHONPATH#$ROOT} nice -n 5 python3 tests/gpu/sglang_jit_warmup.py --cache-in /tmp/sglang-jit-in && touch /tmp/sglang-jit.done"
    sleep 2; echo "SGLang JIT warm-up started from $D" ;;
  sglang-jit-save)   # (SGLang, last call of a lease) this machine's SGLang JIT cache -> $OUT in parts
    python3 tests/gpu/sglang_jit_warmup.py --save-cache $OUT ;;
  sglang-tiny)   # plugin vs stock SGLang GPTQ on tiny Qwen3-VL: layer check, image+text and text requests
    wait_sglang_jit || exit 1
    python3 -c "from grace_qat import synthetic; synthetic.write_qwen3vl('/tmp/sg-tiny', size='tiny')" || exit 1
    wait_gpu || exit 1
    timeout 900 python3 tests/gpu/sglang_serve_check.py --model /tmp/sg-tiny --out $OUT/sglang-tiny.json \
      --timeout 400 "$@" ;;
  sglang)     # plugin vs stock SGLang GPTQ, tiny then 2B
    wait_sglang_jit || exit 1
    python3 -c "from grace_qat import synthetic; synthetic.write_qwen3vl('/tmp/sg-tiny', size='tiny')" || exit 1
    wait_gpu || exit 1
    # each step (layer check, plugin engine, stock engine) gets --timeout; the first engine may still
    # JIT-compile SGLang's smaller kernels
    rc=0
    timeout 900 python3 tests/gpu/sglang_serve_check.py --model /tmp/sg-tiny --out $OUT/sglang-tiny.json \
      --timeout 400 "$@" || rc=1
    wait_prep || exit 1
    timeout 900 python3 tests/gpu/sglang_serve_check.py --model $WORK/qwen3vl-2b-qat-sidecar-w4 \
      --reference $WORK/qwen3vl-2b-qat-sidecar-w4-gptq --out $OUT/sglang-2b.json --skip-layer-check \
      --timeout 400 "$@" || rc=1
    exit $rc ;;
  sglang-llava)   # (SGLang) original-layout LLaVA-1.5 (tiny) on SGLang's LlavaLlamaForCausalLM: local CLIP
    # tower (mm_vision_tower = a directory), --tokenizer-path from `grace-qat llava-processor`
    wait_sglang_jit || exit 1
    python3 -c "import sys; sys.path.insert(0, 'tests')
import llava_fixtures
from grace_qat import llava_hf
llava_fixtures.write_llava('/tmp/sg-llava', size='tiny', clip_dir='/tmp/sg-clip')
llava_hf.write_processor('/tmp/sg-llava', '/tmp/sg-llava-proc')" || exit 1
    timeout 900 python3 tests/gpu/sglang_serve_check.py --model /tmp/sg-llava --tokenizer-path /tmp/sg-llava-proc \
      --out $OUT/sglang-llava-tiny.json --timeout 400 "$@" ;;
  bench-sglang)   # (SGLang bundle) the plugin vs stock SGLang GPTQ on the full-size 2B, formats A and B
    wait_sglang_jit || exit 1
    wait_prep || exit 1
    python3 benchmarks/vllm_bench.py --model qwen3vl --size 2b --work $WORK --batches "$BENCH_BATCHES" \
      --image-batches "$BENCH_IMAGE_BATCHES" --timeout 420 \
      --systems "${GRACE_BENCH_SGLANG_SYSTEMS:-sglang-gptq,sglang-gptq-humming,sglang-bf16-grid,sglang-grace-a,sglang-grace-a-humming,sglang-grace-b}" \
      --out $OUT/qwen2b-sglang "$@" ;;
  bench-sglang-llava)   # (SGLang bundle) the plugin vs stock SGLang GPTQ on LLaVA-1.5-7B, text prompts
    wait_sglang_jit || exit 1
    wait_prep || exit 1
    dir=$(prepared llava 7b grace-a) && [ -n "$dir" ] || exit 1
    sglang_llava_inputs $dir 7b || exit 1
    python3 benchmarks/vllm_bench.py --model llava --size 7b --work $WORK --batches "$BENCH_BATCHES" \
      --no-image --tokenizer-path $dir-proc --timeout 600 \
      --systems "${GRACE_BENCH_SGLANG_SYSTEMS:-sglang-gptq-humming,sglang-grace-a,sglang-gptq}" \
      --out $OUT/llava7b-sglang "$@" ;;
  suite)
    cuda_visible || exit 1
    export PYTHONPATH=/tmp/site-test:$PYTHONPATH
    wait_gpu || exit 1
    timeout 450 python3 -m pytest -q -x -p no:cacheprovider tests/test_vllm_plugin.py > $OUT/suite.log 2>&1; rc=$?
    tail -25 $OUT/suite.log; echo "pytest rc=$rc"
    llava_check 400 || rc=1
    exit $rc ;;
  sglang-gpu-tests)
    cuda_visible || exit 1
    wait_sglang_jit || exit 1
    export PYTHONPATH=/tmp/site-test:$PYTHONPATH
    timeout 500 python3 -m pytest -q -rs -m "sglang and gpu" -p no:cacheprovider tests/test_sglang_plugin.py \
      > $OUT/sglang-gpu-tests.log 2>&1; rc=$?
    tail -25 $OUT/sglang-gpu-tests.log; echo "pytest rc=$rc"; exit $rc ;;
  gpu-tests)
    cuda_visible || exit 1
    export PYTHONPATH=/tmp/site-test:$PYTHONPATH
    # GRACE_GPU_TEST_ARGS narrows it for a short lease: files and a -k expression without spaces
    timeout 900 python3 -m pytest -q -rsP -m "gpu or stock_kernels" -p no:cacheprovider \
      ${GRACE_GPU_TEST_ARGS:-tests/test_vllm_plugin.py tests/test_small_m_kernel.py} > $OUT/gpu-tests.log 2>&1; rc=$?
    tail -25 $OUT/gpu-tests.log; echo "pytest rc=$rc"; exit $rc ;;
  gemv)
    cuda_visible || exit 1
    export PYTHONPATH=/tmp/site-test:$PYTHONPATH
    mkdir -p $OUT/gemv; rc=0
    echo "engine: ${ENGINE_FROM:-none, so grace_qat kernels and BF16 only}"
    timeout 170 python3 -m pytest -q -rs -m gpu -p no:cacheprovider tests/test_cuda_gemv.py > $OUT/gemv-tests.log 2>&1 \
      || rc=1
    tail -15 $OUT/gemv-tests.log
    timeout 300 python3 benchmarks/gemv_kernel.py --out $OUT/gemv --bits 4 --ms 1,2,4,8,16 --sweep-seconds 75 \
      ${GRACE_GEMV_BENCH_ARGS:-} > $OUT/gemv-bench.log 2>&1 || { rc=1; echo "benchmark failed"; }
    grep -v "^ *$" $OUT/gemv-bench.log | tail -40
    timeout 170 python3 benchmarks/gemv_kernel.py --out $OUT/gemv --ncu --ncu-m 1 --ncu-timeout 160 \
      > $OUT/gemv/ncu.log 2>&1 || echo "ncu profile failed (not counted): tail of $OUT/gemv/ncu.log"
    tail -25 $OUT/gemv/ncu.log
    echo "gemv rc=$rc"; exit $rc ;;
  workflow-vllm|sglang-workflow)
    # A published image has no bundle marker: hide it, keep the engine importable through PYTHONPATH
    export GRACE_GPU_SITES=/tmp/no-bundle GRACE_GPU_BUNDLE_WAIT=0   # PYTHONPATH already holds $SITE (use_engine)
    job=$ENGINE
    timeout 1500 python3 tests/gpu/workflow_steps.py $job --offline --out $OUT/workflow-$job.jsonl \
      --artifacts $OUT/artifacts > $OUT/workflow-$job.log 2>&1; rc=$?
    grep -E "^== |\"failed\"" $OUT/workflow-$job.log; tail -5 $OUT/workflow-$job.log; exit $rc ;;
  llava-check)   # the original-layout LLaVA checks of `suite` alone
    llava_check 300 ;;
  tiny)
    python3 benchmarks/vllm_bench.py --size tiny --eager --batches 1 --gen-tokens 32 --out "$OUT/tiny" \
      --systems gptq,grace-a,grace-a-single,grace-a-inline,grace-a-grid,gptq-w8,grace-a-w8,gptq-from-b,grace-b,bf16 "$@" ;;
  *) echo "unknown stage '$stage' (stages: the comment at the top of $0)"; exit 2 ;;
esac
