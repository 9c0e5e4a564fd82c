#!/usr/bin/env python3
"""Ship a serving engine, with the torch it pins, to the GPU test machine in parts of one call each.

The GPU machine has no network and takes 64 MiB per call (working tree plus carried paths). Its image
(Python 3.12, torch 2.11.0+cu130, CUDA 13.0 libraries as nvidia-* wheels) is described in IMAGE below.
This tool, run here with network:

1. resolves the engine's full dependency set for cp312 / manylinux x86_64 (pip's resolver, dry run);
2. decides per package: skip (the tests never load it, PROFILES), reuse the image's copy (same version,
   or a version that satisfies every requirement on it; for CUDA libraries: same SONAME and every
   dynamic symbol the shipped .so files import from it is exported by the image's version), or ship it;
3. installs the shipped wheels into a staging folder (pip --target, --no-deps; its .so files are what the
   CUDA-library check reads) and packs: `--format wheels` (what the GPU runs use) copies the wheels
   without the members the tests never load (zip -d, no recompression) into a plain tar;
   `--format xz` tars the stripped staging tree through xz (slow here: see BUNDLES.md);
4. splits the archive into parts of --part-mib (52 MiB: 64 MiB per call minus the working tree and
   headroom), writes <out>/partNN/ with the last part holding SHA256SUMS and install.sh, and prints the
   device calls: one per part, each carrying only its part folder.

    python3 tests/gpu/bundle.py build vllm==0.33.0 --format wheels [--out DIR] [--calls FILE]
    python3 tests/gpu/bundle.py verify .devbundle-vllm-0.33.0 --python /path/to/python3.12   # play the calls here
    python3 tests/gpu/bundle.py libs .devbundle-vllm-0.33.0/manifest.json   # the CUDA-library evidence table

On the GPU machine the installed bundle lives in /tmp/site-<engine>; `source /tmp/site-<engine>.env`
sets PYTHONPATH (and PYTORCH_SKIP_CUDNN_COMPATIBILITY_CHECK where the image's cuDNN is reused).
See tests/gpu/BUNDLES.md for what travels per version and why.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

MIB = 1024 * 1024
CALL_LIMIT = 64 * MIB          # what one device call may carry: working tree + carried paths
PART_MIB = 52                  # default part size: leaves 12 MiB for the working tree (8.5 MB archived today)
TAR_BLOCK = 512
PLATFORMS = ["manylinux_2_%d_x86_64" % n for n in range(5, 40)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
TARGET_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "platform_system": "Linux",
              "platform_machine": "x86_64", "sys_platform": "linux", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython"}
IMAGE_SITE = "/opt/torch/.venv/lib/python3.12/site-packages"

# The GPU image, read by a probe on 2026-12-01 (versions) and 2026-11-17 (names without a version).
IMAGE = {
    "torch": "2.11.0", "triton": "3.6.0", "torchvision": "0.26.0", "torchaudio": "2.11.0",
    "transformers": "5.17.0", "tokenizers": "0.23.2", "huggingface-hub": "1.33.0", "numpy": "2.5.2",
    "safetensors": "0.8.0", "sentencepiece": "0.2.2", "tiktoken": "0.14.0", "accelerate": "1.15.0",
    "cuda-toolkit": "13.0.2", "cuda-bindings": "13.3.1", "nvidia-cublas": "13.1.0.3",
    "nvidia-cuda-cupti": "13.0.85", "nvidia-cuda-nvrtc": "13.0.88", "nvidia-cuda-runtime": "13.0.96",
    "nvidia-cudnn-cu13": "9.19.0.56", "nvidia-cufft": "12.0.0.61", "nvidia-cufile": "1.15.1.6",
    "nvidia-curand": "10.4.0.35", "nvidia-cusolver": "12.0.4.66", "nvidia-cusparse": "12.6.3.3",
    "nvidia-cusparselt-cu13": "0.8.0", "nvidia-nccl-cu13": "2.28.9", "nvidia-nvjitlink": "13.0.88",
    "nvidia-nvshmem-cu13": "3.4.5", "nvidia-nvtx": "13.0.85",
}
IMAGE_UNVERSIONED = """absl-py aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs build certifi
charset-normalizer click cloudpickle cmake colorama contourpy coverage cuda-core cuda-pathfinder cupy-cuda13x cycler
cython einops filelock flatbuffers fonttools frozenlist fsspec grpcio h11 h5py hf-xet httpcore httpx humanize
hypothesis idna imageio iniconfig jinja2 joblib kiwisolver lazy-loader llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda nvidia-ml-py onnx onnxruntime opencv-python-headless packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo
pygments pyparsing pyproject-hooks python-dateutil pyyaml regex requests rich scikit-build-core scikit-image
scikit-learn scipy setuptools shellingham simplejson six sortedcontainers sympy tabulate tensorboard threadpoolctl
tifffile timm toolz tqdm typer typing-extensions typing-inspect urllib3 uvloop werkzeug wheel wrapt xxhash yarl
zipp""".split()
# Never ship these over the image's copy: the installer tooling itself, and packages whose replacement
# would change what the image's own compiled packages were built against (numpy: the image has 2.5.2;
# mistral-common's metadata says <2.4 and numba 0.65 <2.5, but numba is only imported for n-gram
# speculative decoding and mistral-common only for Mistral tokenizers).
NEVER_SHIP = {"pip", "setuptools", "wheel", "packaging", "numpy", "numba", "llvmlite"}
# An image package of unknown version is reused when its wheel is at least this big (a large compiled
# package is costly to carry and the image's copy is recent); smaller constrained ones ship.
REUSE_UNKNOWN_MIN = 4 * MIB
# Compiled against torch's C++ ABI: they travel with torch whenever torch travels, whatever the metadata
# of the engine says about them (the image's torchvision 0.26 is built for its torch 2.11).
TORCH_BOUND = {"torchvision", "torchaudio"}

# Files nobody loads at run time, for every torch/triton (paths inside the installed tree).
COMMON_DROP = [
    r"torch/include/", r"torch/share/cmake/", r"torch/bin/protoc", r"torch/lib/.*\.a$", r"torch/test/",
    r"triton/backends/nvidia/lib/cupti-blackwell/", r"triton/backends/nvidia/bin/ptxas-blackwell$",
    r"triton/backends/nvidia/lib/cupti/.*\.a$", r"triton/backends/nvidia/lib/cupti/libnvperf_host\.so",
    r"nvidia/[^/]+/include/", r".*/tests?/.*\.py$",
]
COMMON_SKIP = {
    # heavy, and loaded only for audio/video inputs, other GPUs, or server features the tests do not use
    "torchaudio": "audio models only (the image's torchaudio 2.11 must not be imported with a newer torch)",
    "torchcodec": "video decoding only", "pynvvideocodec": "video decoding only",
    "nvidia-cuda-nvcc": "the image has nvcc 13.0 (JIT paths use it)",
    "nvidia-cuda-crt": "part of nvcc, which the image has", "nvidia-nvvm": "part of nvcc, which the image has",
    "nvidia-cuda-cccl": "CUDA C++ headers; the image's CUDA toolkit has them",
    "cuda-python": "meta package with no module of its own (cuda-bindings is reused)",
    "mcp": "tool servers for the Responses API", "mcp-types": "tool servers for the Responses API",
    "opentelemetry-exporter-otlp": "tracing export", "opentelemetry-exporter-otlp-proto-grpc": "tracing export",
    "opentelemetry-exporter-otlp-proto-http": "tracing export", "opentelemetry-exporter-otlp-common": "tracing",
    "opentelemetry-exporter-otlp-proto-common": "tracing export", "opentelemetry-proto": "tracing export",
    "opentelemetry-exporter-http-transport": "tracing export", "googleapis-common-protos": "tracing export",
    "grpcio": "tracing export (the image has grpcio)",
    "fastapi-cloud-cli": "fastapi's cloud deploy command", "rignore": "fastapi-cloud-cli",
    "sentry-sdk": "fastapi-cloud-cli", "agent-detector": "fastapi-cloud-cli", "detect-installer": "fastapi-cloud-cli",
    "pyjwt": "mcp auth", "cryptography": "mcp auth", "cffi": "cryptography", "pycparser": "cryptography",
    "supervisor": "process supervision in containers",
    "z3-solver": "tilelang's solver", "tilelang": "TileLang kernels (DeepSeek sparse attention)",
    "tokenspeed-mla": "MLA kernels (DeepSeek)", "tokenspeed-triton": "tokenspeed-mla's Triton fork",
    "nccl4py": "NCCL from Python for multi-GPU paths", "nccl-extensions": "NCCL extensions (multi-GPU)",
    "instanttensor": "alternative weight loader", "fastsafetensors": "alternative weight loader (GDS)",
}

PROFILES = {
    "vllm": dict(
        skip=dict(COMMON_SKIP, **{
            "nvidia-cutlass-dsl-libs-cu12": "CuTe DSL for CUDA 12 (the machine is CUDA 13)",
            "cuda-tile": "cuTile kernels (Blackwell)",
            # vLLM 0.34 pins flashinfer-python==0.7.3, which the index lacks; the engines start and serve
            # without FlashInfer (FA3 attention, VLLM_USE_FLASHINFER_SAMPLER=0): the smoke test proves it
            "flashinfer-python": "FlashInfer (the tests use FA3 and VLLM_USE_FLASHINFER_SAMPLER=0)",
            "flashinfer-cubin": "prebuilt FlashInfer kernels; the tests use FA3 and VLLM_USE_FLASHINFER_SAMPLER=0",
            "flashinfer-jit-cache": "prebuilt FlashInfer JIT cache",
        }),
        drop=[r"vllm/vllm_flash_attn/_vllm_fa2_C\.abi3\.so$", r"vllm/vllm-rs$", r"vllm/_flashmla.*\.so$",
              r"vllm/_flashkda_C\.abi3\.so$", r"vllm/third_party/fmha_sm100/", r"vllm/_qutlass_C\.abi3\.so$",
              r"vllm/_deepselect_C\.abi3\.so$", r"vllm/third_party/deep_gemm/_C\.cpython-3(?!12)"],
    ),
    "sglang": dict(
        # soundfile and its cffi ship: SGLang 0.5.23's HTTP server imports its audio chunking at start-up
        # (`sglang.launch_server` died on `import soundfile`, H100, 2026-12-07)
        skip=dict({k: v for k, v in COMMON_SKIP.items() if k not in ("cffi", "pycparser")}, **{
            "flashinfer-cubin": "prebuilt FlashInfer kernels", "flashinfer-jit-cache": "prebuilt FlashInfer JIT",
            "flash-attn-4": "FA4 (Blackwell)", "kernels": "Hub kernels loader", "kernels-data": "Hub kernels",
            "deepseek-recipe": "DeepSeek models", "sgl-deep-ep": "expert parallelism (multi-GPU MoE)",
            "sgl-deep-gemm": "FP8 DeepGEMM (MoE / DeepSeek)", "sgl-flash-mla": "MLA attention (DeepSeek)",
            "nvidia-mathdx": "cuBLASDx/cuFFTDx for CuTe-DSL kernels", "nvshmem4py-cu13": "multi-GPU NVSHMEM",
            # nvidia-cutlass-dsl ships: SGLang 0.5.23's Llama and Qwen2/3 MLPs (layers/dual_gemm.py) import
            # `cutlass` when the model is built, on every CUDA engine (H100, 2026-12-07: no model started)
            "quack-kernels": "CuTe-DSL kernels (Blackwell)",
            "nvidia-cutlass-dsl-libs-cu12": "CuTe DSL for CUDA 12 (the machine is CUDA 13)",
            "cuda-tile": "cuTile kernels (Blackwell)", "datasets": "benchmark datasets",
            "modelscope": "ModelScope hub downloads", "modelscope-hub": "ModelScope hub downloads",
            "smg-grpc-servicer": "gRPC server mode", "smg-grpc-proto": "gRPC server mode",
            "grpcio-health-checking": "gRPC server mode", "grpcio-reflection": "gRPC server mode",
            "py-spy": "profiling", "tml-renderers": "Thinking Machines renderers",
            "timm": "some vision towers (the image has timm)", "pyarrow": "datasets (the image has pyarrow)",
            "multiprocess": "datasets", "pandas": "datasets (the image has pandas)",
        }),
        drop=[r"sgl_kernel/flash_ops\.abi3\.so$", r"sgl_kernel/sm100/", r"sgl_kernel/flashmla_ops\.abi3\.so$",
              r"sgl_kernel/.*/flash_ops\.abi3\.so$", r"sgl_kernel/.*/flashmla_ops\.abi3\.so$",
              r"sgl_kernel/.*cpython-3(?!12)\d+-x86_64-linux-gnu\.so$"],
        # imported but not declared by the engine (reached here only through skipped packages)
        need={"dill": "sglang.srt.sampling.custom_logit_processor imports it; only datasets declares it"},
    ),
}
# install.sh's smoke test: start the engine with its defaults and generate (not only import it)
SMOKE = pathlib.Path(__file__).with_name("engine_smoke.py")
# SGLang JIT-compiles its Marlin kernels with nvcc + tvm-ffi: keep torch's headers for it.
SGLANG_KEEP = [r"torch/include/"]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def run(cmd, **kw):
    print("+ " + " ".join(shlex.quote(str(c)) for c in cmd[:12]) + (" ..." if len(cmd) > 12 else ""),
          file=sys.stderr)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


# ---------------------------------------------------------------- splitting, checksums, call text
def sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            h.update(block)
    return h.hexdigest()


def check_part_size(part_bytes: int, tree_bytes: int, limit: int = CALL_LIMIT) -> None:
    """Refuse a part that, with the working tree beside it, would not fit in one call."""
    if part_bytes <= 0:
        raise ValueError("part size must be positive, got %d" % part_bytes)
    if part_bytes + tree_bytes + 64 * 1024 > limit:
        raise ValueError("part of %d bytes plus the working tree (%d bytes) exceeds the %d-byte call limit"
                         % (part_bytes, tree_bytes, limit))


def split_file(src: pathlib.Path, out: pathlib.Path, part_bytes: int, tree_bytes: int = 0) -> list[dict]:
    """Cut src into out/partNN/<src.name>.partNN; return [{dir, file, sha256, size}] in order."""
    check_part_size(part_bytes, tree_bytes)
    parts = []
    with open(src, "rb") as f:
        i = 0
        while True:
            chunk = f.read(part_bytes)
            if not chunk and i:
                break
            d = out / ("part%02d" % i)
            d.mkdir(parents=True, exist_ok=True)
            name = "%s.part%02d" % (src.name, i)
            (d / name).write_bytes(chunk)
            parts.append(dict(dir=d.name, file=name, sha256=hashlib.sha256(chunk).hexdigest(), size=len(chunk)))
            i += 1
            if len(chunk) < part_bytes:
                break
    return parts


INSTALL_SH = r"""#!/usr/bin/env bash
# Reassemble, verify and unpack the {label} bundle on the GPU machine. Written by tests/gpu/bundle.py.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ASM=/tmp/asm-{engine} SITE=/tmp/site-{engine}
cp "$here/{last_file}" "$ASM/"
cd "$ASM"
sha256sum -c --quiet "$here/SHA256SUMS.parts"
# the archive, its unpacked copy and the site beside the parts: say so in one line where they cannot fit
# (lease 6 of 2026-12-07: a 7B fixture set left 4.8 GiB and pip died mid-install with "No space left")
free_kib=$(df -Pk "$ASM" | awk 'NR == 2 {{print $4}}')
if [ "$free_kib" -lt {need_kib} ]; then
  echo "install.sh: unpacking {label} needs $(({need_kib} / 1048576 + 1)) GiB free under $ASM, $((free_kib / 1048576)) GiB are: delete what no later stage needs (fixtures under /tmp/grace-bench, another engine's /tmp/site-*) and call again" >&2
  exit 1
