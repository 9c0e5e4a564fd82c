"""Linear method for the grid formats: BF16 grid weights + per-group steps -> GPTQ layout -> SGLang's
GPTQ-Marlin. SGLang plumbing only, the same as grace_vllm's: the tensors (``Format.rank_tensors``),
the codes and steps (``Format.rank_codes``) and the tensor-parallel rules
(``grace_qat.tensor_parallel``) come from the core.

Loading (``create_weights``): the layer gets the tensors the checkpoint's format lists for one rank
(the weight (out_pp, in_pp) in the checkpoint's dtype, and its log-steps (out_pp, in_pp/G) fp32
where the format stores them), each with SGLang's v1 parallel-linear loader
(``input_dim``/``output_dim``, as unquantized layers have), so the column / merged / QKV loaders
(output rows, KV-head replication) and the row-parallel loader (input columns, whole groups) shard
them. Tensors the weight stream carries (weight, inline log-steps) arrive through the model's
``load_weights``; a thin wrapper records which checkpoint modules arrived. Tensors it does not carry
(the sidecar's log-steps) are fed after loading through the same loader per checkpoint module and
shard id (``grace_qat.tensor_parallel.checkpoint_feeds``). A TP size that splits a group is refused in
``create_weights`` with a message.

After loading (``process_weights_after_loading``): ``Format.rank_codes`` turns what this rank holds
into verified codes and fp32 steps (any off-grid value is an error, never a silent approximation;
steps derived from the grid for a format that stores none), packed into the GPTQ layout
(``grace_qat.packing.pack_gptq``: uint4b8 / uint8b128 along the input dim; steps cast to the
activation dtype, exactly what ``grace-qat convert --to gptq`` writes); the loaded tensors are
dropped, and SGLang's own ``GPTQMarlinLinearKernel`` (the kernel object behind
``GPTQMarlinLinearMethod``) repacks them (``gptq_marlin_repack``, ``marlin_permute_scales``) and
later runs ``apply_gptq_marlin_linear``: on the same weights, the layer runs what stock SGLang runs.
``GRACE_QAT_SGLANG_KERNEL=humming`` (or a kernel table's ``engine_default``) hands them to SGLang's
Humming method instead, as stock SGLang's ``--quantization humming`` does for a GPTQ checkpoint.

A second kernel for small batches (grace_qat's own, ``grace_qat.kernels.own``) with its own copy of
the codes is kept only where a kernel table measured on this device and SGLang version says it beats
the engine kernel for the layer's shape (``grace_qat.kernels.table``; ``benchmarks/kernel_crossover.py --engine
sglang``); the layer then runs the two-kernel custom op (``grace_qat.kernels.mixed_mm``).
``GRACE_QAT_DUAL_KERNEL=0`` keeps one copy everywhere.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from torch.nn import Parameter
from sglang.srt.layers.linear import MergedColumnParallelLinear, QKVParallelLinear
from sglang.srt.layers.parameter import GroupQuantScaleParameter, PackedvLLMParameter
from sglang.srt.layers.quantization.base_config import LinearMethodBase

from grace_qat import formats, settings, tensor_parallel
from grace_qat.errors import GraceFormatError
from grace_qat.kernels import table as kernel_table
from grace_qat.kernels.mixed_mm import KernelDispatch
from grace_qat.kernels.own import OWN_KERNELS
from grace_qat.packing import pack_compressed_tensors, pack_factor, pack_gptq

logger = logging.getLogger(__name__)

ENGINE = "sglang"
MARLIN = "GPTQMarlinLinearKernel"     # what stock SGLang runs GPTQ layers with on CUDA, by default
HUMMING = "HummingLinearMethod"       # ... and with --quantization humming (SGLang 0.5.23 ships humming-kernels)
KERNEL_NAMES = {"marlin": MARLIN, "humming": HUMMING}    # GRACE_QAT_SGLANG_KERNEL's values
_warned_fp16_scales = False
_announced: set[tuple] = set()


def new_marlin_kernel(layer: torch.nn.Module, quant_type, group: int, full: tuple[int, int],
                      part: tuple[int, int], act_dtype: torch.dtype):
    """SGLang's GPTQ-Marlin kernel for a layer holding GPTQ ``qweight``/``scales`` (repacked now), as
    stock SGLang's GPTQMarlinLinearMethod makes it; shapes are (in, out), full and on this rank."""
    import sglang.srt.layers.quantization  # noqa: F401  (gptq_kernels has an import cycle otherwise)
    from sglang.srt.hardware_backend.gpu.quantization.gptq_kernels import (
        GPTQMarlinLinearKernel, MarlinLinearLayerConfig)
    from sglang.srt.layers.quantization.marlin_utils import verify_marlin_supported

    verify_marlin_supported(quant_type=quant_type, group_size=group)
    kernel = GPTQMarlinLinearKernel(None)     # the config is read only by the MoE kernel
    kernel.kernel_config = MarlinLinearLayerConfig(
        full_weight_shape=full, partition_weight_shape=part, weight_type=quant_type, act_type=act_dtype,
        group_size=group, zero_points=False, has_g_idx=False)
    kernel.process_weights_after_loading(layer)
    return kernel


