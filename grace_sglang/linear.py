"""Linear method for the grid formats: BF16 grid weights + per-group steps -> GPTQ layout -> SGLang's
GPTQ-Marlin. SGLang plumbing only: the steps (``GraceCheckpoint.module_steps``), the codes
(``Format.rank_codes``) and the layer rules (``grace_qat.layers``) come from the core.

Loading (``create_weights``): the layer gets a staging ``weight`` (out_pp, in_pp) in the
checkpoint's dtype and a staging ``grace_scales`` (out_pp, in_pp/G) fp32, both with SGLang's v1
parallel-linear loader (``input_dim=1, output_dim=0``, as unquantized layers have). The model's
``load_weights`` pushes each checkpoint weight through ``weight``'s loader, which this module wraps:
after the weight shard is stored, the steps of the same checkpoint module (stored, or derived from
the grid for a format that stores none), shaped (out, in/G), go
through the *same* loader with the *same* shard id into ``grace_scales``. Scale rows are weight rows
and scale columns are groups of weight columns, so the column / merged / QKV loaders (output rows,
KV-head replication) and the row-parallel loader (input columns, ``shard = param.shape[1]``) shard
the steps exactly like the weight, provided a rank's input slice holds whole groups; a TP size that
splits a group is refused in ``create_weights`` with a message.

After loading (``process_weights_after_loading``): codes are recovered from each rank's shard and
verified against the stored weight (``Format.rank_codes``: any off-grid value is an
error, never a silent approximation), packed into the GPTQ layout (``grace_qat.packing.pack_gptq``:
uint4b8 / uint8b128 along the input dim; steps cast to the activation dtype, exactly what
``grace-qat convert --to gptq`` writes), the BF16 staging tensors are dropped, and SGLang's own
``GPTQMarlinLinearKernel`` (the kernel object behind ``GPTQMarlinLinearMethod``) repacks them
(``gptq_marlin_repack``, ``marlin_permute_scales``) and later runs ``apply_gptq_marlin_linear``.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from torch.nn import Parameter
from sglang.srt.layers.quantization.base_config import LinearMethodBase

from grace_qat import layers
from grace_qat.errors import GraceFormatError
from grace_qat.packing import pack_factor, pack_gptq

logger = logging.getLogger(__name__)

_warned_fp16_scales = False


def _set_attrs(param: torch.Tensor, attrs: dict) -> None:
    for k, v in attrs.items():
        setattr(param, k, v)


def _refuse_loading(param, loaded_weight, *args, **kwargs):
    raise RuntimeError("grace_qat: packed Marlin tensors cannot be reloaded from a checkpoint; "
                       "restart the engine to load new weights")


def _ignore_loading(param, loaded_weight, *args, **kwargs):
    """Sink for ``<module>.log_scale`` tensors found in the weight stream (qat-inline exports).

    The steps are read through ``GraceCheckpoint`` when the module's weight arrives; registering
    this parameter only keeps the models' ``load_weights`` from failing on an unknown name
    (SGLang 0.5.17's Qwen3-VL raises KeyError for unknown fused names).
    """
    return None


class GraceQATLinearMethod(LinearMethodBase):
    """One instance per quantized SGLang linear layer (``GraceQATConfig.get_quant_method``)."""

    def __init__(self, config, prefix: str, names: list[str]):
        self.config = config
        self.prefix = prefix
        self.names = list(names)           # checkpoint modules in shard order
        self.kernel = None
        self._loaded: set[str] = set()

    # -- shapes -------------------------------------------------------------------------------

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        ckpt = self.config.checkpoint
        base_loader = extra_weight_attrs.get("weight_loader")
        if base_loader is None:
            raise RuntimeError(f"grace_qat: {self.prefix}: SGLang passed no weight_loader")
        shapes = [ckpt.module_shape(n) for n in self.names]
        if any(s[1] != input_size for s in shapes):
            raise GraceFormatError(f"{ckpt.path}: {self.names} have in_features "
                                   f"{[s[1] for s in shapes]}, SGLang's {self.prefix} expects {input_size}")
        n, k = sum(output_partition_sizes), input_size_per_partition
        geo = layers.Geometry.of(self.prefix, input_size, output_size, k, n, ckpt.group_size)
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
        self.input_size, self.output_size = input_size, output_size
        self.params_dtype = params_dtype
        self.bits, self.bits_inferred = ckpt.bits, ckpt.bits_inferred
        staging = ckpt.kind.weight_dtype(ckpt)

        weight = Parameter(torch.empty(n, k, dtype=staging), requires_grad=False)
        _set_attrs(weight, {"input_dim": 1, "output_dim": 0,
                            "weight_loader": self._make_loader(layer, base_loader)})
        layer.register_parameter("weight", weight)
        scales = Parameter(torch.empty(n, k // g, dtype=torch.float32), requires_grad=False)
        _set_attrs(scales, {"input_dim": 1, "output_dim": 0, "weight_loader": base_loader})
        layer.register_parameter("grace_scales", scales)
        streamed = {t.leaf for t in ckpt.kind.rank_tensors(n, k, geo.groups_pp, staging)
                    if t.source == "stream"} - {"weight"}
        for leaf in sorted(streamed):    # e.g. inline log-steps: the steps come with the weight below
            sink = Parameter(torch.empty(0), requires_grad=False)
            _set_attrs(sink, {"weight_loader": _ignore_loading})
            layer.register_parameter(leaf, sink)

    # -- loading ------------------------------------------------------------------------------

    def _names_for_shard(self, shard_id) -> list[str]:
        if shard_id is None:
            return self.names
        idx = layers.shard_index(shard_id, len(self.names))
        if idx is None:
            raise GraceFormatError(f"grace_qat: {self.prefix}: unexpected shard id {shard_id!r} "
                                   f"for modules {self.names}")
        return [self.names[idx]]

    def _steps(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """fp32 steps (out, in/G) of one checkpoint module whose full weight is ``weight``."""
        try:
            return self.config.checkpoint.module_steps(name, weight)
        except GraceFormatError as e:
            raise GraceFormatError(f"grace_qat: {self.prefix}: {e}") from None

    def _make_loader(self, layer: torch.nn.Module, base_loader: Callable) -> Callable:
        def load_weight_and_steps(param, loaded_weight, loaded_shard_id=None):
            if isinstance(loaded_shard_id, tuple):
                raise GraceFormatError(f"grace_qat: {self.prefix}: multi-index shard ids are not "
                                       f"supported (got {loaded_shard_id!r})")
            shard_args = () if loaded_shard_id is None else (loaded_shard_id,)
            base_loader(param, loaded_weight, *shard_args)
            names = self._names_for_shard(loaded_shard_id)
            with torch.device(loaded_weight.device):
                if len(names) == 1:
                    steps = self._steps(names[0], loaded_weight)
                else:   # a checkpoint that stores the fused tensor: split its rows per module
                    rows = [self.config.checkpoint.module_shape(m)[0] for m in names]
                    parts = torch.split(loaded_weight, rows, dim=0)
                    steps = torch.cat([self._steps(m, w) for m, w in zip(names, parts, strict=True)], dim=0)
            base_loader(layer.grace_scales, steps, *shard_args)
            self._loaded.update(names)
        return load_weight_and_steps

    # -- after loading ------------------------------------------------------------------------

    def pack_gptq_layout(self, layer: torch.nn.Module) -> None:
        """Staging BF16 + fp32 steps -> verified codes -> GPTQ ``qweight``/``scales`` on the layer.

        Runs on any device (the CPU tests call it directly). Drops the staging tensors.
        """
        missing = [m for m in self.names if m not in self._loaded]
        if missing:
            raise GraceFormatError(f"grace_qat: {self.prefix}: no weight was loaded for {missing}; "
                                   f"the checkpoint and the model's layer names do not match")
        from sglang.srt.layers.parameter import GroupQuantScaleParameter, PackedvLLMParameter

        weight = layer.weight.data
        steps = layer.grace_scales.data
        label = self.names[0] if len(self.names) == 1 else f"{self.prefix} ({', '.join(self.names)})"
        # grace_qat's helpers create small tensors (bit shifts, ...) with factory functions:
        # make them land on the weight's device (the GPU when SGLang serves), whatever the default.
        with torch.device(weight.device):
            codes, _ = self.config.checkpoint.kind.rank_codes(
                {"weight": weight, "steps": steps}, self.bits, self.group, name=label,
                inferred=getattr(self, "bits_inferred", False))
            packed = pack_gptq(codes, steps, self.bits, self.group, scale_dtype=self.params_dtype)
        self._check_scale_dtype(steps, packed["scales"])
        del codes
        for name in ("weight", "grace_scales", "log_scale"):
            if name in layer._parameters:
                delattr(layer, name)
        qweight = PackedvLLMParameter(data=packed["qweight"].to(weight.device), input_dim=0,
                                      output_dim=1, packed_dim=0, packed_factor=pack_factor(self.bits),
                                      weight_loader=_refuse_loading)
        scales = GroupQuantScaleParameter(data=packed["scales"].to(weight.device), input_dim=0,
                                          output_dim=1, weight_loader=_refuse_loading)
        layer.register_parameter("qweight", qweight)
        layer.register_parameter("scales", scales)

    def _check_scale_dtype(self, steps: torch.Tensor, cast: torch.Tensor) -> None:
        global _warned_fp16_scales
        if self.params_dtype == torch.float16 and not _warned_fp16_scales:
            tiny = steps.abs() < torch.finfo(torch.float16).tiny
            if bool(tiny.any()):
                _warned_fp16_scales = True
                logger.warning("grace_qat: %s: %d steps are below fp16's normal range and lose "
                               "precision when cast to the fp16 activation dtype", self.prefix,
                               int(tiny.sum()))

    def setup_marlin(self, layer: torch.nn.Module) -> None:
        """Hand the GPTQ tensors to SGLang's GPTQ-Marlin kernel (repack + scale permutation). CUDA only."""
        import sglang.srt.layers.quantization  # noqa: F401  (gptq_kernels has an import cycle otherwise)
        from sglang.srt.hardware_backend.gpu.quantization.gptq_kernels import (
            GPTQMarlinLinearKernel, MarlinLinearLayerConfig)
        from sglang.srt.layers.quantization.marlin_utils import verify_marlin_supported

        verify_marlin_supported(quant_type=self.config.quant_type, group_size=self.marlin_group)
        kernel = GPTQMarlinLinearKernel(self.config)
        kernel.kernel_config = MarlinLinearLayerConfig(
            full_weight_shape=(self.input_size, self.output_size),
            partition_weight_shape=(self.in_pp, self.out_pp),
            weight_type=self.config.quant_type,
            act_type=self.params_dtype,
            group_size=self.marlin_group,
            zero_points=False,
            has_g_idx=False,
        )
        kernel.process_weights_after_loading(layer)
        self.kernel = kernel
        (logger.info if ".layers.0." in f".{self.prefix}" else logger.debug)("grace_qat: %s runs SGLang's %s (%s)", self.prefix, type(kernel).__name__, self.config.quant_type)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if self.kernel is not None:
            return
        if "qweight" not in layer._parameters:
            self.pack_gptq_layout(layer)
        self.setup_marlin(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.kernel is None:
            raise RuntimeError(f"grace_qat: {self.prefix}: weights were not processed after loading")
        return self.kernel.apply(layer, x, bias)


__all__ = ["GraceQATLinearMethod"]
