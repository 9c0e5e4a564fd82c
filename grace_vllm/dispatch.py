"""Two int4/int8 kernels for one layer, chosen per call by the number of tokens M.

Why: on Hopper vLLM hands every mixed-precision layer to Machete. Machete wins at large M (prefill,
big decode batches), smaller kernels at small M: stock vLLM 0.26 decodes a 7B GPTQ model on an H100
at 230 tokens/s at batch 1 with Machete and 316 with Marlin, but 7561 vs 6314 at batch 64.
grace_qat owns its linear method, so it keeps a second packed copy for small M and picks per call:
the small-M kernel for M <= the layer shape's ``max_m``, vLLM's kernel above. The small-M kernel is
Marlin or grace_qat's own Triton kernel (``grace_qat.kernels.triton_wna16``, reading the plain
compressed-tensors packing), whichever mix the table says is faster for that shape on this GPU.

Tables are measured per GPU (``benchmarks/kernel_crossover.py``, ``benchmarks/small_m_kernel.py``)
and shipped per GPU (``kernel_crossover.json``: H100; ``kernel_table_h200.json``: H200); the one
used is the one whose device name equals this GPU's. A GPU no table was measured on keeps one copy
and vLLM's own choice: crossovers move between GPUs (the H100 table misroutes on an H200: 0.88x
stock at batch 64).

Cost: a second packed copy of every quantized weight (W4: +0.5 byte per weight, +25% of the layer's
BF16 size); never a third. ``GRACE_QAT_DUAL_KERNEL=0`` keeps one copy and vLLM's own choice;
``GRACE_QAT_MARLIN_MAX_M=<int>`` forces Marlin below that M on every shape and GPU;
``GRACE_QAT_CROSSOVER_FILE`` adds a table measured elsewhere (same format, keyed by device name).

The choice happens inside one custom op, ``torch.ops.grace_qat.mixed_mm``, which torch.compile treats
as opaque: Dynamo never sees the branch (no specialisation on M, no recompilation), and each CUDA
graph vLLM captures records the kernel for its own batch size.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import os
import weakref

import torch

ENV_DUAL = "GRACE_QAT_DUAL_KERNEL"
ENV_MAX_M = "GRACE_QAT_MARLIN_MAX_M"
ENV_TABLE = "GRACE_QAT_CROSSOVER_FILE"
_HERE = os.path.dirname(os.path.abspath(__file__))
TABLE_PATH = os.path.join(_HERE, "kernel_crossover.json")                  # H100
TABLE_PATHS = (TABLE_PATH, os.path.join(_HERE, "kernel_table_h200.json"))   # one file per GPU

SMALL_M_KERNEL = "MarlinLinearKernel"
LARGE_M_KERNEL = "MacheteLinearKernel"
TRITON_KERNEL = "TritonWNA16Kernel"
MARLIN, TRITON = "marlin", "triton"

# data_ptr of a layer's packed weight -> layer. The custom op receives that weight tensor (a graph
# input, as for any kernel op) and finds its layer here; no per-layer constant enters the graph, so
# the decoder layers' pieces stay identical and torch.compile compiles them once, not once per layer.
_LAYERS: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()
CALLS: collections.Counter = collections.Counter()   # kernel name -> eager calls (tests, logs)


def enabled() -> bool:
    """``GRACE_QAT_DUAL_KERNEL`` (on unless set off); a misspelt value says so once and stays on."""
    from grace_qat.hub import env_flag
    try:
        return env_flag(ENV_DUAL, True)
    except ValueError as e:
        if ENV_DUAL not in _WARNED:
            _WARNED.add(ENV_DUAL)
            logging.getLogger("vllm.grace_qat").warning("grace_qat: %s; two kernels stay on", e)
        return True


_WARNED: set[str] = set()


def shape_key(bits: int, group: int, n: int, k: int) -> str:
    """Table key of one layer shape on one rank: n = output features, k = input features."""
    return f"w{bits}g{group} n{n} k{k}"


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=None)
def _table(path: str | None) -> dict:
    tables = {}
    for p in (*TABLE_PATHS, path):
        if p and os.path.exists(p):
            with open(p) as f:
                for device, entry in json.load(f).get("devices", {}).items():
                    tables.setdefault(device, {"shapes": {}}).update(
                        {k: v for k, v in entry.items() if k != "shapes"})
                    tables[device]["shapes"].update(entry.get("shapes", {}))
    return tables


@dataclasses.dataclass(frozen=True)
class Plan:
    """The second kernel of one layer shape: ``small`` (MARLIN, TRITON or None: one copy, vLLM's
    choice) for M <= ``max_m``; ``configs`` are the Triton kernel's measured launch configs."""
    small: str | None
    max_m: int
    source: str
    configs: tuple = ()


