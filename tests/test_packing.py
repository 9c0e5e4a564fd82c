"""Packing layouts against independent references: element-by-element bit arithmetic written from
the format descriptions, and the compressed-tensors library's own packer."""
import pytest
import torch

from grace_qat.errors import GraceFormatError
from requires import require
from grace_qat.packing import (pack_awq, pack_compressed_tensors, pack_gptq, unpack_awq,
                               unpack_compressed_tensors, unpack_gptq)

# AutoAWQ GEMM, written out from the format description (not imported from the code under test):
# nibble k (bits 4k..4k+3) of packed column c holds output channel c*8 + AWQ_CHANNEL_OF_NIBBLE[k].
AWQ_CHANNEL_OF_NIBBLE = (0, 2, 4, 6, 1, 3, 5, 7)


def _codes(bits, out_f=16, in_f=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    return torch.randint(lo, hi, (out_f, in_f), generator=g), torch.rand(out_f, in_f // 128, generator=g) + 0.1


def _u32(x):
    return int(x) & 0xFFFFFFFF


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_layout_bit_by_bit(bits):
    codes, scales = _codes(bits)
    t = pack_gptq(codes, scales, bits, 128)
    pf, off = 32 // bits, 2 ** (bits - 1)
    assert t["qweight"].shape == (256 // pf, 16) and t["qweight"].dtype == torch.int32
    for i in (0, 1, pf - 1, pf, 255):
        for o in (0, 5, 15):
            word = _u32(t["qweight"][i // pf, o])
            assert (word >> (bits * (i % pf))) & (2 ** bits - 1) == codes[o, i] + off
    # v1 zeros convention: stored zero is (2^(b-1) - 1)
    assert (_u32(t["qzeros"][0, 0]) & (2 ** bits - 1)) == off - 1
    assert torch.equal(t["g_idx"], torch.arange(256, dtype=torch.int32) // 128)
    back, s = unpack_gptq(t["qweight"], t["qzeros"], t["scales"], bits)
    assert torch.equal(back, codes.to(torch.int32)) and torch.equal(s, scales.half())


def test_awq_layout_interleave_bit_by_bit():
    codes, scales = _codes(4, out_f=32)
    t = pack_awq(codes, scales, 128)
    assert t["qweight"].shape == (256, 4) and t["scales"].dtype == torch.float16
    for i in (0, 77, 255):
        for c in range(4):
            word = _u32(t["qweight"][i, c])
            for k in range(8):
                assert (word >> (4 * k)) & 0xF == codes[c * 8 + AWQ_CHANNEL_OF_NIBBLE[k], i] + 8
    assert _u32(t["qzeros"][0, 0]) == 0x88888888
    back, _ = unpack_awq(t["qweight"], t["qzeros"], t["scales"])
    assert torch.equal(back, codes.to(torch.int32))
    # and the other way: words built here nibble by nibble unpack to the channels the layout names
    qweight = torch.zeros(256, 4, dtype=torch.int64)
    for c in range(4):
        for k in range(8):
            qweight[:, c] |= (codes[c * 8 + AWQ_CHANNEL_OF_NIBBLE[k], :].to(torch.int64) + 8) << (4 * k)
    qweight = torch.where(qweight >= 2 ** 31, qweight - 2 ** 32, qweight).to(torch.int32)
    back, _ = unpack_awq(qweight, t["qzeros"], t["scales"])
    assert torch.equal(back, codes.to(torch.int32))


def test_awq_zero_point_other_than_8_rejected():
    codes, scales = _codes(4, out_f=32)
    t = pack_awq(codes, scales, 128)
    qz = t["qzeros"].clone()
    qz[0, 1] = torch.tensor(0x88888887 - (1 << 32), dtype=torch.int32)
    with pytest.raises(GraceFormatError, match="zero points differ from 8"):
        unpack_awq(t["qweight"], qz, t["scales"], "model.layers.0.mlp.up_proj")


@pytest.mark.parametrize("bits", [4, 8])
def test_compressed_tensors_layout_matches_library(bits):
    # the library's public packer (compressed_tensors.compressors re-exports it)
    helpers = require("compressed_tensors.compressors")
    codes, scales = _codes(bits)
    t = pack_compressed_tensors(codes, scales, bits)
    ref = helpers.pack_to_int32(codes.to(torch.int8), bits, packed_dim=1)
    assert torch.equal(t["weight_packed"], ref)
    assert t["weight_shape"].tolist() == [16, 256]
    back, _ = unpack_compressed_tensors(t["weight_packed"], t["weight_scale"], bits)
    lib_back = helpers.unpack_from_int32(ref, bits, torch.Size([16, 256]), packed_dim=1)
    assert torch.equal(back, codes.to(torch.int32)) and torch.equal(lib_back.to(torch.int32), back)
