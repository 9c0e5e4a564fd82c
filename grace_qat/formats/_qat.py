"""What the three QAT formats share: BF16 weights that lie on the quantization grid, one step per
group either stored (log-steps in the sidecar or inline) or derived from the grid."""
from __future__ import annotations

import os
from dataclasses import replace

import torch

from ..errors import GraceFormatError
from ..architectures import check_architecture
from ..files import CONFIG_NAME, QUANT_METHOD, SAFETENSORS_DTYPES
from ..quantizer import code_range, derive_scales, effective_group_size, recover_codes, scales_from_log_scale
from .base import Format, Opening, QuantizedLinear, RankTensor, Record


class QATFormat(Format):
    """Format A: grid weights (+ stored log-steps in the subclasses that have them)."""

    def _finish_open(self, rec: Record, o: Opening) -> Record:
        """The checks every QAT checkpoint passes once its modules are known."""
        _check_module_set(rec, o.candidates)
        check_architecture(o.path, o.config, rec.modules)
        if rec.bits is None:
            rec = replace(rec, bits=self._infer_bits(rec), bits_inferred=True)
        return rec

    def _infer_bits(self, rec) -> int:
        """The codes' range tells the bits: a 4-bit grid never needs a code beyond [-8, 7]."""
        first = rec.modules[0]
        w = self.checked_weight(rec, first)
        s = self._stored_scales(rec, first, w.shape)
        codes = torch.round(w.float().reshape(w.shape[0], s.shape[1], -1) / s.unsqueeze(-1))
        lo, hi = code_range(4)
        return 4 if float(codes.min()) >= lo and float(codes.max()) <= hi else 8

    @staticmethod
    def checked_weight(rec, name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The stored weight of a QAT module, refused unless 2-D and bf16/fp16/fp32 (``weight``:
        a meta tensor of it, to check without reading)."""
        weight = rec.tensors.get(name + ".weight") if weight is None else weight
        if weight.dim() != 2:
            raise GraceFormatError(f"{rec.tensors.file_of(name + '.weight')}: {name}.weight has shape "
                                   f"{tuple(weight.shape)}, expected a 2-D linear weight")
        if weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise GraceFormatError(f"{rec.tensors.file_of(name + '.weight')}: {name}.weight is "
                                   f"{weight.dtype}, expected bfloat16/float16")
        return weight

    def module_shape(self, rec, name: str) -> tuple[int, int]:
        shape = rec.tensors.shape(name + ".weight")
        if len(shape) != 2:
            raise GraceFormatError(f"{rec.tensors.file_of(name + '.weight')}: {name}.weight has shape "
                                   f"{shape}, expected a 2-D linear weight")
        return shape

    def weight_dtype(self, rec) -> torch.dtype:
        stored = rec.tensors.dtype(rec.modules[0] + ".weight")
        if stored not in SAFETENSORS_DTYPES:
            raise GraceFormatError(f"{rec.path}: {rec.modules[0]}.weight is stored as {stored}, "
                                   f"expected BF16, F16 or F32")
        return SAFETENSORS_DTYPES[stored]

    # -- stored steps (sidecar / inline) ----------------------------------------------------------

    def _log_scale_where(self, rec, name: str) -> str:
        raise NotImplementedError

    def _stored_scales(self, rec, name: str, shape) -> torch.Tensor:
        out_f, in_f = shape
        where = self._log_scale_where(rec, name)
        log_scale = self.log_scale(rec, name)          # its own errors name the file already
        try:
            return scales_from_log_scale(log_scale, out_f, in_f, rec.group_size, name)
        except GraceFormatError as e:
            declared = rec.config.get("quantization_config") or {}
            if (log_scale.dim() == 1 and declared.get("quant_method") == QUANT_METHOD
                    and declared.get("group_size") == rec.group_size
                    and log_scale.numel() != out_f * (in_f // effective_group_size(in_f, rec.group_size))):
                # the group size is config.json's: name it as the source of the mismatch
                raise GraceFormatError(f"{os.path.join(rec.path, CONFIG_NAME)}: quantization_config.group_size "
                                       f"{rec.group_size} does not fit {where}: {e}") from None
            raise GraceFormatError(f"{where}: {e}") from None

    @staticmethod
    def _checked_log_scale(ls: torch.Tensor, where: str, name: str) -> torch.Tensor:
        if not ls.is_floating_point():
            raise GraceFormatError(f"{where}: {name}.log_scale is {ls.dtype}, expected a floating-point "
                                   f"tensor (fp32 log-steps)")
        return ls

    def scales(self, rec, name: str) -> torch.Tensor:
        return self._stored_scales(rec, name, self.module_shape(rec, name))

    def check_served(self, rec) -> None:
        """What ``quantized`` checks short of reading the weights: dtypes and shapes (the sidecar's
        copy included), and the stored steps against the group size."""
        for name in rec.modules:
            weight = self.checked_weight(rec, name, rec.tensors.meta(name + ".weight"))
            self._check_copy(rec, name, weight, rec.tensors.file_of(name + ".weight"))
            if self.stored_steps:
                self._stored_scales(rec, name, weight.shape)

    def _module_scales(self, rec, name: str, weight: torch.Tensor) -> torch.Tensor:
        return self._stored_scales(rec, name, weight.shape)   # its errors name the file holding log_scale

    def quantized(self, rec, name: str) -> QuantizedLinear:
        bias = rec.tensors.get(name + ".bias") if name + ".bias" in rec.tensors else None
        weight = self.checked_weight(rec, name)
        where = rec.tensors.file_of(name + ".weight")
        self._check_copy(rec, name, weight, where)
        scales = self._module_scales(rec, name, weight) if self.stored_steps else None
        try:
            if scales is None:
                scales = derive_scales(weight, rec.bits, rec.group_size, name, rec.bits_inferred)
            codes = recover_codes(weight, scales, rec.bits, rec.group_size, name, rec.bits_inferred)
        except GraceFormatError as e:
            raise GraceFormatError(f"{where}: {e}") from None
        return QuantizedLinear(name, codes, scales, rec.bits, rec.group_size, bias)

    def _check_copy(self, rec, name: str, weight: torch.Tensor, where: str) -> None:
        pass

    # -- one rank ----------------------------------------------------------------------------------

    def rank_tensors(self, out_pp, in_pp, groups_pp, weight_dtype):
        # loaded in the checkpoint's own dtype, so that the grid check sees the stored values
        return [RankTensor("weight", (out_pp, in_pp), weight_dtype)] + self._step_tensors(out_pp, groups_pp)

    def _step_tensors(self, out_pp: int, groups_pp: int) -> list[RankTensor]:
        return []

    def rank_codes(self, loaded, bits, group, name, inferred=False):
        weight = loaded["weight"]
        if "steps" in loaded:              # steps an engine loaded already as steps (shard of scales())
            steps = loaded["steps"]
        elif "log_scale" in loaded:
            # exp() on the CPU, as `grace-qat convert` does: CUDA's fp32 exp can differ by an ulp,
            # which now and then flips the bf16 step and breaks equality with converted checkpoints.
            ls = loaded["log_scale"]
            steps = scales_from_log_scale(ls.cpu(), ls.shape[0], ls.shape[1] * group, group,
                                          name=name).to(weight.device)
        else:
            steps = derive_scales(weight, bits, group, name=name, inferred=inferred)
        return recover_codes(weight, steps, bits, group, name=name, inferred=inferred), steps


def _check_module_set(rec: Record, candidates: list[str]) -> None:
    """Stored steps and quantizable linears must name the same modules."""
    where = rec.sidecar_path or rec.path
    extra = [m for m in rec.modules if m + ".weight" not in rec.tensors]
    if extra:
        raise GraceFormatError(f"{where}: scales for {len(extra)} modules that have no weight in the "
                               f"safetensors (first: {extra[0]})")
    missing = [m for m in candidates if m not in set(rec.modules)]
    if missing:
        raise GraceFormatError(f"{where}: no scales for {len(missing)} quantizable linears "
                               f"(first: {missing[0]}); every language-model projection must be quantized")