def plan(large: str, bits: int, group: int, n: int, k: int, triton_ok: bool = True) -> Plan:
    """Which small-M kernel pairs with vLLM's ``large`` kernel on this shape, from this GPU's table
    (``triton_ok``: the Triton kernel can run this layer here)."""
    forced = os.environ.get(ENV_MAX_M)
    if forced not in (None, ""):
        return Plan(MARLIN if large == LARGE_M_KERNEL else None, int(forced), ENV_MAX_M)
    device = device_name()
    tables = _table(os.environ.get(ENV_TABLE))
    if device not in tables:
        return Plan(None, 0, f"no kernel table measured on {device!r}: vLLM's own choice")
    entry = tables[device]["shapes"].get(shape_key(bits, group, n, k))
    where = f"measured on {device}"
    if entry is None:
        if "default" in tables[device] and large == LARGE_M_KERNEL:
            return Plan(MARLIN, int(tables[device]["default"]), f"median of the shapes {where}")
        return Plan(None, 0, f"shape not in the table of {device}: vLLM's own choice")
    if isinstance(entry, int):                          # a Marlin-vs-Machete crossover alone
        entry = {"marlin_max_m": entry}
    configs = tuple(tuple(c) for c in entry.get("triton_configs", ())) if triton_ok else ()
    if large == LARGE_M_KERNEL:
        if entry.get("small") == TRITON and configs:
            return Plan(TRITON, int(entry["triton_max_m"]), where, configs)
        return Plan(MARLIN, int(entry["marlin_max_m"]), where)
    if large == SMALL_M_KERNEL and configs and int(entry.get("triton_vs_marlin_max_m", 0)) > 0:
        return Plan(TRITON, int(entry["triton_vs_marlin_max_m"]), where, configs)
    return Plan(None, 0, f"{large}: no faster small-M kernel {where}")


def crossover(bits: int, group: int, n: int, k: int) -> tuple[int, str]:
    """(largest M that runs on Marlin next to Machete, where that number comes from); 0 where
    this GPU has no table."""
    p = plan(LARGE_M_KERNEL, bits, group, n, k, triton_ok=False)
    return (p.max_m if p.small == MARLIN else 0), p.source


def triton_available(bits: int, group: int, k: int, act_dtype: torch.dtype | None) -> bool:
    if act_dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        from grace_qat.kernels import triton_wna16
    except ImportError:
        return False
    return triton_wna16.supports(bits, group, k)


def small_m_partner(kernel_cls: type, mp_config, bits: int, group: int, n: int, k: int,
                    act_dtype: torch.dtype | None) -> tuple[type | None, Plan | None]:
    """(second kernel class, plan) for a layer of shape (n, k) on this rank that vLLM gave to
    ``kernel_cls``; (None, None) keeps one copy. ``group`` is the kernel's (-1: whole rows)."""
    if not enabled() or kernel_cls.__name__ not in (LARGE_M_KERNEL, SMALL_M_KERNEL):
        return None, None
    p = plan(kernel_cls.__name__, bits, group, n, k, triton_available(bits, group, k, act_dtype))
    if p.small == TRITON:
        return TritonWNA16Kernel, p
    if p.small == MARLIN:
        from vllm.model_executor.kernels.linear.mixed_precision.marlin import MarlinLinearKernel
        ok, _ = MarlinLinearKernel.can_implement(mp_config)
        return (MarlinLinearKernel, p) if ok else (None, None)
    return None, None