fi
cat {part_glob} > {archive}
echo "{whole_sha}  {archive}" | sha256sum -c --quiet
rm -rf "$SITE" "$SITE.done"; mkdir -p "$SITE"
{unpack}
rm -f {archive} {part_glob}
# CUDA libraries reused from the image: symlink every image file the bundle does not carry, so torch's
# RPATH ($ORIGIN/../../nvidia/...) and its sys.path preload find them next to the shipped ones.
IMG=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['platlib'])")
if [ -d "$IMG/nvidia" ]; then mkdir -p "$SITE/nvidia"; cp -rsn "$IMG/nvidia/." "$SITE/nvidia/"; fi
# A --target install leaves .pth files unprocessed (PYTHONPATH is no site directory), and vLLM 0.34's
# CuTe-DSL warm-up imports `cutlass`, which nvidia-cutlass-dsl's .pth puts on sys.path: process them.
printf 'import os, site\nsite.addsitedir(os.path.dirname(os.path.abspath(__file__)))\n' > "$SITE/sitecustomize.py"
cat > "$SITE.env" <<EOF
export PYTHONPATH=$SITE\${{PYTHONPATH:+:\$PYTHONPATH}}
{env_lines}EOF
. "$SITE.env"
cd /tmp && python3 "${{BUNDLE_SMOKE:-$here/smoke.py}}" {engine}
touch "$SITE.done"
echo "installed {label} into $SITE ($(du -sh "$SITE" | cut -f1)); later calls: source $SITE.env"
"""


UNPACK = {
    # a tar.xz of the installed tree: unpack it (xz with threads where present, else Python's lzma)
    "xz": 'if command -v xz >/dev/null; then xz -dc -T0 {archive} | tar -x -C "$SITE"\n'
          'else python3 -c "import lzma,sys,tarfile; tarfile.open(fileobj=lzma.open(sys.argv[1])).extractall('
          'sys.argv[2])" {archive} "$SITE"; fi',
    # a plain tar of the (stripped) wheels: pip installs them, offline and without dependencies
    "wheels": 'rm -rf whl && mkdir whl && tar -xf {archive} -C whl\n'
              'python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" whl/wheels/*.whl\n'
              'rm -rf whl',
}


def unzipped_bytes(wheels: list[pathlib.Path]) -> int:
    """What the wheels hold unpacked: the size of the site pip installs them into."""
    total = 0
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            total += sum(i.file_size for i in z.infolist())
    return total


def write_install(last: pathlib.Path, label: str, engine: str, parts: list[dict], whole_sha: str,
                  env_lines: str, smoke: str, fmt: str = "xz", installed_bytes: int = 0) -> None:
    """Put SHA256SUMS.parts, install.sh (reassemble, verify, unpack, smoke test) and the smoke test
    (``smoke``: a Python script's text, run with the engine name as its argument) beside the last part.
    ``installed_bytes``: the unpacked site's size, which install.sh checks the disk has room for."""
    archive = label + (".tar.xz" if fmt == "xz" else ".tar")
    archive_bytes = sum((last.parent / p["dir"] / p["file"]).stat().st_size for p in parts)
    need_kib = (2 * archive_bytes + installed_bytes) // 1024 + 1   # archive, its unpacked copy, the site
    (last / "SHA256SUMS.parts").write_text("".join("%s  %s\n" % (p["sha256"], p["file"]) for p in parts))
    (last / "smoke.py").write_text(smoke)
    (last / "install.sh").write_text(INSTALL_SH.format(
        label=label, engine=engine, last_file=parts[-1]["file"], part_glob=archive + ".part[0-9][0-9]",
        archive=archive, whole_sha=whole_sha, env_lines=env_lines, need_kib=need_kib,
        unpack=UNPACK[fmt].format(archive=archive)))


def call_sequence(engine: str, label: str, rel_out: str, parts: list[dict]) -> list[dict]:
    """The device calls, in order: one per part, each carrying only its own part folder."""
    calls = []
    for i, p in enumerate(parts):
        folder = "%s/%s" % (rel_out, p["dir"])
        if i < len(parts) - 1:
            cmd = ("mkdir -p /tmp/asm-{e} && cp {f}/{n} /tmp/asm-{e}/ && cd /tmp/asm-{e} && "
                   "echo '{h}  {n}' | sha256sum -c && df -h /tmp | tail -1").format(
                e=engine, f=folder, n=p["file"], h=p["sha256"])
        else:
            cmd = "mkdir -p /tmp/asm-{e} && bash {f}/install.sh".format(e=engine, f=folder)
        calls.append(dict(carry=[folder], command=cmd))
    return calls


def format_calls(label: str, calls: list[dict], total: int) -> str:
    lines = ["%s bundle: %d parts, %.1f MiB packed. Send these device calls one right after the other "
             "(each call carries only its own part folder; the machine stays warm 30 s between calls, so send "
             "each call alone as soon as the last one answers: calls written together run only once all "
             "are written):" %
             (label, len(calls), total / MIB)]
    for i, c in enumerate(calls):
        lines.append("%d. run carry=%s command=%s" % (i + 1, json.dumps(c["carry"]), json.dumps(c["command"])))
    engine = calls[-1]["command"].split("/tmp/asm-")[1].split(" ")[0] if calls else "?"
    lines.append("After the last call /tmp/site-%s.done exists; every later call starts with "
                 "`source /tmp/site-%s.env` (PYTHONPATH and the flags the bundle needs)." % (engine, engine))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- resolution and decisions
MISSING_PIN = re.compile(r"Could not find a version that satisfies the requirement ([A-Za-z0-9_.\-]+)"
                         r"(?:\[[^\]]*\])?==([^\s;,)]+) \(from versions: ([^)]*)\)")


def substitute_pin(name: str, pinned: str, available: list[str]) -> tuple[str | None, str]:
    """The rule for a pin the package index lacks: the nearest release of the same major.minor, the
    next newer one first (a patch release the engine's authors would have taken), else the newest
    older one; None where that series has no release. Returns (version, the rule as printed)."""
    from packaging.version import InvalidVersion, Version
    want = Version(pinned)
    same = []
    for v in available:
        try:
            ver = Version(v.strip())
        except InvalidVersion:
            continue
        if not ver.is_prerelease and ver.release[:2] == want.release[:2]:
            same.append(ver)
    newer = sorted(v for v in same if v > want)
    older = sorted(v for v in same if v < want)
    pick = newer[0] if newer else (older[-1] if older else None)
    rule = ("%s==%s is not on the package index; rule: the nearest release of %d.%d, a newer one first -> %s"
            % (name, pinned, want.release[0], want.release[1] if len(want.release) > 1 else 0,
               pick if pick else "none: add it to the profile's skip list with the reason, or ship a wheel"))
    return (str(pick) if pick else None), rule


def _pip_resolve(cmd: list[str], reqs: list[str]) -> str | None:
    """Run pip's dry-run resolution; None when it succeeded, else its error output."""
    print("+ pip resolve " + " ".join(reqs[:6]) + (" ..." if len(reqs) > 6 else ""), file=sys.stderr)
    r = subprocess.run([str(c) for c in cmd + reqs], capture_output=True, text=True)
    return None if r.returncode == 0 else (r.stderr + r.stdout)


def report_path(spec: str, cache: pathlib.Path) -> pathlib.Path:
    """The cached resolution of spec; keyed by the profile's skip list too, since a resolution made
    without the skipped requirements (the fallback below) is stale once that list changes."""
    skip = hashlib.sha256(" ".join(sorted(PROFILES[norm(spec.split("==")[0])]["skip"])).encode()).hexdigest()[:10]
    return cache / ("report-%s-%s.json" % (spec.replace("==", "-"), skip))


def resolve(spec: str, cache: pathlib.Path) -> list[dict]:
    """pip's resolution of spec for the GPU machine (cp312, manylinux x86_64), cached per spec.

    When pip cannot resolve the engine as published (a pinned dependency the index lacks: vLLM 0.34's
    flashinfer-python==0.7.3, SGLang 0.5.21's cuda-tile==1.6.0rc5), its requirements are resolved
    instead, without the ones the profile skips and with each missing pin replaced by
    ``substitute_pin``'s choice, printed and kept in the report; the engine itself is added after."""
    report = report_path(spec, cache)
    if not report.exists():
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
               "--target", str(cache / "dry-target"), "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", "--report", str(report)]
        for p in PLATFORMS:
            cmd += ["--platform", p]
        err = _pip_resolve(cmd, [spec])
        substituted = {}
        if err is not None:
            errors = [line for line in err.splitlines() if line.startswith("ERROR")]
            why = next((line for line in errors if "Could not find a version that satisfies" in line),
                       errors[-1] if errors else err.strip()[-300:])
            print("pip cannot resolve %s as published (%s): resolving its requirements without the ones "
                  "the profile skips" % (spec, why), file=sys.stderr)
            skip = PROFILES[norm(spec.split("==")[0])]["skip"]
            name, version = spec.split("==")
            download(cache, [dict(name=name, version=version)])
            with zipfile.ZipFile(wheel_of(cache, dict(name=name, version=version))) as z:
                meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
            reqs = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
            keep = [r for r in reqs if norm(re.split(r"[\s;<>=!~\[(]", r, 1)[0]) not in skip and "extra ==" not in r]
            for _ in range(8):
                err = _pip_resolve(cmd, keep)
                if err is None:
                    break
                m = MISSING_PIN.search(err)
                if not m:
                    raise SystemExit("pip cannot resolve %s's requirements for the GPU machine:\n%s"
                                     % (spec, err.strip()[-2000:]))
                missing, pinned = m.group(1), m.group(2)
                new, rule = substitute_pin(missing, pinned, m.group(3).split(","))
                print(rule, file=sys.stderr)
                if new is None:
                    raise SystemExit(rule)
                substituted[norm(missing)] = dict(pinned=pinned, shipped=new, rule=rule)
                keep = [re.sub(r"==\s*%s\b" % re.escape(pinned), "==" + new, r)
                        if norm(re.split(r"[\s;<>=!~\[(]", r, 1)[0]) == norm(missing) else r for r in keep]
            else:
                raise SystemExit("pip cannot resolve %s's requirements after 8 substitutions" % spec)
            data = json.loads(report.read_text())
            data["install"].insert(0, dict(metadata=dict(name=name, version=version, requires_dist=reqs),
                                           download_info=dict(url="file:///" + spec), requested=True))
            data["substituted"] = substituted
            report.write_text(json.dumps(data))
    out = []
    for item in json.loads(report.read_text())["install"]:
        m = item["metadata"]
        out.append(dict(name=norm(m["name"]), version=m["version"], requires=m.get("requires_dist") or [],
                        url=item["download_info"]["url"], requested=item.get("requested", False)))
    return out