def gptq_parameters(layer: torch.nn.Module, qweight: torch.Tensor, scales: torch.Tensor, bits: int) -> None:
    """GPTQ ``qweight`` (in/pf, out) int32 and ``scales`` (groups, out) on ``layer``, as SGLang's GPTQ
    layers register them (Marlin's repack reads their dims); they cannot be reloaded."""
    layer.register_parameter("qweight", PackedvLLMParameter(
        data=qweight, input_dim=0, output_dim=1, packed_dim=0, packed_factor=pack_factor(bits),
        weight_loader=_refuse_loading))
    layer.register_parameter("scales", GroupQuantScaleParameter(
        data=scales, input_dim=0, output_dim=1, weight_loader=_refuse_loading))


def new_humming_kernel(layer: torch.nn.Module, bits: int, group: int, full: tuple[int, int],
                       part_in: int, output_partition_sizes: list[int], act_dtype: torch.dtype):
    """SGLang's Humming method for a layer holding GPTQ ``qweight``/``scales``, as stock SGLang's
    ``--quantization humming`` makes it for a symmetric GPTQ checkpoint without act order: its
    parameters, filled with those tensors instead of a checkpoint's, then its own conversion and
    repack. ``full``: (in, out)."""
    from sglang.srt.layers.quantization.humming import HummingLayerQuantizationConfig, HummingLinearMethod

    gptq = {name: getattr(layer, name).data for name in ("qweight", "scales")}
    method = HummingLinearMethod(HummingLayerQuantizationConfig.from_config(
        {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False, "sym": True}))
    # stock SGLang creates these while it builds the model, under the model's device
    with torch.device(gptq["qweight"].device):
        method.create_weights(layer, part_in, list(output_partition_sizes), full[0], full[1], act_dtype,
                              weight_loader=_refuse_loading)
        for name, data in gptq.items():
            getattr(layer, name).data = data
        method.process_weights_after_loading(layer)
    return method


class EngineKernel:
    """One of SGLang's kernels for a layer (``name``: MARLIN or HUMMING), called as the two-kernel op
    calls kernels."""

    def __init__(self, name: str, kernel):
        self.name, self.kernel = name, kernel

    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None):
        return self.kernel.apply(layer, x, bias)


def engine_kernel(bits: int) -> tuple[str, str]:
    """(the SGLang kernel ``bits``-bit layers run, why): ``GRACE_QAT_SGLANG_KERNEL`` where set (the
    user's choice, as ``--quantization humming`` is for stock SGLang); else the kernel table's
    ``engine_default`` where one of this device and SGLang version measured stock SGLang faster with
    Humming at every batch for that width (off with GRACE_QAT_DUAL_KERNEL=0); else Marlin, stock
    SGLang's default."""
    chosen = settings.sglang_kernel()
    if chosen:
        return KERNEL_NAMES[chosen], f"{settings.SGLANG_KERNEL}={chosen}"
    if kernel_table.second_kernels_allowed(logger):
        import sglang
        pick = kernel_table.engine_default(ENGINE, sglang.__version__, MARLIN, bits=bits) or {}
        if pick.get("use") == HUMMING:
            return HUMMING, f"{HUMMING} instead of {MARLIN}: {pick.get('measured', 'measured')}"
    return MARLIN, "stock SGLang's kernel for GPTQ"


def second_kernel_class(name: str) -> Optional[type]:
    """The class of a kernel a layer can keep as its second copy here, or None: grace_qat's own kernels
    only (the adapter builds SGLang's Marlin or Humming once per layer, on the layer's own parameters)."""
    return OWN_KERNELS.get(name)


