"""A second int4/int8 kernel for small batches, only where this GPU and engine version measured it faster.

Stock vLLM hands every mixed-precision layer to one kernel (``choose_mp_linear_kernel``: on Hopper
Machete, or what ``--linear-backend``, ``--kernel-config``'s ``linear_backend_per_quant`` and
``VLLM_DISABLED_KERNELS`` select). grace_qat's layers take exactly that kernel, with one packed copy:
on the same weights they run what stock vLLM runs. A second copy for another kernel (any vLLM
mixed-precision kernel that can implement the layer, or grace_qat's own Triton or CUDA kernel) is
kept only where the kernel table measured on this device, engine version and engine kernel says it is faster
(``grace_qat.kernels.table``); the per-call choice by token count M happens inside one custom op.

The list of kernels is open: a kernel is known by its class name, looked up among vLLM's registered
mixed-precision kernels and grace_qat's own (``OWN_KERNELS``), and used only where its
``can_implement`` accepts the layer, as vLLM does. Adding one is a class plus its table entries
(grace_qat's own also ``attach``: its copy on the holder module, in its own layout).

``GRACE_QAT_DUAL_KERNEL=0`` keeps one copy everywhere; ``GRACE_QAT_MARLIN_MAX_M=<int>`` forces Marlin
for M <= that number next to any other kernel; ``GRACE_QAT_CROSSOVER_FILE`` adds a table measured on
your GPU (``benchmarks/kernel_crossover.py``).

A layer with one kernel calls it exactly as stock vLLM's layer does, so torch.compile traces the
same code, fuses the same neighbours and captures the same kernels (on the H100 with vLLM 0.34,
with every layer behind the custom op, grace_qat decoded 0.79x stock's tokens/s at batch 1 on the
same kernel, Humming, and its greedy tokens parted from stock's). A layer with two kernels calls
the custom op ``torch.ops.grace_qat.mixed_mm``, opaque to Dynamo (no specialisation on M, no
recompilation); each captured CUDA graph records the kernel for its own batch size. Which route a layer takes depends on these settings, so they enter vLLM's
compile cache key (``record_compile_factors``): a graph compiled under other settings is never
reused.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import weakref

import torch

from grace_qat import settings
from grace_qat.errors import GraceFormatError
from grace_qat.kernels import table as kernel_table

ENV_DUAL, ENV_MAX_M, ENV_TABLE = settings.DUAL_KERNEL, settings.MARLIN_MAX_M, settings.CROSSOVER_FILE
ENGINE = "vllm"
MARLIN = "MarlinLinearKernel"

# data_ptr of a layer's key buffer -> layer. The custom op receives that tensor (a graph input, as a
# kernel's weight is) and finds its layer here; no per-layer constant enters the graph, so the
# decoder layers' pieces stay identical and torch.compile compiles them once, not once per layer.
_LAYERS: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()
CALLS: collections.Counter = collections.Counter()   # kernel name -> eager calls (tests, logs)
_WARNED: set[str] = set()


def enabled() -> bool:
    """``GRACE_QAT_DUAL_KERNEL`` (on unless set off); a misspelt value says so once and stays on."""
    try:
        return settings.dual_kernel()
    except GraceFormatError as e:
        if ENV_DUAL not in _WARNED:
            _WARNED.add(ENV_DUAL)
            logging.getLogger("vllm.grace_qat").warning("grace_qat: %s; two kernels stay allowed", e)
        return True


def shape_key(bits: int, group: int, n: int, k: int) -> str:
    return kernel_table.shape_key(bits, group, n, k)


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def engine_version() -> str:
    import vllm
    return vllm.__version__


def plan(large: str, bits: int, group: int, n: int, k: int) -> kernel_table.Plan:
    """The small-M partner of ``large`` (the kernel vLLM chose) for one layer shape on this rank."""
    forced = settings.marlin_max_m()
    if forced is not None:
        if large == MARLIN or forced == 0:
            return kernel_table.Plan(None, 0, f"{ENV_MAX_M}={forced}: {large} alone")
        return kernel_table.Plan(MARLIN, forced, f"{ENV_MAX_M}={forced}")
    return kernel_table.plan(device_name(), ENGINE, engine_version(), large, bits, group, n, k,
                             extra=settings.crossover_file())


def _current_vllm_config():
    """The vLLM config the engine is building the model under, or None (tests, tools)."""
    try:
        import vllm.config as vc
    except ImportError:
        return None
    get = getattr(vc, "get_current_vllm_config_or_none", None)
    if get is not None:
        return get()
    try:
        return vc.get_current_vllm_config()
    except AssertionError:          # vLLM <= 0.32 outside set_current_vllm_config
        return None


def user_chose_kernel() -> str | None:
    """How the user picked vLLM's mixed-precision kernel (``--linear-backend``, ``--kernel-config``'s
    ``linear_backend_per_quant``, ``VLLM_DISABLED_KERNELS``), or None where vLLM chose on its own."""
    if os.environ.get("VLLM_DISABLED_KERNELS"):
        return "VLLM_DISABLED_KERNELS"
    kc = getattr(_current_vllm_config(), "kernel_config", None)
    per_quant = getattr(kc, "linear_backend_per_quant", None) or {}
    if per_quant.get("mixed_precision"):
        return "linear_backend_per_quant"
    backend = getattr(kc, "linear_backend", "auto")
    return None if backend in (None, "auto") else f"--linear-backend {backend}"


def engine_default(chosen: type, mp_config) -> tuple[type, str | None]:
    """The kernel for a layer vLLM gave to ``chosen`` by its own ranking: the table's ``engine_default``
    kernel where one was measured faster end to end than ``chosen`` on this device and vLLM version
    (one copy either way); ``chosen`` where the user picked a kernel, two kernels are off, or nothing
    was measured. The reason, for the log, where the table's kernel is taken or cannot be."""
    if not enabled() or user_chose_kernel():
        return chosen, None
    t = kernel_table.table_for(device_name(), ENGINE, engine_version(), extra=settings.crossover_file())
    pick = (t or {}).get("engine_default") or {}
    if pick.get("instead_of") != chosen.__name__:
        return chosen, None
    cls = kernel_class(pick["use"])
    if cls is None or cls in OWN_KERNELS.values():
        return chosen, f"the table's {pick['use']} is not a vLLM kernel here: {chosen.__name__}"
    ok, why = cls.can_implement(mp_config)
    if not ok:
        return chosen, f"the table's {pick['use']} cannot run this layer ({why}): {chosen.__name__}"
    return cls, f"{pick['use']} instead of {chosen.__name__}: {pick.get('measured', 'measured')}"