def requirements_on(pkgs: list[dict], consider: set[str]):
    """{name: [(specifier, from_name)]} over the requirements of the packages in `consider`."""
    from packaging.requirements import Requirement
    extras_wanted: dict[str, set[str]] = {}
    for p in pkgs:
        for r in p["requires"]:
            req = Requirement(r)
            if req.extras:
                extras_wanted.setdefault(norm(req.name), set()).update(req.extras)
    on: dict[str, list] = {}
    for p in pkgs:
        if p["name"] not in consider:
            continue
        for r in p["requires"]:
            req = Requirement(r)
            ok = req.marker is None or any(
                req.marker.evaluate(dict(TARGET_ENV, extra=e)) for e in [""] + sorted(extras_wanted.get(p["name"], ())))
            if ok:
                on.setdefault(norm(req.name), []).append((req.specifier, p["name"]))
    return on


def download(cache: pathlib.Path, pkgs: list[dict]) -> None:
    """pip download (no deps, cp312 manylinux x86_64) of each {name, version} whose wheel is not cached."""
    missing = [p for p in pkgs if not cached_wheel(cache, p["name"], p["version"])]
    if not missing:
        return
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "-d", str(cache / "wheels")]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    run(cmd + ["%s==%s" % (p["name"], p["version"]) for p in missing])


