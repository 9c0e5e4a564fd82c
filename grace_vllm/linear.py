"""grace_qat linear methods: GRACE weights onto vLLM's own mixed-precision (WNA16) kernels.

Format A (qat-sidecar / qat-inline / qat-grid), ``GraceQATLinearMethod``:
  * loads the BF16 on-grid weight into an ordinary ``ModelWeightParameter`` through the layer's
    ``weight_loader_v2``, so vLLM's own tensor-parallel and fused (qkv / gate_up) loaders shard it;
  * per-group steps get the *same* sharding: inline ``<module>.log_scale`` tensors arrive in the weight
    stream into a ``log_scale`` parameter; sidecar log-scales are fed, per checkpoint module and shard
    id, through that parameter's loader after loading; qat-grid steps are derived from the weight;
  * recovers and verifies the integer codes (grace_qat.quantizer.recover_codes), packs them in the
    compressed-tensors layout (out, in/pf) int32 as uint4b8 / uint8b128, frees the BF16 weight and hands
    the layer to the kernel ``choose_mp_linear_kernel`` picks (Machete / Marlin on CUDA, CPUWNA16 on CPU).
    Where vLLM picks Machete (Hopper), a second packed copy goes to a small-M kernel (Marlin, or
    grace_qat's Triton kernel on the plain packing, as this GPU's table says) for small batches
    (``dispatch.py``: per-call choice by token count, inside one custom op).
Format B (awq), ``GraceAWQLinearMethod``: loads qweight / qzeros / scales as they are on disk, checks
every zero point is 8, and runs the same symmetric uint4b8 path (codes u-8, scales in the activation
dtype); no dequantized copy.

Where no kernel exists for a layer (8-bit on CPU; x86 CPUs without AVX-512, whose vLLM build lacks
``cpu_gemm_wna16``) the layer runs vLLM's unquantized GEMM on the exact dequantized weight (format A:
the loaded BF16 weight itself), with one warning per process.
"""
from __future__ import annotations

import dataclasses
import inspect

import torch
from vllm.logger import init_logger
from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
from vllm.model_executor.layers.linear import (LinearMethodBase, MergedColumnParallelLinear,
                                               QKVParallelLinear, UnquantizedLinearMethod,
                                               register_weight_loader_v2_supported_method)
from vllm.model_executor.parameter import (GroupQuantScaleParameter, ModelWeightParameter,
                                           PackedvLLMParameter)
from vllm.model_executor.utils import set_weight_attrs
from vllm.scalar_type import scalar_types

