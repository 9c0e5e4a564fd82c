"""grace_qat's own small-M kernels, behind the calling convention the engines' kernel objects share.

They run as vLLM's ``MPLinearKernel`` objects do (``apply_weights(module, x, bias)``) and say which
layers they can run (``can_implement`` from vLLM's layer config, ``can_run`` from plain facts), so
either adapter can keep one as a layer's second kernel where a kernel table measured it faster
(``grace_qat.kernels.table``). Each lays out its own copy of the layer's codes on a holder module
(``attach``), from the compressed-tensors packing (out, in/pf) int32 as uint4b8 / uint8b128 and the
steps (out, groups) in the activation dtype.
"""
from __future__ import annotations

import torch


class OwnKernel:
    """What grace_qat's own kernels share, with the engines' kernel calling convention: symmetric
    int4/int8 and 16-bit activations only (``can_implement``, then the kernel module's own
    ``reason_not``), launch configs from this GPU's table, and ``attach``: the layer's copy on the
    holder module, in the kernel's layout (``layout``)."""

    @classmethod
    def can_implement(cls, c) -> tuple[bool, str | None]:
        """As vLLM's kernels answer, from its layer config (``MPLinearLayerConfig``)."""
        return cls.can_run(c.weight_type.size_bits, c.group_size, c.partition_weight_shape[0], c.act_type,
                           getattr(c, "zero_points", False))

    @classmethod
    def can_run(cls, bits: int, group: int, k: int, act_type: torch.dtype, zero_points: bool = False
                ) -> tuple[bool, str | None]:
        """Symmetric int4/int8, 16-bit activations, whole packed groups (group -1: the whole row of
        ``k`` inputs on this rank); (False, why) otherwise."""
        if act_type not in (torch.bfloat16, torch.float16):
            return False, f"activations {act_type}"
        if zero_points:
            return False, "zero points"
        why = cls.reason_not(bits, k if group == -1 else group, k)
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
    """grace_qat's Triton small-M kernel: the packed codes (N, K/pf) int32 and steps (N, K/G) in the
    compressed-tensors layout, not repacked."""

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


OWN_KERNELS: dict[str, type] = {k.__name__: k for k in (TritonWNA16Kernel, CudaGemvKernel)}
