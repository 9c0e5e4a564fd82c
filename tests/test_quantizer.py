"""The quantizer math against plain-torch references written from the format specification."""
import math

import pytest
import torch

from grace_qat.errors import GraceFormatError
from grace_qat.quantizer import (code_range, dequantize, derive_scales, effective_group_size,
                                 fake_quantize, mse_init_log_scale, recover_codes, scales_from_log_scale)


def _grace_layer(out_f, in_f, bits, g=128, seed=0, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * 0.02
    log_scale = mse_init_log_scale(w, bits, g)
    s = torch.exp(log_scale).reshape(out_f, -1)
    return fake_quantize(w.to(dtype), s, bits, g), log_scale, s


def _reference_codes(w_dq, s, bits, g):
    """Per-element loop-free but independent: view flat as (groups, G) exactly as the spec words it."""
    out_f, in_f = w_dq.shape
    gs = g if in_f % g == 0 else in_f
    flat = w_dq.float().reshape(-1, gs)
    qmin, qmax = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(flat / s.reshape(-1, 1)), qmin, qmax).reshape(out_f, in_f)


@pytest.mark.parametrize("bits", [4, 8])
def test_code_range(bits):
    assert code_range(bits) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def test_bits_other_than_4_or_8_rejected():
    with pytest.raises(GraceFormatError, match="bits"):
        code_range(3)


@pytest.mark.parametrize("bits", [4, 8])
def test_recover_codes_matches_reference_and_dequantizes_back(bits):
    w_dq, _, s = _grace_layer(64, 256, bits)
    codes = recover_codes(w_dq, s, bits, 128, "layer")
    assert torch.equal(codes.float(), _reference_codes(w_dq, s, bits, 128))
    # the dequantized codes are the stored weight, bit for bit
    assert torch.equal(dequantize(codes, s, 128, torch.bfloat16), w_dq)


@pytest.mark.parametrize("bits", [4, 8])
def test_edge_code_qmin_recovers_exactly(bits):
    qmin, qmax = code_range(bits)
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(qmin, qmax + 1, (32, 256), generator=gen)
    codes[:, 0] = qmin          # the spec's hardest case: |q| = 2^(b-1)
    codes[:, 1] = qmax
    s = torch.exp(torch.empty(32, 2).uniform_(-7, -2, generator=gen))
    w_dq = dequantize(codes, s, 128, torch.bfloat16)
    assert torch.equal(recover_codes(w_dq, s, bits, 128).long(), codes)


def test_off_grid_weight_is_rejected_with_module_name():
    w_dq, _, s = _grace_layer(32, 256, 4)
    w = w_dq.clone()
    w[3, 7] = w[3, 7] + s[3, 0] * 0.37
    with pytest.raises(GraceFormatError, match=r"layers\.0\.mlp\.up_proj\.weight: 1 of .* off the quantization grid"):
        recover_codes(w, s, 4, 128, "model.layers.0.mlp.up_proj")


def test_out_of_range_codes_are_rejected():
    w_dq, _, s = _grace_layer(32, 256, 8)    # an 8-bit weight read as 4-bit
    with pytest.raises(GraceFormatError, match="outside the 4-bit range"):
        recover_codes(w_dq, s, 4, 128, "m")


def test_group_is_whole_row_when_group_size_does_not_divide():
    assert effective_group_size(200, 128) == 200
    w_dq, log_scale, s = _grace_layer(16, 200, 4)
    assert log_scale.numel() == 16
    codes = recover_codes(w_dq, s, 4, 128)
    assert torch.equal(codes.float(), _reference_codes(w_dq, s, 4, 128))


@pytest.mark.parametrize("bad, match", [
    (float("nan"), "non-finite"), (float("inf"), "non-finite"), (-40.0, "outside the trained range"),
    (25.0, "outside the trained range")])
def test_bad_log_scales_rejected(bad, match):
    ls = torch.full((32 * 2,), -5.0)
    ls[5] = bad
    with pytest.raises(GraceFormatError, match=match):
        scales_from_log_scale(ls, 32, 256, 128, "m")


def test_log_scale_length_mismatch_rejected():
    with pytest.raises(GraceFormatError, match="expected 64 groups"):
        scales_from_log_scale(torch.zeros(63), 32, 256, 128, "m")


@pytest.mark.parametrize("bits", [4, 8])
def test_derive_scales_reproduces_weight(bits):
    w_dq, _, s = _grace_layer(16, 256, bits, seed=3)
    derived = derive_scales(w_dq, bits, 128)
    codes = recover_codes(w_dq, derived, bits, 128)   # verifies the grid to within one bf16 ulp
    true_codes = recover_codes(w_dq, s, bits, 128)
    # the step comes from the grid alone: it matches the learned one to bf16 precision; at 8 bits
    # the top codes are one bf16 ulp apart, so a rare code may differ by one (same weight to 1 ulp)
    assert torch.allclose(derived, s, rtol=2 ** -7)
    mismatched = (codes != true_codes).float().mean()
    assert mismatched == 0 if bits == 4 else mismatched < 1e-3
    exact = (dequantize(codes, derived, 128, torch.bfloat16) == w_dq).float().mean()
    assert exact > 0.95


def test_derive_scales_rejects_plain_weight():
    w = (torch.randn(8, 256) * 0.02).to(torch.bfloat16)
    with pytest.raises(GraceFormatError, match="not on any 4-bit grid"):
        derive_scales(w, 4, 128)


def test_mse_init_beats_max_abs_and_produces_clipping():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 512, generator=gen)
    ls = mse_init_log_scale(w, 4, 128)
    s = torch.exp(ls).reshape(64, -1)
    maxabs = w.reshape(64, 4, 128).abs().amax(-1) / 7
    err = lambda st: ((fake_quantize(w, st, 4, 128) - w) ** 2).sum()
    assert err(s) < err(maxabs)
    codes = torch.round(w.reshape(64, 4, 128) / s.unsqueeze(-1)).clamp(-8, 7)
    assert (codes == -8).any() and (codes == 7).any()
    # independent per-group search written from the docstring (GRACE's LSQ init): candidates
    # max|w|/7 * (1 - 0.5 i/40), i < 40; the chosen step is the first with the least squared error
    groups = w.reshape(-1, 128)
    for g in (0, 1, 77, groups.shape[0] - 1):
        x = [float(v) for v in groups[g]]
        base = max(abs(v) for v in x) / 7

        def sq_err(step):
            return sum((min(7, max(-8, round(v / step))) * step - v) ** 2 for v in x)
        cands = [base * (1.0 - 0.5 * i / 40) for i in range(40)]
        errs = [sq_err(c) for c in cands]
        chosen = math.exp(float(ls[g]))
        assert sq_err(chosen) <= min(errs) * (1 + 1e-5), g
        assert math.isclose(chosen, cands[errs.index(min(errs))], rel_tol=1e-5), g