from grace_qat.checkpoint import FORMAT_AWQ, FORMAT_QAT_GRID, FORMAT_QAT_SIDECAR
from grace_qat.errors import GraceFormatError
from grace_qat.packing import pack_factor, pack_int32, unpack_awq
from grace_qat.quantizer import (code_range, dequantize, derive_scales, effective_group_size,
                                 recover_codes, scales_from_log_scale)

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
    cls = GraceAWQLinearMethod if qcfg.fmt == FORMAT_AWQ else GraceQATLinearMethod
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
    KERNELS_USED.add(kernel_cls.__name__)
    return kernel


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Shapes of one layer on this rank, and the group size the kernel sees."""
    in_pp: int
    out_pp: int
    group: int            # effective group size (the whole row when group_size does not divide in)
    kernel_group: int     # what the kernel is told: -1 for whole-row groups

    @property
    def groups_pp(self) -> int:
        return self.in_pp // self.group

    @classmethod
    def of(cls, layer, input_size: int, output_size: int, in_pp: int, out_pp: int,
           group_size: int) -> "_Geometry":
        group = effective_group_size(input_size, group_size)
        if in_pp != input_size and (group == input_size or in_pp % group):
            tp = getattr(layer, "tp_size", input_size // in_pp)
            groups = "one group per row" if group == input_size else f"{input_size // group} groups"
            raise ValueError(
                f"grace_qat: layer {layer.prefix} (weight {output_size}x{input_size}, quantized in groups of "
                f"{group} along the input dimension: {groups}) is split by tensor parallel size {tp} into "
                f"input shards of {in_pp}, which do not hold whole groups. Use a tensor parallel size that "
                f"divides the number of groups per row.")
        return cls(in_pp, out_pp, group, -1 if group == input_size else group)


class _GraceLinearMethod(LinearMethodBase):
    """Shared part: kernel choice, packing and kernel hand-off, exact 16-bit fallback, apply."""

    def __init__(self, qcfg, hf_names: list[str]):
        self.qcfg = qcfg
        self.hf_names = hf_names
        self.bits = int(qcfg.bits)
        self.geo: _Geometry | None = None
        self.mp_config = None
        self.kernel_cls: type | None = None
        self.kernel = None
        self.small_m_kernel_cls: type | None = None    # Hopper: a small-M kernel next to vLLM's (dispatch.py)
        self.small_m_plan: dispatch.Plan | None = None
        self.dispatch: dispatch.KernelDispatch | None = None   # CUDA layers: the custom-op route
        self.act_dtype: torch.dtype | None = None
        # Built now, while vLLM's config is current (it reads the linear backend from it).
        self._unquantized = UnquantizedLinearMethod()

    # -- set-up ----------------------------------------------------------------------------------

    def _plan(self, layer, input_size, output_size, in_pp, out_pp, params_dtype) -> None:
        self.geo = _Geometry.of(layer, input_size, output_size, in_pp, out_pp, self.qcfg.group_size)
        self.act_dtype = params_dtype
        self.mp_config = mp_layer_config(self.bits, self.geo.kernel_group, (input_size, output_size),
                                         (in_pp, out_pp), params_dtype)
        try:
            kernel = choose_mp_linear_kernel(self.mp_config)
            reason = _missing_kernel_op(kernel)
        except ValueError as e:
            kernel, reason = None, _one_line(e)
        if reason is None:
            self.kernel_cls = kernel
            self.small_m_kernel_cls, self.small_m_plan = dispatch.small_m_partner(
                kernel, self.mp_config, self.bits, self.geo.kernel_group, out_pp, in_pp, params_dtype)
            key = (kernel.__name__, self.bits, self.geo.kernel_group, params_dtype)
            if key not in _announced:
                _announced.add(key)
                logger.info("grace_qat: using %s for W%d g%d (%s activations, weights %s)",
                            kernel.__name__, self.bits, self.geo.group, str(params_dtype).split(".")[-1],
                            _WEIGHT_TYPES[self.bits])
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
        """Row ranges of at most ~16M elements that never straddle two checkpoint modules."""
        step = max(1, _ROWS_PER_CHUNK_ELEMENTS // max(1, self.geo.in_pp))
        for name, lo, hi in self._module_rows(layer):
            for r0 in range(lo, hi, step):
                yield name, lo, r0, min(hi, r0 + step)

    def _where(self) -> str:
        return self.qcfg.model_dir or "checkpoint"

    def _codes(self, layer, weight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
        """Verified codes of ``weight`` (on this rank) into ``out`` (int8/int16), chunk by chunk."""
        for name, lo, r0, r1 in self._chunks(layer):
            try:
                out[r0:r1] = recover_codes(weight[r0:r1], scales[r0:r1], self.bits, self.geo.group,
                                           name=name, inferred=getattr(self.qcfg, "bits_inferred", False))
            except GraceFormatError as e:
                raise GraceFormatError(
                    f"{self._where()}: vLLM layer {layer.prefix}, rows {r0 - lo}..{r1 - lo - 1} of {name} "
                    f"on this rank: {e}") from None

    def _attach_kernel(self, layer, codes: torch.Tensor, scales: torch.Tensor) -> None:
        """Pack codes (out, in) as uint4b8/uint8b128 in the compressed-tensors layout and hand the
        layer to the chosen kernel (and, on Hopper, a second copy to Marlin for small batches).
        Scales: fp32 steps cast once to the activation dtype."""
        g = self.geo
        offset = -code_range(self.bits)[0]
        packed = torch.empty(g.out_pp, g.in_pp // pack_factor(self.bits), dtype=torch.int32,
                             device=codes.device)
        for _, _, r0, r1 in self._chunks(layer):
            packed[r0:r1] = pack_int32(codes[r0:r1].to(torch.int32) + offset, self.bits, dim=1)
        del codes
        scales = scales.to(self.act_dtype).contiguous()
        small = None
        if self.small_m_kernel_cls is not None:
            holder = torch.nn.Module()
            bias = getattr(layer, "bias", None)
            if bias is not None:
                holder.bias = torch.nn.Parameter(bias.data.clone(), requires_grad=False)
            if self.small_m_kernel_cls is dispatch.TritonWNA16Kernel:
                # the plain compressed-tensors packing, as it is: no repack
                holder.weight_packed = torch.nn.Parameter(packed.clone(), requires_grad=False)
                holder.weight_scale = torch.nn.Parameter(scales.clone(), requires_grad=False)
                small = dispatch.TritonWNA16Kernel(self.bits, g.kernel_group, self.small_m_plan.configs)
            else:
                small = new_kernel(self.small_m_kernel_cls, self.mp_config, holder, packed.clone(),
                                   scales.clone())
            setattr(layer, dispatch.KernelDispatch.HOLDER, holder)
        self.kernel = new_kernel(self.kernel_cls, self.mp_config, layer, packed, scales)
        if small is None:
            if packed.is_cuda:
                self.dispatch = dispatch.KernelDispatch(layer, self.kernel)
            return
        max_m, source = self.small_m_plan.max_m, self.small_m_plan.source
        self.dispatch = dispatch.KernelDispatch(layer, self.kernel, small, max_m)
        key = ("dual", self.bits, g.kernel_group, g.out_pp, g.in_pp)
        if key not in _announced:
            _announced.add(key)
            logger.info("grace_qat: W%d g%d %dx%d layers: %s for <= %d tokens, %s above (%s); "
                        "second packed copy kept (%s=0 keeps one)", self.bits, g.group, g.out_pp,
                        g.in_pp, self.small_m_kernel_cls.__name__, max_m, self.kernel_cls.__name__,
                        source, dispatch.ENV_DUAL)

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
        if self.kernel is not None:
            return self.kernel.apply_weights(layer, x, bias)
        return self._unquantized.apply(layer, x, bias)


def _reshaping_loader(loader, groups_per_row: int):
    """Checkpoint log_scale tensors are flat (out*in/G,); vLLM's loaders shard (out, in/G)."""
    def load_log_scale(param, loaded_weight, *args, **kwargs):
        if loaded_weight.dim() == 1:
            loaded_weight = loaded_weight.reshape(-1, groups_per_row)
        return loader(param, loaded_weight, *args, **kwargs)
    return load_log_scale


