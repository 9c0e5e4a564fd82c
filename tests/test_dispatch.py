"""The second-kernel decision (grace_qat/kernels/table.py, grace_vllm/dispatch.py): a table applies
only on its device, engine version and engine kernel; the open kernel list; the shipped tables; and
the op routing small M to the second kernel (the Triton kernel run by Triton's interpreter on a CPU).

The dispatch with vLLM's kernels on a GPU is tested in
tests/test_vllm_plugin.py::test_dual_kernel_layer_dispatches_by_token_count."""
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

from grace_qat.kernels import mixed_mm, own  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


@pytest.fixture
def dispatch(monkeypatch):
    from grace_qat.kernels import table
    from grace_vllm import dispatch as d
    monkeypatch.delenv(d.ENV_MAX_M, raising=False)
    monkeypatch.delenv(d.ENV_TABLE, raising=False)
    # the default (a second kernel allowed), whatever the environment the suite runs in
    monkeypatch.delenv(d.ENV_DUAL, raising=False)
    table.tables.cache_clear()
    yield d
    table.tables.cache_clear()


MACHETE, MARLIN, HUMMING = "MacheteLinearKernel", "MarlinLinearKernel", "HummingLinearKernel"


def _write_table(path, device, version, shapes):
    path.write_text(json.dumps({"device": device, "engine": "vllm", "engine_version": version,
                                "measured": "by this test", "shapes": shapes}))
    return str(path)


def test_an_entry_applies_only_on_its_device_engine_version_and_engine_kernel(dispatch, tmp_path, monkeypatch):
    key = dispatch.shape_key(4, 128, 4096, 2048)
    monkeypatch.setenv(dispatch.ENV_TABLE, _write_table(tmp_path / "t.json", "Test GPU", "9.9.1", {
        key: {"large": MACHETE, "small": HUMMING, "max_m": 16, "gain": 1.3},
        dispatch.shape_key(4, 128, 4096, 4096): {"large": MACHETE, "small": "CudaGemvKernel", "max_m": 8,
                                                 "gain": 1.2, "configs": [[8, [1, 8, 1, 2]]]},
        dispatch.shape_key(4, 128, 2048, 2048): {"large": MACHETE, "small": MARLIN, "max_m": 8, "gain": 1.02},
        dispatch.shape_key(4, 128, 512, 512): {"large": MACHETE, "small": None, "max_m": 0, "gain": None}}))
    monkeypatch.setattr(dispatch.kernel_table, "device_name", lambda: "Test GPU")
    monkeypatch.setattr(dispatch, "engine_version", lambda: "9.9.1")
    p = dispatch.plan(MACHETE, 4, 128, 4096, 2048)
    assert (p.small, p.max_m) == (HUMMING, 16) and "Test GPU, vllm 9.9.1" in p.reason
    assert p.configs == () and "launch configs" not in p.reason
    p = dispatch.plan(MACHETE, 4, 128, 4096, 4096)                             # the log says what runs
    assert p.configs == ((8, [1, 8, 1, 2]),)
    assert p.reason.endswith(">= 1.20x, with its measured launch configs"), p.reason
    # the engine chose another kernel (--linear-backend, VLLM_DISABLED_KERNELS): nothing measured next to it
    assert dispatch.plan(HUMMING, 4, 128, 4096, 2048).small is None
    assert dispatch.plan(MACHETE, 8, 128, 4096, 2048).small is None            # bits are part of the key
    p = dispatch.plan(MACHETE, 4, 128, 2048, 2048)                             # under the 5% rule
    assert p.small is None and "1.02" in p.reason
    assert dispatch.plan(MACHETE, 4, 128, 512, 512).small is None              # nothing was faster
    assert dispatch.plan(MACHETE, 4, 128, 1000, 1000).small is None            # not measured
    monkeypatch.setattr(dispatch, "engine_version", lambda: "9.9.2")           # another engine version
    p = dispatch.plan(MACHETE, 4, 128, 4096, 2048)
    assert p.small is None and "no kernel table measured on Test GPU, vllm 9.9.2" in p.reason
    monkeypatch.setattr(dispatch, "engine_version", lambda: "9.9.1")
    monkeypatch.setattr(dispatch.kernel_table, "device_name", lambda: "Test GPU 2")        # another GPU
    assert dispatch.plan(MACHETE, 4, 128, 4096, 2048).small is None