def cached_wheel(cache: pathlib.Path, name: str, version: str):
    stem = re.sub(r"[-_.]+", "_", name).lower() + "-" + version + "-"
    for w in (cache / "wheels").glob("*.whl"):
        if w.name.lower().startswith(stem) or w.name.lower().replace("-", "_", 1).startswith(stem):
            return w
    return None


def wheel_of(cache: pathlib.Path, p: dict) -> pathlib.Path:
    w = cached_wheel(cache, p["name"], p["version"])
    if w is None:
        raise SystemExit("no cached wheel for %s==%s" % (p["name"], p["version"]))
    return w


# ---------------------------------------------------------------- ELF evidence for the CUDA libraries
@functools.lru_cache(maxsize=None)
def elf_info(path: str):
    """(NEEDED sonames, SONAME, undefined symbols, defined symbols) with symbol versions, via readelf."""
    out = subprocess.run(["readelf", "-dW", "--dyn-syms", path], capture_output=True, text=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)
    m = re.search(r"\(SONAME\)\s+Library soname: \[(.+?)\]", out)
    und, dfn = set(), set()
    for line in out.splitlines():
        f = line.split()
        if len(f) < 8 or not f[0].endswith(":") or not f[0][:-1].isdigit():
            continue
        if f[6] == "UND":
            und.add(f[7])
        elif f[4] in ("GLOBAL", "WEAK"):
            dfn.add(f[7].replace("@@", "@"))
    return needed, (m.group(1) if m else None), und, dfn


