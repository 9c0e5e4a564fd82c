"""The NVRTC-compiled decode GEMV (grace_qat/kernels/cuda_gemv.py, cuda_gemv.cu).

On a CPU: the weight layout is a bijection on every layer shape of both models (and their
tensor-parallel shards); an emulation of what the kernel does with the packed words (written here
from the CUDA source and PTX's mma.m16n8k16 fragment layout, not from the packer's map) gives
x @ W^T exactly, so the layout is the one the kernel indexes; NVRTC compiles every instantiation
for sm_90 (no GPU needed).

On a GPU (``-m gpu``): the compiled kernel against a float64 reference on every shape, M = 1..8,
16 and 32, bf16 and fp16, int4 and int8; every code and step read back through the identity;
random data within the error of the BF16 GEMM; split-K, CUDA-graph capture and replay (counters
left at zero for the next replay), programmatic dependent launch, and torch.compile through a
custom op without recompiles.

The benchmark's Nsight Compute step (benchmarks/gemv_kernel.py --ncu) on a CPU: Nsight Compute's
CSV read per launch, the bound each launch gets, one case per layer shape with the timed config.

Exactness as in tests/test_small_m_kernel.py: integer activations in [-1, 1] and power-of-two
steps make every product and fp32 sum exact, so the output must equal the float64 result rounded
once to the output dtype."""
from __future__ import annotations

import functools

import pytest

from requires import require

torch = require("torch")
from grace_qat.kernels import cuda_gemv as cg  # noqa: E402
from grace_qat.kernels import mixed_mm, own  # noqa: E402

CUDA = torch.cuda.is_available()


