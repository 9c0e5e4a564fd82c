"""The Hopper kernel-dispatch tables (grace_vllm/dispatch.py): per-GPU choice, the shipped tables,
and the op routing small M to the Triton kernel (run by Triton's interpreter on a CPU).

The dispatch with vLLM's kernels (Marlin below the crossover, Machete above, under torch.compile)
needs CUDA and is tested in tests/test_vllm_plugin.py::test_dual_kernel_layer_dispatches_by_token_count."""
from __future__ import annotations

import json
import os
import sys

import pytest

from requires import require

# Triton's interpreter must be chosen before Triton is first imported (vLLM imports it), since
# its own library functions are decorated then.
_TRITON_PRELOADED = "triton" in sys.modules
if not _TRITON_PRELOADED and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
require("vllm")
torch = require("torch")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


@pytest.fixture
def dispatch(monkeypatch):
    from grace_vllm import dispatch as d
    monkeypatch.delenv(d.ENV_MAX_M, raising=False)
    monkeypatch.delenv(d.ENV_TABLE, raising=False)
    # the default (dual on), whatever the environment the suite runs in
    monkeypatch.delenv(d.ENV_DUAL, raising=False)
    d._table.cache_clear()
    yield d
    d._table.cache_clear()


def _this_device() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def test_lookup_uses_this_devices_table_only(dispatch, tmp_path, monkeypatch):
    table = tmp_path / "x.json"
    table.write_text(json.dumps({"devices": {
        _this_device(): {"default": 24, "shapes": {dispatch.shape_key(4, 128, 4096, 2048): 96}},
        "Other GPU": {"default": 8, "shapes": {dispatch.shape_key(4, 128, 512, 512): 3}}}}))
    monkeypatch.setenv(dispatch.ENV_TABLE, str(table))
    assert dispatch.crossover(4, 128, 4096, 2048)[0] == 96             # measured here
    assert dispatch.crossover(4, 128, 1000, 1000)[0] == 24             # this GPU's median
    assert dispatch.crossover(8, 128, 4096, 2048)[0] != 96             # bits are part of the key
    # measured only on another GPU: not used, here or for any GPU without a table
    assert dispatch.crossover(4, 128, 512, 512)[0] != 3
    monkeypatch.setattr(dispatch, "device_name", lambda: "Unmeasured GPU")
    p = dispatch.plan(dispatch.LARGE_M_KERNEL, 4, 128, 512, 512)
    assert p.small is None and "Unmeasured GPU" in p.source
    monkeypatch.setenv(dispatch.ENV_MAX_M, "5")                        # forced: Marlin everywhere
    assert dispatch.crossover(4, 128, 4096, 2048) == (5, dispatch.ENV_MAX_M)


def _shipped() -> dict:
    from grace_vllm import dispatch
    devices = {}
    for path in dispatch.TABLE_PATHS:
        with open(path) as f:
            for device, entry in json.load(f)["devices"].items():
                assert device not in devices, f"{device} in two shipped tables"
                devices[device] = entry
    return devices


def test_shipped_tables_cover_both_backbones_on_one_and_two_gpus(dispatch):
    """Every quantized layer shape of Qwen3-VL-2B (W4, W8) and LLaVA-1.5-7B (W4), TP 1 and 2, has a
    measured entry on the H100 and on the H200, and each crossover is a token count (0..512)."""
    from kernel_crossover import layer_shapes
    devices = _shipped()
    assert {"NVIDIA H100 80GB HBM3", "NVIDIA H200"} <= set(devices)
    for device, entry in devices.items():
        for model, bits_list in (("qwen3vl-2b", (4, 8)), ("llava-7b", (4,))):
            for tp in (1, 2):
                for bits in bits_list:
                    for layer, n, k in layer_shapes(model, tp):
                        key = dispatch.shape_key(bits, 128, n, k)
                        assert key in entry["shapes"], f"{device}: {model} tp{tp} {layer} ({key}) not measured"
                        e = entry["shapes"][key]
                        e = e if isinstance(e, dict) else {"marlin_max_m": e}
                        assert 0 <= e["marlin_max_m"] <= 512
                        if e.get("small") == "triton":
                            assert e["triton_configs"] and 0 < e["triton_max_m"] <= 512, key