def wheel_libs(whl: pathlib.Path, dest: pathlib.Path) -> dict[str, set]:
    """Unpack a wheel's shared libraries under dest; return {SONAME: exported symbols}."""
    libs = {}
    with zipfile.ZipFile(whl) as z:
        for n in z.namelist():
            if re.search(r"\.so(\.\d+)*$", n.rsplit("/", 1)[-1]):
                p = dest / n
                if not p.exists():
                    z.extract(n, dest)
                _, soname, _, dfn = elf_info(str(p))
                libs[soname or p.name] = dfn
    return libs


def compare_libs(consumers: list[pathlib.Path], pinned: dict[str, set], image: dict[str, set]):
    """Rows (consumer, soname, imported, missing-in-image list) for every CUDA soname a consumer needs."""
    def base(s):
        return s.split("@")[0]
    rows = []
    for c in consumers:
        needed, _, und, _ = elf_info(str(c))
        for so in needed:
            if so not in pinned and so not in image:
                continue
            if so not in image:
                rows.append((c, so, None, None))
                continue
            exp = pinned.get(so, image[so])
            exp_plain = {base(x) for x in exp}
            imported = [u for u in und if u in exp or ("@" not in u and u in exp_plain)]
            img_plain = {base(x) for x in image[so]}
            missing = sorted(u for u in imported if not (u in image[so] or ("@" not in u and u in img_plain)))
            rows.append((c, so, len(imported), missing))
    return rows


def lib_decisions(pkgs, cache: pathlib.Path, consumers_from: list[pathlib.Path], shipping: set[str]):
    """For each nvidia-* CUDA library the resolution pins at another version than the image: ship or reuse,
    by SONAME and symbol evidence. Returns ({name: (decision, reason)}, evidence rows)."""
    work = cache / "elf"
    cands = [p for p in pkgs if p["name"].startswith("nvidia-") and p["name"] in IMAGE]
    diff = [p for p in cands if p["version"] != IMAGE[p["name"]]]
    download(cache, diff + [dict(name=p["name"], version=IMAGE[p["name"]]) for p in diff])
    consumers = []
    for d in consumers_from:
        consumers += [p for p in d.rglob("*.so*") if p.is_file() and not p.is_symlink()
                      and p.relative_to(d).parts[0] != "nvidia"]
    decisions, evidence = {}, []
    for p in cands:
        if p["version"] == IMAGE[p["name"]]:
            decisions[p["name"]] = ("reuse", "same version as the image (%s)" % p["version"])
    for p in diff:
        pinned = wheel_libs(wheel_of(cache, p), work / ("%s-%s" % (p["name"], p["version"])))
        iw = wheel_of(cache, dict(name=p["name"], version=IMAGE[p["name"]]))
        image = wheel_libs(iw, work / ("%s-%s" % (p["name"], IMAGE[p["name"]])))
        rows = compare_libs(consumers, pinned, image)
        lost_so = sorted(set(pinned) - set(image))
        bad = [r for r in rows if r[2] is None or r[3]]
        for r in rows:
            evidence.append((p["name"], p["version"], IMAGE[p["name"]]) + r)
        if bad or lost_so and any(r[1] in lost_so for r in rows):
            why = "; ".join("%s needs %s: %s" % (r[0].name, r[1], "no such SONAME in the image" if r[2] is None
                                                 else "%d of %d imported symbols missing (%s)" % (
                                                     len(r[3]), r[2], ", ".join(r[3][:4]))) for r in bad[:3])
            decisions[p["name"]] = ("ship", why)
        else:
            n = sum(r[2] for r in rows)
            decisions[p["name"]] = ("reuse", "%d symbol imports over %d .so files all exported by the image's %s"
                                    % (n, len({r[0] for r in rows}), IMAGE[p["name"]]))
    return decisions, evidence