def kernel_class(name: str) -> type | None:
    """A kernel by class name: grace_qat's own, or any mixed-precision kernel vLLM registers."""
    if name in OWN_KERNELS:
        return OWN_KERNELS[name]
    from vllm.model_executor.kernels import linear as vllm_kernels
    for kernels in vllm_kernels._POSSIBLE_KERNELS.values():
        for cls in kernels:
            if cls.__name__ == name:
                return cls
    return None


def small_m_partner(kernel_cls: type, mp_config, bits: int, group: int, n: int, k: int
                    ) -> tuple[type | None, kernel_table.Plan | None]:
    """(second kernel class, plan) for a layer of shape (n, k) on this rank that vLLM gave to
    ``kernel_cls``; (None, plan) keeps one copy, the plan saying why. ``group``: the kernel's."""
    if not enabled():
        return None, kernel_table.Plan(None, 0, f"{ENV_DUAL}=0: one copy, {kernel_cls.__name__}")
    p = plan(kernel_cls.__name__, bits, group, n, k)
    if p.small is None:
        return None, p
    cls = kernel_class(p.small)
    if cls is None:
        return None, kernel_table.Plan(None, 0, f"{p.small} is not a kernel this vLLM has: "
                                                f"{kernel_cls.__name__} alone")
    ok, why = cls.can_implement(mp_config)
    if not ok:
        return None, kernel_table.Plan(None, 0, f"{p.small} cannot run this layer ({why}): "
                                                f"{kernel_cls.__name__} alone")
    return cls, p


def compile_factors() -> dict:
    """What decides each layer's kernel and route (one kernel traced in, or two behind the custom op):
    the settings and every kernel table's content (second kernels and engine defaults)."""
    tables = [{k: v for k, v in t.items() if k != "path"} for t in kernel_table.tables(settings.crossover_file())]
    digest = hashlib.sha256(json.dumps(tables, sort_keys=True).encode()).hexdigest()[:16]
    return {"dual_kernel": enabled(), "marlin_max_m": settings.marlin_max_m(), "tables": digest}


def record_compile_factors() -> None:
    """Put ``compile_factors()`` in the vLLM config's ``additional_config``, which vLLM hashes into its
    compile cache key (vLLM 0.32 to 0.34); called while vLLM builds the model, before it compiles,
    once per config (the first layer's call)."""
    extra = getattr(_current_vllm_config(), "additional_config", None)
    if isinstance(extra, dict) and "grace_qat" not in extra:
        extra["grace_qat"] = compile_factors()


class OwnKernel:
    """What grace_qat's own kernels share, with the vLLM kernel's calling convention: symmetric
    int4/int8 and 16-bit activations only (``can_implement``, then the kernel module's own
    ``reason_not``), launch configs from this GPU's table, and ``attach``: the layer's copy on the
    holder module, in the kernel's layout (``layout``)."""

    @classmethod
    def can_implement(cls, c) -> tuple[bool, str | None]:
        """As vLLM's kernels answer: symmetric int4/int8, 16-bit activations, whole packed groups."""
        if c.act_type not in (torch.bfloat16, torch.float16):
            return False, f"activations {c.act_type}"
        if getattr(c, "zero_points", False):
            return False, "zero points"
        k = c.partition_weight_shape[0]
        why = cls.reason_not(c.weight_type.size_bits, k if c.group_size == -1 else c.group_size, k)
        return (False, why) if why else (True, None)

    def __init__(self, bits: int, group: int, configs: tuple = ()):
        self.module = self.kernel_module()       # the kernel's module: its Config, launcher, layout
        self.bits, self.group = bits, group
        self.table = [(int(m), self.module.Config.from_list(c)) for m, c in configs]

    @classmethod
    def attach(cls, holder: torch.nn.Module, packed: torch.Tensor, scales: torch.Tensor, bits: int,
               group: int, configs: tuple = ()) -> "OwnKernel":
        """The kernel for one layer, its copy on ``holder`` (from the compressed-tensors codes)."""
        weight, steps = cls.layout(packed, scales, bits)
        holder.weight_packed = torch.nn.Parameter(weight, requires_grad=False)
        holder.weight_scale = torch.nn.Parameter(steps, requires_grad=False)
        holder.own_out_features = packed.shape[0]
        return cls(bits, group, configs)