def small_m_partner(large: str, bits: int, group: int, n: int, k: int, act_type: torch.dtype
                    ) -> tuple[Optional[type], kernel_table.Plan]:
    """(grace_qat kernel class, plan) for a layer of shape (n, k) on this rank next to ``large`` (the
    SGLang kernel it runs), where the kernel table of this device and SGLang version has one; (None,
    plan saying why) otherwise."""
    if not kernel_table.second_kernels_allowed(logger):
        return None, kernel_table.Plan(None, 0, f"{settings.DUAL_KERNEL}=0: one copy, {large}")
    import sglang
    p = kernel_table.plan(kernel_table.device_name(), ENGINE, sglang.__version__, large, bits, group,
                          n, k, extra=settings.crossover_file())
    return kernel_table.partner(p, large, second_kernel_class, lambda cls: cls.can_run(bits, group, k, act_type))


def _set_attrs(param: torch.Tensor, attrs: dict) -> None:
    for k, v in attrs.items():
        setattr(param, k, v)


def _refuse_loading(param, loaded_weight, *args, **kwargs):
    raise RuntimeError("grace_qat: packed Marlin tensors cannot be reloaded from a checkpoint; "
                       "restart the engine to load new weights")


class GraceQATLinearMethod(LinearMethodBase):
    """One instance per quantized SGLang linear layer (``GraceQATConfig.get_quant_method``)."""

    def __init__(self, config, prefix: str, names: list[str]):
        self.config = config
        self.prefix = prefix
        self.names = list(names)           # checkpoint modules in shard order
        self.kernel = None
        self.dispatch: Optional[KernelDispatch] = None   # two kernels: the custom-op route
        self.tensors = []                  # the format's RankTensors of this layer on this rank
        self._loaded: set[tuple[str, str]] = set()   # (leaf, checkpoint module) the stream delivered
        self._fed = False

    # -- shapes -------------------------------------------------------------------------------

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        ckpt = self.config.checkpoint()
        base_loader = extra_weight_attrs.get("weight_loader")
        if base_loader is None:
            raise RuntimeError(f"grace_qat: {self.prefix}: SGLang passed no weight_loader")
        shapes = [ckpt.module_shape(n) for n in self.names]
        if any(s[1] != input_size for s in shapes):
            raise GraceFormatError(f"{ckpt.path}: {self.names} have in_features "
                                   f"{[s[1] for s in shapes]}, SGLang's {self.prefix} expects {input_size}")
        n, k = sum(output_partition_sizes), input_size_per_partition
        geo = tensor_parallel.Geometry.of(self.prefix, input_size, output_size, k, n, ckpt.group_size)
        g = geo.group
        self.marlin_group = geo.kernel_group
        from sglang.srt.layers.quantization.marlin_utils import verify_marlin_supports_shape
        try:
            verify_marlin_supports_shape(n, k, input_size, self.marlin_group
                                         if self.marlin_group != -1 else input_size)
        except ValueError as e:
            raise GraceFormatError(f"grace_qat: {self.prefix}: Marlin cannot run this layer "
                                   f"(out {n}, in {k} per rank): {e}") from None
        self.group = g
        self.in_pp, self.out_pp = k, n
        self.output_partition_sizes = list(output_partition_sizes)
        self.input_size, self.output_size = input_size, output_size
        self.params_dtype = params_dtype
        self.bits, self.bits_inferred = ckpt.bits, ckpt.bits_inferred
        staging = ckpt.weight_dtype()

        self.tensors = formats.get(ckpt.format).rank_tensors(n, k, geo.groups_pp, staging)
        for t in self.tensors:
            loader = tensor_parallel.loader_for(t, base_loader, input_size // g)
            if t.source == "stream":
                loader = self._recording_loader(t.leaf, loader)
            param = Parameter(t.blank(), requires_grad=False)   # grid formats: nothing packed (t.packed == 1)
            _set_attrs(param, {"input_dim": 1 - t.output_dim, "output_dim": t.output_dim,
                               "weight_loader": loader})
            layer.register_parameter(t.leaf, param)

    # -- loading ------------------------------------------------------------------------------

    def _names_for_shard(self, shard_id) -> list[str]:
        if shard_id is None:
            return self.names
        idx = tensor_parallel.shard_index(shard_id, len(self.names))
        if idx is None:
            raise GraceFormatError(f"grace_qat: {self.prefix}: unexpected shard id {shard_id!r} "
                                   f"for modules {self.names}")
        return [self.names[idx]]

    def _recording_loader(self, leaf: str, loader: Callable) -> Callable:
        """SGLang's loader, noting which checkpoint modules' ``leaf`` arrived (for the error below)."""
        def load_and_record(param, loaded_weight, loaded_shard_id=None):
            if isinstance(loaded_shard_id, tuple):
                raise GraceFormatError(f"grace_qat: {self.prefix}: multi-index shard ids are not "
                                       f"supported (got {loaded_shard_id!r})")
            names = self._names_for_shard(loaded_shard_id)
            if leaf == "weight":   # SGLang hands the whole module's tensor; its loader only asserts
                ckpt = self.config.checkpoint()
                shapes = [ckpt.module_shape(m) for m in names]
                want = (sum(s[0] for s in shapes), shapes[0][1])
                if tuple(loaded_weight.shape) != want:
                    raise GraceFormatError(f"{ckpt.path}: the weight loaded for {' + '.join(names)} has "
                                           f"shape {tuple(loaded_weight.shape)}, the checkpoint says {want}")
            loader(param, loaded_weight, *(() if loaded_shard_id is None else (loaded_shard_id,)))
            self._loaded.update((leaf, m) for m in names)
        return load_and_record

    def feed_from_checkpoint(self, layer: torch.nn.Module) -> None:
        """Tensors the weight stream does not carry (the sidecar's log-steps), per checkpoint module
        and shard id through the same loader; once."""
        if self._fed:
            return
        shards = tensor_parallel.module_shards(self.prefix, type(layer).__name__, self.names,
                                      qkv=isinstance(layer, QKVParallelLinear),
                                      merged=isinstance(layer, MergedColumnParallelLinear))
        ckpt = self.config.checkpoint()
        try:
            with torch.device(getattr(layer, self.tensors[0].leaf).device):
                for leaf, full, args in tensor_parallel.checkpoint_feeds(ckpt, self.tensors, shards):
                    param = getattr(layer, leaf)
                    tensor_parallel.feed_loader(param)(param, full.to(param.device), *args)
        except GraceFormatError as e:        # names the file and tensor already
            raise GraceFormatError(f"grace_qat: {self.prefix}: {e}") from None
        self._fed = True

    # -- after loading ------------------------------------------------------------------------

    def pack_gptq_layout(self, layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """What this rank loaded -> verified codes and fp32 steps -> GPTQ ``qweight``/``scales`` on
        the layer. Runs on any device (the CPU tests call it directly). Drops the loaded tensors;
        returns the (codes, steps) it packed.
        """
        for t in self.tensors:
            missing = [m for m in self.names if (t.leaf, m) not in self._loaded]
            if t.source == "stream" and missing:
                raise GraceFormatError(f"grace_qat: {self.prefix}: no {t.leaf} was loaded for {missing}; "
                                       f"the checkpoint and the model's layer names do not match")
        ckpt = self.config.checkpoint()
        self.feed_from_checkpoint(layer)
        loaded = {t.leaf: getattr(layer, t.leaf).data for t in self.tensors}
        device = next(iter(loaded.values())).device
        label = self.names[0] if len(self.names) == 1 else f"{self.prefix} ({', '.join(self.names)})"
        # grace_qat's helpers create small tensors (bit shifts, ...) with factory functions:
        # make them land on the weight's device (the GPU when SGLang serves), whatever the default.
        with torch.device(device):
            try:
                codes, steps = formats.get(ckpt.format).rank_codes(loaded, self.bits, self.group, name=label,
                                                    inferred=getattr(self, "bits_inferred", False))
            except GraceFormatError as e:
                raise GraceFormatError(f"{ckpt.path}: SGLang layer {self.prefix} on this rank: {e}") from None
            packed = pack_gptq(codes, steps, self.bits, self.group, scale_dtype=self.params_dtype)
        self._check_scale_dtype(steps, packed["scales"])
        del loaded
        for t in self.tensors:
            delattr(layer, t.leaf)
        gptq_parameters(layer, packed["qweight"].to(device), packed["scales"].to(device), self.bits)
        return codes, steps

    def _check_scale_dtype(self, steps: torch.Tensor, cast: torch.Tensor) -> None:
        global _warned_fp16_scales
        if self.params_dtype == torch.float16 and not _warned_fp16_scales:
            tiny = steps.abs() < torch.finfo(torch.float16).tiny
            if bool(tiny.any()):
                _warned_fp16_scales = True
                logger.warning("grace_qat: %s: %d steps are below fp16's normal range and lose "
                               "precision when cast to the fp16 activation dtype", self.prefix,
                               int(tiny.sum()))

    def setup_kernel(self, layer: torch.nn.Module) -> None:
        """Hand the GPTQ tensors to the SGLang kernel ``engine_kernel`` names (Marlin: repack + scale
        permutation; Humming: its conversion and repack). CUDA only."""
        name, why = engine_kernel(self.bits)
        if name == HUMMING:
            kernel = new_humming_kernel(layer, self.bits, self.group, (self.input_size, self.output_size),
                                        self.in_pp, self.output_partition_sizes, self.params_dtype)
        else:
            kernel = new_marlin_kernel(layer, self.config.quant_type, self.marlin_group,
                                       (self.input_size, self.output_size), (self.in_pp, self.out_pp),
                                       self.params_dtype)
        self.kernel = EngineKernel(name, kernel)
        key = (name, self.bits, self.group, self.params_dtype)
        if key not in _announced:
            _announced.add(key)
            logger.info("grace_qat: using SGLang's %s for W%d g%d (%s activations, %s; %s)", name, self.bits,
                        self.group, str(self.params_dtype).split(".")[-1], self.config.quant_type, why)

    def keep_small_m_kernel(self, layer: torch.nn.Module, codes: torch.Tensor, steps: torch.Tensor,
                            bias: Optional[torch.Tensor]) -> None:
        """Where this device's kernel table says so, a second kernel of grace_qat's own with its copy
        of ``codes``/``steps`` (what ``pack_gptq_layout`` packed) and of ``bias`` (as it was before
        the engine kernel's set-up, which may convert the layer's) for small token counts; else nothing."""
        g, large = self.marlin_group, self.kernel.name
        cls, plan = small_m_partner(large, self.bits, g, self.out_pp, self.in_pp, self.params_dtype)
        shape = (self.bits, g, self.out_pp, self.in_pp, cls)
        if cls is None:
            if shape not in _announced:
                _announced.add(shape)
                logger.info("grace_qat: W%d g%d %dx%d layers: one packed copy (%s)", self.bits, self.group,
                            self.out_pp, self.in_pp, plan.reason)
            return
        holder = torch.nn.Module()
        holder.bias = None if bias is None else Parameter(bias, requires_grad=False)   # the op passes it
        ct = pack_compressed_tensors(codes, steps, self.bits, scale_dtype=self.params_dtype)
        small = cls.attach(holder, ct["weight_packed"].to(codes.device), ct["weight_scale"].to(codes.device),
                           self.bits, g, plan.configs)
        setattr(layer, KernelDispatch.HOLDER, holder)
        self.dispatch = KernelDispatch(layer, self.kernel, self.out_pp, small, plan.max_m)
        if shape not in _announced:
            _announced.add(shape)
            logger.info("grace_qat: W%d g%d %dx%d layers: %s for <= %d tokens, %s above (%s); second "
                        "packed copy kept (%s=0 keeps one)", self.bits, self.group, self.out_pp, self.in_pp,
                        cls.__name__, plan.max_m, large, plan.reason, settings.DUAL_KERNEL)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if self.kernel is not None:
            return
        codes = steps = None
        if "qweight" not in layer._parameters:
            codes, steps = self.pack_gptq_layout(layer)
            self.config.layer_done()        # this layer reads the checkpoint no more
        bias = getattr(layer, "bias", None)
        bias = None if bias is None else bias.data.clone()
        self.setup_kernel(layer)
        if codes is not None:
            self.keep_small_m_kernel(layer, codes, steps, bias)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.dispatch is not None:
            return self.dispatch.apply(layer, x, bias)
        if self.kernel is None:
            raise RuntimeError(f"grace_qat: {self.prefix}: weights were not processed after loading")
        return self.kernel.apply_weights(layer, x, bias)


__all__ = ["GraceQATLinearMethod"]
