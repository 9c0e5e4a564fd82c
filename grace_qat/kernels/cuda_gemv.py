"""Decode GEMV / small-batch GEMM in CUDA for GRACE's symmetric group-wise int4 / int8 weights,
compiled at run time by NVRTC (no nvcc on the user's machine) and launched through the CUDA driver
API on torch's current stream, so it is captured by CUDA graphs like any torch kernel.

y = x @ W^T (+ bias) for x (M, K) in bf16 or fp16, M <= 32 (``MAX_M``), with
W[n, k] = (u[n, k] - Z) * step[n, k // G], Z = 8 (int4) or 128 (int8), G = 128 or K.

The kernel (``cuda_gemv.cu``) runs the products on the tensor cores (mma.m16n8k16, fp32
accumulation; the activations are the 8-column operand, so M = 1..8 cost one mma per 16x16
weights) after a magic-number conversion of the codes to bf16/fp16 (exact), and scales each
chunk's fp32 partial sum by its group's step. It reads the weights in its own layout, made once
at load time by ``pack`` (pure torch, so the CPU tests can prove it a bijection and check it
against an emulation of the kernel's indexing):

* ``wq`` int32 (tiles, C, 32, 4): tile = 16 output rows, chunk = CK input features (64 for int4,
  32 for int8); the 16 bytes of lane l of a (tile, chunk) are the A fragments of the chunk's mma
  steps for that lane (``lane_map``), so each lane issues one 128-bit load per tile and chunk and a
  warp reads 512 contiguous bytes;
* ``st`` (tiles, groups, 16) in the activation dtype: per group, the steps of rows g and g + 8 of
  the tile side by side (one 32-bit load per lane).

Rows are padded to a multiple of 16 (code Z, step 0); K must be a multiple of CK.

Launch configuration (``Config``): NT tiles per block, warps per block (they split the block's
chunks), in-kernel split-K (blocks along y; the last block of a column adds the slices in a fixed
order), chunks per pipeline stage. From a measured table or ``heuristic``; nothing is tuned at run
time. Everything that must not happen inside a CUDA-graph capture (NVRTC, module loading, the
counters' allocation) happens in ``prepare``, which the plugin calls at load time.

Needs ``cuda-bindings`` (NVRTC and driver API) and an NVIDIA GPU of compute capability >= 8.0;
programmatic dependent launch (``pdl=True``) needs 9.0.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import math
import os
import threading

import torch

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_gemv.cu")
MAX_M = 32
ZERO = {4: 8, 8: 128}             # the code of weight 0
CHUNK = {4: 64, 8: 32}            # input features per (tile, chunk) block of 512 bytes
TILE = 16                         # output rows per tile
NUM_SMS_DEFAULT = 132
COUNTERS = 1 << 16                # split-K arrival counters per device (>= blocks along x)

# (MT, NT, U) compiled: MT 8-token column tiles (M <= 8 * MT), NT 16-row tiles per block, U chunks
# per warp per pipeline stage; bounded so that the double-buffered registers fit without spilling.
INSTANCES = tuple((mt, nt, u) for mt in (1, 2, 4) for nt in (1, 2, 4) for u in (1, 2, 4)
                  if nt * u <= 8 and mt * u <= 4 and nt * mt <= 8)


@dataclasses.dataclass(frozen=True)
class Config:
    nt: int            # 16-row output tiles per block
    warps: int         # warps per block, splitting the block's chunks
    split: int         # blocks along K (in-kernel split-K)
    unroll: int        # chunks per warp per pipeline stage (U)

    def as_list(self) -> list:
        return [self.nt, self.warps, self.split, self.unroll]

    @classmethod
    def from_list(cls, v) -> "Config":
        return cls(int(v[0]), int(v[1]), int(v[2]), int(v[3]))


def m_tiles(m: int) -> int:
    if not 1 <= m <= MAX_M:
        raise ValueError(f"cuda_gemv: M={m} outside 1..{MAX_M}")
    return 1 if m <= 8 else 2 if m <= 16 else 4


def why_not(bits: int, group: int, k: int) -> str | None:
    """None when the kernel runs symmetric int``bits`` weights of K ``k`` in groups of ``group``
    (-1 or K: one group per row), else why not."""
    if bits not in CHUNK:
        return f"int{bits} (int4 and int8 only)"
    ck = CHUNK[bits]
    if k <= 0 or k % ck:
        return f"K={k} is not a multiple of {ck}"
    if group in (-1, k):
        return None
    if group <= 0 or k % group or group % ck or group & (group - 1):
        return f"groups of {group} (powers of two >= {ck} dividing K, or one per row)"
    return None


def supports(bits: int, group: int, k: int) -> bool:
    return why_not(bits, group, k) is None


# --- the weight layout ----------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def lane_map(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, k), each (32 lanes, 4 words, 32/bits values) int64: the tile row and the feature
    within the chunk of value p of word w of lane l, value p at bits [p*bits, (p+1)*bits).

    What the kernel does with a lane's words (``codes_to_a`` in cuda_gemv.cu), mma.m16n8k16's
    fragment layout (lane = 4 g + t; A register r holds row g + 8 (r % 2), k-slots 2t + 8 (r // 2)
    + {0, 1} in its low and high half) and the activation columns the lane loads (features
    (CK/4) t + 4 s + j, j = 0..3, for mma step s, slot 2t + {0, 1} -> j = {0, 1}, slot 2t + 8 + {0, 1}
    -> j = {2, 3}) fix this map:
    int4, word s (step s): nibble p is half p // 4 of register p % 4;
    int8, words 2s, 2s+1 (step s): byte p of word 2s + h is half p % 2 of register 2h + p // 2."""
    pf = 32 // bits
    ck = CHUNK[bits]
    rows = torch.empty(32, 4, pf, dtype=torch.int64)
    ks = torch.empty(32, 4, pf, dtype=torch.int64)
    for lane in range(32):
        g, t = divmod(lane, 4)
        for w in range(4):
            for p in range(pf):
                if bits == 4:
                    s, reg, half = w, p % 4, p // 4
                else:
                    s, reg, half = w // 2, 2 * (w % 2) + p // 2, p % 2
                rows[lane, w, p] = g + 8 * (reg % 2)
                ks[lane, w, p] = (ck // 4) * t + 4 * s + 2 * (reg // 2) + half
    return rows, ks


def _words(vals: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., pf) codes -> (...) int32 words, value p at bits p*bits (two's complement wrap)."""
    shifts = torch.arange(0, 32, bits, device=vals.device, dtype=torch.int64)
    w = (vals.to(torch.int64) << shifts).sum(-1)
    return torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32)


def pack_codes(u: torch.Tensor, bits: int, rows_per_call: int = 4096) -> torch.Tensor:
    """Unsigned codes (N, K) (any integer dtype, 0..2^bits - 1) -> ``wq`` (tiles, C, 32, 4) int32.
    Rows past N (up to a multiple of 16) hold the code of zero."""
    n, k = u.shape
    ck = CHUNK[bits]
    if k % ck:
        raise ValueError(f"cuda_gemv: K={k} is not a multiple of {ck}")
    tiles, c = -(-n // TILE), k // ck
    rows, ks = lane_map(bits)
    flat = (rows * ck + ks).reshape(-1).to(u.device)            # index into one (16, CK) block
    out = torch.empty(tiles, c, 32, 4, dtype=torch.int32, device=u.device)
    step = max(1, rows_per_call // TILE)
    for t0 in range(0, tiles, step):
        t1 = min(tiles, t0 + step)
        part = u[t0 * TILE:t1 * TILE].to(torch.int32)
        if part.shape[0] < (t1 - t0) * TILE:
            pad = torch.full(((t1 - t0) * TILE - part.shape[0], k), ZERO[bits], dtype=torch.int32,
                             device=u.device)
            part = torch.cat([part, pad])
        blocks = part.reshape(t1 - t0, TILE, c, ck).permute(0, 2, 1, 3).reshape(t1 - t0, c, TILE * ck)
        vals = blocks[:, :, flat].reshape(t1 - t0, c, 32, 4, 32 // bits)
        out[t0:t1] = _words(vals, bits)
    return out


def unpack_codes(wq: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    """The inverse of ``pack_codes``: ``wq`` -> codes (N, K) int32 (N: all padded rows if None)."""
    tiles, c = wq.shape[:2]
    ck, pf = CHUNK[bits], 32 // bits
    rows, ks = lane_map(bits)
    flat = (rows * ck + ks).reshape(-1).to(wq.device)
    shifts = torch.arange(0, 32, bits, device=wq.device, dtype=torch.int32)
    vals = (wq.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)                # (tiles, C, 32, 4, pf)
    blocks = torch.empty(tiles, c, TILE * ck, dtype=torch.int32, device=wq.device)
    blocks[:, :, flat] = vals.reshape(tiles, c, 32 * 4 * pf)
    u = blocks.reshape(tiles, c, TILE, ck).permute(0, 2, 1, 3).reshape(tiles * TILE, c * ck)
    return u if n is None else u[:n]


def pack_steps(steps: torch.Tensor) -> torch.Tensor:
    """Steps (N, groups) -> ``st`` (tiles, groups, 16): entry 2g + h is row 16 tile + g + 8h
    (rows past N: 0)."""
    n, groups = steps.shape
    tiles = -(-n // TILE)
    if tiles * TILE != n:
        steps = torch.cat([steps, steps.new_zeros(tiles * TILE - n, groups)])
    return steps.reshape(tiles, 2, 8, groups).permute(0, 3, 2, 1).reshape(tiles, groups, TILE).contiguous()


def unpack_steps(st: torch.Tensor, n: int | None = None) -> torch.Tensor:
    tiles, groups, _ = st.shape
    s = st.reshape(tiles, groups, 8, 2).permute(0, 3, 2, 1).reshape(tiles * TILE, groups)
    return s if n is None else s[:n]


def codes_from_int32(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The plugins' compressed-tensors packing (N, K/pf) int32, value i of word j = feature j*pf + i
    -> unsigned codes (N, K) int32."""
    pf = 32 // bits
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
    return ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(packed.shape[0], -1)


def pack(packed: torch.Tensor, scales: torch.Tensor, bits: int, rows_per_call: int = 4096
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(``wq``, ``st``) from the compressed-tensors codes (N, K/pf) int32 and steps (N, groups)
    (any float dtype; ``st`` keeps it). Rows go through in slices to bound the temporary memory."""
    rows = max(TILE, rows_per_call // TILE * TILE)     # slices of whole tiles; the last one pads
    wq = torch.cat([pack_codes(codes_from_int32(packed[r:r + rows], bits), bits, rows)
                    for r in range(0, packed.shape[0], rows)])
    return wq, pack_steps(scales)


# --- NVRTC ----------------------------------------------------------------------------------

def _bits16(value: float, dtype: torch.dtype) -> int:
    return int(torch.tensor([value], dtype=dtype).view(torch.int16).item()) & 0xFFFF


def constants() -> dict[str, int]:
    """The 16-bit float patterns the source uses, each twice in a 32-bit word, made by torch."""
    two = lambda v, dt: _bits16(v, dt) * 0x10001     # noqa: E731
    return {"GQ_BF16_MAGIC2": two(128.0, torch.bfloat16), "GQ_F16_MAGIC2": two(1024.0, torch.float16),
            "GQ_BF16_ONE2": two(1.0, torch.bfloat16), "GQ_F16_ONE2": two(1.0, torch.float16),
            "GQ_BF16_NEG_I4": two(-(128.0 + ZERO[4]), torch.bfloat16),
            "GQ_F16_NEG_I4": two(-(1024.0 + ZERO[4]), torch.float16),
            "GQ_F16_NEG_I8": two(-(1024.0 + ZERO[8]), torch.float16)}


def kernel_name(bits: int, bf16: bool, mt: int, nt: int, u: int) -> str:
    return f"grace_gemv<{bits}, {'true' if bf16 else 'false'}, {mt}, {nt}, {u}>"


def source() -> str:
    with open(SOURCE) as f:
        return f.read()


def options(arch: str) -> list[str]:
    return [f"--gpu-architecture={arch}", "-std=c++17", "-lineinfo"] + \
        [f"-D{k}={v:#x}u" for k, v in sorted(constants().items())]


def _check(result, what: str):
    err = result[0]
    if int(err) != 0:
        raise RuntimeError(f"cuda_gemv: {what} failed: {err!r}")
    return result[1] if len(result) == 2 else result[1:]


def nvrtc_version() -> tuple[int, int]:
    from cuda.bindings import nvrtc
    return tuple(_check(nvrtc.nvrtcVersion(), "nvrtcVersion"))


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "grace_qat", "nvrtc")


def compile_cubin(bits: int, bf16: bool, arch: str, instances=INSTANCES,
                  cache_dir: str | None = "") -> tuple[bytes, dict[tuple, str]]:
    """NVRTC: the kernels of ``instances`` ((MT, NT, U) ...) for int``bits`` and bf16 (else fp16)
    activations, as a cubin for ``arch`` (``sm_90``), and each instance's lowered (mangled) name.
    Cached on disk under ``cache_dir`` ("": ``default_cache_dir()``, None: no cache), keyed by the
    source, the options and NVRTC's version; an unwritable cache directory is only not used."""
    from cuda.bindings import nvrtc
    src, opts = source(), options(arch)
    names = {inst: kernel_name(bits, bf16, *inst) for inst in instances}
    key = hashlib.sha256(repr((src, opts, sorted(names.values()), nvrtc_version())).encode()).hexdigest()[:24]
    cache_dir = default_cache_dir() if cache_dir == "" else cache_dir
    path = os.path.join(cache_dir, f"gemv-{arch}-{key}") if cache_dir else None
    if path and os.path.exists(path + ".cubin") and os.path.exists(path + ".names"):
        with open(path + ".cubin", "rb") as f:
            cubin = f.read()
        with open(path + ".names") as f:
            lowered = dict(zip(instances, f.read().split("\n")))
        if len(lowered) == len(instances) and all(lowered.values()):
            return cubin, lowered
    prog = _check(nvrtc.nvrtcCreateProgram(src.encode(), b"cuda_gemv.cu", 0, [], []), "nvrtcCreateProgram")
    try:
        for name in names.values():
            _check((nvrtc.nvrtcAddNameExpression(prog, name.encode())[0], None), "nvrtcAddNameExpression")
        enc = [o.encode() for o in opts]
        err = nvrtc.nvrtcCompileProgram(prog, len(enc), enc)[0]
        if int(err) != 0:
            size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"cuda_gemv: NVRTC could not compile for {arch}: {err!r}\n"
                               f"{log.decode(errors='replace')}")
        size = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        _check((nvrtc.nvrtcGetCUBIN(prog, cubin)[0], None), "nvrtcGetCUBIN")
        lowered = {inst: _check(nvrtc.nvrtcGetLoweredName(prog, name.encode()), "nvrtcGetLoweredName").decode()
                   for inst, name in names.items()}
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    if path:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(cubin)
            os.replace(tmp, path + ".cubin")
            with open(tmp, "w") as f:
                f.write("\n".join(lowered[i] for i in instances))
            os.replace(tmp, path + ".names")
        except OSError:
            pass
    return cubin, lowered


# --- loading and launching ------------------------------------------------------------------

_LOCK = threading.Lock()
_MODULES: dict[tuple, "_Module"] = {}
_COUNTERS: dict[int, torch.Tensor] = {}
_CHOSEN: dict[tuple, "Config"] = {}


class _Module:
    """The compiled kernels of one (device, bits, dtype): CUfunctions loaded into the device's
    primary context (the one torch uses), and their occupancy."""

    def __init__(self, device: int, bits: int, bf16: bool):
        from cuda.bindings import driver
        self.driver = driver
        self.device = device
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            raise RuntimeError(f"cuda_gemv: needs compute capability >= 8.0, device {device} has {major}.{minor}")
        self.cc = major * 10 + minor
        self.sms = torch.cuda.get_device_properties(device).multi_processor_count
        cubin, lowered = compile_cubin(bits, bf16, f"sm_{major}{minor}")
        self._make_current()
        self.library = _check(driver.cuLibraryLoadData(cubin, None, None, 0, None, None, 0), "cuLibraryLoadData")
        self.functions = {}
        for inst, name in lowered.items():
            kernel = _check(driver.cuLibraryGetKernel(self.library, name.encode()), "cuLibraryGetKernel")
            # loads it into this context now, not lazily at a first launch inside a graph capture
            self.functions[inst] = _check(driver.cuKernelGetFunction(kernel), "cuKernelGetFunction")
        self._occupancy: dict[tuple, int] = {}

    def _make_current(self) -> None:
        driver = self.driver
        torch.cuda.init()
        with torch.cuda.device(self.device):
            torch.empty(1, device=f"cuda:{self.device}")     # the runtime makes its context current
        ctx = _check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if not int(ctx):
            dev = _check(driver.cuDeviceGet(self.device), "cuDeviceGet")
            ctx = _check(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
            _check((driver.cuCtxSetCurrent(ctx)[0], None), "cuCtxSetCurrent")

    def blocks_per_sm(self, inst: tuple, warps: int) -> int:
        key = (inst, warps)
        if key not in self._occupancy:
            mt, nt, _ = inst
            self._occupancy[key] = _check(self.driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(
                self.functions[inst], 32 * warps, smem_bytes(mt, nt, warps)), "cuOccupancy")
        return self._occupancy[key]

    def launch(self, inst, grid, block, smem, stream, params, pdl: bool) -> None:
        driver = self.driver
        f = self.functions[inst]
        for attempt in range(2):
            if pdl:
                cfg = driver.CUlaunchConfig()
                cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = grid[0], grid[1], 1
                cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = block, 1, 1
                cfg.sharedMemBytes = smem
                cfg.hStream = driver.CUstream(stream)
                attr = driver.CUlaunchAttribute()
                attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
                attr.value.programmaticStreamSerializationAllowed = 1
                cfg.attrs = [attr]
                cfg.numAttrs = 1
                err = driver.cuLaunchKernelEx(cfg, f, params, 0)[0]
            else:
                err = driver.cuLaunchKernel(f, grid[0], grid[1], 1, block, 1, 1, smem,
                                            driver.CUstream(stream), params, 0)[0]
            if int(err) == 0:
                return
            if attempt == 0 and err == driver.CUresult.CUDA_ERROR_INVALID_CONTEXT:
                self._make_current()       # a thread torch had not made the context current on
                continue
            raise RuntimeError(f"cuda_gemv: launch failed: {err!r}")


def smem_bytes(mt: int, nt: int, warps: int) -> int:
    """Dynamic shared memory: warps 1.. hand their fp32 fragments to warp 0."""
    return (warps - 1) * nt * mt * 4 * 32 * 4


def available() -> str | None:
    """None when the kernel can be built and run here, else why not."""
    try:
        from cuda.bindings import driver, nvrtc  # noqa: F401
    except ImportError as e:
        return f"cuda-bindings unavailable ({e})"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.cuda.get_device_capability()[0] < 8:
        return "needs compute capability >= 8.0"
    return None


def module(device: int, bits: int, dtype: torch.dtype) -> _Module:
    key = (device, bits, dtype)
    mod = _MODULES.get(key)
    if mod is None:
        with _LOCK:
            mod = _MODULES.get(key)
            if mod is None:
                if torch.cuda.is_current_stream_capturing():
                    raise RuntimeError("cuda_gemv: first use inside a CUDA-graph capture; call "
                                       "cuda_gemv.prepare(device, bits, dtype) before capturing")
                mod = _MODULES[key] = _Module(device, bits, dtype == torch.bfloat16)
    return mod


def counters(device: int) -> torch.Tensor:
    c = _COUNTERS.get(device)
    if c is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("cuda_gemv: call cuda_gemv.prepare before capturing a CUDA graph")
        c = _COUNTERS[device] = torch.zeros(COUNTERS, dtype=torch.int32, device=f"cuda:{device}")
    return c


def prepare(device: int | torch.device, bits: int, dtype: torch.dtype) -> None:
    """Compile (or read from the cache), load, and allocate the split-K counters: everything a
    launch needs that must not happen inside a CUDA-graph capture."""
    device = torch.device(device).index if not isinstance(device, int) else device
    device = torch.cuda.current_device() if device is None else device
    module(device, bits, dtype)
    counters(device)


# --- launch configuration --------------------------------------------------------------------

def _default_blocks_per_sm(mt: int, nt: int, u: int, warps: int) -> int:
    """Without a device: ~ registers of the double-buffered stages, 64K registers per SM."""
    regs = min(255, 48 + 8 * nt * u + 8 * mt * u * 2 + 4 * nt * mt)
    return max(1, min(32, 65536 // (regs * 32 * warps), 2048 // (32 * warps)))


def heuristic(m: int, n: int, k: int, bits: int, sms: int = NUM_SMS_DEFAULT, blocks_per_sm=None,
              bandwidth: float = 3.0e12, latency_s: float = 1.0e-6) -> Config:
    """A launch configuration from a crude model: the busiest SM's bytes at its share of the
    bandwidth, or the chain of memory latencies of one warp's pipeline stages, whichever is longer,
    plus a cost for the split-K slices. ``blocks_per_sm(mt, nt, u, warps)``: the occupancy (the
    driver's when a device is there)."""
    mt = m_tiles(m)
    occ = blocks_per_sm or _default_blocks_per_sm
    tiles, c = -(-n // TILE), k // CHUNK[bits]
    best, best_t = None, math.inf
    for imt, nt, u in INSTANCES:
        if imt != mt:
            continue
        for warps in (4, 8):
            slots = sms * max(1, occ(mt, nt, u, warps))
            gx = -(-tiles // nt)
            for split in (1, 2, 3, 4, 6, 8, 12, 16):
                per_split = -(-c // split)
                if split > 1 and (per_split < warps or gx * split > 8 * slots):
                    continue
                blocks = gx * split
                per_warp = -(-per_split // warps)
                busiest = -(-blocks // sms) * nt * per_split * 512
                t_bw = busiest / (bandwidth / sms)
                t_lat = -(-blocks // slots) * (0.6 * -(-per_warp // u) + 1) * latency_s
                t = max(t_bw, t_lat) + (0.7e-6 if split > 1 else 0) + 0.02e-6 * (warps + nt + u)
                if t < best_t:
                    best, best_t = Config(nt, warps, split, u), t
    return best


def choose(m: int, n: int, k: int, bits: int, table=(), sms: int = NUM_SMS_DEFAULT, blocks_per_sm=None) -> Config:
    """The config for M from ``table`` [(largest M, Config), ...] (measured, increasing M; the last
    entry also serves larger M) when its M tiles match, else the heuristic."""
    for max_m, cfg in table:
        if m <= max_m:
            return cfg
    if table and m_tiles(m) == m_tiles(table[-1][0]):
        return table[-1][1]
    return heuristic(m, n, k, bits, sms, blocks_per_sm)


def check_config(cfg: Config, m: int) -> tuple:
    inst = (m_tiles(m), cfg.nt, cfg.unroll)
    if inst not in INSTANCES:
        raise ValueError(f"cuda_gemv: no compiled kernel for M tiles {inst[0]}, NT {cfg.nt}, U {cfg.unroll} "
                         f"(compiled: {INSTANCES})")
    if cfg.warps not in (1, 2, 4, 8) or cfg.split < 1:
        raise ValueError(f"cuda_gemv: bad config {cfg}")
    return inst


# --- the GEMM ---------------------------------------------------------------------------------

def gemv(x: torch.Tensor, wq: torch.Tensor, st: torch.Tensor, bits: int, n: int | None = None,
         bias: torch.Tensor | None = None, config: Config | None = None, table=(), pdl: bool = False
         ) -> torch.Tensor:
    """y = x @ W^T (+ bias) for x (..., K) bf16/fp16 with at most ``MAX_M`` rows, W given by
    ``wq``, ``st`` (see ``pack``; ``st`` in x's dtype), ``n`` output features (default: all rows
    of ``wq``)."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"cuda_gemv: activations must be bf16 or fp16, got {x.dtype}")
    if st.dtype != x.dtype:
        raise TypeError(f"cuda_gemv: steps are {st.dtype}, activations {x.dtype}")
    tiles, c = wq.shape[0], wq.shape[1]
    k = c * CHUNK[bits]
    n = tiles * TILE if n is None else n
    if x.shape[-1] != k:
        raise ValueError(f"cuda_gemv: x has {x.shape[-1]} input features, the packed weight {k}")
    if not (tiles - 1) * TILE < n <= tiles * TILE:
        raise ValueError(f"cuda_gemv: {n} output features for {tiles} tiles of {TILE}")
    groups = st.shape[1]
    group = k // groups
    if groups * group != k or (groups > 1 and group & (group - 1)) or group % CHUNK[bits]:
        raise ValueError(f"cuda_gemv: {groups} groups over K={k}")
    if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous() or bias.numel() != n):
        raise ValueError(f"cuda_gemv: bias must be a contiguous ({n},) {x.dtype} tensor")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*lead, n)
    if x2.stride(-1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16:
        x2 = x2.contiguous() if x2.stride(-1) != 1 or x2.stride(0) % 8 else x2.clone()
    device = x.device.index if x.device.index is not None else torch.cuda.current_device()
    mod = module(device, bits, x.dtype)
    cfg = config
    if cfg is None:            # the heuristic's search costs ~0.3 ms of Python: once per (layer shape, M)
        key = (device, m, n, k, bits, tuple(table))
        cfg = _CHOSEN.get(key)
        if cfg is None:
            cfg = _CHOSEN[key] = choose(m, n, k, bits, table, mod.sms,
                                        lambda mt, nt, u, w: mod.blocks_per_sm((mt, nt, u), w))
    inst = check_config(cfg, m)
    gx = -(-tiles // cfg.nt)
    per_split = -(-c // max(1, min(cfg.split, c)))
    split = -(-c // per_split)                        # no empty slices
    if gx > COUNTERS:
        raise ValueError(f"cuda_gemv: {gx} column blocks exceed the {COUNTERS} split-K counters")
    ws = torch.empty((split, m, tiles * TILE), dtype=torch.float32, device=x.device) if split > 1 else None
    ctr = counters(device)
    group_shift = 30 if groups == 1 else group.bit_length() - 1
    args = [ctypes.c_void_p(wq.data_ptr()), ctypes.c_void_p(st.data_ptr()), ctypes.c_void_p(x2.data_ptr()),
            ctypes.c_void_p(bias.data_ptr() if bias is not None else 0), ctypes.c_void_p(y.data_ptr()),
            ctypes.c_void_p(ws.data_ptr() if ws is not None else 0), ctypes.c_void_p(ctr.data_ptr()),
            ctypes.c_int(m), ctypes.c_int(n), ctypes.c_int(tiles), ctypes.c_int(c), ctypes.c_int(groups),
            ctypes.c_int(group_shift), ctypes.c_int(x2.stride(0)), ctypes.c_int(n), ctypes.c_int(per_split)]
    params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
    mod.launch(inst, (gx, split), 32 * cfg.warps, smem_bytes(inst[0], cfg.nt, cfg.warps),
               torch.cuda.current_stream(x.device).cuda_stream, ctypes.addressof(params), pdl)
    return y.reshape(*lead, n)