class TritonWNA16Kernel(OwnKernel):
    """grace_qat's Triton small-M kernel: the packed codes (N, K/pf) int32 and steps (N, K/G) as
    registered by ``grace_vllm.linear.new_kernel`` (the compressed-tensors layout, not repacked)."""

    @staticmethod
    def reason_not(bits: int, group: int, k: int) -> str | None:
        try:
            from grace_qat.kernels import triton_wna16
        except ImportError as e:
            return f"Triton unavailable ({e})"
        return None if triton_wna16.supports(bits, group, k) else f"W{bits} g{group} k{k}"

    @staticmethod
    def kernel_module():
        from grace_qat.kernels import triton_wna16
        return triton_wna16

    @staticmethod
    def layout(packed: torch.Tensor, scales: torch.Tensor, bits: int):
        return packed.clone(), scales.clone()

    def apply_weights(self, module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        w = module.weight_packed
        cfg = self.module.choose(x.numel() // x.shape[-1], w.shape[0], x.shape[-1], self.bits, self.group,
                                 self.table)
        return self.module.wna16_mm(x, w, module.weight_scale, self.bits, self.group, bias, config=cfg)


class CudaGemvKernel(OwnKernel):
    """grace_qat's NVRTC-compiled decode GEMV (``grace_qat.kernels.cuda_gemv``) for M <= 32. Its copy
    is its own layout (``cuda_gemv.pack``), made from the compressed-tensors codes once at load time:
    the layer's only small-M copy. Compiling, loading and the split-K counters happen in ``attach``,
    before any CUDA-graph capture."""

    MAX_M = 32

    @staticmethod
    def reason_not(bits: int, group: int, k: int) -> str | None:
        from grace_qat.kernels import cuda_gemv
        return cuda_gemv.available() or cuda_gemv.why_not(bits, group, k)

    @staticmethod
    def kernel_module():
        from grace_qat.kernels import cuda_gemv
        return cuda_gemv

    @staticmethod
    def layout(packed: torch.Tensor, scales: torch.Tensor, bits: int):
        from grace_qat.kernels import cuda_gemv
        cuda_gemv.prepare(packed.device, bits, scales.dtype)
        return cuda_gemv.pack(packed, scales, bits)

    def apply_weights(self, module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.module.gemv(x, module.weight_packed, module.weight_scale, self.bits, module.own_out_features,
                                bias=bias, table=self.table)


class KernelDispatch:
    """The kernel(s) of one CUDA layer: ``large`` on the layer itself and, when dual, ``small``
    (Marlin or the Triton kernel) on a child module holding its own packed copy, used for
    M <= ``max_m``.

    Only layers with two kernels have one; a layer with one kernel calls it directly."""

    HOLDER = "grace_qat_small_m"

    KEY = "grace_qat_key"

    def __init__(self, layer: torch.nn.Module, large, out_features: int, small=None, max_m: int = 0):
        self.large, self.small, self.max_m = large, small, max_m
        self.out_features = out_features
        # The op's key: a one-element buffer of the layer's own. Not the packed weight: kernels rename
        # or replace their parameters when they repack (Humming moves weight_packed to weight).
        key = torch.zeros(1, dtype=torch.int8, device=next(layer.parameters()).device)
        layer.register_buffer(self.KEY, key, persistent=False)
        _LAYERS[key.data_ptr()] = layer

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.grace_qat.mixed_mm(x, bias, getattr(layer, self.KEY), self.out_features)


def _mixed_mm(x: torch.Tensor, bias: torch.Tensor | None, weight: torch.Tensor, out_features: int) -> torch.Tensor:
    layer = _LAYERS.get(weight.data_ptr())     # ``weight``: the layer's key buffer
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


OWN_KERNELS: dict[str, type] = {k.__name__: k for k in (TritonWNA16Kernel, CudaGemvKernel)}

_lib = torch.library.Library("grace_qat", "FRAGMENT")
_lib.define("mixed_mm(Tensor x, Tensor? bias, Tensor weight, int out_features) -> Tensor")
# CUDA is where the plugin uses it; CPU so that the dispatch logic is testable without a GPU.
for _key in ("CUDA", "CPU"):
    _lib.impl("mixed_mm", _mixed_mm, _key)
torch.library.register_fake("grace_qat::mixed_mm", _mixed_mm_fake, lib=_lib)