def test_engine_default_replaces_vllms_own_ranking_only(dispatch, tmp_path, monkeypatch):
    """A table's ``engine_default`` swaps the kernel vLLM picked by its own ranking (one copy), never a
    kernel the user picked, never with two kernels off, never on another device or vLLM version or
    weight width, and never for a kernel that cannot run the layer. On a CPU the swap's target is vLLM's CPUWNA16."""
    from vllm.config import KernelConfig, VllmConfig, set_current_vllm_config

    from grace_vllm.linear import mp_layer_config
    table = {"device": "Test GPU", "engine": "vllm", "engine_version": "9.9.1", "measured": "by this test",
             "shapes": {}}
    table["engine_default"] = {"instead_of": MACHETE, "use": "CPUWNA16LinearKernel", "bits": [4],
                               "measured": "by this test"}
    (tmp_path / "t.json").write_text(json.dumps(table))
    monkeypatch.setenv(dispatch.ENV_TABLE, str(tmp_path / "t.json"))
    monkeypatch.delenv("VLLM_DISABLED_KERNELS", raising=False)
    monkeypatch.setattr(dispatch.kernel_table, "device_name", lambda: "Test GPU")
    monkeypatch.setattr(dispatch, "engine_version", lambda: "9.9.1")
    machete = type(MACHETE, (), {})
    cfg = mp_layer_config(4, 128, (2048, 4096), (2048, 4096), torch.bfloat16)
    target = dispatch.kernel_class("CPUWNA16LinearKernel")
    ok, _ = target.can_implement(cfg)
    cls, why = dispatch.engine_default(machete, cfg)
    if ok:
        assert cls is target and "instead of MacheteLinearKernel: by this test" in why
    else:
        assert cls is machete and "cannot run this layer" in why
    other = type(MARLIN, (), {})
    assert dispatch.engine_default(other, cfg) == (other, None)            # measured against Machete only
    w8 = mp_layer_config(8, 128, (2048, 4096), (2048, 4096), torch.bfloat16)
    assert dispatch.engine_default(machete, w8) == (machete, None)         # measured on W4 only
    with set_current_vllm_config(VllmConfig(kernel_config=KernelConfig(linear_backend="machete"))):
        assert dispatch.engine_default(machete, cfg) == (machete, None)    # the user's --linear-backend
    assert dispatch.user_chose_kernel() is None
    monkeypatch.setenv("VLLM_DISABLED_KERNELS", "HummingLinearKernel")
    assert dispatch.engine_default(machete, cfg) == (machete, None)
    monkeypatch.delenv("VLLM_DISABLED_KERNELS")
    monkeypatch.setenv(dispatch.ENV_DUAL, "0")
    assert dispatch.engine_default(machete, cfg) == (machete, None)
    monkeypatch.delenv(dispatch.ENV_DUAL)
    monkeypatch.setattr(dispatch, "engine_version", lambda: "9.9.2")
    assert dispatch.engine_default(machete, cfg) == (machete, None)
    table["engine_default"]["use"] = "TritonWNA16Kernel"                 # grace_qat's own: not a stand-in
    (tmp_path / "t.json").write_text(json.dumps(table))
    dispatch.kernel_table.tables.cache_clear()
    monkeypatch.setattr(dispatch, "engine_version", lambda: "9.9.1")
    cls, why = dispatch.engine_default(machete, cfg)
    assert cls is machete and "not a vLLM kernel" in why