class TritonWNA16Kernel:
    """grace_qat's Triton small-M kernel with the vLLM kernel's calling convention: the packed
    codes (N, K/pf) int32 and steps (N, K/G) as registered by ``grace_vllm.linear.new_kernel`` (the
    compressed-tensors layout, not repacked), launch configs from this GPU's table."""

    def __init__(self, bits: int, group: int, configs: tuple = ()):
        from grace_qat.kernels import triton_wna16
        self._mm = triton_wna16.wna16_mm
        self._choose = triton_wna16.choose
        self.bits, self.group = bits, group
        self.table = [(int(m), triton_wna16.Config.from_list(c)) for m, c in configs]

    def apply_weights(self, module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        w = module.weight_packed
        m = x.numel() // x.shape[-1]
        cfg = self._choose(m, w.shape[0], x.shape[-1], self.bits, self.group, self.table)
        return self._mm(x, w, module.weight_scale, self.bits, self.group, bias, config=cfg)


class KernelDispatch:
    """The kernel(s) of one CUDA layer: ``large`` on the layer itself and, when dual, ``small``
    (Marlin or the Triton kernel) on a child module holding its own packed copy, used for
    M <= ``max_m``.

    Every CUDA layer calls through the custom op, dual or not, so the graph torch.compile traces
    (and vLLM caches on disk, keyed without our settings) is the same in both modes: switching
    GRACE_QAT_DUAL_KERNEL or the crossovers never reuses a compiled graph of the other mode."""

    HOLDER = "grace_qat_small_m"

    def __init__(self, layer: torch.nn.Module, large, small=None, max_m: int = 0):
        self.large, self.small, self.max_m = large, small, max_m
        self.weight_name = large.w_q_name           # the large kernel's packed weight: the op's key
        self.out_features = large.config.partition_weight_shape[1]
        _LAYERS[getattr(layer, self.weight_name).data_ptr()] = layer

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.grace_qat.mixed_mm(x, bias, getattr(layer, self.weight_name), self.out_features)


def _mixed_mm(x: torch.Tensor, bias: torch.Tensor | None, weight: torch.Tensor, out_features: int) -> torch.Tensor:
    layer = _LAYERS.get(weight.data_ptr())
    if layer is None:
        raise RuntimeError("grace_qat: mixed_mm called with a weight no grace_qat layer owns (was it "
                           "moved or replaced after loading?)")
    d: KernelDispatch = layer.quant_method.dispatch
    if d.small is not None and x.numel() // x.shape[-1] <= d.max_m:
        holder = getattr(layer, KernelDispatch.HOLDER)
        CALLS[type(d.small).__name__] += 1
        # The holder keeps its kernel's copy of the bias (Marlin permutes it); vLLM passes None
        # where it must not be added (tensor-parallel ranks > 0, skip_bias_add).
        return d.small.apply_weights(holder, x, None if bias is None else holder.bias)
    CALLS[type(d.large).__name__] += 1
    return d.large.apply_weights(layer, x, bias)


def _mixed_mm_fake(x: torch.Tensor, bias: torch.Tensor | None, weight: torch.Tensor,
                   out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


_lib = torch.library.Library("grace_qat", "FRAGMENT")
_lib.define("mixed_mm(Tensor x, Tensor? bias, Tensor weight, int out_features) -> Tensor")
# CUDA is where the plugin uses it; CPU so that the dispatch logic is testable without a GPU.
for _key in ("CUDA", "CPU"):
    _lib.impl("mixed_mm", _mixed_mm, _key)
torch.library.register_fake("grace_qat::mixed_mm", _mixed_mm_fake, lib=_lib)