def plan(spec: str, cache: pathlib.Path):
    """Decide skip / reuse / ship for every resolved package. Returns (pkgs, {name: (decision, reason)})."""
    engine = norm(spec.split("==")[0])
    prof = PROFILES[engine]
    pkgs = resolve(spec, cache)
    names = {p["name"] for p in pkgs}
    dec: dict[str, tuple[str, str]] = {}
    for p in pkgs:
        if p["name"] in prof["skip"]:
            dec[p["name"]] = ("skip", prof["skip"][p["name"]])
    on = requirements_on(pkgs, names - set(dec))
    reach, todo = set(), [p["name"] for p in pkgs if p["requested"] or p["name"] in prof.get("need", {})]
    while todo:
        n = todo.pop()
        if n in reach or n in dec:
            continue
        reach.add(n)
        todo += [m for m, lst in on.items() if any(f == n for _, f in lst)]
    for n in names - reach - set(dec):
        dec[n] = ("skip", "needed only by skipped packages")
    kept = reach
    on = requirements_on(pkgs, kept)
    download(cache, [p for p in pkgs if p["name"] in kept])
    for p in pkgs:
        n = p["name"]
        if n in dec or n.startswith("nvidia-") and n in IMAGE:
            continue
        specs = on.get(n, [])
        size = wheel_of(cache, p).stat().st_size
        if n in TORCH_BOUND and n in IMAGE and p["version"] != IMAGE[n]:
            dec[n] = ("ship", "built against torch's C++ ABI: travels with torch (image has %s)" % IMAGE[n])
        elif n in NEVER_SHIP:
            dec[n] = ("reuse", "the image's copy is kept (installer tooling, or the base of its compiled packages)")
        elif n in IMAGE:
            bad = [(s, f) for s, f in specs if not s.contains(IMAGE[n], prereleases=True)]
            dec[n] = ("ship", "image has %s; %s" % (IMAGE[n], ", ".join("%s wants %s" % (f, s) for s, f in bad))) \
                if bad else ("reuse", "image's %s satisfies %s" % (IMAGE[n], ", ".join(
                    "%s%s" % (f, s) for s, f in specs if str(s)) or "every requirement"))
        elif n in IMAGE_UNVERSIONED:
            constrained = [(s, f) for s, f in specs if str(s)]
            if not constrained:
                dec[n] = ("reuse", "in the image; nothing constrains its version")
            elif size >= REUSE_UNKNOWN_MIN:
                dec[n] = ("reuse", "in the image (version not read); %.0f MB wheel; wanted %s" % (
                    size / 1e6, ", ".join("%s by %s" % (s, f) for s, f in constrained)))
            else:
                dec[n] = ("ship", "image version unknown; %s (small: ships to be sure)" % ", ".join(
                    "%s by %s" % (s, f) for s, f in constrained))
        else:
            dec[n] = ("ship", "not in the image")
    reused_must_fit(pkgs, dec, cache)
    return pkgs, dec


def image_requires(cache: pathlib.Path, name: str, version: str) -> list[str]:
    """Requires-Dist of the image's copy of a package (read from its published wheel)."""
    download(cache, [dict(name=name, version=version)])
    with zipfile.ZipFile(wheel_of(cache, dict(name=name, version=version))) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    return [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]


def reused_must_fit(pkgs: list[dict], dec: dict, cache: pathlib.Path, requires_of=None) -> None:
    """A reused image package must accept what ships beside it: where its own requirements exclude the
    version chosen for a dependency (the image's transformers 5.17 wants huggingface-hub<2.0, vLLM 0.34
    ships hub 2.x), it ships at the resolved version instead. Repeated until nothing changes, since a
    package that ships changes the versions the others see. ``requires_of(name, version)`` reads a
    package's requirements (default: the published wheel's metadata)."""
    from packaging.requirements import Requirement
    requires_of = requires_of or functools.partial(image_requires, cache)
    resolved = {p["name"]: p for p in pkgs}

    def chosen(n):
        d = dec.get(n, ("ship",))[0]
        if d == "skip" or n not in resolved:
            return None
        return IMAGE.get(n) if d == "reuse" else resolved[n]["version"]

    changed = True
    while changed:
        changed = False
        for n, (d, _) in sorted(dec.items()):
            if d != "reuse" or n not in IMAGE or n in NEVER_SHIP or n.startswith("nvidia-") or n not in resolved:
                continue
            own = resolved[n]["requires"] if IMAGE[n] == resolved[n]["version"] else requires_of(n, IMAGE[n])
            for r in own:
                req = Requirement(r)
                if req.marker is not None and not req.marker.evaluate(dict(TARGET_ENV, extra="")):
                    continue
                v = chosen(norm(req.name))
                if v is not None and str(req.specifier) and not req.specifier.contains(v, prereleases=True):
                    dec[n] = ("ship", "the image's %s %s requires %s%s, but %s %s is chosen" % (
                        n, IMAGE[n], norm(req.name), req.specifier, norm(req.name), v))
                    changed = True
                    break


