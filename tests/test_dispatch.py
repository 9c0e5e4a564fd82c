"""The Hopper kernel-dispatch table (grace_vllm/dispatch.py): lookup order and the shipped table.

The dispatch itself (Marlin below the crossover, Machete above, under torch.compile) needs CUDA and
is tested in tests/test_vllm_plugin.py::test_dual_kernel_layer_dispatches_by_token_count."""
from __future__ import annotations

import json
import os
import sys

import pytest

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


@pytest.fixture
def dispatch(monkeypatch):
    from grace_vllm import dispatch as d
    monkeypatch.delenv(d.ENV_MAX_M, raising=False)
    monkeypatch.delenv(d.ENV_TABLE, raising=False)
    d._table.cache_clear()
    yield d
    d._table.cache_clear()


def _this_device() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def test_lookup_prefers_this_devices_measurement_then_its_default(dispatch, tmp_path, monkeypatch):
    table = tmp_path / "x.json"
    table.write_text(json.dumps({"devices": {
        _this_device(): {"default": 24, "shapes": {dispatch.shape_key(4, 128, 4096, 2048): 96}},
        "Other GPU": {"default": 8, "shapes": {dispatch.shape_key(4, 128, 512, 512): 3}}}}))
    monkeypatch.setenv(dispatch.ENV_TABLE, str(table))
    assert dispatch.crossover(4, 128, 4096, 2048)[0] == 96             # measured here
    assert dispatch.crossover(4, 128, 512, 512)[0] == 3                # measured on another GPU
    assert dispatch.crossover(4, 128, 1000, 1000)[0] == 24             # this GPU's median
    assert dispatch.crossover(8, 128, 4096, 2048)[0] != 96             # bits are part of the key
    monkeypatch.setenv(dispatch.ENV_MAX_M, "5")
    assert dispatch.crossover(4, 128, 4096, 2048) == (5, dispatch.ENV_MAX_M)


def test_shipped_table_covers_both_backbones_on_one_and_two_gpus(dispatch):
    """Every quantized layer shape of Qwen3-VL-2B (W4, W8) and LLaVA-1.5-7B (W4), TP 1 and 2, has a
    measured crossover, and each is a token count Marlin handles (0..512)."""
    from kernel_crossover import layer_shapes
    with open(dispatch.TABLE_PATH) as f:
        devices = json.load(f)["devices"]
    assert devices, "no measured device in the shipped table"
    for device, entry in devices.items():
        for model, bits_list in (("qwen3vl-2b", (4, 8)), ("llava-7b", (4,))):
            for tp in (1, 2):
                for bits in bits_list:
                    for layer, n, k in layer_shapes(model, tp):
                        key = dispatch.shape_key(bits, 128, n, k)
                        assert key in entry["shapes"], f"{device}: {model} tp{tp} {layer} ({key}) not measured"
                        assert 0 <= entry["shapes"][key] <= 512


def test_dual_kernel_is_off_by_environment(dispatch, monkeypatch):
    class Machete:      # only the class name matters to the decision being tested
        pass
    Machete.__name__ = dispatch.LARGE_M_KERNEL
    monkeypatch.setenv(dispatch.ENV_DUAL, "0")
    assert dispatch.small_m_partner(Machete, None) is None
    monkeypatch.setenv(dispatch.ENV_DUAL, "1")

    class Other:
        pass
    assert dispatch.small_m_partner(Other, None) is None               # only next to Machete


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
