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
