"""The small-M Triton kernel (grace_qat/kernels/triton_wna16.py) against an fp32 reference written here.

On a machine without a GPU these run under Triton's interpreter (TRITON_INTERPRET=1 is set below
before Triton is imported), on small shapes; the `gpu` tests run the compiled kernel on CUDA,
including CUDA-graph capture and torch.compile. The reference packs and dequantizes with plain
torch (nothing from grace_qat), so a layout mistake in the kernel cannot cancel out.

Exact, no tolerance: the steps are powers of two and the inputs integers in [-1, 1] (bias: eighths),
so every product and partial sum the kernel forms in fp32 is exact (|sum| <= K * 128 / 4 < 2^24
sixteenths for K <= 11008) and the output must be the float64 result rounded once to the output
dtype. Rounding can still hide one wrong code in a sum, so the codes and steps are also read back
through the identity (each output element is one code times one step), at the M under test."""
from __future__ import annotations

import functools
import os

import pytest

from requires import require

torch = require("torch")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
require("triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _pack(u: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) unsigned codes -> (N, K*bits/32) int32, value i of word j at bits i*bits (little-endian)."""
    pf = 32 // bits
    n, k = u.shape
    words = torch.zeros(n, k // pf, dtype=torch.int64)
    for i in range(pf):
        words |= u[:, i::pf].to(torch.int64) << (bits * i)
    words[words >= 2 ** 31] -= 2 ** 32
    return words.to(torch.int32)


@functools.lru_cache(maxsize=8)
def _case(n: int, k: int, bits: int, group: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, k), generator=g)
    gs = k if group == -1 else group
    steps = (2.0 ** -torch.randint(2, 5, (n, k // gs), generator=g)).to(dtype)   # 1/4, 1/8, 1/16
    w_ref = q.double() * steps.double().repeat_interleave(gs, dim=1)        # exact dequantized weight
    return _pack(q + 2 ** (bits - 1), bits), steps, w_ref


def _inputs(m: int, k: int, n: int, dtype, seed: int):
    """Integer activations in [-1, 1] and a bias in eighths: exact in bf16/fp16 and in every fp32 sum."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-1, 2, (m, k), generator=g).to(dtype)
    b = (torch.randint(-16, 17, (n,), generator=g) / 8).to(dtype)
    return x, b


INTERPRETER_BF16_DOT = ("Triton's CPU interpreter gets bf16 tl.dot wrong (off by ~1e10 on a plain "
                        "16x16 product); the gpu tests cover bf16 on the tensor-core path")


def _check(m, n, k, bits, group, dtype, bias=False, config=None, seed=0):
    from grace_qat.kernels import triton_wna16 as kern
    if not CUDA and dtype == torch.bfloat16 and config is not None and config.use_dot:
        pytest.skip(INTERPRETER_BF16_DOT)
    packed, steps, w_ref = _case(n, k, bits, group, dtype, seed)
    x, b = _inputs(m, k, n, dtype, seed + 1)
    b = b if bias else None
    ref = x.double() @ w_ref.t() + (b.double() if bias else 0)
    assert ref.abs().max() < 2 ** 15                  # fp16's range, far from it
    y = kern.wna16_mm(x.to(DEVICE), packed.to(DEVICE), steps.to(DEVICE), bits, group,
                      None if b is None else b.to(DEVICE), config=config)
    assert y.shape == (m, n) and y.dtype == dtype
    y = y.cpu()
    bad = y != ref.to(dtype)                          # exact sums, one rounding to the output dtype
    if not CUDA and dtype == torch.bfloat16:
        bad &= y != _truncated_bf16(ref)
    assert not bad.any(), f"{int(bad.sum())} elements off, max err {(y.double() - ref).abs().max():.3g}"
    _check_codes(m, n, k, bits, group, dtype, config=config, seed=seed)
    return y


def _truncated_bf16(ref: torch.Tensor) -> torch.Tensor:
    """ref (exact in fp32 here) cut to bf16 toward zero: Triton's CPU interpreter casts fp32 to bf16
    by dropping the low 16 bits instead of rounding to nearest (the compiled kernel rounds)."""
    bits = ref.to(torch.float32).view(torch.int32) & ~0xFFFF
    return bits.view(torch.float32).to(torch.bfloat16)


def _check_codes(m, n, k, bits, group, dtype, config=None, seed=0):
    """Every code and step, exactly: the kernel run on the identity, m rows at a time (as many
    rows per call as the M under test), gives bf16/fp16(code * step) for each weight."""
    from grace_qat.kernels import triton_wna16 as kern
    packed, steps, w_ref = _case(n, k, bits, group, dtype, seed)
    packed, steps = packed.to(DEVICE), steps.to(DEVICE)
    eye = torch.eye(k, dtype=dtype, device=DEVICE)
    y = torch.cat([kern.wna16_mm(eye[i:i + m], packed, steps, bits, group, config=config)
                   for i in range(0, k, m)]).cpu()
    bad = y != w_ref.t().to(dtype)
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} weights read back wrong, first at {bad.nonzero()[0].tolist()}"


def _cfg(**kw):
    from grace_qat.kernels.triton_wna16 import Config
    base = dict(block_m=1, block_n=16, block_kp=8, split_k=1, use_dot=False, num_warps=1, num_stages=1)
    base.update(kw)
    return Config(**base)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fma_path_matches_reference(bits, dtype):
    # K = 256: two groups of 128; N = 24 leaves a partial output tile; M = 3 a partial M tile
    _check(3, 24, 256, bits, 128, dtype, config=_cfg(block_m=4))


@pytest.mark.parametrize("unpack", [0, 1])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dot_path_matches_reference(bits, dtype, unpack):
    # each dot step is block_kp * pf features: 16*8 = 128 (int4), 16*4 = 64 (int8), inside a group
    _check(5, 32, 256, bits, 128, dtype,
           config=_cfg(block_m=16, block_n=16, block_kp=16, use_dot=True, unpack=unpack))


def test_split_k_with_bias_and_uneven_splits():
    # 256 / (8*8) = 4 steps over 3 splits -> 2 splits of 2 steps (no empty split); bias added once
    _check(2, 16, 512, 4, 128, torch.bfloat16, bias=True, config=_cfg(block_m=2, split_k=3))


def test_whole_row_group_and_k_not_multiple_of_128():
    # K = 200: one group per row (GRACE's rule when 128 does not divide in); last step is partial
    _check(2, 16, 200, 4, -1, torch.bfloat16, config=_cfg(block_m=2, block_kp=8))
    _check(17, 16, 200, 8, -1, torch.float16, config=_cfg(block_m=16, block_kp=16, use_dot=True))
    _check(17, 16, 200, 8, -1, torch.float16, config=_cfg(block_m=16, block_kp=16, use_dot=True, unpack=1))


def test_heuristic_choice_runs_and_leading_dims_are_kept():
    from grace_qat.kernels import triton_wna16 as kern
    packed, steps, w_ref = _case(16, 128, 4, 128, torch.bfloat16, 3)
    x = _inputs(6, 128, 16, torch.float16, 4)[0].reshape(2, 3, 128)   # M = 6: the tensor-core path
    assert kern.choose(6, 16, 128, 4, 128).use_dot
    y = kern.wna16_mm(x.to(DEVICE), packed.to(DEVICE), steps.to(DEVICE).half(), 4, 128)
    assert y.shape == (2, 3, 16)
    ref = x.double().reshape(6, 128) @ w_ref.t()
    assert torch.equal(y.cpu().reshape(6, 16), ref.to(torch.float16))


def test_rejects_what_it_cannot_run():
    from grace_qat.kernels import triton_wna16 as kern
    packed, steps, _ = _case(16, 128, 4, 128, torch.bfloat16, 0)
    with pytest.raises(ValueError, match="input features"):
        kern.wna16_mm(torch.zeros(1, 64, dtype=torch.bfloat16), packed, steps, 4, 128)
    with pytest.raises(TypeError, match="bf16 or fp16"):
        kern.wna16_mm(torch.zeros(1, 128), packed, steps, 4, 128)
    assert not kern.supports(4, 100, 200) and not kern.supports(3, 128, 256)
    assert kern.supports(4, 128, 256) and kern.supports(8, -1, 200)


def test_core_imports_without_triton():
    """grace_qat itself must not pull Triton in (the kernel module is imported lazily)."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['triton'] = None; import grace_qat, grace_qat.kernels, "
            "grace_qat.packing, grace_qat.quantizer; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.stdout.strip() == "ok", out.stderr


# --- GPU: the compiled kernel, real shapes, CUDA graphs, torch.compile --------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16, 32])
@pytest.mark.parametrize("bits,n,k", [(4, 4096, 2048), (4, 2048, 6144), (8, 12288, 2048), (4, 4096, 11008)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_layer_shapes_match_reference(m, bits, n, k, dtype):
    _check(m, n, k, bits, 128, dtype, bias=(m == 2), seed=0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("m", [8, 32])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_in_place_unpack_matches_reference(m, bits, dtype):
    cfg = _cfg(block_m=16 if m <= 16 else 32, block_n=64, block_kp=16 if bits == 4 else 32,
               split_k=2, use_dot=True, num_warps=4, num_stages=3, unpack=1)
    _check(m, 4096, 2048, bits, 128, dtype, bias=True, config=cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_cuda_graph_and_torch_compile_without_recompiles():
    from grace_qat.kernels import triton_wna16 as kern
    packed, steps, w_ref = _case(4096, 2048, 4, 128, torch.bfloat16, 7)
    packed, steps = packed.cuda(), steps.cuda()
    lib = torch.library.Library("grace_qat_test", "FRAGMENT")
    lib.define("mm(Tensor x, Tensor w, Tensor s) -> Tensor")
    lib.impl("mm", lambda x, w, s: kern.wna16_mm(x, w, s, 4, 128), "CUDA")
    torch.library.register_fake("grace_qat_test::mm", lambda x, w, s: x.new_empty(x.shape[0], w.shape[0]),
                                lib=lib)
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    f = torch.compile(lambda x: torch.ops.grace_qat_test.mm(x, packed, steps) * 2, fullgraph=True,
                      dynamic=True)
    eye = torch.eye(2048, device="cuda", dtype=torch.bfloat16)
    codes = (w_ref.t() * 2).to(torch.bfloat16)       # exact: steps are powers of two
    for m in (1, 3, 8, 32):
        x = _inputs(m, 2048, 4096, torch.bfloat16, m)[0].cuda()
        want = ((x.double().cpu() @ w_ref.t()) * 2).to(torch.bfloat16)     # one rounding, then exact x2
        assert torch.equal(f(x).cpu(), want)
        xs = x.clone()
        graph = torch.cuda.CUDAGraph()
        f(xs)
        with torch.cuda.graph(graph):
            out = f(xs)
        for i in range(0, 2048, m):                  # the captured graph, replayed on the identity
            xs.copy_(eye[i:i + m] if i + m <= 2048 else torch.cat([eye[i:], eye[:i + m - 2048]]))
            graph.replay()
            rows = min(m, 2048 - i)
            assert torch.equal(out[:rows].cpu(), codes[i:i + rows]), f"M={m}: rows {i}..{i + rows - 1}"
        xs.copy_(_inputs(m, 2048, 4096, torch.bfloat16, 100 + m)[0].cuda())
        graph.replay()
        want = ((xs.double().cpu() @ w_ref.t()) * 2).to(torch.bfloat16)
        assert torch.equal(out.cpu(), want)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])   # M=1 may specialise once