def test_h200_table_is_the_measured_one(dispatch):
    """The shipped H200 Marlin crossovers are those kernel_crossover.py measured on the H200
    (the project's record, written there by the benchmark), not the H100's."""
    shipped = _shipped()
    h200, h100 = shipped["NVIDIA H200"]["shapes"], shipped["NVIDIA H100 80GB HBM3"]["shapes"]
    # values from that run's crossover.json (H200, vLLM 0.26, 2026-12-01)
    measured = {"w4g128 n11008 k4096": 16, "w4g128 n2048 k3072": 48, "w4g128 n12288 k2048": 8,
                "w4g128 n2048 k6144": 64, "w8g128 n2048 k3072": 64}
    for key, value in measured.items():
        assert h200[key]["marlin_max_m"] == value, key
    assert h100["w4g128 n11008 k4096"] == 32 and h100["w4g128 n2048 k3072"] == 64


def test_table_is_picked_by_device_name(dispatch, monkeypatch):
    key = (4, 128, 11008, 4096)              # LLaVA-7B gate_up on 2 GPUs: Marlin to 32 on H100, 16 on H200
    monkeypatch.setattr(dispatch, "device_name", lambda: "NVIDIA H100 80GB HBM3")
    assert dispatch.plan(dispatch.LARGE_M_KERNEL, *key) == dispatch.Plan(
        dispatch.MARLIN, 32, "measured on NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(dispatch, "device_name", lambda: "NVIDIA H200")
    assert dispatch.plan(dispatch.LARGE_M_KERNEL, *key) == dispatch.Plan(
        dispatch.MARLIN, 16, "measured on NVIDIA H200")
    # Qwen3-VL-2B o_proj on 2 GPUs: the H200 table keeps the Triton kernel next to Machete
    small = (4, 128, 2048, 1024)
    p = dispatch.plan(dispatch.LARGE_M_KERNEL, *small)
    assert p.small == dispatch.TRITON and p.max_m == 4 and p.configs
    assert dispatch.plan(dispatch.LARGE_M_KERNEL, *small, triton_ok=False).small == dispatch.MARLIN
    # next to Marlin (vLLM chose it), only up to where the Triton kernel beat Marlin
    assert dispatch.plan(dispatch.SMALL_M_KERNEL, *small).max_m == 4
    assert dispatch.plan(dispatch.SMALL_M_KERNEL, *key).small is None
    for name in ("NVIDIA A100-SXM4-80GB", "NVIDIA H200 NVL", "NVIDIA H100 PCIe", "cpu"):
        monkeypatch.setattr(dispatch, "device_name", lambda name=name: name)
        assert dispatch.plan(dispatch.LARGE_M_KERNEL, *key).small is None, name
        assert dispatch.crossover(*key)[0] == 0, name


def _named(name: str) -> type:
    cls = type(name, (), {})    # only the class name matters to the decisions being tested
    return cls


def test_partner_choice_and_dual_off(dispatch, monkeypatch):
    machete, marlin = _named(dispatch.LARGE_M_KERNEL), _named(dispatch.SMALL_M_KERNEL)
    monkeypatch.setattr(dispatch, "device_name", lambda: "NVIDIA H200")
    # the decision alone, whatever Triton this process can import
    monkeypatch.setattr(dispatch, "triton_available", lambda *args: True)
    small = (4, 128, 2048, 1024)
    cls, p = dispatch.small_m_partner(machete, None, *small, torch.bfloat16)
    assert cls is dispatch.TritonWNA16Kernel and p.max_m == 4
    cls, p = dispatch.small_m_partner(marlin, None, *small, torch.float16)
    assert cls is dispatch.TritonWNA16Kernel and p.max_m == 4
    assert dispatch.small_m_partner(_named("CPUWNA16LinearKernel"), None, *small, torch.bfloat16) == (None, None)
    monkeypatch.setenv(dispatch.ENV_DUAL, "0")                          # one copy, vLLM's choice
    assert dispatch.small_m_partner(machete, None, *small, torch.bfloat16) == (None, None)
    assert dispatch.small_m_partner(marlin, None, *small, torch.bfloat16) == (None, None)
    monkeypatch.setenv(dispatch.ENV_DUAL, "1")
    monkeypatch.setattr(dispatch, "device_name", lambda: "NVIDIA L40S")  # no table: one copy
    assert dispatch.small_m_partner(machete, None, *small, torch.bfloat16) == (None, None)


class _ScaledKernel:
    """Stands in for a vLLM MPLinearKernel: y = scale * x @ W.T (+ bias), W on the given module."""

    def __init__(self, n: int, k: int, scale: float):
        from types import SimpleNamespace
        self.w_q_name = "weight_packed"
        self.config = SimpleNamespace(partition_weight_shape=(k, n))
        self.scale = scale

    def apply_weights(self, module, x, bias=None):
        y = self.scale * (x @ getattr(module, self.w_q_name).t())
        return y if bias is None else y + bias


def _layer(dispatch, n=8, k=16, max_m=4, seed=0):
    from types import SimpleNamespace
    layer = torch.nn.Module()
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    layer.weight_packed = torch.nn.Parameter(w, requires_grad=False)
    holder = torch.nn.Module()
    holder.weight_packed = torch.nn.Parameter(w.clone(), requires_grad=False)
    holder.bias = None
    setattr(layer, dispatch.KernelDispatch.HOLDER, holder)
    # "small" doubles its output so that the test can tell which kernel ran
    d = dispatch.KernelDispatch(layer, _ScaledKernel(n, k, 1.0), _ScaledKernel(n, k, 2.0), max_m)
    layer.quant_method = SimpleNamespace(dispatch=d)
    return layer, d


def test_op_runs_small_kernel_up_to_max_m_then_large(dispatch):
    layer, d = _layer(dispatch)
    for m in (1, 4, 5, 33):
        x = torch.randn(m, 16)
        y = d.apply(layer, x, None)
        plain = x @ layer.weight_packed.t()
        assert torch.allclose(y, 2 * plain if m <= 4 else plain), m
    other, d2 = _layer(dispatch, seed=1)             # each layer finds its own weights
    x = torch.randn(2, 16)
    assert torch.allclose(d2.apply(other, x, None), 2 * (x @ other.weight_packed.t()))


def test_compiled_graphs_of_two_layers_are_the_same_graph(dispatch):
    """The op gets the layer's weight tensor, not a per-layer constant: torch.compile traces the same
    graph for every layer of a shape (vLLM compiles the decoder layers' pieces once, not once per
    layer), and still dispatches by M at run time."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    layers = [_layer(dispatch, seed=s) for s in (0, 1)]
    for layer, d in layers:
        f = torch.compile(lambda x, layer=layer, d=d: d.apply(layer, x, None), backend=capture,
                          dynamic=True, fullgraph=True)
        for m in (2, 3, 9):
            x = torch.randn(m, 16)
            want = x @ layer.weight_packed.t() * (2 if m <= 4 else 1)
            assert torch.allclose(f(x), want), m
    # one graph, reused for the second layer, or two identical ones
    assert graphs and len(set(graphs)) == 1, graphs
    assert "grace_qat.mixed_mm" in graphs[0]


def test_op_routes_small_m_to_the_triton_kernel_on_the_plain_packing(dispatch):
    """The second copy is the compressed-tensors packing, unchanged, run by TritonWNA16Kernel for
    M <= max_m (checked against a dequantized reference written here); the large kernel above."""
    require("triton")
    if torch.cuda.is_available():
        pytest.skip("CPU tensors: the kernel on CUDA is covered by tests/test_small_m_kernel.py (gpu)")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU, and Triton was imported before this module could select its interpreter")
    n, k, bits = 16, 256, 4
    g = torch.Generator().manual_seed(5)
    q = torch.randint(-8, 8, (n, k), generator=g)
    steps = (torch.rand(n, k // 128, generator=g) * 0.02 + 0.002).to(torch.float16)
    u = (q + 8).to(torch.int64)
    words = sum(u[:, i::8] << (4 * i) for i in range(8))
    packed = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    w_ref = q.double() * steps.double().repeat_interleave(128, dim=1)
    layer, d = _layer(dispatch, n=n, k=k)
    holder = getattr(layer, dispatch.KernelDispatch.HOLDER)
    holder.weight_packed = torch.nn.Parameter(packed, requires_grad=False)
    holder.weight_scale = torch.nn.Parameter(steps, requires_grad=False)
    holder.bias = torch.nn.Parameter((torch.randn(n, generator=g) * 0.1).half(), requires_grad=False)
    d.small = dispatch.TritonWNA16Kernel(bits, 128, configs=[[4, [4, 16, 16, 2, 0, 1, 1]]])
    for m in (1, 3, 4):
        x = torch.randn(m, k, generator=g).half()
        before = dispatch.CALLS[dispatch.TRITON_KERNEL]
        y = d.apply(layer, x, layer.weight_packed.new_zeros(n))       # a bias: the holder's is used
        assert dispatch.CALLS[dispatch.TRITON_KERNEL] == before + 1
        ref = x.double() @ w_ref.t() + holder.bias.double()
        assert torch.allclose(y.double(), ref, rtol=2 ** -9, atol=1e-3), m
    x = torch.randn(5, k, generator=g)
    assert torch.allclose(d.apply(layer, x, None), x @ layer.weight_packed.t())   # M=5: large kernel
