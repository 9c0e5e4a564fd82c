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

A lease starts on a fresh machine, so every lease paid those minutes again. SGLang's JIT cache is
content-addressed (a build is reused only where its sources, flags, compilers and package versions
hash the same), so a cache built on the GPU machine can travel: ``--save-cache DIR`` packs the whole
cache (the Marlin modules and whatever the engines compiled on their own) into checksummed parts
small enough to come back from the device; ``--cache-in DIR`` unpacks such parts before building,
and a build that still applies is then a cache hit. A part that fails its checksum is refused and
the kernels are built as before.

    python3 tests/gpu/sglang_jit_warmup.py [--dtypes bfloat16,float16] [--cache-in DIR]
    python3 tests/gpu/sglang_jit_warmup.py --save-cache DIR
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import os
import pathlib
import subprocess
import sys
import tarfile
import time

# the module that defines _jit_gptq_marlin_module moved between SGLang releases
GEMM_MODULES = ("sglang.kernels.ops.gemm.gptq_marlin",           # 0.5.23
                "sglang.kernels.ops.quantization.gptq_marlin")   # 0.5.17
REPACKS = (("sglang.kernels.ops.quantization.gptq_marlin_repack", "_jit_gptq_marlin_repack_module"),
           ("sglang.kernels.ops.quantization.awq_marlin_repack", "_jit_awq_marlin_repack_module"))


# Files come back from the device machine at most 8 per call and 16 MiB each: parts and SHA256SUMS
PART_BYTES = 15 * 2**20
MAX_PARTS = 7
ARCHIVE = "sglang-jit.tar.xz"


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


def jit_cache_root() -> pathlib.Path:
    """Where this SGLang keeps its JIT builds (SGLANG_JIT_CACHE_DIR, else its default)."""
    try:
        from sglang.kernels.jit.utils.compile.cache import cache_root
        return pathlib.Path(cache_root())
    except ImportError:          # an SGLang without the content-addressed cache (0.5.17)
        return pathlib.Path(os.environ.get("SGLANG_JIT_CACHE_DIR") or "~/.cache/sglang/jit").expanduser()


def save_cache(root: pathlib.Path, out: pathlib.Path) -> list[pathlib.Path]:
    """Pack ``root`` into parts of at most PART_BYTES under ``out`` plus SHA256SUMS; none where the
    cache is empty or would take more than MAX_PARTS parts (said on stdout)."""
    if not root.is_dir() or not any(root.iterdir()):
        print(f"[jit] nothing to save: {root} is empty or missing", flush=True)
        return []
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        tar.add(root, arcname=".", filter=lambda info: None if "/.staging-" in info.name else info)
    data = buf.getvalue()
    chunks = [data[i:i + PART_BYTES] for i in range(0, len(data), PART_BYTES)]
    if len(chunks) > MAX_PARTS:
        print(f"[jit] not saved: {root} packs to {len(data) / 2**20:.0f} MiB, more than {MAX_PARTS} "
              f"parts of {PART_BYTES // 2**20} MiB can bring back", flush=True)
        return []
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{ARCHIVE}.part{i:02d}" for i in range(len(chunks))]
    for path, chunk in zip(paths, chunks):
        path.write_bytes(chunk)
    (out / "SHA256SUMS").write_text("".join(f"{hashlib.sha256(chunk).hexdigest()}  {path.name}\n"
                                            for path, chunk in zip(paths, chunks)))
    print(f"[jit] saved {root} as {len(paths)} parts ({len(data) / 2**20:.1f} MiB) in {out}", flush=True)
    return paths


def restore_cache(src: pathlib.Path, root: pathlib.Path) -> bool:
    """Unpack the parts that ``save_cache`` wrote into ``root``; False (and nothing unpacked) where
    there are none, a part is missing or fails its checksum, or the archive does not read."""
    sums = src / "SHA256SUMS"
    if not sums.is_file():
        print(f"[jit] no saved cache in {src}: building", flush=True)
        return False
    chunks = []
    for line in sums.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        part = src / name
        chunks.append(part.read_bytes() if part.is_file() else None)
        if chunks[-1] is None or hashlib.sha256(chunks[-1]).hexdigest() != digest:
            print(f"[jit] saved cache refused: {part} is missing or fails its SHA-256: building", flush=True)
            return False
    try:
        with tarfile.open(fileobj=io.BytesIO(b"".join(chunks)), mode="r:xz") as tar:
            root.mkdir(parents=True, exist_ok=True)
            for member in tar.getmembers():       # every member checked before anything is written
                tarfile.data_filter(member, str(root))    # no absolute paths, no '..', no device files
            tar.extractall(root, filter="data")
    except (tarfile.TarError, OSError) as exc:
        print(f"[jit] saved cache refused: {exc}: building", flush=True)
        return False
    print(f"[jit] restored the saved cache from {src} into {root}", flush=True)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="bfloat16,float16",
                    help="activation dtypes (Qwen3-VL serves in bf16, LLaVA-1.5 in fp16)")
    ap.add_argument("--cache-in", type=pathlib.Path,
                    help="a folder of parts written by --save-cache: unpacked before building")
    ap.add_argument("--save-cache", type=pathlib.Path, metavar="DIR",
                    help="only pack this machine's SGLang JIT cache into DIR (parts + SHA256SUMS)")
    ap.add_argument("--only", help=argparse.SUPPRESS)    # one module, in a child process
    args = ap.parse_args()
    if args.save_cache:
        save_cache(jit_cache_root(), args.save_cache)
        return
    if args.cache_in:
        restore_cache(args.cache_in, jit_cache_root())
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
