"""The GRACE quantizer: symmetric, group-wise, learned step size (LSQ).

Everything that knows the quantization math lives here, so that the checkpoint reader, the
converters, the synthetic checkpoints and both engine adapters agree on it bit for bit.

Conventions (README "Support matrix"; the formats in :mod:`grace_qat.formats`):
  * a weight W has shape (out, in); groups of ``group_size`` run along ``in`` inside one row;
    when ``in`` is not a multiple of the group size, the group is the whole row;
  * one step s = exp(log_scale) per group, fp32; codes q = clamp(round(W / s), qmin, qmax);
  * the dequantized weight is (q * s) computed in fp32, then cast to the weight dtype.
"""
from __future__ import annotations

import math

import torch

from .errors import GraceFormatError

SUPPORTED_BITS = (4, 8)
DEFAULT_GROUP_SIZE = 128
# Training clamps log_scale to [ln 1e-8, ln 1e4]; anything outside is not a GRACE scale.
LOG_SCALE_MIN = -18.420680743952367
LOG_SCALE_MAX = 9.210340371976184


def check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise GraceFormatError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return bits


def code_range(bits: int) -> tuple[int, int]:
    """(qmin, qmax) of the signed symmetric grid: int4 -> (-8, 7), int8 -> (-128, 127)."""
    check_bits(bits)
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def effective_group_size(in_features: int, group_size: int) -> int:
    """The group size actually used for a layer: the whole row when ``group_size`` does not divide it."""
    if group_size <= 0:
        raise GraceFormatError(f"group size must be positive, got {group_size}")
    return group_size if in_features % group_size == 0 else in_features


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    out_f, in_f = weight.shape
    g = effective_group_size(in_f, group_size)
    return weight.reshape(out_f, in_f // g, g)


def scales_from_log_scale(log_scale: torch.Tensor, out_features: int, in_features: int,
                          group_size: int, name: str = "?") -> torch.Tensor:
    """exp(log_scale) as an fp32 (out, in/G) matrix, after checking length and finiteness."""
    g = effective_group_size(in_features, group_size)
    expected = out_features * (in_features // g)
    if log_scale.dim() != 1 and tuple(log_scale.shape) != (out_features, in_features // g):
        raise GraceFormatError(
            f"{name}.log_scale: expected a 1-D tensor of {expected} groups "
            f"(weight {out_features}x{in_features}, group {g}), got shape {tuple(log_scale.shape)}")
    if log_scale.numel() != expected:
        raise GraceFormatError(
            f"{name}.log_scale: expected {expected} groups (weight {out_features}x{in_features}, "
            f"group {g}), got {log_scale.numel()}")
    ls = log_scale.detach().to(torch.float32).reshape(out_features, in_features // g)
    lo, hi = float(ls.min()), float(ls.max())     # NaN propagates: both finite <=> all finite
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = ~torch.isfinite(ls)      # only on this path: isfinite + any cost 50x min + max
        idx = int(bad.flatten().nonzero()[0])
        raise GraceFormatError(
            f"{name}.log_scale: {int(bad.sum())} non-finite values (first at group {idx}: "
            f"{ls.flatten()[idx].item()}); expected finite log-steps")
    if lo < LOG_SCALE_MIN - 1e-3 or hi > LOG_SCALE_MAX + 1e-3:
        raise GraceFormatError(
            f"{name}.log_scale: values span [{lo:.3f}, {hi:.3f}], outside the trained range "
            f"[ln 1e-8, ln 1e4] = [{LOG_SCALE_MIN:.3f}, {LOG_SCALE_MAX:.3f}]")
    return torch.exp(ls)


def fake_quantize(weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The training-time forward: (clamp(round(W/s)) * s) in fp32, cast back to W's dtype."""
    qmin, qmax = code_range(bits)
    w = _grouped(weight.to(torch.float32), group_size)
    s = scales.to(torch.float32).unsqueeze(-1)
    q = torch.clamp(torch.round(w / s), qmin, qmax)
    return (q * s).reshape(weight.shape).to(weight.dtype)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, group_size: int,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W_dq from integer codes (out, in) and fp32 steps (out, in/G): the reference for every check."""
    q = _grouped(codes.to(torch.float32), group_size)
    return (q * scales.to(torch.float32).unsqueeze(-1)).reshape(codes.shape).to(dtype)


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` values around |x| (the smallest normal spacing for zero/subnormals)."""
    fi = torch.finfo(dtype)
    _, exp = torch.frexp(x.to(torch.float32).abs().clamp_min(fi.tiny))
    return torch.ldexp(torch.full_like(x, fi.eps, dtype=torch.float32), exp - 1)


_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32}


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of their (shared) float dtype lie between ``a`` and ``b``
    (0: equal, 1: neighbours; +0 and -0 are equal). Integer arithmetic on the bit patterns, mapped
    onto one monotonic line (negative floats count down from zero)."""
    width = a.element_size()
    ints = _INT_OF_WIDTH[width]
    lowest = torch.iinfo(ints).min

    def line(x: torch.Tensor) -> torch.Tensor:
        bits = x.contiguous().view(ints).to(torch.int64 if width == 4 else torch.int32)
        return torch.where(bits < 0, lowest - bits, bits)

    return (line(a) - line(b)).abs()


def needed_bits(lo: int, hi: int) -> int | None:
    """The narrowest supported width whose range holds codes in [lo, hi] (None: none does)."""
    for b in SUPPORTED_BITS:
        qmin, qmax = code_range(b)
        if lo >= qmin and hi <= qmax:
            return b
    return None


def _disagreement(bits: int) -> str:
    return (f"but the checkpoint's width was inferred as {bits} bits from its first quantized module: the "
            f"modules disagree on the bit width (state it with --bits or quantization_config.bits to check "
            f"every module against it)")


def check_width(lo: float, hi: float, bits: int, inferred: bool, name: str = "?") -> None:
    """The one rule for a bit width that was inferred (from the first module) rather than stated:
    every module's codes must need exactly that width, else the modules disagree and the checkpoint
    is refused. This refuses a module that needs fewer bits; one that needs more fails the range
    check of :func:`recover_codes`, whose message then names both widths. A stated width is only
    range-checked."""
    if not inferred or not (math.isfinite(lo) and math.isfinite(hi)):
        return
    need = needed_bits(lo, hi)
    if need is None or need >= bits:
        return
    nmin, nmax = code_range(need)
    code = lo if -lo > hi else hi
    raise GraceFormatError(
        f"{name}.weight: its codes span [{lo:.0f}, {hi:.0f}] (largest magnitude code {code:.0f}): a "
        f"{need}-bit grid [{nmin}, {nmax}], {_disagreement(bits)}")


def recover_codes(weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                  name: str = "?", inferred: bool = False) -> torch.Tensor:
    """Integer codes of an on-grid weight, verified; int8 for 4 bits, int16 for 8 bits.

    Exact because bf16 keeps 8 significant bits: |W/s - q| <= |q| 2^-8 < 0.5. The verification is
    stronger than that bound: re-dequantizing the codes must give back the stored weight to within
    one unit in the last place (exp() may differ by an fp32 ulp between the machine that trained and
    this one). Off-grid or out-of-range weights raise GraceFormatError naming the module and the
    worst value; a silent wrong answer is never returned. ``inferred``: ``bits`` was inferred from
    the checkpoint's first module, not stated; the codes must then need exactly ``bits``
    (:func:`check_width`).
    """
    qmin, qmax = code_range(bits)
    out_f, in_f = weight.shape
    g = effective_group_size(in_f, group_size)
    if tuple(scales.shape) != (out_f, in_f // g):
        raise GraceFormatError(f"{name}: scales shape {tuple(scales.shape)} does not match weight "
                               f"{out_f}x{in_f} with group {g} (expected {(out_f, in_f // g)})")
    if not (scales > 0).all() or not torch.isfinite(scales).all():
        raise GraceFormatError(f"{name}: steps must be finite and > 0")
    # Full-size passes are kept few (this runs on every quantized weight at load time): reductions
    # find the rare bad cases, which are then located in detail.
    w = _grouped(weight.to(torch.float32, copy=True), g)     # a copy: worked on in place below
    lo, hi = torch.aminmax(w)                      # NaN and inf both surface here
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise GraceFormatError(f"{name}.weight: contains NaN or inf")
    s = scales.to(torch.float32).unsqueeze(-1)
    q = w.div_(s).round_()
    q_lo, q_hi = torch.aminmax(q)
    check_width(float(q_lo), float(q_hi), bits, inferred, name)
    if q_lo < qmin or q_hi > qmax:
        out_of_range = (q < qmin) | (q > qmax)
        worst = q_lo if qmin - q_lo > q_hi - qmax else q_hi
        need = needed_bits(float(q_lo), float(q_hi))
        why = (f"the module needs {need} bits, {_disagreement(bits)}" if inferred and need is not None
               else "wrong bits or scales?")
        raise GraceFormatError(
            f"{name}.weight: {int(out_of_range.sum())} codes outside the {bits}-bit range "
            f"[{qmin}, {qmax}] (worst code {float(worst):.0f}); {why}")
    dtype = torch.int8 if bits == 4 else torch.int16
    codes = q.reshape(out_f, in_f).to(dtype)
    recon = q.mul_(s).reshape(out_f, in_f).to(weight.dtype)      # q is done with: reuse it
    mismatch = recon != weight
    # exp() may differ by an fp32 ulp between machines: a neighbouring value is still on the grid
    if mismatch.any() and bool((ulps_apart(recon[mismatch], weight[mismatch]) > 1).any()):
        apart = ulps_apart(recon, weight)
        flat = int(apart.flatten().argmax())
        o, rest = divmod(flat, in_f)
        raise GraceFormatError(
            f"{name}.weight: {int((apart > 1).sum())} of {weight.numel()} values are off the quantization "
            f"grid (worst at [{o}, {rest}]: {weight.flatten()[flat].item():.6g}, nearest grid value "
            f"{recon.flatten()[flat].item():.6g}); not a GRACE {bits}-bit weight for these scales")
    return codes


def derive_scales(weight: torch.Tensor, bits: int, group_size: int, name: str = "?",
                  inferred: bool = False) -> torch.Tensor:
    """Per-group steps of an on-grid weight alone (no sidecar, no log_scale): see _derive_scales.

    ``inferred`` (``bits`` came from the first module, not from the user): the module's own
    narrowest grid must have that width. A 4-bit grid is also an 8-bit grid (at a 16x finer step),
    so the narrower widths are tried first; a module on a narrower or only on a wider grid is
    refused as a disagreement between modules (:func:`check_width`), naming both widths."""
    if not inferred:
        return _derive_scales(weight, bits, group_size, name)
    first_error = None
    for width in SUPPORTED_BITS:                       # narrowest first
        try:
            s = _derive_scales(weight, width, group_size, name)
        except GraceFormatError as e:
            if width == bits:
                first_error = e
            continue
        if width == bits:
            return s
        if width < bits:                               # e.g. on a 4-bit grid, inferred 8
            q = torch.round(_grouped(weight.to(torch.float32), group_size) / s.unsqueeze(-1))
            lo, hi = torch.aminmax(q)
            check_width(float(lo), float(hi), bits, True, name)
        raise GraceFormatError(f"{first_error}; its values lie on a grid of {width}-bit codes, "
                               f"{_disagreement(bits)}")
    raise first_error


def _derive_scales(weight: torch.Tensor, bits: int, group_size: int, name: str = "?") -> torch.Tensor:
    """Recover per-group steps from an on-grid weight alone (no sidecar, no log_scale).

    For each group, try every possible code magnitude k of its largest element; the step is
    max|W| / k refined by least squares over the whole group. Among the k whose codes reproduce the
    group to within one ulp, the one reproducing most values exactly wins. Groups with no solution
    raise GraceFormatError. Steps are estimates (to bf16 precision); with a sidecar or inline
    log_scale the learned steps are used instead.
    """
    qmin, qmax = code_range(bits)
    out_f, in_f = weight.shape
    g = effective_group_size(in_f, group_size)
    w = _grouped(weight.to(torch.float32), g)
    amax = w.abs().amax(-1, keepdim=True)
    tol = _ulp(w, weight.dtype) * 1.0001
    best = torch.ones_like(amax)
    best_misses = torch.full(amax.shape, w.shape[-1] + 1, dtype=torch.int64,
                             device=amax.device)   # > G: no solution yet
    for k in range(1, -qmin + 1):
        s0 = torch.where(amax > 0, amax / k, torch.ones_like(amax))
        s = s0
        for _ in range(3):   # alternate codes and least-squares step until they agree
            q = torch.clamp(torch.round(w / s), qmin, qmax)
            qq = (q * q).sum(-1, keepdim=True)
            s = torch.where(qq > 0, (w * q).sum(-1, keepdim=True) / qq.clamp_min(1), s0)
        q = torch.clamp(torch.round(w / s), qmin, qmax)
        err = ((q * s).to(weight.dtype).to(torch.float32) - w).abs()
        valid = (err <= tol).all(-1, keepdim=True)
        misses = torch.where(valid, (err > 0).sum(-1, keepdim=True), best_misses)
        better = misses < best_misses      # prefer the step that reproduces the most values exactly
        best = torch.where(better, s, best)
        best_misses = torch.where(better, misses, best_misses)
        if bool((best_misses == 0).all()):
            break
    # Least squares leaves the step off by up to ~1e-3 at 8 bits, where bf16 no longer tells code q
    # from q+-1 within an ulp: pin the step down exactly. A stored value w = bf16(q*s) bounds s to
    # [(w - ulp/2)/q, (w + ulp/2)/q] (half that spacing below a power of two); intersect the bounds of
    # the values whose code is beyond doubt, take the codes every step in the interval agrees on, and
    # narrow again; the midpoint then reproduces the whole group.
    if not bool((best_misses == 0).all()):
        up = _ulp(w, weight.dtype) * 0.5
        down = torch.where(torch.frexp(w)[0].abs() == 0.5, up * 0.5, up)
        w_lo, w_hi = w - torch.where(w > 0, down, up), w + torch.where(w > 0, up, down)
        inf = torch.full_like(w, float("inf"))

        def bounds(q, use):
            qs = torch.where(use, q, torch.ones_like(q))
            a, b = w_lo / qs, w_hi / qs
            return (torch.where(use, torch.minimum(a, b), -inf).amax(-1, keepdim=True),
                    torch.where(use, torch.maximum(a, b), inf).amin(-1, keepdim=True))

        r = w / best
        q = torch.clamp(torch.round(r), qmin, qmax)
        lo, hi = bounds(q, (q != 0) & ((r - q).abs() < 0.25))
        slack = 1 + 2 ** -20      # ties (w exactly between two bf16 values) close the interval to a point
        for _ in range(4):
            ok = (lo > 0) & (lo <= hi * slack) & torch.isfinite(hi)
            safe_lo, safe_hi = torch.where(ok, lo, best), torch.where(ok, hi, best)
            qa = torch.clamp(torch.round(w / safe_lo), qmin, qmax)
            qb = torch.clamp(torch.round(w / safe_hi), qmin, qmax)
            lo2, hi2 = bounds(qa, (qa == qb) & (qa != 0))
            lo, hi = torch.maximum(lo, lo2), torch.minimum(hi, hi2)
        ok = (lo > 0) & (lo <= hi * slack) & torch.isfinite(hi)
        # the midpoint, or an end when ties (w exactly between two bf16 values) pin the step to it
        for s in ((lo + hi) * 0.5, lo, hi):
            s = torch.where(ok, s, best)
            q = torch.clamp(torch.round(w / s), qmin, qmax)
            err = ((q * s).to(weight.dtype).to(torch.float32) - w).abs()
            misses = torch.where((err <= tol).all(-1, keepdim=True), (err > 0).sum(-1, keepdim=True), best_misses)
            better = misses < best_misses
            best = torch.where(better, s, best)
            best_misses = torch.where(better, misses, best_misses)
    found = best_misses <= w.shape[-1]
    if not bool(found.all()):
        n = int((~found).sum())
        first = int((~found).flatten().nonzero()[0])
        raise GraceFormatError(
            f"{name}.weight: {n} groups are not on any {bits}-bit grid (first: row {first // (in_f // g)}, "
            f"group {first % (in_f // g)}); not a GRACE checkpoint, or wrong bits")
    return best.squeeze(-1)


def mse_init_log_scale(weight: torch.Tensor, bits: int, group_size: int, steps: int = 40) -> torch.Tensor:
    """LSQ initialisation as GRACE does it: per group, the step minimising ||W - fakeq(W)||^2
    over a grid of fractions of max|W|/qmax. Returns log_scale, fp32, flat (out*in/G,)."""
    qmin, qmax = code_range(bits)
    w = _grouped(weight.to(torch.float32), group_size)
    base = (w.abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-8)
    best_err = torch.full_like(base, float("inf"))
    best = base.clone()
    for i in range(steps):
        s = base * (1.0 - 0.5 * i / steps)   # shrink from 1.0x to 0.5x of the max-abs step
        err = ((torch.clamp(torch.round(w / s), qmin, qmax) * s - w) ** 2).sum(-1, keepdim=True)
        better = err < best_err
        best = torch.where(better, s, best)
        best_err = torch.where(better, err, best_err)
    return torch.log(best).flatten().clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)
