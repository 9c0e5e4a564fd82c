"""Two int4/int8 kernels for one layer, chosen per call by the number of tokens M.

Why: on Hopper vLLM hands every mixed-precision layer to Machete. Machete wins at large M (prefill,
big decode batches), Marlin at small M: stock vLLM 0.26 decodes a 7B GPTQ model on an H100 at 230
tokens/s at batch 1 with Machete and 316 with Marlin, but 7561 vs 6314 at batch 64. grace_qat owns
its linear method, so it keeps both packings and picks per call: Marlin for M <= the layer shape's
crossover, Machete above. The crossovers are measured per layer shape on the GPU
(``benchmarks/kernel_crossover.py``) and shipped in ``kernel_crossover.json``.

Cost: a second packed copy of every quantized weight (W4: +0.5 byte per weight, +25% of the layer's
BF16 size). ``GRACE_QAT_DUAL_KERNEL=0`` keeps one copy and vLLM's own choice;
``GRACE_QAT_MARLIN_MAX_M=<int>`` overrides every crossover; ``GRACE_QAT_CROSSOVER_FILE`` points at a
table measured elsewhere.

The choice happens inside one custom op, ``torch.ops.grace_qat.mixed_mm``, which torch.compile treats
as opaque: Dynamo never sees the branch (no specialisation on M, no recompilation), and each CUDA
graph vLLM captures records the kernel for its own batch size.
"""
from __future__ import annotations

import collections
import functools
import json
import os
import weakref

import torch

ENV_DUAL = "GRACE_QAT_DUAL_KERNEL"
ENV_MAX_M = "GRACE_QAT_MARLIN_MAX_M"
ENV_TABLE = "GRACE_QAT_CROSSOVER_FILE"
TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel_crossover.json")
# Used for a shape the table lacks on a GPU the table lacks: the batch size below which stock vLLM's
# Marlin beat its Machete end to end on the H100 (7B, vLLM 0.26: faster at 1 and 16, slower at 64).
FALLBACK_MAX_M = 16

SMALL_M_KERNEL = "MarlinLinearKernel"
LARGE_M_KERNEL = "MacheteLinearKernel"

# data_ptr of a layer's packed weight -> layer. The custom op receives that weight tensor (a graph
# input, as for any kernel op) and finds its layer here; no per-layer constant enters the graph, so
# the decoder layers' pieces stay identical and torch.compile compiles them once, not once per layer.
_LAYERS: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()
CALLS: collections.Counter = collections.Counter()   # kernel name -> eager calls (tests, logs)


def enabled() -> bool:
    return os.environ.get(ENV_DUAL, "1").strip().lower() not in ("0", "false", "no", "off")


def shape_key(bits: int, group: int, n: int, k: int) -> str:
    """Table key of one layer shape on one rank: n = output features, k = input features."""
    return f"w{bits}g{group} n{n} k{k}"


@functools.lru_cache(maxsize=None)
def _table(path: str | None) -> dict:
    tables = {}
    for p in (TABLE_PATH, path):
        if p and os.path.exists(p):
            with open(p) as f:
                for device, entry in json.load(f).get("devices", {}).items():
                    tables.setdefault(device, {"shapes": {}}).update(
                        {k: v for k, v in entry.items() if k != "shapes"})
                    tables[device]["shapes"].update(entry.get("shapes", {}))
    return tables


def crossover(bits: int, group: int, n: int, k: int) -> tuple[int, str]:
    """(largest M that runs on Marlin, where that number comes from)."""
    forced = os.environ.get(ENV_MAX_M)
    if forced not in (None, ""):
        return int(forced), ENV_MAX_M
    tables = _table(os.environ.get(ENV_TABLE))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    key = shape_key(bits, group, n, k)
    # this GPU's table first, then any other measured one (all are Hopper: Machete needs sm90)
    names = ([device] if device in tables else []) + sorted(d for d in tables if d != device)
    for name in names:
        if key in tables[name]["shapes"]:
            return int(tables[name]["shapes"][key]), f"measured on {name}"
    if names and "default" in tables[names[0]]:
        return int(tables[names[0]]["default"]), f"median of the shapes measured on {names[0]}"
    return FALLBACK_MAX_M, "built-in default"


def small_m_partner(kernel_cls: type, mp_config) -> type | None:
    """Marlin, when vLLM chose Machete for this layer and Marlin can run it too (and dual is on)."""
    if not enabled() or kernel_cls.__name__ != LARGE_M_KERNEL:
        return None
    from vllm.model_executor.kernels.linear.mixed_precision.marlin import MarlinLinearKernel
    ok, _ = MarlinLinearKernel.can_implement(mp_config)
    return MarlinLinearKernel if ok else None


class KernelDispatch:
    """The kernel(s) of one CUDA layer: ``large`` on the layer itself and, when dual, ``small``
    (Marlin) on a child module holding its own packed copy, used for M <= ``max_m``.

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
        CALLS[SMALL_M_KERNEL] += 1
        # Marlin keeps a permuted copy of the bias on its holder; vLLM passes None where it must
        # not be added (tensor-parallel ranks > 0, skip_bias_add).
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