def model_shapes(tps=(1, 2, 4)) -> list[tuple[str, int, int]]:
    """(name, n, k) of every quantized linear layer of Qwen3-VL-2B and LLaVA-1.5-7B on one rank,
    for each tensor-parallel size whose input shards hold whole groups of 128 (as
    grace_qat.tensor_parallel.Geometry requires: LLaVA's down_proj at TP 4, K = 2752, is refused)."""
    out = {}
    for model, hidden, inter, heads, kv, hd in (("qwen3vl-2b", 2048, 6144, 16, 8, 128),
                                                 ("llava-7b", 4096, 11008, 32, 32, 128)):
        for tp in tps:
            for layer, n, k in (("qkv", (heads + 2 * kv) * hd // tp, hidden), ("o", hidden, heads * hd // tp),
                                ("gate_up", 2 * inter // tp, hidden), ("down", hidden, inter // tp)):
                if k % 128 == 0:
                    out.setdefault((n, k), f"{model} tp{tp} {layer}")
    return [(name, n, k) for (n, k), name in out.items()]


SHAPES = model_shapes()
SHAPE_IDS = [f"{name} {n}x{k}" for name, n, k in SHAPES]


def test_shapes_cover_both_models_and_shards():
    names = " ".join(name for name, _, _ in SHAPES)
    assert {(4096, 2048), (2048, 2048), (12288, 2048), (2048, 6144), (12288, 4096), (4096, 4096),
            (22016, 4096), (4096, 11008), (11008, 4096), (4096, 5504), (5504, 4096)} <= {(n, k) for _, n, k in SHAPES}
    assert "tp4" in names and "tp2" in names


# --- the layout ------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("name,n,k", SHAPES, ids=SHAPE_IDS)
def test_packing_is_a_bijection_on_every_layer_shape(name, n, k, bits):
    """Codes -> layout -> codes is the identity, and distinct positions land in distinct places
    (the layout holds exactly N x K codes plus the padding; each is read back where it came from)."""
    g = torch.Generator().manual_seed(n * 7 + k + bits)
    u = torch.randint(0, 2 ** bits, (n, k), generator=g, dtype=torch.int32)
    wq = cg.pack_codes(u, bits)
    tiles = -(-n // 16)
    assert wq.shape == (tiles, k // cg.CHUNK[bits], 32, 4) and wq.dtype == torch.int32
    assert torch.equal(cg.unpack_codes(wq, bits, n), u)


@pytest.mark.parametrize("bits", [4, 8])
def test_lane_map_is_a_permutation_of_each_block(bits):
    rows, ks = cg.lane_map(bits)
    ck = cg.CHUNK[bits]
    flat = (rows * ck + ks).reshape(-1)
    assert sorted(flat.tolist()) == list(range(16 * ck))


def test_padding_rows_hold_zero_and_steps_round_trip():
    u = torch.randint(0, 16, (40, 128), dtype=torch.int32)
    wq = cg.pack_codes(u, 4)
    assert wq.shape[0] == 3
    assert torch.equal(cg.unpack_codes(wq, 4)[40:], torch.full((8, 128), 8, dtype=torch.int32))
    s = torch.rand(40, 3).to(torch.bfloat16)
    st = cg.pack_steps(s)
    assert st.shape == (3, 3, 16) and torch.equal(cg.unpack_steps(st, 40), s)
    assert torch.equal(cg.unpack_steps(st)[40:], torch.zeros(8, 3, dtype=torch.bfloat16))
    assert st[0, 1, 2 * 3 + 1] == s[8 + 3, 1]        # entry 2g + h of group j: row g + 8h


def test_pack_from_the_plugins_int32_packing():
    from grace_qat.packing import pack_int32
    for bits in (4, 8):
        u = torch.randint(0, 2 ** bits, (50, 256), dtype=torch.int32)
        s = torch.rand(50, 2).half()
        wq, st = cg.pack(pack_int32(u, bits, dim=1), s, bits, rows_per_call=16)
        assert torch.equal(cg.unpack_codes(wq, bits, 50), u) and torch.equal(cg.unpack_steps(st, 50), s)


# --- an emulation of the kernel's arithmetic ---------------------------------------------------

def _registers(words: torch.Tensor, bits: int, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """codes_to_a in cuda_gemv.cu: the 4 A registers of mma step ``step`` as (low, high) signed
    codes, from the lane's 4 words (..., 4) int64 (unsigned)."""
    if bits == 4:
        w = words[..., step]
        # ((w >> 4r) & 0x000F000F): nibble r in the low half, nibble r + 4 in the high half
        return [(((w >> (4 * r)) & 0xF) - 8, ((w >> (4 * r + 16)) & 0xF) - 8) for r in range(4)]
    regs = []
    for h in range(2):
        w = words[..., 2 * step + h]
        byte = [(w >> (8 * i)) & 0xFF for i in range(4)]
        # fp16: prmt 0x4140 -> bytes 0, 1; 0x4342 -> bytes 2, 3. bf16: 0x7540 + 2p, 0x7541 + 2p
        regs += [(byte[0] - 128, byte[1] - 128), (byte[2] - 128, byte[3] - 128)]
    return regs


def emulate(x: torch.Tensor, wq: torch.Tensor, st: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """y (M, N) float64 as cuda_gemv.cu computes it: per tile and chunk, each lane's words become
    A registers (row g + 8 (r % 2), k-slots 2t + 8 (r // 2) + {0, 1}; PTX ISA, mma.m16n8k16 .bf16/.f16
    A fragment), the B operand is what each lane loads of x (features c*CK + (CK/4) t + 4 s + j,
    slots 2t + {0, 1} <- j = 0, 1 and 2t + 8 + {0, 1} <- j = 2, 3; column g = token), and each chunk's
    sum is scaled by the step pair lane g loads (rows g, g + 8 of group (c*CK) >> shift)."""
    tiles, chunks = wq.shape[:2]
    ck = cg.CHUNK[bits]
    m_rows, k = x.shape
    groups = st.shape[1]
    group = k // groups
    words = wq.to(torch.int64) & 0xFFFFFFFF                       # (tiles, C, 32, 4)
    # lane g's 32-bit load of group j: the low half scales row g, the high half row g + 8
    pairs = st.double().reshape(tiles, groups, 8, 2)
    steps = torch.cat([pairs[..., 0], pairs[..., 1]], dim=2).permute(0, 2, 1)      # (tiles, 16, groups)
    xd = x.double()
    y = torch.zeros(m_rows, tiles * 16, dtype=torch.float64)
    for mt in range(-(-m_rows // 8)):
        xb = torch.zeros(8, k, dtype=torch.float64)
        rows_here = xd[mt * 8:mt * 8 + 8]
        xb[:rows_here.shape[0]] = rows_here
        for c in range(chunks):
            acc = torch.zeros(tiles, 16, 8, dtype=torch.float64)
            for s in range(ck // 16):
                a = torch.zeros(tiles, 16, 16, dtype=torch.float64)       # (tile, row, k-slot)
                b = torch.zeros(16, 8, dtype=torch.float64)               # (k-slot, token)
                for lane in range(32):
                    g, t = divmod(lane, 4)
                    for r, (lo, hi) in enumerate(_registers(words[:, c, lane], bits, s)):
                        row, slot = g + 8 * (r % 2), 2 * t + 8 * (r // 2)
                        a[:, row, slot], a[:, row, slot + 1] = lo.double(), hi.double()
                    base = c * ck + (ck // 4) * t + 4 * s
                    b[2 * t, g], b[2 * t + 1, g] = xb[g, base], xb[g, base + 1]
                    b[2 * t + 8, g], b[2 * t + 9, g] = xb[g, base + 2], xb[g, base + 3]
                acc += a @ b
            scale = steps[:, :, (c * ck) // group]                       # (tiles, 16)
            y[mt * 8:mt * 8 + 8] += (acc * scale[:, :, None]).permute(2, 0, 1).reshape(8, -1)[:rows_here.shape[0]]
    return y[:, :n]


@functools.lru_cache(maxsize=4)
def _case(n: int, k: int, bits: int, group: int, dtype, seed: int):
    """Signed codes, power-of-two steps (1/4 .. 1/16), the exact float64 weight, the packed layout."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, k), generator=g)
    gs = k if group == -1 else group
    steps = (2.0 ** -torch.randint(2, 5, (n, k // gs), generator=g)).to(dtype)
    w_ref = q.double() * steps.double().repeat_interleave(gs, dim=1)
    u = (q + 2 ** (bits - 1)).to(torch.int32)
    return cg.pack_codes(u, bits), cg.pack_steps(steps), w_ref


def _inputs(m: int, k: int, n: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-1, 2, (m, k), generator=g).to(dtype)
    b = (torch.randint(-16, 17, (n,), generator=g) / 8).to(dtype)
    return x, b


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,k,group,m", [(48, 256, 128, 1), (40, 256, 128, 3), (32, 192, -1, 9)])
def test_kernel_emulation_on_the_packed_layout_is_exact(bits, n, k, group, m):
    """The layout is what the kernel indexes: emulating its loads, conversions and mma fragments on
    ``pack``'s output gives x @ W^T exactly (partial last tile, whole-row group, two token tiles)."""
    if bits == 4 and k % 64:
        pytest.skip("K not a multiple of int4's chunk")
    wq, st, w_ref = _case(n, k, bits, group, torch.bfloat16, 3)
    x = _inputs(m, k, n, torch.bfloat16, 4)[0]
    y = emulate(x, wq, st, bits, n)
    assert torch.equal(y, x.double() @ w_ref.t())


def test_emulation_notices_a_wrong_interleave(monkeypatch):
    """The check above can fail: a layout whose rows g and g + 8 trade places is caught."""
    rows, ks = cg.lane_map(4)
    swapped = (rows + 8) % 16
    monkeypatch.setattr(cg, "lane_map", lambda bits: (swapped, ks))
    wq, st, w_ref = _case.__wrapped__(32, 128, 4, 128, torch.bfloat16, 5)
    x = _inputs(2, 128, 32, torch.bfloat16, 6)[0]
    assert not torch.equal(emulate(x, wq, st, 4, 32), x.double() @ w_ref.t())


# --- constants, configs, NVRTC ------------------------------------------------------------------

def test_constants_are_the_float_patterns_the_source_names():
    c = cg.constants()
    lo = lambda v, dt: torch.tensor([v & 0xFFFF], dtype=torch.int32).to(torch.int16).view(dt).item()  # noqa: E731
    assert c["GQ_BF16_MAGIC2"] == 0x43004300 and c["GQ_F16_MAGIC2"] == 0x64006400
    assert lo(c["GQ_BF16_NEG_I4"], torch.bfloat16) == -136 and lo(c["GQ_F16_NEG_I4"], torch.float16) == -1032
    assert lo(c["GQ_F16_NEG_I8"], torch.float16) == -1152
    for name, v in c.items():
        assert v >> 16 == v & 0xFFFF, name                     # the same half twice
    # (128 + u) and (1024 + u) are the magic patterns with u in the low mantissa bits
    for u in (0, 7, 15):
        assert torch.tensor([0x4300 | u], dtype=torch.int32).to(torch.int16).view(torch.bfloat16).item() == 128 + u
        assert torch.tensor([0x6400 | u], dtype=torch.int32).to(torch.int16).view(torch.float16).item() == 1024 + u
    assert torch.tensor([0x6400 | 255], dtype=torch.int32).to(torch.int16).view(torch.float16).item() == 1024 + 255


def test_supports_and_configs():
    assert cg.supports(4, 128, 4096) and cg.supports(8, 128, 2048) and cg.supports(4, -1, 192)
    assert not cg.supports(4, 128, 200) and not cg.supports(3, 128, 256) and not cg.supports(4, 96, 192)
    assert "multiple of 64" in cg.why_not(4, -1, 96)
    for _, n, k in SHAPES:
        for m in (1, 2, 3, 4, 5, 8, 9, 16, 17, 32):
            for bits in (4, 8):
                cfg = cg.heuristic(m, n, k, bits)
                cg.check_config(cfg, m)
                assert cfg.warps in (4, 8) and cfg.split >= 1
    with pytest.raises(ValueError, match="outside"):
        cg.m_tiles(33)
    table = [(4, cg.Config(2, 4, 1, 2)), (8, cg.Config(1, 8, 2, 4))]
    assert cg.choose(3, 4096, 4096, 4, table) == table[0][1]
    assert cg.choose(8, 4096, 4096, 4, table) == table[1][1]
    assert cg.choose(9, 4096, 4096, 4, table) == cg.heuristic(9, 4096, 4096, 4)   # other M tiles
    assert cg.Config.from_list(cg.Config(4, 8, 3, 1).as_list()) == cg.Config(4, 8, 3, 1)


def _nvrtc_or_skip():
    try:
        from cuda.bindings import nvrtc
        cg.nvrtc_version()
    except (ImportError, RuntimeError, OSError) as e:
        if __import__("requires").in_ci():
            raise
        pytest.skip(f"NVRTC unavailable: {e}")
    return nvrtc


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp16"])
def test_nvrtc_compiles_every_instance_for_sm90(bits, bf16, tmp_path):
    """Every (M tiles, NT, U) instance compiles for Hopper without a GPU; the cubin is cached."""
    _nvrtc_or_skip()
    cubin, lowered = cg.compile_cubin(bits, bf16, "sm_90", cache_dir=str(tmp_path))
    assert cubin[:4] == b"\x7fELF" and set(lowered) == set(cg.INSTANCES)
    assert all(name.startswith("_Z10grace_gemv") for name in lowered.values())
    again = cg.compile_cubin(bits, bf16, "sm_90", cache_dir=str(tmp_path))
    assert again == (cubin, lowered) and len(list(tmp_path.iterdir())) == 2


def test_nvrtc_reports_a_compile_error(monkeypatch):
    _nvrtc_or_skip()
    monkeypatch.setattr(cg, "source", lambda: "__global__ void broken( { }")
    with pytest.raises(RuntimeError, match="NVRTC could not compile"):
        cg.compile_cubin(4, True, "sm_90", instances=(), cache_dir=None)


def test_source_ships_with_the_package():
    import pathlib
    import tomllib
    root = pathlib.Path(__file__).resolve().parents[1]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(p == "*.cu" for pats in data.values() for p in pats)
    assert pathlib.Path(cg.SOURCE).exists()


# --- GPU ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _gpu_case(n, k, bits, dtype, seed=0):
    """As ``_case``, made on the GPU (full-size layers: the float64 weight alone is up to 720 MB)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, k), generator=g, device="cuda")
    steps = (2.0 ** -torch.randint(2, 5, (n, k // 128), generator=g, device="cuda")).to(dtype)
    w_ref = q.double() * steps.double().repeat_interleave(128, dim=1)
    wq = cg.pack_codes((q + 2 ** (bits - 1)).to(torch.int32), bits)
    return wq, cg.pack_steps(steps), w_ref


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("name,n,k", SHAPES, ids=SHAPE_IDS)
def test_gpu_every_shape_and_m_is_exact(name, n, k, bits, dtype):
    wq, st, w_ref = _gpu_case(n, k, bits, dtype)
    for m in (1, 2, 3, 4, 5, 6, 7, 8, 16, 32):
        x, b = (t.cuda() for t in _inputs(m, k, n, dtype, m))
        bias = b if m in (2, 16) else None
        y = cg.gemv(x, wq, st, bits, n, bias=bias)
        ref = x.double() @ w_ref.t() + (bias.double() if bias is not None else 0)
        bad = y != ref.to(dtype)
        assert not bad.any(), f"M={m}: {int(bad.sum())} off, max err {(y.double() - ref).abs().max():.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("bits", [4, 8])
def test_gpu_every_code_and_step_reads_back_through_the_identity(bits, dtype):
    n, k = 4096, 2048
    wq, st, w_ref = _gpu_case(n, k, bits, dtype, seed=1)
    want = w_ref.t().to(dtype)
    for m in (1, 8, 16):
        eye = torch.eye(k, dtype=dtype, device="cuda")
        y = torch.cat([cg.gemv(eye[i:i + m], wq, st, bits, n) for i in range(0, k, m)])
        bad = y != want
        assert not bad.any(), f"M={m}: {int(bad.sum())} weights wrong, first at {bad.nonzero()[0].tolist()}"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("cfg", [cg.Config(1, 4, 1, 1), cg.Config(2, 8, 4, 2), cg.Config(4, 4, 3, 1),
                                 cg.Config(1, 8, 16, 4), cg.Config(2, 1, 1, 2)], ids=str)
@pytest.mark.parametrize("m", [1, 5, 12, 32])
def test_gpu_every_config_is_exact(cfg, m):
    try:
        cg.check_config(cfg, m)
    except ValueError:
        pytest.skip("not an instance for this M")
    for bits, n, k in ((4, 2048, 6144), (8, 1040, 2048)):
        wq, st, w_ref = _gpu_case(n, k, bits, torch.bfloat16, seed=2)
        x, b = (t.cuda() for t in _inputs(m, k, n, torch.bfloat16, 9))
        y = cg.gemv(x, wq, st, bits, n, bias=b, config=cfg)
        assert torch.equal(y, (x.double() @ w_ref.t() + b.double()).to(torch.bfloat16)), (bits, n, k)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_random_data_within_the_error_of_the_bf16_gemm(dtype):
    """Normal activations, random steps: no further from the float64 result than torch's 16-bit
    GEMM on the dequantized weight (what BF16 serving computes)."""
    from grace_qat.packing import pack_int32
    g = torch.Generator(device="cuda").manual_seed(0)
    for bits, n, k in ((4, 12288, 4096), (4, 4096, 11008), (8, 4096, 2048)):
        u = torch.randint(0, 2 ** bits, (n, k), device="cuda", dtype=torch.int32, generator=g)
        s = (torch.rand(n, k // 128, device="cuda", generator=g) * 0.02 + 0.001).to(dtype)
        w = ((u - 2 ** (bits - 1)).double() * s.double().repeat_interleave(128, dim=1))
        wq, st = cg.pack(pack_int32(u, bits, dim=1), s, bits)
        for m in (1, 4, 8, 16):
            x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
            ref = x.double() @ w.t()
            ours = (cg.gemv(x, wq, st, bits, n).double() - ref).abs().max().item()
            dense = (torch.nn.functional.linear(x, w.to(dtype)).double() - ref).abs().max().item()
            assert ours <= 1.01 * dense + 1e-6, (bits, n, k, m, ours, dense)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("pdl", [False, True], ids=["plain", "pdl"])
def test_gpu_cuda_graph_replay_matches_eager_and_leaves_counters_at_zero(pdl):
    if pdl and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90")
    n, k, bits = 2048, 6144, 4
    wq, st, w_ref = _gpu_case(n, k, bits, torch.bfloat16, seed=4)
    cg.prepare(0, bits, torch.bfloat16)
    for m, cfg in ((1, cg.Config(1, 4, 8, 2)), (8, cg.Config(2, 4, 1, 2)), (16, None)):
        xs = _inputs(m, k, n, torch.bfloat16, 20 + m)[0].cuda()
        f = lambda: cg.gemv(xs, wq, st, bits, n, config=cfg, pdl=pdl) * 2      # noqa: E731
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            f()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = f()
        for seed in range(3):
            xs.copy_(_inputs(m, k, n, torch.bfloat16, 100 * seed + m)[0].cuda())
            graph.replay()
            want = ((xs.double() @ w_ref.t()).to(torch.bfloat16)) * 2
            assert torch.equal(out, want), (m, seed)
            assert torch.equal(out, f())
        torch.cuda.synchronize()
        assert int(cg.counters(0).abs().sum()) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_torch_compile_through_a_custom_op_without_recompiles():
    n, k, bits = 4096, 2048, 4
    wq, st, w_ref = _gpu_case(n, k, bits, torch.bfloat16, seed=7)
    cg.prepare(0, bits, torch.bfloat16)
    lib = torch.library.Library("grace_qat_gemv_test", "FRAGMENT")
    lib.define("mm(Tensor x, Tensor w, Tensor s) -> Tensor")
    lib.impl("mm", lambda x, w, s: cg.gemv(x, w, s, 4, n), "CUDA")
    torch.library.register_fake("grace_qat_gemv_test::mm",
                                lambda x, w, s: x.new_empty(x.shape[0], w.shape[0] * 16), lib=lib)
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    f = torch.compile(lambda x: torch.ops.grace_qat_gemv_test.mm(x, wq, st) * 2, fullgraph=True, dynamic=True)
    for m in (1, 3, 8, 16, 32):
        x = _inputs(m, k, n, torch.bfloat16, m)[0].cuda()
        want = ((x.double() @ w_ref.t()).to(torch.bfloat16)) * 2
        assert torch.equal(f(x), want), m
        xs = x.clone()
        graph = torch.cuda.CUDAGraph()
        f(xs)
        with torch.cuda.graph(graph):
            out = f(xs)
        xs.copy_(_inputs(m, k, n, torch.bfloat16, 50 + m)[0].cuda())
        graph.replay()
        assert torch.equal(out, ((xs.double() @ w_ref.t()).to(torch.bfloat16)) * 2), m
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])   # M=1 may specialise once


# --- the plugin's kernel class --------------------------------------------------------------------

def _mp_config(bits=4, group=128, k=4096, n=4096, act=torch.bfloat16):
    from types import SimpleNamespace
    return SimpleNamespace(act_type=act, zero_points=False, weight_type=SimpleNamespace(size_bits=bits),
                           group_size=group, partition_weight_shape=(k, n), full_weight_shape=(k, n))


def test_plugin_lists_the_kernel_and_it_says_what_it_can_run():
    from grace_vllm import dispatch
    assert own.OWN_KERNELS["CudaGemvKernel"] is own.CudaGemvKernel
    assert dispatch.kernel_class("CudaGemvKernel") is own.CudaGemvKernel
    ok, why = own.CudaGemvKernel.can_implement(_mp_config(act=torch.float32))
    assert not ok and "float32" in why
    ok, why = own.CudaGemvKernel.can_implement(_mp_config(k=4000))
    assert not ok
    ok, why = own.CudaGemvKernel.can_implement(_mp_config())
    assert ok == (cg.available() is None), why


class _Dense:
    """The large kernel's stand-in: x @ W^T in float64, rounded once (W on the layer)."""

    def apply_weights(self, module, x, bias=None):
        y = x.double() @ module.w_ref.t()
        return (y if bias is None else y + bias.double()).to(x.dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_plugin_op_routes_small_m_to_the_cuda_kernel_under_compile_and_graphs():
    """grace_qat::mixed_mm sends M <= max_m to CudaGemvKernel (its layout made by ``attach`` from the
    compressed-tensors packing, the holder's bias), larger M to the layer's kernel; under
    torch.compile one graph serves every M, and captured graphs replay exactly."""
    from types import SimpleNamespace

    from grace_qat.packing import pack_int32
    n, k, bits = 4096, 2048, 4
    g = torch.Generator().manual_seed(11)
    q = torch.randint(-8, 8, (n, k), generator=g)
    steps = (2.0 ** -torch.randint(2, 5, (n, k // 128), generator=g)).to(torch.bfloat16)
    w_ref = (q.double() * steps.double().repeat_interleave(128, dim=1)).cuda()
    bias = (torch.randint(-16, 17, (n,), generator=g) / 8).to(torch.bfloat16).cuda()
    layer = torch.nn.Module()
    layer.weight_packed = torch.nn.Parameter(torch.zeros(1, device="cuda"), requires_grad=False)
    layer.w_ref = w_ref
    holder = torch.nn.Module()
    holder.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    small = own.CudaGemvKernel.attach(holder, pack_int32((q + 8).to(torch.int32), bits, dim=1).cuda(),
                                           steps.cuda(), bits, 128)
    setattr(layer, mixed_mm.KernelDispatch.HOLDER, holder)
    d = mixed_mm.KernelDispatch(layer, _Dense(), n, small, max_m=8)
    layer.quant_method = SimpleNamespace(dispatch=d)
    want = lambda x: (x.double() @ w_ref.t() + bias.double()).to(torch.bfloat16)   # noqa: E731
    for m in (1, 3, 8, 9):
        x = _inputs(m, k, n, torch.bfloat16, m)[0].cuda()
        before = mixed_mm.CALLS["CudaGemvKernel"]
        assert torch.equal(d.apply(layer, x, bias), want(x)), m
        assert mixed_mm.CALLS["CudaGemvKernel"] == before + (m <= 8), m
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    f = torch.compile(lambda x: d.apply(layer, x, bias), dynamic=True, fullgraph=True)
    for m in (1, 2, 8, 16):
        xs = _inputs(m, k, n, torch.bfloat16, 30 + m)[0].cuda()
        assert torch.equal(f(xs), want(xs)), m
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = f(xs)
        xs.copy_(_inputs(m, k, n, torch.bfloat16, 60 + m)[0].cuda())
        graph.replay()
        assert torch.equal(out, want(xs)), m
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


# --- the benchmark's Nsight Compute profiles (benchmarks/gemv_kernel.py --ncu) ------------------

def _gemv_bench():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gemv_kernel
    return gemv_kernel


def _ncu_csv(launches: list[dict]) -> str:
    """ncu --csv --page raw as Nsight Compute prints it: its own lines, a header row, a units row,
    one row per profiled launch (values with thousands separators), the program's output between."""
    names = ["ID", "Process ID", "Kernel Name"] + list(launches[0])
    units = ["", "", ""] + ["%" if "pct" in n else "" for n in launches[0]]
    q = lambda row: ",".join(f'"{v}"' for v in row)       # noqa: E731
    return "\n".join(["==PROF== Connected to process 1234", "ncu child: llava-7b:qkv_proj ...", q(names), q(units)]
                     + [q([i, 1234, "grace_gemv<4, true, 1, 2, 2>"] + list(m.values())) for i, m in enumerate(launches)]
                     + ["==PROF== Disconnected from process 1234"])


def test_ncu_bound_per_launch_from_nsight_computes_csv():
    """Each profiled launch gets its own metrics, in launch order, and what bounds it: DRAM at 60% of
    its peak or more; the SM where its throughput or issue activity is; else latency, with the
    largest stall reason."""
    g = _gemv_bench()
    stall = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    base = {"gpu__time_duration.sum": "1,234.5", "dram__throughput.avg.pct_of_peak_sustained_elapsed": "0",
            "sm__throughput.avg.pct_of_peak_sustained_elapsed": "10",
            "smsp__issue_active.avg.pct_of_peak_sustained_active": "10",
            stall.format("long_scoreboard"): "3.5", stall.format("barrier"): "0.2"}
    launches = [dict(base, **{"dram__throughput.avg.pct_of_peak_sustained_elapsed": "71.3"}),
                dict(base, **{"dram__throughput.avg.pct_of_peak_sustained_elapsed": "40",
                              "smsp__issue_active.avg.pct_of_peak_sustained_active": "64"}),
                dict(base, **{"dram__throughput.avg.pct_of_peak_sustained_elapsed": "35"})]
    parsed = g.parse_ncu_csv(_ncu_csv(launches))
    assert len(parsed) == 3 and parsed[0]["gpu__time_duration.sum"] == ("1,234.5", "")
    assert [g.bound_of(m)["bound"] for m in parsed] == ["DRAM bandwidth", "SM (issue slots / pipes)", "latency"]
    last = g.bound_of(parsed[2])
    assert last["dram_pct"] == 35.0 and last["top_stall"] == "long_scoreboard"
    assert g.bound_of({})["bound"] == "unknown"
    assert g.parse_ncu_csv("==PROF== no kernels were profiled") == []


def test_ncu_profiles_every_layer_shape_with_the_config_the_timing_run_chose(tmp_path):
    """--ncu-shape all: one case per distinct TP-1 layer shape of both models (and M), each with the
    config small_m.json of the same --out holds for it, else the heuristic's; the bounds go back into
    small_m.json beside the timings."""
    import argparse
    import json
    g = _gemv_bench()
    args = argparse.Namespace(ncu_bits=4, ncu_shape="all", models="llava-7b,qwen3vl-2b", group=128,
                              out=str(tmp_path), ncu_m="1,4", ncu_config=None)
    timed = {"meta": {}, "shapes": [{"bits": 4, "n": 22016, "k": 4096,
                                     "m": {"1": {"kernels": {"cuda_gemv": {"us": 30.0, "config": [4, 8, 2, 1]}}}}}]}
    (tmp_path / "small_m.json").write_text(json.dumps(timed))
    cases = g.ncu_cases(args)
    assert sorted({(c["n"], c["k"]) for c in cases}) == sorted({(n, k) for _, n, k in model_shapes(tps=(1,))})
    assert len(cases) == 2 * 8
    gate_up = {c["m"]: c for c in cases if (c["n"], c["k"]) == (22016, 4096)}
    assert gate_up[1]["config"] == [4, 8, 2, 1] and gate_up[1]["config_from"] == "small_m.json"
    assert gate_up[4]["config"] == cg.heuristic(4, 22016, 4096, 4).as_list()
    assert gate_up[4]["config_from"] == "heuristic"
    gate_up[1].update(g.bound_of({"dram__throughput.avg.pct_of_peak_sustained_elapsed": ("61", "%")}))
    g.merge_ncu_into_timings(str(tmp_path), cases)
    merged = json.loads((tmp_path / "small_m.json").read_text())["shapes"][0]["m"]["1"]
    assert merged["ncu"]["bound"] == "DRAM bandwidth" and merged["ncu"]["config"] == [4, 8, 2, 1]
    one = argparse.Namespace(**dict(vars(args), ncu_shape="llava-7b:down,4096x2048", ncu_m="1"))
    assert [(c["shape"], c["n"], c["k"]) for c in g.ncu_cases(one)] == [("llava-7b:down", 4096, 11008),
                                                                       ("4096x2048", 4096, 2048)]


# --- the benchmark's engine kernels run on its own weights ----------------------------------------

def test_benchmark_fails_where_a_kernel_is_off_the_reference():
    """The H100 lease of 2026-12-07 built Marlin, Machete and Humming on random codes of their own
    (kernel_crossover's), not the benchmark's: their "error" came out near sqrt(2), an unrelated
    output. Its small_m.json, committed, is flagged on exactly those; the GEMV's rows are not."""
    import json
    from pathlib import Path
    g = _gemv_bench()
    path = Path(__file__).resolve().parents[1] / "benchmarks/results/h100-vllm0.34-2026-12-07/gemv/gemv/small_m.json"
    rows = json.loads(path.read_text())["shapes"]
    flagged = g.off_reference(rows)
    assert {line.split(": ")[0].split()[-1] for line in flagged} == {"marlin", "machete", "humming"}
    assert len(flagged) == 3 * len(rows) * len(rows[0]["m"])
    for r in rows:
        for per in r["m"].values():
            for name in ("marlin", "machete", "humming"):
                per["kernels"][name]["rel_err"] = 0.0017
    assert g.off_reference(rows) == []


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_benchmark_builds_the_engine_kernels_on_its_own_weights():
    """Each engine kernel of the benchmark (Marlin, Machete, Humming where vLLM has them) computes the
    same product as the float64 reference on the benchmark's weights, as the GEMV does."""
    require("vllm")
    g = _gemv_bench()
    row = g.measure_shape(4, 128, 4096, 2048, [1, 8], 3e12, True, g.SweepClock(0))
    assert not row["engine_failed"], row["engine_failed"]
    for m, per in row["m"].items():
        assert {"marlin", "machete", "humming"} & set(per["kernels"]), f"M={m}: no engine kernel ran"
    assert g.off_reference([row]) == [], g.off_reference([row])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_crossover_without_a_sweep_times_the_gemv_with_its_own_fastest_candidates():
    """Without --gemv-configs the crossover still times the GEMV tuned, not with its heuristic alone
    (1.16x slower on the 7B gate_up in an H100 run, which lost that shape to Humming): one config per
    M up to the kernel's MAX_M, each one of gemv_kernel.py's candidates for that M, and the entry
    carries them where the GEMV is the second kernel."""
    require("vllm")
    g = _gemv_bench()
    import kernel_crossover as kx
    n, k, ladder = 4096, 2048, (1, 8, 16, 64)
    r = kx.measure(4, 128, n, k, ladder=ladder)
    swept = r["gemv_configs"]
    assert [m for m, _ in swept] == [1, 8, 16], swept
    for m, cfg in swept:
        assert cg.Config.from_list(cfg) in g.device_candidates(m, n, k, 4), (m, cfg)
        cg.check_config(cg.Config.from_list(cfg), m)
    assert set(r["us"]["CudaGemvKernel"]) == {1, 8, 16}
    if r["entry"]["small"] == "CudaGemvKernel":
        assert r["entry"]["configs"] == swept
    given = [[1, [1, 8, 1, 2]], [16, [1, 8, 1, 1]]]
    assert kx.measure(4, 128, n, k, ladder=(1,), gemv_table=given)["gemv_configs"] == given


def test_the_sweep_budget_counts_the_sweeps_own_time_only():
    """gemv_kernel.py's --sweep-seconds: time spent outside the sweep (the engine kernels' timing)
    leaves the budget whole; the sweep's own time uses it up."""
    import time
    g = _gemv_bench()
    clock = g.SweepClock(0.2)
    time.sleep(0.3)                                    # e.g. building and timing Marlin, Humming
    assert not clock.spent()
    assert clock.run(lambda: time.sleep(0.1) or "timed") == "timed" and not clock.spent()
    clock.run(lambda: time.sleep(0.15))
    assert clock.spent()
    assert g.SweepClock(0).spent()


def test_crossover_takes_the_gemv_sweeps_configs_into_the_table():
    """kernel_crossover --gemv-configs: the launch configs gemv_kernel.py's sweep chose per M on this
    GPU (its small_m.json, read as --ncu reads it) are what the crossover times the GEMV with and what
    a table entry carries; the plugin's kernel reads them back."""
    import json
    from pathlib import Path
    g = _gemv_bench()
    path = Path(__file__).resolve().parents[1] / "benchmarks/results/h100-vllm0.34-2026-12-07/gemv/gemv/small_m.json"
    tuned = g.swept_configs(str(path))
    assert len(tuned) == 8 and tuned[(4, 12288, 4096)][0] == [1, [2, 4, 1, 2]]
    assert [m for m, _ in tuned[(4, 12288, 4096)]] == [1, 2, 4, 8, 16]
    assert g.swept_configs(None) == {} and g.swept_configs("/nonexistent") == {}
    table = [[1, [1, 4, 1, 4]], [8, [1, 8, 2, 4]]]
    kern = own.CudaGemvKernel(4, 128, json.loads(json.dumps(table)))
    assert kern.table == [(1, cg.Config(1, 4, 1, 4)), (8, cg.Config(1, 8, 2, 4))]
    assert cg.choose(1, 4096, 11008, 4, kern.table) == cg.Config(1, 4, 1, 4)
    assert cg.choose(5, 4096, 11008, 4, kern.table) == cg.Config(1, 8, 2, 4)