def test_a_lease_table_of_shapes_keeps_the_shipped_engine_default(dispatch, tmp_path, monkeypatch):
    """A crossover file of shapes alone (GRACE_QAT_CROSSOVER_FILE, as a lease uses it) adds its
    shapes to the shipped table of that device and version and keeps that table's engine default (a
    file that names its own wins): the second kernels measured next to the default kernel then meet it.
    And the crossover writes the default in effect into its own file, so the file stands alone."""
    import kernel_crossover
    from grace_qat.kernels import table as kt
    shipped_dir = tmp_path / "shipped"
    shipped_dir.mkdir()
    key = {"device": "Test GPU", "engine": "vllm", "engine_version": "9.9.1"}
    default = {"instead_of": MACHETE, "use": HUMMING, "bits": [4], "measured": "shipped"}
    (shipped_dir / "table-test.json").write_text(json.dumps(dict(key, measured="m", engine_default=default,
        shapes={"w4g128 n1 k128": {"large": HUMMING, "small": None, "max_m": 0}})))
    lease = tmp_path / "lease.json"
    lease.write_text(json.dumps(dict(key, measured="lease", shapes={
        "w4g128 n4096 k2048": {"large": HUMMING, "small": "CudaGemvKernel", "max_m": 8, "gain": 1.4}})))
    monkeypatch.setattr(kt, "TABLE_GLOB", str(shipped_dir / "table-*.json"))
    kt.tables.cache_clear()
    merged = kt.table_for("Test GPU", "vllm", "9.9.1", extra=str(lease))
    assert merged["engine_default"] == default and set(merged["shapes"]) == {"w4g128 n1 k128", "w4g128 n4096 k2048"}
    monkeypatch.setenv(dispatch.ENV_TABLE, str(lease))
    written = kernel_crossover.lease_table("Test GPU", "vllm", "9.9.1", {})
    assert written["engine_default"] == default
    assert "engine_default" not in kernel_crossover.lease_table("Test GPU", "vllm", "9.9.2", {})
    own = dict(default, use=MARLIN, measured="lease")
    lease.write_text(json.dumps(dict(key, measured="lease", engine_default=own, shapes={})))
    kt.tables.cache_clear()
    assert kt.table_for("Test GPU", "vllm", "9.9.1", extra=str(lease))["engine_default"] == own


def test_the_crossover_measures_next_to_the_kernel_grace_qat_runs(dispatch, monkeypatch):
    """The crossover's reference kernel is the one the plugin runs the layer with, a table's engine
    default included (vLLM's own ranking said Machete on Hopper, the table Humming): a second kernel
    measured next to vLLM's own choice would never meet the layer's kernel."""
    import kernel_crossover
    seen = []

    def table_says(chosen, cfg):
        seen.append(chosen.__name__)
        return type("ChosenByTheTable", (), {}), "a test"
    monkeypatch.setattr(dispatch, "engine_default", table_says)
    monkeypatch.setattr(kernel_crossover, "_capability", lambda: 90)      # a Hopper, on this CPU
    large, _, _ = kernel_crossover.usable_kernels(4, 128, 4096, 2048)
    assert large == "ChosenByTheTable" and len(seen) == 1


def test_forced_marlin_and_its_strict_parse(dispatch, monkeypatch):
    monkeypatch.setattr(dispatch.kernel_table, "device_name", lambda: "Unmeasured GPU")
    monkeypatch.setenv(dispatch.ENV_MAX_M, "5")
    p = dispatch.plan(MACHETE, 4, 128, 4096, 2048)
    assert (p.small, p.max_m) == (MARLIN, 5)
    assert dispatch.plan(MARLIN, 4, 128, 4096, 2048).small is None            # Marlin next to itself: no
    monkeypatch.setenv(dispatch.ENV_MAX_M, "five")
    with pytest.raises(ValueError, match="GRACE_QAT_MARLIN_MAX_M='five': expected a whole number"):
        dispatch.plan(MACHETE, 4, 128, 4096, 2048)


def test_entry_from_timings_keeps_a_kernel_only_where_it_is_5_percent_faster():
    from grace_qat.kernels.table import entry_from_timings
    us = {MACHETE: {1: 10.0, 2: 10.0, 4: 10.0, 8: 10.0},
          HUMMING: {1: 7.0, 2: 9.5, 4: 9.6, 8: 12.0},       # 1.43x, 1.05x, 1.04x: serves M <= 2
          MARLIN: {1: 9.0, 2: 9.0, 4: 9.0, 8: 11.0}}        # 1.11x at 1, 2 and 4: serves M <= 4
    assert entry_from_timings(MACHETE, us) == {"large": MACHETE, "small": MARLIN, "max_m": 4, "gain": 1.111}
    us[MARLIN] = {1: 9.8, 2: 9.0, 4: 9.0, 8: 11.0}           # 1.02x at M=1: never starts
    assert entry_from_timings(MACHETE, us) == {"large": MACHETE, "small": HUMMING, "max_m": 2, "gain": 1.053}
    slow = {MACHETE: {1: 5.0, 2: 5.0}, MARLIN: {1: 5.0, 2: 4.0}}
    assert entry_from_timings(MACHETE, slow)["small"] is None


