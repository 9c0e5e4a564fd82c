"""Bit-packing of integer codes into the int32 layouts the engines' kernels load.

All layouts store unsigned values u = q + 2^(bits-1) (vLLM's uint4b8 / uint8b128), packed
little-endian: element k of a pack occupies bits [k*bits, (k+1)*bits) of the int32.

  * GPTQ: ``qweight`` (in/pf, out), packed along the input dim; ``qzeros`` (in/G, out/pf) hold
    zero-1 (the GPTQ v1 convention), ``scales`` (in/G, out).
  * AutoAWQ GEMM: ``qweight`` (in, out/8), packed along the output dim with the interleave
    AWQ_ORDER; ``qzeros`` (in/G, out/8) packed the same way, ``scales`` (in/G, out).
  * compressed-tensors pack-quantized: ``weight_packed`` (out, in/pf), ``weight_scale`` (out, in/G).
"""
from __future__ import annotations

import sys

import torch

from .errors import GraceFormatError
from .quantizer import code_range

# AWQ nibble k of a packed column c holds output channel c*8 + AWQ_ORDER[k].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = tuple(AWQ_ORDER.index(i) for i in range(8))


def pack_factor(bits: int) -> int:
    return 32 // bits


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned 4- or 8-bit values (any int dtype) along ``dim`` into int32: value i of a word at
    bits [bits*i, bits*(i+1))."""
    if bits not in (4, 8):
        raise GraceFormatError(f"cannot pack {bits}-bit values: GRACE codes are 4 or 8 bits")
    if sys.byteorder != "little":
        raise GraceFormatError("packing codes needs a little-endian machine (as every engine's kernels do)")
    pf = pack_factor(bits)
    v = values.movedim(dim, -1)
    if v.shape[-1] % pf:
        raise GraceFormatError(f"cannot pack {v.shape[-1]} values along dim {dim} in groups of {pf}")
    if v.numel():
        lo, hi = torch.aminmax(v)
        if lo < 0 or hi >= (1 << bits):
            raise GraceFormatError(f"values to pack must lie in [0, {(1 << bits) - 1}]")
    # Little-endian: the bytes of an int32 in memory order hold its fields from the lowest bits up, so
    # packing is one pass over bytes (an int64 shift-and-sum way spent 17 s of a 2B model's CPU load)
    u8 = v.to(torch.uint8)
    if bits == 4:
        u8 = u8[..., 0::2] | (u8[..., 1::2] << 4)
    return u8.contiguous().view(torch.int32).movedim(-1, dim).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of pack_int32: unsigned values as int32, ``dim`` grown by 32/bits."""
    pf = pack_factor(bits)
    # int32 throughout: an arithmetic shift fills in sign bits, which the mask then drops
    p = packed.to(torch.int32).movedim(dim, -1)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=p.device)
    v = (p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    v = v.reshape(*p.shape[:-1], p.shape[-1] * pf)
    return v.movedim(-1, dim).contiguous()


def _offset(bits: int) -> int:
    return -code_range(bits)[0]


# -- GPTQ ---------------------------------------------------------------------------------------

def pack_gptq(codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
              scale_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """codes (out, in) signed, scales (out, in/G) -> GPTQ tensors (sym, desc_act=False)."""
    out_f, in_f = codes.shape
    u = (codes.to(torch.int32) + _offset(bits)).t()                 # (in, out)
    qweight = pack_int32(u, bits, dim=0)
    zeros = torch.full((scales.shape[1], out_f), _offset(bits) - 1, dtype=torch.int32)  # v1: zero-1
    qzeros = pack_int32(zeros, bits, dim=1)
    g_idx = torch.arange(in_f, dtype=torch.int32) // (in_f // scales.shape[1])
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales.t().to(scale_dtype).contiguous(),
            "g_idx": g_idx}


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                bits: int, name: str = "?") -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ tensors -> (codes (out, in) signed int32, scales (out, in/G)); zeros must be symmetric."""
    zeros = unpack_int32(qzeros, bits, dim=1) + 1
    if not bool((zeros == _offset(bits)).all()):
        raise GraceFormatError(f"{name}.qzeros: expected symmetric zero point {_offset(bits)}")
    codes = unpack_int32(qweight, bits, dim=0).t() - _offset(bits)
    return codes.contiguous(), scales.t().contiguous()


# -- AutoAWQ GEMM ------------------------------------------------------------------------------

def _awq_interleave(u: torch.Tensor) -> torch.Tensor:
    rows, cols = u.shape
    return u.reshape(rows, cols // 8, 8)[..., list(AWQ_ORDER)].reshape(rows, cols)


def _awq_deinterleave(u: torch.Tensor) -> torch.Tensor:
    rows, cols = u.shape
    return u.reshape(rows, cols // 8, 8)[..., list(AWQ_REVERSE_ORDER)].reshape(rows, cols)


def pack_awq(codes: torch.Tensor, scales: torch.Tensor, group_size: int,
             scale_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """4-bit codes (out, in) and scales (out, in/G) -> AutoAWQ GEMM qweight/qzeros/scales (zp 8)."""
    out_f, _ = codes.shape
    if out_f % 8:
        raise GraceFormatError(f"AWQ packing needs out_features divisible by 8, got {out_f}")
    u = (codes.to(torch.int32) + 8).t()                                  # (in, out)
    qweight = pack_int32(_awq_interleave(u), 4, dim=1)
    zeros = torch.full((scales.shape[1], out_f), 8, dtype=torch.int32)
    qzeros = pack_int32(_awq_interleave(zeros), 4, dim=1)
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales.t().to(scale_dtype).contiguous()}


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               name: str = "?") -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ tensors -> (codes (out, in) signed, scales (out, in/G)). Every zero point must be 8."""
    zeros = _awq_deinterleave(unpack_int32(qzeros, 4, dim=1))
    if not bool((zeros == 8).all()):
        bad = zeros[zeros != 8]
        raise GraceFormatError(
            f"{name}.qzeros: {bad.numel()} zero points differ from 8 (e.g. {int(bad[0])}); GRACE AWQ "
            f"checkpoints are symmetric with a constant zero point 8")
    u = _awq_deinterleave(unpack_int32(qweight, 4, dim=1))               # (in, out)
    return (u.t() - 8).contiguous(), scales.t().contiguous()


# -- compressed-tensors pack-quantized ----------------------------------------------------------

def pack_compressed_tensors(codes: torch.Tensor, scales: torch.Tensor, bits: int,
                            scale_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """codes (out, in), scales (out, in/G) -> weight_packed / weight_scale / weight_shape."""
    u = codes.to(torch.int32) + _offset(bits)
    return {"weight_packed": pack_int32(u, bits, dim=1),
            "weight_scale": scales.to(scale_dtype).contiguous(),
            "weight_shape": torch.tensor(list(codes.shape), dtype=torch.int64)}


def unpack_compressed_tensors(weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                              bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    return unpack_int32(weight_packed, bits, dim=1) - _offset(bits), weight_scale