def _shard_ids(layer, hf_names: list[str]) -> list:
    n = len(hf_names)
    if n == 1:
        return [None]
    if isinstance(layer, QKVParallelLinear) and n == 3:
        return ["q", "k", "v"]
    if isinstance(layer, MergedColumnParallelLinear):
        return list(range(n))
    raise ValueError(f"grace_qat: layer {layer.prefix} ({type(layer).__name__}) fuses checkpoint modules "
                     f"{hf_names}; no rule to load their scales shard by shard")


@register_weight_loader_v2_supported_method
class GraceQATLinearMethod(_GraceLinearMethod):
    """Format A: BF16 weights on the quantization grid (+ sidecar / inline log_scale / nothing)."""

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size,
                       output_size, params_dtype, **extra_weight_attrs):
        weight_loader = extra_weight_attrs.pop("weight_loader")
        out_pp = sum(output_partition_sizes)
        self._plan(layer, input_size, output_size, input_size_per_partition, out_pp, params_dtype)
        # Loaded in the checkpoint's own dtype (normally bf16), so that the grid check sees the stored
        # values even when the model runs in another dtype; cast to params_dtype only for the fallback.
        stored = getattr(torch, self.qcfg.weight_dtype or "", None) or params_dtype
        weight = ModelWeightParameter(
            data=torch.empty(out_pp, input_size_per_partition, dtype=stored),
            input_dim=1, output_dim=0, weight_loader=weight_loader)
        layer.register_parameter("weight", weight)
        set_weight_attrs(weight, extra_weight_attrs)
        if self.qcfg.fmt != FORMAT_QAT_GRID:
            # NaN until loaded: a log-scale that never arrives fails verification by name.
            log_scale = GroupQuantScaleParameter(
                data=torch.full((out_pp, self.geo.groups_pp), float("nan"), dtype=torch.float32),
                input_dim=1, output_dim=0,
                weight_loader=_reshaping_loader(weight_loader, input_size // self.geo.group))
            layer.register_parameter("log_scale", log_scale)

    def _load_sidecar_log_scales(self, layer) -> None:
        ckpt = self.qcfg.checkpoint()
        param = layer.log_scale
        for hf_name, shard_id in zip(self.hf_names, _shard_ids(layer, self.hf_names)):
            steps = ckpt.scales(hf_name)      # validates length, finiteness, range; names file + module
            log_scale = ckpt.log_scale(hf_name).to(torch.float32).reshape(steps.shape)
            args = () if shard_id is None else (shard_id,)
            param.weight_loader(param, log_scale.to(param.device), *args)

    def process_weights_after_loading(self, layer) -> None:
        if getattr(layer, "_grace_qat_done", False):
            return
        weight = layer.weight.data
        g = self.geo
        if self.kernel_cls is None and self.qcfg.fmt == FORMAT_QAT_GRID:
            # No stored steps, and the fallback needs none: the loaded weight is the exact W_dq.
            return self._finish_unquantized(layer)
        if self.qcfg.fmt == FORMAT_QAT_GRID:
            try:
                scales = derive_scales(weight, self.bits, g.group, name=layer.prefix,
                                       inferred=getattr(self.qcfg, "bits_inferred", False))
            except GraceFormatError as e:
                raise GraceFormatError(f"{self._where()}: {e}") from None
        else:
            if self.qcfg.fmt == FORMAT_QAT_SIDECAR:
                self._load_sidecar_log_scales(layer)
            try:
                # exp() on the CPU, as `grace-qat convert` does: CUDA's fp32 exp can differ by an ulp,
                # which now and then flips the bf16 step and breaks equality with converted checkpoints.
                scales = scales_from_log_scale(layer.log_scale.data.cpu(), g.out_pp, g.in_pp, g.group,
                                               name=f"{layer.prefix} ({' + '.join(self.hf_names)})")
            except GraceFormatError as e:
                raise GraceFormatError(f"{self._where()}: {e}") from None
            scales = scales.to(weight.device)
            del layer.log_scale
        codes = torch.empty(g.out_pp, g.in_pp, device=weight.device,
                            dtype=torch.int8 if self.bits == 4 else torch.int16)
        self._codes(layer, weight, scales, codes)
        if self.kernel_cls is None:
            return self._finish_unquantized(layer)   # the verified weight, as loaded
        del layer.weight, weight
        self._attach_kernel(layer, codes, scales)
        self._finish(layer)


@register_weight_loader_v2_supported_method
class GraceAWQLinearMethod(_GraceLinearMethod):
    """Format B: AutoAWQ GEMM tensors (qweight/qzeros/scales), zero point 8 = symmetric uint4b8."""

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size,
                       output_size, params_dtype, **extra_weight_attrs):
        weight_loader = extra_weight_attrs.pop("weight_loader")
        out_pp = sum(output_partition_sizes)
        if self.bits != 4:
            raise GraceFormatError(f"{self._where()}: AWQ-packed GRACE checkpoints are 4-bit, got {self.bits}")
        if out_pp % 8:
            raise ValueError(f"grace_qat: layer {layer.prefix}: {out_pp} output channels on this rank are not "
                             f"a multiple of 8, which AWQ packing needs")
        self._plan(layer, input_size, output_size, input_size_per_partition, out_pp, params_dtype)
        groups = self.geo.groups_pp
        packed = dict(input_dim=0, output_dim=1, packed_dim=1, packed_factor=8, weight_loader=weight_loader)
        layer.register_parameter("qweight", PackedvLLMParameter(
            data=torch.empty(input_size_per_partition, out_pp // 8, dtype=torch.int32), **packed))
        layer.register_parameter("qzeros", PackedvLLMParameter(
            data=torch.empty(groups, out_pp // 8, dtype=torch.int32), **packed))
        # fp32 holds the checkpoint's fp16 steps exactly; cast to the activation dtype for the kernel.
        layer.register_parameter("scales", GroupQuantScaleParameter(
            data=torch.full((groups, out_pp), float("nan"), dtype=torch.float32),
            input_dim=0, output_dim=1, weight_loader=weight_loader))
        for name in ("qweight", "qzeros", "scales"):
            set_weight_attrs(getattr(layer, name), extra_weight_attrs)

    def process_weights_after_loading(self, layer) -> None:
        if getattr(layer, "_grace_qat_done", False):
            return
        g = self.geo
        where = f"{self._where()}: vLLM layer {layer.prefix} ({' + '.join(self.hf_names)})"
        scales_in = layer.scales.data
        if not bool(torch.isfinite(scales_in).all()) or not bool((scales_in > 0).all()):
            raise GraceFormatError(f"{where}: scales must be finite and > 0 (missing from the checkpoint?)")
        codes = torch.empty(g.out_pp, g.in_pp, dtype=torch.int8, device=scales_in.device)
        rows = max(g.group, (_ROWS_PER_CHUNK_ELEMENTS // max(1, g.out_pp)) // g.group * g.group)
        for i0 in range(0, g.in_pp, rows):           # whole groups of input rows at a time
            i1 = min(g.in_pp, i0 + rows)
            try:
                c, _ = unpack_awq(layer.qweight.data[i0:i1], layer.qzeros.data[i0 // g.group:i1 // g.group],
                                  scales_in[i0 // g.group:i1 // g.group], name=layer.prefix)
            except GraceFormatError as e:
                raise GraceFormatError(f"{where}: {e}") from None
            codes[:, i0:i1] = c
        scales = scales_in.t().contiguous()            # (out, in/G) fp32 (= the fp16 steps)
        for name in ("qweight", "qzeros", "scales"):
            delattr(layer, name)
        if self.kernel_cls is None:
            # bf16/fp16 dequantized in fp32 from the fp16 steps (what `grace-qat convert --to bf16` writes)
            weight = ModelWeightParameter(data=dequantize(codes, scales, g.group, self.act_dtype),
                                          input_dim=1, output_dim=0, weight_loader=_no_reload)
            layer.register_parameter("weight", weight)
            return self._finish_unquantized(layer)
        self._attach_kernel(layer, codes, scales)
        self._finish(layer)