def _shipped() -> list[dict]:
    from grace_qat.kernels import table
    return [t for t in table.tables() if t["path"].startswith(os.path.dirname(table.TABLE_GLOB))]


def test_shipped_tables_name_their_device_engine_version_and_cover_both_backbones(dispatch):
    """Every quantized layer shape of Qwen3-VL-2B (W4, W8) and LLaVA-1.5-7B (W4), TP 1 and 2, has an
    entry in each shipped vLLM table of second kernels, next to the kernel that vLLM version chose
    there, with a token count. A table with an engine default (one copy where it lists no second
    kernel; every SGLang table) says what measured it."""
    from kernel_crossover import layer_shapes
    shipped = _shipped()
    keys = {(t["device"], t["engine"], t["engine_version"]) for t in shipped}
    assert {("NVIDIA H100 80GB HBM3", "vllm", "0.26.0"), ("NVIDIA H200", "vllm", "0.26.0"),
            ("NVIDIA H100 80GB HBM3", "vllm", "0.34.0")} <= keys
    assert len(keys) == len(shipped), "two shipped tables for one device and engine version"
    for t in shipped:
        if not t["shapes"] or t["engine"] != "vllm":
            pick = t.get("engine_default") or {}
            assert pick.get("instead_of") and pick.get("use") and pick.get("measured"), t["path"]
            continue
        for model, bits_list in (("qwen3vl-2b", (4, 8)), ("llava-7b", (4,))):
            for tp in (1, 2):
                for bits in bits_list:
                    for layer, n, k in layer_shapes(model, tp):
                        key = dispatch.shape_key(bits, 128, n, k)
                        assert key in t["shapes"], f"{t['path']}: {model} tp{tp} {layer} ({key}) not measured"
                        e = t["shapes"][key]
                        assert e["large"].endswith("Kernel") and 0 <= e["max_m"] <= 512, key
                        assert (e["small"] is None) == (e["max_m"] == 0), key


def test_shipped_sglang_tables_pair_the_engine_default_with_grace_qats_own_kernels():
    """An SGLang table's second kernels stand beside the kernel its engine default names, are kernels
    grace_sglang can keep as a second copy (grace_qat's own: lease 6's crossover named SGLang's Marlin
    for one shape, which the plugin refuses) and were measured >= MIN_GAIN faster; shapes it does not
    list keep the engine's kernel alone (SGLang has no per-shape requirement: TP 2 and W8 unmeasured)."""
    from grace_qat.kernels import table
    from grace_qat.kernels.own import OWN_KERNELS
    tables = [t for t in _shipped() if t["engine"] == "sglang" and t["shapes"]]
    assert tables, "no shipped SGLang table with second kernels"
    for t in tables:
        for key, e in t["shapes"].items():
            assert e["large"] == t["engine_default"]["use"], (t["path"], key)
            assert (e["small"] is None) == (e["max_m"] == 0), (t["path"], key)
            if e["small"] is not None:
                assert e["small"] in OWN_KERNELS and e["gain"] >= table.MIN_GAIN and 0 < e["max_m"] <= 512, key


def test_shipped_gemv_launch_configs_are_what_the_h100_sweeps_chose():
    """Where a shipped H100 table keeps the CUDA GEMV, it carries launch configs (without them the
    kernel runs its heuristic's, up to 1.16x slower on an H100), each a compiled instance for its M,
    and up to M 8 the one all committed H100 sweeps of benchmarks/gemv_kernel.py but at most one chose."""
    import glob

    from gemv_kernel import swept_configs

    from grace_qat.kernels import cuda_gemv as cg
    from grace_qat.kernels.table import shape_key
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sweeps = sorted(glob.glob(f"{root}/benchmarks/results/h100-2026-12-07*/gemv/small_m.json"))   # group 128
    assert len(sweeps) >= 3
    chosen = {}
    for path in sweeps:
        for (bits, n, k), configs in swept_configs(path).items():
            for m, cfg in configs:
                chosen.setdefault((shape_key(bits, 128, n, k), m), []).append(tuple(cfg))
    gemv_entries = [(t["path"], key, e) for t in _shipped() if t["device"].startswith("NVIDIA H100")
                    for key, e in t["shapes"].items() if e["small"] == "CudaGemvKernel"]
    assert gemv_entries
    for path, key, e in gemv_entries:
        ms = [m for m, _ in e.get("configs", ())]
        assert ms and ms == sorted(set(ms)) and ms[0] == 1 and ms[-1] >= min(e["max_m"], 16), (path, key, ms)
        for m, cfg in e["configs"]:
            cg.check_config(cg.Config.from_list(cfg), m)
            if m <= 8:
                runs = chosen[(key, m)]
                assert len(runs) >= 3 and runs.count(tuple(cfg)) >= len(runs) - 1, (path, key, m, cfg, runs)


