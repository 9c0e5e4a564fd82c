#!/usr/bin/env python3
"""Build SGLang's JIT Marlin kernels once, before any engine starts.

SGLang (0.5.17+) compiles its GPTQ-Marlin GEMM with nvcc on first use. On the GPU test machine that
took over 5 minutes (cicc ~4 min, ptxas ~1.5 min) per activation dtype, inside the first CUDA-graph
capture: an engine started with a shorter timeout is killed mid-build, its ninja dies with it, and
the next engine starts the build from scratch (seen: three engines in a row, stock GPTQ included,
never got past "Capture ... begin"). Building here, with no timeout, leaves the modules in the
tvm-ffi cache for every later engine process. The build targets the compute capability that
nvidia-smi reports, with the GPU hidden from this process, so it can run beside an engine without
holding GPU memory (a neighbour that frees memory breaks vLLM's memory profiling).

    python3 tests/gpu/sglang_jit_warmup.py [--dtypes bfloat16,float16]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import subprocess
import sys
import time

# the module that defines _jit_gptq_marlin_module moved between SGLang releases
GEMM_MODULES = ("sglang.kernels.ops.gemm.gptq_marlin",           # 0.5.23
                "sglang.kernels.ops.quantization.gptq_marlin")   # 0.5.17
REPACKS = (("sglang.kernels.ops.quantization.gptq_marlin_repack", "_jit_gptq_marlin_repack_module"),
           ("sglang.kernels.ops.quantization.awq_marlin_repack", "_jit_awq_marlin_repack_module"))


class NoJitModule(Exception):
    """This SGLang defines none of the known JIT Marlin builders (e.g. it ships the kernels prebuilt)."""


def _first(names: tuple[str, ...], attr: str):
    for name in names:
        try:
            return getattr(importlib.import_module(name), attr)
        except (ImportError, AttributeError):
            continue
    raise NoJitModule(f"none of {names} defines {attr}")


def _gpu_arch() -> contextlib.AbstractContextManager:
    """Build for the local GPU's capability without opening a CUDA context."""
    try:
        cap = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout.split()[0]
        major, minor = (int(x) for x in cap.split("."))
        from sglang.kernels.jit.utils import override_jit_cuda_arch
    except Exception as exc:     # no nvidia-smi or an SGLang without the override: detect normally
        print(f"[jit] building with SGLang's own arch detection ({exc})", flush=True)
        return contextlib.nullcontext()
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    print(f"[jit] target compute capability {major}.{minor}", flush=True)
    return override_jit_cuda_arch(major, minor)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="bfloat16,float16",
                    help="activation dtypes (Qwen3-VL serves in bf16, LLaVA-1.5 in fp16)")
    ap.add_argument("--only", help=argparse.SUPPRESS)    # one module, in a child process
    args = ap.parse_args()
    if args.only:
        with _gpu_arch():
            try:
                _build(args.only)
            except NoJitModule as e:   # nothing to warm up: the engine builds (or needs) nothing here
                print(f"[jit] {args.only}: nothing to build ({e}): this SGLang builds Marlin differently",
                      flush=True)
        return
    # nvcc compiles one file on one core: the modules build side by side, one process each
    jobs = [attr for _, attr in REPACKS] + [f"gemm:{d}" for d in args.dtypes.split(",") if d]
    children = {job: subprocess.Popen([sys.executable, __file__, "--only", job]) for job in jobs}
    failed = [job for job, child in children.items() if child.wait() != 0]
    if failed:
        raise SystemExit(f"[jit] failed to build: {', '.join(failed)}")


def _build(job: str) -> None:
    t = time.perf_counter()
    if job.startswith("gemm:"):
        import torch
        _first(GEMM_MODULES, "_jit_gptq_marlin_module")(getattr(torch, job.split(":", 1)[1]))
    else:
        _first(tuple(m for m, attr in REPACKS if attr == job), job)()
    print(f"[jit] {job} built in {time.perf_counter() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
