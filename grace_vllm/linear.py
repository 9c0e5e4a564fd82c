"""grace_qat linear methods: GRACE weights onto vLLM's own mixed-precision (WNA16) kernels.

vLLM plumbing only; every format question goes to the core (:mod:`grace_qat.formats`):
  * ``create_weights`` registers the tensors the checkpoint's format lists for one rank
    (``Format.rank_tensors``: BF16 grid weights and their log-steps, or AWQ's qweight/qzeros/scales)
    as vLLM parameters with the layer's own loader, so vLLM's tensor-parallel and fused (qkv /
    gate_up) loaders shard them; tensors the weight stream does not carry (the sidecar's log-steps)
    are fed through the same loader per checkpoint module and shard id after loading;
  * ``process_weights_after_loading`` hands what this rank loaded to ``Format.rank_codes`` (verified
    codes and fp32 steps, chunk by chunk), packs the codes in the compressed-tensors layout (out,
    in/pf) int32 as uint4b8 / uint8b128, frees the loaded tensors and hands the layer to the kernel
    ``choose_mp_linear_kernel`` picks, exactly as for stock vLLM's GPTQ layers (Machete, Humming or
    Marlin on CUDA as ``--linear-backend`` and ``VLLM_DISABLED_KERNELS`` say; CPUWNA16 on CPU). A second
    packed copy for a small-M kernel is kept only where this GPU and vLLM version measured it faster
    (``dispatch.py``: per-call choice by token count, inside one custom op; a layer with one kernel
    calls it as stock vLLM's layer does).

Where no kernel exists for a layer (8-bit on CPU; x86 CPUs without AVX-512, whose vLLM build lacks
``cpu_gemm_wna16``) the layer runs vLLM's unquantized GEMM on the weight dequantized from exactly
what a kernel would be handed (the packed codes, read back with vLLM's own unpack helper and the
weight type's zero point, times the fp32 steps over the kernel's group size), with one warning per
process. Every format goes through code and step recovery there too (never the loaded 16-bit weight
as it is), so a wrong code, step, zero point or group size changes what the layer computes on any
machine; where recovery is exact (stored steps) the result equals the checkpoint's W_dq bit for bit.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect

import torch
from vllm.logger import init_logger
from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
from vllm.model_executor.layers.linear import (LinearMethodBase, MergedColumnParallelLinear,
                                               QKVParallelLinear, UnquantizedLinearMethod,
                                               register_weight_loader_v2_supported_method)
from vllm.model_executor.parameter import (GroupQuantScaleParameter, ModelWeightParameter,
                                           PackedvLLMParameter)
from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32
from vllm.model_executor.utils import set_weight_attrs
from vllm.scalar_type import scalar_types

from grace_qat import formats, tensor_parallel
from grace_qat.errors import GraceFormatError
from grace_qat.kernels.mixed_mm import KernelDispatch
from grace_qat.kernels.own import OWN_KERNELS
from grace_qat.kernels.table import Plan
from grace_qat.packing import pack_factor, pack_int32
from grace_qat.quantizer import code_range

from . import dispatch

logger = init_logger("vllm.grace_qat")

_WEIGHT_TYPES = {4: scalar_types.uint4b8, 8: scalar_types.uint8b128}
# vLLM 0.26 has MPLinearLayerConfig.has_g_idx and MPLinearKernel(w_gidx_param_name=); 0.32+ has neither.
_MP_CONFIG_HAS_G_IDX = "has_g_idx" in {f.name for f in dataclasses.fields(MPLinearLayerConfig)}
_ROWS_PER_CHUNK_ELEMENTS = 1 << 24   # bounds the fp32/int64 temporaries of code recovery and packing

_announced: set[tuple] = set()
_fallback_warned = False
KERNELS_USED: set[str] = set()        # kernel class names this process handed layers to (for tests/logs)


def make_linear_method(qcfg, hf_names: list[str]):
    """The method for one quantized vLLM layer backed by checkpoint modules ``hf_names``."""
    cls = GraceQATLinearMethod if formats.get(qcfg.format).grid_weights else GraceAWQLinearMethod
    return cls(qcfg, hf_names)


def _no_reload(param, *args, **kwargs):
    raise RuntimeError("grace_qat: this parameter was built after loading from the GRACE checkpoint; "
                       "reloading weights into a grace_qat layer is not supported")


def _one_line(err: Exception) -> str:
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    return text if len(text) <= 300 else text[:297] + "..."


def _missing_kernel_op(kernel: type) -> str | None:
    """Kernels that can_implement() accepts but whose compiled op this build lacks."""
    if kernel.__name__ == "CPUWNA16LinearKernel":
        import vllm._custom_ops  # noqa: F401  (loads the platform's compiled ops into torch.ops._C)
        if not hasattr(torch.ops._C, "cpu_gemm_wna16"):
            return ("this CPU's vLLM build has no cpu_gemm_wna16 op (x86 without AVX-512 loads "
                    "the AVX2 library)")
    return None


def _allow_amx() -> None:
    """CPUWNA16 runs AMX tile instructions on CPUs that have them (``isa_hint`` "amx"), and Linux
    kills a process that uses AMX tile data before asking for it (arch_prctl ARCH_REQ_XCOMP_PERM):
    "Illegal instruction". An engine usually asks through oneDNN's BF16 GEMMs before the first
    quantized layer runs; a process whose first AMX user is ``cpu_gemm_wna16`` must ask itself."""
    if torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()


def mp_layer_config(bits: int, kernel_group: int, full: tuple[int, int], part: tuple[int, int],
                    act_dtype: torch.dtype) -> MPLinearLayerConfig:
    """vLLM's description of one symmetric WNA16 layer: (in, out) full and on this rank."""
    kw = dict(full_weight_shape=full, partition_weight_shape=part, weight_type=_WEIGHT_TYPES[bits],
              act_type=act_dtype, group_size=kernel_group, zero_points=False)
    if _MP_CONFIG_HAS_G_IDX:
        kw["has_g_idx"] = False
    return MPLinearLayerConfig(**kw)


