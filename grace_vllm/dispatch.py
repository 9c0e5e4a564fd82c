"""A second int4/int8 kernel for small batches, only where this GPU and engine version measured it faster.

Stock vLLM hands every mixed-precision layer to one kernel (``choose_mp_linear_kernel``: on Hopper
Machete, or what ``--linear-backend``, ``--kernel-config``'s ``linear_backend_per_quant`` and
``VLLM_DISABLED_KERNELS`` select). grace_qat's layers take exactly that kernel, with one packed copy:
on the same weights they run what stock vLLM runs. A second copy for another kernel (any vLLM
mixed-precision kernel that can implement the layer, or grace_qat's own Triton or CUDA kernel) is
kept only where the kernel table measured on this device, engine version and engine kernel says it is faster
(``grace_qat.kernels.table``); the per-call choice by token count M happens inside one custom op.

The list of kernels is open: a kernel is known by its class name, looked up among vLLM's registered
mixed-precision kernels and grace_qat's own (``grace_qat.kernels.own``), and used only where its
``can_implement`` accepts the layer, as vLLM does. Adding one is a class plus its table entries
(grace_qat's own also ``attach``: its copy on the holder module, in its own layout).

``GRACE_QAT_DUAL_KERNEL=0`` keeps one copy everywhere; ``GRACE_QAT_MARLIN_MAX_M=<int>`` forces Marlin
for M <= that number next to any other kernel; ``GRACE_QAT_CROSSOVER_FILE`` adds a table measured on
your GPU (``benchmarks/kernel_crossover.py``).

A layer with one kernel calls it exactly as stock vLLM's layer does, so torch.compile traces the
same code, fuses the same neighbours and captures the same kernels (on the H100 with vLLM 0.34,
with every layer behind the custom op, grace_qat decoded 0.79x stock's tokens/s at batch 1 on the
same kernel, Humming, and its greedy tokens parted from stock's). A layer with two kernels calls
the custom op of ``grace_qat.kernels.mixed_mm``. Which route a layer takes depends on these
settings, so they enter vLLM's compile cache key (``record_compile_factors``): a graph compiled
under other settings is never reused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

import torch

from grace_qat import settings
from grace_qat.kernels import table as kernel_table
from grace_qat.kernels.own import OWN_KERNELS

ENV_DUAL, ENV_MAX_M, ENV_TABLE = settings.DUAL_KERNEL, settings.MARLIN_MAX_M, settings.CROSSOVER_FILE
ENGINE = "vllm"
MARLIN = "MarlinLinearKernel"


def enabled() -> bool:
    """``GRACE_QAT_DUAL_KERNEL`` (on unless set off; a misspelt value is warned about and stays on)."""
    return kernel_table.second_kernels_allowed(logging.getLogger("vllm.grace_qat"))


def shape_key(bits: int, group: int, n: int, k: int) -> str:
    return kernel_table.shape_key(bits, group, n, k)


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
    return kernel_table.plan(kernel_table.device_name(), ENGINE, engine_version(), large, bits, group, n, k,
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


def batch_invariant_linear():
    """vLLM's GPTQ linear for ``VLLM_BATCH_INVARIANT=1`` (dequantize, then its batch-invariant matmul:
    what its GPTQ, AWQ and compressed-tensors W4A16 layers run in that mode since 0.34, because the
    mixed-precision kernels pick their tiling from the token count), where the variable is set and
    this vLLM has it, on CUDA (its matmul is a Triton kernel); else None (older vLLM runs its kernels
    in that mode, and so do we)."""
    try:
        import vllm.envs as envs
        if not envs.VLLM_BATCH_INVARIANT or not torch.cuda.is_available():
            return None
        from vllm.model_executor.determinism.batch_invariant import gptq_linear_batch_invariant
    except (ImportError, AttributeError):
        return None
    return gptq_linear_batch_invariant


def engine_default(chosen: type, mp_config) -> tuple[type, str | None]:
    """The kernel for a layer vLLM gave to ``chosen`` by its own ranking: the table's ``engine_default``
    kernel where one was measured faster end to end than ``chosen`` on this device and vLLM version
    (one copy either way); ``chosen`` where the user picked a kernel, two kernels are off, or nothing
    was measured. The reason, for the log, where the table's kernel is taken or cannot be."""
    if not enabled() or user_chose_kernel():
        return chosen, None
    pick = kernel_table.engine_default(ENGINE, engine_version(), chosen.__name__,
                                       bits=mp_config.weight_type.size_bits)
    if pick is None:
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
    return kernel_table.partner(plan(kernel_cls.__name__, bits, group, n, k), kernel_cls.__name__,
                                kernel_class, lambda cls: cls.can_implement(mp_config))


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