def strip_tree(site: pathlib.Path, patterns: list[str], keep: list[str]) -> tuple[int, list[str]]:
    """Delete files whose path (relative to site) matches a pattern; return (bytes freed, patterns that hit)."""
    rx = [re.compile(p) for p in patterns]
    kx = [re.compile(p) for p in keep]
    freed, hit = 0, set()
    for path in sorted(site.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        rel = path.relative_to(site).as_posix()
        for r in rx:
            if r.search(rel) and not any(k.search(rel) for k in kx):
                freed += path.stat().st_size
                hit.add(r.pattern)
                path.unlink()
                break
    for d in sorted((p for p in site.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(d.iterdir()):
            d.rmdir()
    return freed, sorted(hit)


def deflate_size(wheels: list[pathlib.Path], site: pathlib.Path) -> int:
    """What the kept files cost as zip-deflated in their wheels (for the xz ratio)."""
    total = 0
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            for i in z.infolist():
                name = re.sub(r"^[^/]+\.data/(purelib|platlib)/", "", i.filename)
                if (site / name).is_file():
                    total += i.compress_size
    return total


def make_archive(site: pathlib.Path, dest: pathlib.Path, level: str) -> float:
    """tar of site (members sorted by file name, so copies of one header sit together) piped to xz."""
    files = sorted((p for p in site.rglob("*") if p.is_file() or p.is_symlink()),
                   key=lambda p: (p.name, p.as_posix()))
    t0 = time.time()
    with open(dest, "wb") as f:
        xz = subprocess.Popen(["xz", "-T2", "-" + level, "-c"], stdin=subprocess.PIPE, stdout=f)
        with tarfile.open(fileobj=xz.stdin, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for p in files:
                tar.add(p, arcname=p.relative_to(site).as_posix(), recursive=False)
        xz.stdin.close()
        if xz.wait():
            raise SystemExit("xz failed")
    return time.time() - t0


def strip_wheels(wheels: list[pathlib.Path], patterns: list[str], keep: list[str], dest: pathlib.Path):
    """Copies of the wheels without the members that match (zip -d copies the other members as they are,
    without recompressing). Returns (wheels to ship, bytes of dropped members uncompressed)."""
    rx = [re.compile(p) for p in patterns]
    kx = [re.compile(p) for p in keep]
    dest.mkdir(parents=True, exist_ok=True)
    out, freed = [], 0
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            drop = []
            for i in z.infolist():
                rel = re.sub(r"^[^/]+\.data/(purelib|platlib)/", "", i.filename)
                if any(r.search(rel) for r in rx) and not any(k.search(rel) for k in kx):
                    drop.append(i.filename)
                    freed += i.file_size
        if not drop:
            out.append(w)
            continue
        copy = dest / w.name
        shutil.copyfile(w, copy)
        for i in range(0, len(drop), 1000):
            run(["zip", "-q", "-d", copy] + drop[i:i + 1000])
        out.append(copy)
    return out, freed


def tar_files(files: list[pathlib.Path], dest: pathlib.Path) -> float:
    t0 = time.time()
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for f in files:
            tar.add(f, arcname="wheels/" + f.name)
    return time.time() - t0


def tree_bytes(repo: pathlib.Path) -> int:
    """Size of what every device call sends anyway: tracked + untracked-not-ignored files (+ shared/), as
    an archive holds them (a 512-byte header per file, data padded to 512 bytes): the device tool's
    limit counted that way refused a 56 MiB part beside an 8.2 MB tree whose plain sizes fitted."""
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout
    files = [repo / n for n in out.decode().split("\0") if n and (repo / n).is_file()]
    shared = repo / "shared"
    if shared.is_dir():
        files += [p for p in shared.rglob("*") if p.is_file()]
    return sum(TAR_BLOCK + -(-f.stat().st_size // TAR_BLOCK) * TAR_BLOCK for f in files)


def ensure_excluded(repo: pathlib.Path, out: pathlib.Path) -> None:
    git_dir = pathlib.Path(subprocess.run(["git", "-C", str(repo), "rev-parse", "--git-common-dir"],
                                          capture_output=True, text=True, check=True).stdout.strip())
    if not git_dir.is_absolute():
        git_dir = repo / git_dir
    exclude = git_dir / "info" / "exclude"
    text = exclude.read_text() if exclude.exists() else ""
    rel = "/" + out.relative_to(repo).parts[0] + "/"
    if rel not in text and "/.devbundle*/" not in text:
        exclude.parent.mkdir(parents=True, exist_ok=True)
        with open(exclude, "a") as f:
            f.write("\n%s\n" % rel)


def prepare(spec, engine, cache, staging, force_ship, reinstall=True) -> dict:
    """Resolve, decide, install the shipped wheels into staging and strip it; return what was decided."""
    pkgs, dec = plan(spec, cache)
    ship_names = {n for n, (d, _) in dec.items() if d == "ship"}
    shipped = [p for p in pkgs if p["name"] in ship_names or p["name"] not in dec]
    # the non-CUDA part first: its .so files are the consumers the CUDA-library check reads
    first = [p for p in shipped if not (p["name"].startswith("nvidia-") and p["name"] in IMAGE)]
    if reinstall:
        shutil.rmtree(staging, ignore_errors=True)
        pip_target(staging, [wheel_of(cache, p) for p in first])
    prof = PROFILES[engine]
    keep = SGLANG_KEEP if engine == "sglang" else []
    if reinstall:
        strip_tree(staging, COMMON_DROP + prof["drop"], keep)
    libdec, evidence = lib_decisions(pkgs, cache, [staging], ship_names)
    dec.update(libdec)
    for n in force_ship:
        dec[norm(n)] = ("ship", "forced by --ship")
    cuda_ship = [p for p in pkgs if p["name"].startswith("nvidia-") and p["name"] in IMAGE
                 and dec.get(p["name"], ("",))[0] == "ship"]
    if cuda_ship and reinstall:
        pip_target(staging, [wheel_of(cache, p) for p in cuda_ship])
    wheels = [wheel_of(cache, p) for p in first + cuda_ship]
    freed, hit = strip_tree(staging, COMMON_DROP + prof["drop"], keep) if reinstall else (None, [])
    return dict(pkgs=pkgs, decisions={n: list(v) for n, v in dec.items()},
                evidence=[[e[0], e[1], e[2], e[3].name, e[4], e[5], e[6]] for e in evidence],
                wheels_raw=sum(w.stat().st_size for w in wheels), stripped=freed, strip_patterns=hit,
                uncompressed=sum(p.stat().st_size for p in staging.rglob("*") if p.is_file()),
                deflate_in_wheels=deflate_size(wheels, staging))


def build(args) -> None:
    spec = args.spec
    engine = norm(spec.split("==")[0])
    label = spec.replace("==", "-")
    cache = pathlib.Path(args.cache)
    (cache / "wheels").mkdir(parents=True, exist_ok=True)
    repo = pathlib.Path(args.repo).resolve()
    out = pathlib.Path(args.out or repo / (".devbundle-" + label)).resolve()
    part_bytes = int(args.part_mib * MIB)
    tb = tree_bytes(repo)
    check_part_size(part_bytes, tb)
    staging = cache / ("site-" + label)
    plan_file = cache / ("plan-%s.json" % label)
    prof = PROFILES[engine]
    if args.reuse_staging and plan_file.exists() and staging.is_dir():
        saved = json.loads(plan_file.read_text())
        print("reusing the staged tree %s and its decisions" % staging, file=sys.stderr)
    else:
        saved = prepare(spec, engine, cache, staging, args.ship or [], reinstall=not (args.reuse_staging
                                                                                     and staging.is_dir()))
        plan_file.write_text(json.dumps(saved, indent=1))
    pkgs, dec = saved["pkgs"], {n: tuple(v) for n, v in saved["decisions"].items()}
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        if args.format == "xz":
            archive = pathlib.Path(tmp) / (label + ".tar.xz")
            secs = make_archive(staging, archive, args.level)
        else:
            vers = {p["name"]: p["version"] for p in pkgs}
            wheels = [wheel_of(cache, dict(name=n, version=vers[n])) for n, v in sorted(dec.items()) if v[0] == "ship"]
            t0 = time.time()
            wheels, wfreed = strip_wheels(wheels, COMMON_DROP + prof["drop"], SGLANG_KEEP if engine == "sglang" else [],
                                          cache / ("stripped-" + label))
            archive = pathlib.Path(tmp) / (label + ".tar")
            tar_files(wheels, archive)
            secs = time.time() - t0
        total = archive.stat().st_size
        whole = sha256_file(archive)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        parts = split_file(archive, out, part_bytes, tb)
    last = out / parts[-1]["dir"]
    cudnn_env = ""
    if engine == "vllm" and dec.get("flashinfer-python", ("skip",))[0] == "skip":
        # vLLM 0.34 imports FlashInfer when its sampler is on; the bundle carries no FlashInfer
        cudnn_env += "export VLLM_USE_FLASHINFER_SAMPLER=0\n"
    cd = dec.get("nvidia-cudnn-cu13")
    pinned_cudnn = next((p["version"] for p in pkgs if p["name"] == "nvidia-cudnn-cu13"), None)
    if cd and cd[0] == "reuse" and pinned_cudnn and pinned_cudnn != IMAGE["nvidia-cudnn-cu13"]:
        # torch.backends.cudnn refuses a runtime cuDNN of a lower minor than it was built with
        cudnn_env += "export PYTORCH_SKIP_CUDNN_COMPATIBILITY_CHECK=1\n"
    installed = saved["uncompressed"] if args.format == "xz" else unzipped_bytes(wheels)
    write_install(last, label, engine, parts, whole, cudnn_env, SMOKE.read_text(), args.format, installed)
    if out.is_relative_to(repo):
        ensure_excluded(repo, out)
    rel = out.relative_to(repo).as_posix() if out.is_relative_to(repo) else str(out)
    calls = call_sequence(engine, label, rel, parts)
    text = format_calls(label, calls, total)
    (out / "CALLS.txt").write_text(text)
    manifest = dict(spec=spec, parts=parts, sha256=whole, compressed=total, pack_seconds=round(secs, 1),
                    format=args.format, xz_level=args.level if args.format == "xz" else None, tree_bytes=tb, part_bytes=part_bytes,
                    versions={p["name"]: p["version"] for p in pkgs},
                    substituted=json.loads(report_path(spec, cache).read_text()).get("substituted", {}),
                    **{k: v for k, v in saved.items() if k != "pkgs"})
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if args.calls:
        pathlib.Path(args.calls).write_text(text)
    summary(manifest)
    print(text)


def pip_target(target: pathlib.Path, wheels: list[pathlib.Path]) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--upgrade",
           "--target", str(target)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    run(cmd + [str(w) for w in wheels], env=dict(os.environ, PIP_CONSTRAINT="", PIP_FIND_LINKS=""))


def summary(m: dict) -> None:
    print("%s: shipped wheels %.0f MB; kept files %.0f MB raw, %.0f MB as deflated in the wheels -> %s %.0f MB "
          "(%.2fx the deflated size) packed in %.0f s; %d parts of %d MiB" % (
              m["spec"], m["wheels_raw"] / 1e6, m["uncompressed"] / 1e6, m["deflate_in_wheels"] / 1e6,
              "xz -%s" % m["xz_level"] if m["format"] == "xz" else "tar of stripped wheels", m["compressed"] / 1e6,
              m["compressed"] / m["deflate_in_wheels"], m["pack_seconds"], len(m["parts"]), m["part_bytes"] // MIB))
    for d in ("ship", "reuse", "skip"):
        names = [n for n, v in m["decisions"].items() if v[0] == d]
        print("  %s (%d): %s" % (d, len(names), " ".join(names)))


def verify(args) -> None:
    """Play a bundle's calls here as the device would: each call in a fresh tree that holds only the carried
    part folder, with `python3` on PATH being --python (a stand-in for the image's)."""
    out = pathlib.Path(args.bundle).resolve()
    m = json.loads((out / "manifest.json").read_text())
    engine, label = norm(m["spec"].split("==")[0]), m["spec"].replace("==", "-")
    calls = call_sequence(engine, label, out.name, m["parts"])
    env = dict(os.environ, PATH=str(pathlib.Path(args.python).parent) + os.pathsep + os.environ["PATH"])
    if args.smoke:
        env["BUNDLE_SMOKE"] = str(pathlib.Path(args.smoke).resolve())
    shutil.rmtree("/tmp/asm-" + engine, ignore_errors=True)
    for i, c in enumerate(calls):
        with tempfile.TemporaryDirectory() as tree:
            for rel in c["carry"]:
                shutil.copytree(out / pathlib.Path(rel).name, pathlib.Path(tree) / rel, copy_function=os.link)
            t0 = time.time()
            r = subprocess.run(["bash", "-c", c["command"]], cwd=tree, env=env, capture_output=True, text=True)
            print("call %d/%d rc=%d %.0f s %s" % (i + 1, len(calls), r.returncode, time.time() - t0,
                                                   (r.stdout + r.stderr).strip().splitlines()[-1:]))
            if r.returncode:
                raise SystemExit(r.stdout + r.stderr)


def libs_only(args) -> None:
    """Print the CUDA-library evidence from a built bundle's manifest."""
    m = json.loads(pathlib.Path(args.manifest).read_text())
    print("| library | pinned | image | consumer | SONAME | imports | missing in image |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for e in m["evidence"]:
        miss = "no such SONAME" if e[5] is None else ("%d: %s" % (len(e[6]), " ".join(e[6][:6])) if e[6] else "0")
        print("| %s | %s | %s | %s | %s | %s | %s |" % (e[0], e[1], e[2], e[3], e[4], e[5], miss))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download, decide, strip, compress, split; print the device calls")
    b.add_argument("spec", help="engine==version, e.g. vllm==0.33.0 or sglang==0.5.23")
    b.add_argument("--out", help="output folder (default <repo>/.devbundle-<engine>-<version>)")
    b.add_argument("--repo", default=str(pathlib.Path(__file__).resolve().parents[2]),
                   help="the repository the device tool sends (its size is what each call carries anyway)")
    b.add_argument("--cache", default=os.path.expanduser("~/.cache/grace-qat-bundle"))
    b.add_argument("--part-mib", type=float, default=PART_MIB)
    b.add_argument("--format", choices=["xz", "wheels"], default="xz",
                   help="xz: tar.xz of the installed tree; wheels: plain tar of the stripped wheels as published "
                        "(no compression work here; pip installs them there)")
    b.add_argument("--level", default="6", help="xz preset (6: 8 MiB dictionary)")
    b.add_argument("--calls", help="also write the call sequence to this file")
    b.add_argument("--reuse-staging", action="store_true",
                   help="pack the staged tree of an earlier run again (e.g. at another xz level)")
    b.add_argument("--ship", nargs="*", help="ship these CUDA libraries even where the image's would do")
    v = sub.add_parser("verify", help="play a built bundle's calls here (CPU), with --python as the image's python3")
    v.add_argument("bundle")
    v.add_argument("--python", required=True)
    v.add_argument("--smoke", help="a Python file to run instead of the bundle's smoke.py (e.g. without the "
                                   "CUDA extensions, which need the driver)")
    e = sub.add_parser("libs", help="print the CUDA-library evidence table of a built bundle")
    e.add_argument("manifest")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        if norm(args.spec.split("==")[0]) not in PROFILES or "==" not in args.spec:
            ap.error("spec must be vllm==X or sglang==X")
        build(args)
    elif args.cmd == "verify":
        verify(args)
    else:
        libs_only(args)


if __name__ == "__main__":
    main()