def new_kernel(kernel_cls: type, mp_config, module: torch.nn.Module, packed: torch.Tensor,
               scales: torch.Tensor):
    """Register packed codes (out, in/pf) int32 and steps (out, groups) on ``module`` in the
    compressed-tensors layout and let ``kernel_cls`` repack them there; returns the kernel."""
    module.register_parameter("weight_packed", PackedvLLMParameter(
        data=packed, input_dim=1, output_dim=0, packed_dim=1,
        packed_factor=32 // mp_config.weight_type.size_bits, weight_loader=_no_reload))
    module.register_parameter("weight_scale", GroupQuantScaleParameter(
        data=scales, input_dim=1, output_dim=0, weight_loader=_no_reload))
    names = dict(w_q_param_name="weight_packed", w_s_param_name="weight_scale",
                 # never used (symmetric), but CPUWNA16's W4A8 path wants a name to fill in
                 w_zp_param_name="weight_zero_point")
    if "w_gidx_param_name" in inspect.signature(kernel_cls.__init__).parameters:
        names["w_gidx_param_name"] = "weight_g_idx"   # vLLM <= 0.26
    kernel = kernel_cls(mp_config, **names)
    kernel.process_weights_after_loading(module)
    if kernel_cls.__name__ == "CPUWNA16LinearKernel":
        _allow_amx()
    KERNELS_USED.add(kernel_cls.__name__)
    return kernel


# What vLLM's kernels read off the layer they repack besides its parameters (Humming reads the
# partition sizes, dtype and has_bias): a second kernel's holder module carries the same.
_LAYER_ATTRS = ("input_size", "input_size_per_partition", "output_size", "output_partition_sizes",
                "params_dtype", "has_bias", "tp_rank", "tp_size", "prefix")


def kernel_holder(layer: torch.nn.Module | None = None, **attrs) -> torch.nn.Module:
    """A module for a second packed copy: the layer's shape attributes (or ``attrs``) and a copy of its
    bias (the holder's kernel may permute it)."""
    holder = torch.nn.Module()
    for name in _LAYER_ATTRS:
        if layer is not None and hasattr(layer, name):
            setattr(holder, name, getattr(layer, name))
    for name, value in attrs.items():
        setattr(holder, name, value)
    bias = getattr(layer, "bias", None)
    holder.bias = None if bias is None else torch.nn.Parameter(bias.data.clone(), requires_grad=False)
    return holder


class GraceLinearMethod(LinearMethodBase):
    """One quantized layer: the format's tensors in, verified codes out, onto vLLM's kernel."""

    def __init__(self, qcfg, hf_names: list[str]):
        self.qcfg = qcfg
        self.hf_names = hf_names
        self.format = qcfg.format            # the name; formats.get(self.format) reads it
        self.bits = int(qcfg.bits)
        self.geo: tensor_parallel.Geometry | None = None
        self.tensors: list[formats.RankTensor] = []
        self.mp_config = None
        self.kernel_cls: type | None = None
        self.kernel = None
        self.small_m_kernel_cls: type | None = None    # Hopper: a small-M kernel next to vLLM's (dispatch.py)
        self.small_m_plan: Plan | None = None
        self.dispatch: KernelDispatch | None = None   # two kernels: the custom-op route
        self.batch_invariant = None   # VLLM_BATCH_INVARIANT=1: vLLM's GPTQ dequantize + matmul (dispatch.py)
        self.act_dtype: torch.dtype | None = None
        # Built now, while vLLM's config is current (it reads the linear backend from it).
        self._unquantized = UnquantizedLinearMethod()

    # -- set-up ----------------------------------------------------------------------------------

    def _plan(self, layer, input_size, output_size, in_pp, out_pp, params_dtype) -> None:
        self.geo = tensor_parallel.Geometry.of(layer.prefix, input_size, output_size, in_pp, out_pp, self.qcfg.group_size)
        self.act_dtype = params_dtype
        self.mp_config = mp_layer_config(self.bits, self.geo.kernel_group, (input_size, output_size),
                                         (in_pp, out_pp), params_dtype)
        why = None
        linear = dispatch.batch_invariant_linear()
        if linear is not None:
            # bound once: the layer's widths and the spec's zero point 2^(bits-1)
            self.batch_invariant = functools.partial(linear, num_bits=self.bits, group_size=self.geo.kernel_group,
                                                     zero_bias=-code_range(self.bits)[0])
            key = (linear.__name__, self.bits, self.geo.kernel_group)
            if key not in _announced:
                _announced.add(key)
                logger.info("grace_qat: using %s for W%d g%d (VLLM_BATCH_INVARIANT=1: dequantize, then vLLM's "
                            "batch-invariant matmul, as its GPTQ layers do)", key[0], self.bits, self.geo.group)
            return
        try:
            kernel = choose_mp_linear_kernel(self.mp_config)
            if torch.cuda.is_available():
                dispatch.record_compile_factors()
                kernel, why = dispatch.engine_default(kernel, self.mp_config)
            reason = _missing_kernel_op(kernel)
        except ValueError as e:
            kernel, reason = None, _one_line(e)
        if reason is None:
            self.kernel_cls = kernel
            key = (kernel.__name__, self.bits, self.geo.kernel_group, params_dtype)
            if key not in _announced:
                _announced.add(key)
                logger.info("grace_qat: using %s for W%d g%d (%s activations, weights %s)%s",
                            kernel.__name__, self.bits, self.geo.group, str(params_dtype).split(".")[-1],
                            _WEIGHT_TYPES[self.bits], f" ({why})" if why else "")
            if torch.cuda.is_available():
                self.small_m_kernel_cls, self.small_m_plan = dispatch.small_m_partner(
                    kernel, self.mp_config, self.bits, self.geo.kernel_group, out_pp, in_pp)
                shape = ("plan", self.bits, self.geo.kernel_group, out_pp, in_pp)
                if shape not in _announced and self.small_m_kernel_cls is None:
                    _announced.add(shape)
                    logger.info("grace_qat: W%d g%d %dx%d layers: one packed copy (%s)", self.bits,
                                self.geo.group, out_pp, in_pp, self.small_m_plan.reason)
            return
        global _fallback_warned
        if not _fallback_warned:
            _fallback_warned = True
            logger.warning("grace_qat: no vLLM W%d kernel for this platform (first layer %s: %s); "
                           "such layers run unquantized GEMMs on the exact dequantized weights "
                           "(same outputs, no memory saving)", self.bits, layer.prefix, reason)

    # -- after loading ---------------------------------------------------------------------------

    def _module_rows(self, layer) -> list[tuple[str, int, int]]:
        """(checkpoint module, first row, end row) of each constituent in this rank's weight."""
        sizes = list(getattr(layer, "output_partition_sizes", [self.geo.out_pp]))
        if len(sizes) != len(self.hf_names):
            return [(" + ".join(self.hf_names), 0, self.geo.out_pp)]
        rows, start = [], 0
        for name, size in zip(self.hf_names, sizes):
            rows.append((name, start, start + size))
            start += size
        return rows

    def _chunks(self, layer):
        """Row ranges of at most ~16M elements that never straddle two checkpoint modules (and
        start on a whole int32 of packed rows)."""
        pack = max((t.packed for t in self.tensors), default=1)
        step = max(pack, _ROWS_PER_CHUNK_ELEMENTS // max(1, self.geo.in_pp) // pack * pack)
        rows = self._module_rows(layer)
        if any(lo % pack or hi % pack for _, lo, hi in rows):
            rows = [(" + ".join(self.hf_names), 0, self.geo.out_pp)]
        for name, lo, hi in rows:
            for r0 in range(lo, hi, step):
                yield name, lo, r0, min(hi, r0 + step)

    def _where(self) -> str:
        return self.qcfg.checkpoint_dir or "checkpoint"

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size,
                       output_size, params_dtype, **extra_weight_attrs):
        weight_loader = extra_weight_attrs.pop("weight_loader")
        out_pp = sum(output_partition_sizes)
        self._plan(layer, input_size, output_size, input_size_per_partition, out_pp, params_dtype)
        # 16-bit weights load in the checkpoint's own dtype, so that the grid check sees the stored
        # values even when the model runs in another dtype; cast to params_dtype only for the fallback.
        stored = getattr(torch, self.qcfg.weight_dtype or "", None) or params_dtype
        try:
            self.tensors = formats.get(self.format).rank_tensors(out_pp, input_size_per_partition, self.geo.groups_pp, stored)
        except GraceFormatError as e:
            raise GraceFormatError(f"grace_qat: layer {layer.prefix}: {e}") from None
        for t in self.tensors:
            data = t.blank()
            loader = tensor_parallel.loader_for(t, weight_loader, input_size // self.geo.group)
            dims = dict(input_dim=1 - t.output_dim, output_dim=t.output_dim, weight_loader=loader)
            if t.packed > 1:
                param = PackedvLLMParameter(data=data, packed_dim=t.output_dim, packed_factor=t.packed, **dims)
            elif t.grouped:
                param = GroupQuantScaleParameter(data=data, **dims)
            else:
                param = ModelWeightParameter(data=data, **dims)
            layer.register_parameter(t.leaf, param)
            set_weight_attrs(param, extra_weight_attrs)

    def _feed_from_checkpoint(self, layer) -> None:
        """Tensors the weight stream does not carry, per checkpoint module through the same loader."""
        if not any(t.source == "checkpoint" for t in self.tensors):
            return
        shards = _module_shards(layer, self.hf_names)
        for leaf, full, args in tensor_parallel.checkpoint_feeds(self.qcfg.checkpoint(), self.tensors, shards):
            param = getattr(layer, leaf)
            tensor_parallel.feed_loader(param)(param, full.to(param.device), *args)

    def _rows(self, t: formats.RankTensor, data: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        rows = slice(r0 // t.packed, r1 // t.packed)
        return data[rows] if t.output_dim == 0 else data[:, rows]

    def process_weights_after_loading(self, layer) -> None:
        if getattr(layer, "_grace_qat_done", False):
            return
        g, fmt = self.geo, formats.get(self.format)
        self._feed_from_checkpoint(layer)
        loaded = {t.leaf: getattr(layer, t.leaf).data for t in self.tensors}
        device = next(iter(loaded.values())).device
        codes = torch.empty(g.out_pp, g.in_pp, device=device, dtype=torch.int8 if self.bits == 4 else torch.int16)
        steps = torch.empty(g.out_pp, g.groups_pp, device=device, dtype=torch.float32)
        inferred = getattr(self.qcfg, "bits_inferred", False)
        for name, lo, r0, r1 in self._chunks(layer):
            part = {t.leaf: self._rows(t, loaded[t.leaf], r0, r1) for t in self.tensors}
            try:
                c, s = fmt.rank_codes(part, self.bits, g.group, name=name, inferred=inferred)
            except GraceFormatError as e:
                raise GraceFormatError(
                    f"{self._where()}: vLLM layer {layer.prefix}, rows {r0 - lo}..{r1 - lo - 1} of {name} "
                    f"on this rank: {e}") from None
            codes[r0:r1], steps[r0:r1] = c, s.to(device)
        del loaded
        for t in self.tensors:
            delattr(layer, t.leaf)
        packed = self._pack(layer, codes)
        del codes
        if self.batch_invariant is not None:
            self._attach_gptq_layout(layer, packed, steps)
            return self._finish(layer)
        if self.kernel_cls is None:
            layer.register_parameter("weight", ModelWeightParameter(
                data=self._dequantized(layer, packed, steps), input_dim=1, output_dim=0,
                weight_loader=_no_reload))
            return self._finish_unquantized(layer)
        self._attach_kernel(layer, packed, steps)
        self._finish(layer)

    def _pack(self, layer, codes: torch.Tensor) -> torch.Tensor:
        """Codes (out, in) as the kernel gets them: uint4b8 / uint8b128 (u = q + 2^(bits-1)) in the
        compressed-tensors layout (out, in/pf) int32."""
        g = self.geo
        offset = -code_range(self.bits)[0]
        packed = torch.empty(g.out_pp, g.in_pp // pack_factor(self.bits), dtype=torch.int32,
                             device=codes.device)
        for _, _, r0, r1 in self._chunks(layer):
            packed[r0:r1] = pack_int32(codes[r0:r1] + offset, self.bits, dim=1)   # int8 / int16 hold u
        return packed

    def _dequantized(self, layer, packed: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """The fallback's weight (out, in) in the activation dtype, read from a kernel's inputs as
        the kernel reads them: vLLM's unpack of the weight type's fields minus its zero point (bias),
        times the fp32 step of each group of the kernel's group size (-1: the whole row); chunked."""
        cfg, g = self.mp_config, self.geo
        group = g.in_pp if cfg.group_size == -1 else cfg.group_size
        if steps.shape[1] * group != g.in_pp:
            raise GraceFormatError(f"grace_qat: layer {layer.prefix}: {steps.shape[1]} steps per row do not "
                                   f"cover {g.in_pp} inputs in groups of {cfg.group_size}")
        weight = torch.empty(g.out_pp, g.in_pp, dtype=self.act_dtype, device=packed.device)
        for _, _, r0, r1 in self._chunks(layer):
            u = unpack_quantized_values_into_int32(packed[r0:r1], cfg.weight_type, packed_dim=1)
            q = (u - cfg.weight_type.bias).to(torch.float32)
            weight[r0:r1] = (q * steps[r0:r1].repeat_interleave(group, dim=1)).to(self.act_dtype)
        return weight

    def _attach_gptq_layout(self, layer, packed: torch.Tensor, steps: torch.Tensor) -> None:
        """``qweight`` (in/pf, out) int32 and ``scales`` (groups, out) in the activation dtype: the GPTQ
        checkpoint layout vLLM's batch-invariant GPTQ linear reads (``_pack``'s layout transposed)."""
        for name, data in (("qweight", packed.t().contiguous()),
                           ("scales", steps.to(self.act_dtype).t().contiguous())):
            layer.register_parameter(name, torch.nn.Parameter(data, requires_grad=False))

    def _attach_kernel(self, layer, packed: torch.Tensor, scales: torch.Tensor) -> None:
        """Hand the packed codes (see ``_pack``) to the chosen kernel (and, where this GPU's table says
        so, a second copy to a small-M kernel). Scales: fp32 steps cast once to the activation dtype."""
        g = self.geo
        scales = scales.to(self.act_dtype).contiguous()
        small = None
        if self.small_m_kernel_cls is not None:
            holder = kernel_holder(layer)
            if self.small_m_kernel_cls in OWN_KERNELS.values():
                # grace_qat's own kernels lay out their one copy themselves
                small = self.small_m_kernel_cls.attach(holder, packed, scales, self.bits, g.kernel_group,
                                                       self.small_m_plan.configs)
            else:
                small = new_kernel(self.small_m_kernel_cls, self.mp_config, holder, packed.clone(),
                                   scales.clone())
        self.kernel = new_kernel(self.kernel_cls, self.mp_config, layer, packed, scales)
        if small is not None:   # after the layer's own repack, which may rename the layer's parameters
            setattr(layer, KernelDispatch.HOLDER, holder)
        if small is None:       # one kernel: called as stock vLLM calls it (dispatch.py says why)
            return
        max_m, why = self.small_m_plan.max_m, self.small_m_plan.reason
        self.dispatch = KernelDispatch(layer, self.kernel, g.out_pp, small, max_m)
        key = ("dual", self.bits, g.kernel_group, g.out_pp, g.in_pp)
        if key not in _announced:
            _announced.add(key)
            logger.info("grace_qat: W%d g%d %dx%d layers: %s for <= %d tokens, %s above (%s); "
                        "second packed copy kept (%s=0 keeps one)", self.bits, g.group, g.out_pp,
                        g.in_pp, self.small_m_kernel_cls.__name__, max_m, self.kernel_cls.__name__,
                        why, dispatch.ENV_DUAL)

    def _finish_unquantized(self, layer) -> None:
        """Fallback: vLLM's unquantized GEMM on layer.weight, in the model dtype (what a stock
        engine does with the same 16-bit weights)."""
        if layer.weight.dtype != self.act_dtype:
            layer.weight.data = layer.weight.data.to(self.act_dtype)
        self._unquantized.process_weights_after_loading(layer)
        self._finish(layer)

    def _finish(self, layer) -> None:
        layer._grace_qat_done = True
        self.qcfg.layer_done()

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.dispatch is not None:
            return self.dispatch.apply(layer, x, bias)
        if self.batch_invariant is not None:
            return self.batch_invariant(x, layer.qweight, layer.scales, bias=bias)
        if self.kernel is not None:
            return self.kernel.apply_weights(layer, x, bias)
        return self._unquantized.apply(layer, x, bias)


def _module_shards(layer, hf_names: list[str]) -> list[tuple[str, object]]:
    return tensor_parallel.module_shards(layer.prefix, type(layer).__name__, hf_names,
                                qkv=isinstance(layer, QKVParallelLinear),
                                merged=isinstance(layer, MergedColumnParallelLinear))


@register_weight_loader_v2_supported_method
class GraceQATLinearMethod(GraceLinearMethod):
    """Formats whose files hold 16-bit weights on the grid (the name logs and tests report)."""


@register_weight_loader_v2_supported_method
class GraceAWQLinearMethod(GraceLinearMethod):
    """Formats whose files hold packed integer codes (the name logs and tests report)."""
