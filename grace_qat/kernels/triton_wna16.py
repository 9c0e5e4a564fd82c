"""Small-M GEMM for GRACE's symmetric group-wise int4 / int8 weights, in Triton.

Why: at decode batch sizes a quantized layer is a stream of packed weights, and the engines' int4
kernels (Marlin, Machete) reach 6-46% of the H200's copy bandwidth there. This kernel reads the
layout the plugins already pack (no extra copy of the weights):

* ``packed`` (N, K / pf) int32: unsigned codes u = q + 2^(bits-1), pf = 32 / bits of them per word,
  little-endian along the input dimension (``grace_qat.packing.pack_int32(u, bits, dim=1)``);
* ``scales`` (N, K / G) in the activation dtype (bf16 or fp16); G = 128, or K (one group per row);
* y = x @ W^T (+ bias), W[n, k] = (u[n, k] - 2^(bits-1)) * scales[n, k // G], x of shape (M, K).

Two code paths, both reading every packed word once:
* M <= 4 ("fma"): CUDA-core multiply-adds in fp32. Codes become fp32 without an int-to-float
  conversion: (u | 0x4B000000) read as fp32 is 2^23 + u exactly.
* larger M ("dot"): tensor-core dots on 16-bit codes, the group's scale applied to the fp32 partial
  sum. Codes become 16-bit floats by the same trick (u | 0x4300 is bf16 128 + u; u | 0x6400 is fp16
  1024 + u) minus that constant, which is exact. (Taking the constant off afterwards through the row
  sums of x instead was measured on the H200 to leave fp16 errors of 4e-3 at M=8: tensor-core
  accumulation of values ~1000x larger than the result.)
Word j of a row holds k = j*pf .. j*pf + pf - 1; rather than interleave the pf unpacked values, the
kernel pairs value i of every word with x[:, j*pf + i] (a strided load of the small activation).
Layers with too few output tiles to fill the GPU split K across programs (fp32 partial sums, then a
small reduction kernel adds them, the bias, and casts).

The launch parameters come from a per-shape table the caller passes (measured) or a heuristic; nothing
is tuned at run time, so the function can be captured in CUDA graphs. Triton is imported with this
module only.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

NUM_SMS_DEFAULT = 132


@dataclasses.dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    block_kp: int          # packed int32 columns per step (block_kp * pf input features)
    split_k: int
    use_dot: bool
    num_warps: int = 4
    num_stages: int = 3
    # dot path only: 0 pairs value i of each word with x[:, j*pf + i] (pf dots of block_kp), 1
    # unpacks the tile in place (reshape to block_kp * pf columns) for one dot per step
    unpack: int = 0

    def as_list(self) -> list:
        return [self.block_m, self.block_n, self.block_kp, self.split_k, int(self.use_dot),
                self.num_warps, self.num_stages, self.unpack]

    @classmethod
    def from_list(cls, v) -> "Config":
        return cls(int(v[0]), int(v[1]), int(v[2]), int(v[3]), bool(v[4]), int(v[5]), int(v[6]),
                   int(v[7]) if len(v) > 7 else 0)


def supports(bits: int, group: int, k: int) -> bool:
    """Symmetric int4/int8 with groups that hold whole packed words (or one group per row)."""
    pf = 32 // bits if bits in (4, 8) else 0
    return bool(pf) and k % pf == 0 and (group in (-1, k) or (group > 0 and k % group == 0
                                                                and group % pf == 0))


def _pow2_at_least(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def heuristic(m: int, n: int, k: int, bits: int, group: int, num_sms: int = NUM_SMS_DEFAULT) -> Config:
    pf = 32 // bits
    kp = k // pf
    group = k if group in (-1, k) else group
    if m <= 4:
        block_m, block_n, block_kp, use_dot, warps = _pow2_at_least(m), 32, 32, False, 4
    else:
        block_m, block_n, block_kp, use_dot, warps = min(32, max(16, _pow2_at_least(m))), 64, 16, True, 4
        # a dot step must lie inside one scale group
        if not (group == k or group % (block_kp * pf) == 0):
            block_m, block_n, block_kp, use_dot = _pow2_at_least(min(m, 4)), 32, 32, False
    tiles = -(-n // block_n) * -(-m // block_m)
    chunks = -(-kp // block_kp)
    split = 1
    while tiles * split < 2 * num_sms and split * 2 <= min(16, chunks):
        split *= 2
    return Config(block_m, block_n, block_kp, split, use_dot, warps, 3)


def choose(m: int, n: int, k: int, bits: int, group: int,
           table: "list[tuple[int, Config]] | tuple" = ()) -> Config:
    """The config for M from ``table`` [(largest M, Config), ...] (measured per shape, increasing
    M; the last entry also serves larger M), else the heuristic."""
    for max_m, cfg in table:
        if m <= max_m:
            return cfg
    return table[-1][1] if table else heuristic(m, n, k, bits, group)


@triton.jit
def _wna16_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, KP, GROUP, stride_xm, stride_wn, stride_sn,
                  stride_ym, stride_ys, chunks_per_split, total_chunks,
                  BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr, IS_SPLIT: tl.constexpr,
                  USE_DOT: tl.constexpr, MAGIC16: tl.constexpr, MAGIC16_VALUE: tl.constexpr,
                  NUM_STAGES: tl.constexpr, UNPACK: tl.constexpr):
    PF: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    OFFSET: tl.constexpr = 1 << (BITS - 1)
    BLOCK_K: tl.constexpr = BLOCK_KP * PF
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_KP)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    w_rows = w_ptr + offs_n[:, None] * stride_wn
    c_lo = pid_k * chunks_per_split
    c_hi = tl.minimum(c_lo + chunks_per_split, total_chunks)
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_KP), dtype=tl.float32)
    for c in tl.range(c_lo, c_hi, num_stages=NUM_STAGES):
        jp = c * BLOCK_KP + offs_j
        mask_j = jp < KP
        p = tl.load(w_rows + jp[None, :], mask=mask_n[:, None] & mask_j[None, :], other=0)
        xmask = mask_m[:, None] & mask_j[None, :]
        if USE_DOT and UNPACK == 1:
            ks = tl.reshape((jp * PF)[:, None] + tl.arange(0, PF)[None, :], (BLOCK_K,))
            xk = tl.load(x_rows + ks[None, :], mask=mask_m[:, None] & (ks < KP * PF)[None, :], other=0.0)
            u = (p[:, :, None] >> (tl.arange(0, PF) * BITS)[None, None, :]) & MASK
            u = tl.reshape(u, (BLOCK_N, BLOCK_K))
            if MAGIC16 != 0:
                w = ((u | MAGIC16).to(tl.int16).to(x_ptr.dtype.element_ty, bitcast=True)
                     - (MAGIC16_VALUE + OFFSET))
            else:
                w = (u - OFFSET).to(x_ptr.dtype.element_ty)
            d = tl.dot(xk, tl.trans(w.to(x_ptr.dtype.element_ty)))
        elif USE_DOT:
            d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for i in tl.static_range(PF):
                xi = tl.load(x_rows + (jp * PF + i)[None, :], mask=xmask, other=0.0)
                u = (p >> (i * BITS)) & MASK
                if MAGIC16 != 0:
                    # exact: (magic + u) - (magic + offset) is a small integer in 16-bit floats
                    w = ((u | MAGIC16).to(tl.int16).to(x_ptr.dtype.element_ty, bitcast=True)
                         - (MAGIC16_VALUE + OFFSET))
                else:
                    w = (u - OFFSET).to(x_ptr.dtype.element_ty)
                d += tl.dot(xi, tl.trans(w.to(x_ptr.dtype.element_ty)))
        if USE_DOT:
            s = tl.load(s_ptr + offs_n * stride_sn + (c * BLOCK_K) // GROUP, mask=mask_n, other=0.0)
            acc += d * s.to(tl.float32)[None, :]
        else:
            part = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_KP), dtype=tl.float32)
            for i in tl.static_range(PF):
                xi = tl.load(x_rows + (jp * PF + i)[None, :], mask=xmask, other=0.0).to(tl.float32)
                u = (p >> (i * BITS)) & MASK
                w = (u | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)
                part += w[None, :, :] * xi[:, None, :]
            s = tl.load(s_ptr + offs_n[:, None] * stride_sn + ((jp * PF) // GROUP)[None, :],
                        mask=mask_n[:, None] & mask_j[None, :], other=0.0)
            acc += part * s.to(tl.float32)[None, :, :]
    if USE_DOT:
        out = acc
    else:
        out = tl.sum(acc, axis=2)
    y_ptrs = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
    ymask = mask_m[:, None] & mask_n[None, :]
    if not IS_SPLIT:
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=ymask)
    else:
        tl.store(y_ptrs, out, mask=ymask)


@triton.jit
def _split_k_reduce(ws_ptr, b_ptr, y_ptr, MN, N, SPLIT_K, HAS_BIAS: tl.constexpr,
                    BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


_MAGIC16 = {(4, torch.bfloat16): (0x4300, 128.0), (4, torch.float16): (0x6400, 1024.0),
            (8, torch.float16): (0x6400, 1024.0)}


def wna16_mm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bits: int, group: int,
             bias: torch.Tensor | None = None, config: Config | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for x (..., K) in bf16/fp16, W given as ``packed`` codes (N, K/pf) and
    ``scales`` (N, K/G) (see the module docstring); ``group`` -1 or K means one group per row."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"wna16_mm: activations must be bf16 or fp16, got {x.dtype}")
    pf = 32 // bits
    n, kp = packed.shape
    k = kp * pf
    if x.shape[-1] != k:
        raise ValueError(f"wna16_mm: x has {x.shape[-1]} input features, the packed weight {k}")
    group = k if group in (-1, k) else group
    if not supports(bits, group, k):
        raise ValueError(f"wna16_mm: no kernel for int{bits}, group {group}, K {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*lead, n)
    cfg = config or choose(m, n, k, bits, group)
    if cfg.use_dot and (cfg.block_kp < 16 or cfg.block_m < 16 or cfg.block_n < 16):
        raise ValueError(f"wna16_mm: tensor-core steps need blocks of at least 16, got {cfg}")
    if cfg.use_dot and not (group == k or group % (cfg.block_kp * pf) == 0):
        raise ValueError(f"wna16_mm: dot steps of {cfg.block_kp * pf} features straddle groups of {group}")
    packed = packed.contiguous()
    scales = scales.contiguous()
    total = -(-kp // cfg.block_kp)
    split = max(1, min(cfg.split_k, total))
    per_split = -(-total // split)
    split = -(-total // per_split)            # no empty splits
    magic, magic_value = _MAGIC16.get((bits, x.dtype), (0, 0.0)) if cfg.use_dot else (0, 0.0)
    out = y if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    has_bias = bias is not None and split == 1
    grid = (triton.cdiv(n, cfg.block_n), split, triton.cdiv(m, cfg.block_m))
    _wna16_kernel[grid](
        x2, packed, scales, bias if has_bias else scales, out, m, n, kp, group, x2.stride(0),
        packed.stride(0), scales.stride(0), n, m * n, per_split, total,
        BITS=bits, HAS_BIAS=has_bias, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_KP=cfg.block_kp, IS_SPLIT=split > 1, USE_DOT=cfg.use_dot, MAGIC16=magic,
        MAGIC16_VALUE=magic_value, NUM_STAGES=cfg.num_stages, UNPACK=cfg.unpack, num_warps=cfg.num_warps)
    if split > 1:
        block = 1024
        _split_k_reduce[(triton.cdiv(m * n, block),)](
            out, bias if bias is not None else out, y, m * n, n, split,
            HAS_BIAS=bias is not None, BLOCK=block)
    return y.reshape(*lead, n)