def test_the_vllm_026_tables_are_the_measured_ones(dispatch):
    """The shipped vLLM 0.26 crossovers are those kernel_crossover.py measured (H200 and H100,
    values from that run's crossover.json), not each other's."""
    by = {(t["device"], t["engine_version"]): t["shapes"] for t in _shipped()}
    h200, h100 = by[("NVIDIA H200", "0.26.0")], by[("NVIDIA H100 80GB HBM3", "0.26.0")]
    measured = {"w4g128 n11008 k4096": 16, "w4g128 n2048 k3072": 48, "w4g128 n12288 k2048": 8,
                "w4g128 n2048 k6144": 64, "w8g128 n2048 k3072": 64}
    for key, value in measured.items():
        assert (h200[key]["small"], h200[key]["max_m"]) == (MARLIN, value), key
    assert h100["w4g128 n11008 k4096"]["max_m"] == 32 and h100["w4g128 n2048 k3072"]["max_m"] == 64
    o_tp2 = h200[dispatch.shape_key(4, 128, 2048, 1024)]          # Qwen3-VL-2B o_proj on 2 GPUs
    assert o_tp2["small"] == "TritonWNA16Kernel" and o_tp2["max_m"] == 4 and o_tp2["configs"]


def test_a_vllm_026_table_is_not_used_with_another_vllm(dispatch, monkeypatch):
    """vLLM 0.26's crossovers made grace_qat slower than stock vLLM 0.34 (issue 25): on any other
    version the layer keeps one copy and vLLM's choice."""
    key = (4, 128, 11008, 4096)
    monkeypatch.setattr(dispatch.kernel_table, "device_name", lambda: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(dispatch, "engine_version", lambda: "0.26.0")
    assert (dispatch.plan(MACHETE, *key).small, dispatch.plan(MACHETE, *key).max_m) == (MARLIN, 32)
    for version in ("0.33.0", "0.34.0", "0.26.1"):
        monkeypatch.setattr(dispatch, "engine_version", lambda v=version: v)
        if any(t["engine_version"] == version for t in _shipped()):
            continue
        assert dispatch.plan(MACHETE, *key).small is None, version


def test_the_kernel_list_is_open_and_each_kernel_says_what_it_can_run(dispatch, monkeypatch):
    """Kernels are found by class name among vLLM's registered mixed-precision kernels and grace_qat's
    own; a planned kernel that cannot implement the layer is not used (here on a CPU: Marlin cannot)."""
    from vllm.model_executor.kernels.linear.mixed_precision.marlin import MarlinLinearKernel

    from grace_vllm.linear import mp_layer_config
    assert dispatch.kernel_class(MARLIN) is MarlinLinearKernel
    assert dispatch.kernel_class("TritonWNA16Kernel") is own.TritonWNA16Kernel
    assert dispatch.kernel_class("NoSuchKernel") is None
    cfg = mp_layer_config(4, 128, (2048, 4096), (2048, 4096), torch.bfloat16)
    machete = type(MACHETE, (), {})             # only the class name matters to the decision
    monkeypatch.setenv(dispatch.ENV_MAX_M, "4")
    cls, p = dispatch.small_m_partner(machete, cfg, 4, 128, 4096, 2048)
    ok, why = MarlinLinearKernel.can_implement(cfg)
    if ok:                                      # a CUDA machine
        assert cls is MarlinLinearKernel and p.max_m == 4
    else:
        assert cls is None and "MarlinLinearKernel cannot run this layer" in p.reason
    assert own.TritonWNA16Kernel.can_implement(cfg)[0] in (True, False)
    assert not own.TritonWNA16Kernel.can_implement(
        mp_layer_config(4, 128, (2048, 4096), (2048, 4096), torch.float32))[0]
    monkeypatch.setenv(dispatch.ENV_DUAL, "0")                          # one copy, vLLM's choice
    cls, p = dispatch.small_m_partner(machete, cfg, 4, 128, 4096, 2048)
    assert cls is None and "GRACE_QAT_DUAL_KERNEL=0" in p.reason


class _ScaledKernel:
    """Stands in for a vLLM MPLinearKernel: y = scale * x @ W.T (+ bias), W on the given module."""

    def __init__(self, n: int, k: int, scale: float):
        self.scale = scale

    def apply_weights(self, module, x, bias=None):
        y = self.scale * (x @ module.weight_packed.t())
        return y if bias is None else y + bias


def _layer(dispatch, n=8, k=16, max_m=4, seed=0):
    from types import SimpleNamespace
    layer = torch.nn.Module()
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    layer.weight_packed = torch.nn.Parameter(w, requires_grad=False)
    holder = torch.nn.Module()
    holder.weight_packed = torch.nn.Parameter(w.clone(), requires_grad=False)
    holder.bias = None
    setattr(layer, mixed_mm.KernelDispatch.HOLDER, holder)
    # "small" doubles its output so that the test can tell which kernel ran
    d = mixed_mm.KernelDispatch(layer, _ScaledKernel(n, k, 1.0), n, _ScaledKernel(n, k, 2.0), max_m)
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
    """The op gets the layer's key buffer, not a per-layer constant: torch.compile traces the same
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
    holder = getattr(layer, mixed_mm.KernelDispatch.HOLDER)
    holder.weight_packed = torch.nn.Parameter(packed, requires_grad=False)
    holder.weight_scale = torch.nn.Parameter(steps, requires_grad=False)
    holder.bias = torch.nn.Parameter((torch.randn(n, generator=g) * 0.1).half(), requires_grad=False)
    d.small = own.TritonWNA16Kernel(bits, 128, configs=[[4, [4, 16, 16, 2, 0, 1, 1]]])
    for m in (1, 3, 4):
        x = torch.randn(m, k, generator=g).half()
        before = mixed_mm.CALLS["TritonWNA16Kernel"]
        y = d.apply(layer, x, layer.weight_packed.new_zeros(n))       # a bias: the holder's is used
        assert mixed_mm.CALLS["TritonWNA16Kernel"] == before + 1
        ref = x.double() @ w_ref.t() + holder.bias.double()
        assert torch.allclose(y.double(), ref, rtol=2 ** -9, atol=1e-3), m
    x = torch.randn(5, k, generator=g)
    assert torch.allclose(d.apply(layer, x, None), x @ layer.weight_packed.t())   # M=5: large kernel


def test_settings_that_decide_the_route_enter_vllms_compile_cache_key(dispatch, monkeypatch, tmp_path):
    """A layer's route (one kernel traced in, or two behind the custom op) depends on the settings, so
    a graph vLLM compiled and cached under other settings must not be reused: the settings and the
    tables' content enter ``additional_config``, which vLLM's own config hash covers."""
    from vllm.config import VllmConfig, set_current_vllm_config

    def key(**env):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        cfg = VllmConfig()
        with set_current_vllm_config(cfg):
            dispatch.record_compile_factors()
        return cfg.compute_hash()

    base = key()
    assert key() == base                                     # the same settings: the same cache
    assert key(**{dispatch.ENV_DUAL: "0"}) != base
    monkeypatch.delenv(dispatch.ENV_DUAL)
    assert key(**{dispatch.ENV_MAX_M: "8"}) != base
    monkeypatch.delenv(dispatch.ENV_MAX_M)
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"device": "X", "engine": "vllm", "engine_version": "0", "shapes": {
        "w4g128 n8 k128": {"large": "MacheteLinearKernel", "small": "MarlinLinearKernel", "max_m": 4}}}))
    dispatch.kernel_table.tables.cache_clear()
    with_table = key(**{dispatch.ENV_TABLE: str(table)})
    assert with_table != base
    t = json.loads(table.read_text())                 # an engine default changes the kernel too
    t["engine_default"] = {"instead_of": "MacheteLinearKernel", "use": "HummingLinearKernel"}
    table.write_text(json.dumps(t))
    dispatch.kernel_table.tables.cache_clear()
    assert key() not in (base, with_table)
