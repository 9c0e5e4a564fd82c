"""``awq`` (format B): AutoAWQ GEMM packed 4-bit codes with the constant zero point 8 (so the codes
are symmetric), fp16 scales, ``awq_quantized_modules.json`` and/or ``awq_packing`` in config.json,
and no ``quantization_config``."""
from __future__ import annotations

import json
import os

import torch

from ..errors import GraceFormatError
from ..architectures import check_architecture
from ..files import AWQ_MODULES_NAME, CONFIG_NAME, SAFETENSORS_DTYPES, declared_int, natural_key
from ..packing import pack_awq, unpack_awq
from ..quantizer import DEFAULT_GROUP_SIZE, effective_group_size, recover_codes
from .base import Format, QuantizedLinear, RankTensor, Record, register

ZERO_POINT = 8
PACK = 8          # 4-bit codes per int32


def awq_packing(group_size: int) -> dict:
    """The ``awq_packing`` entry of config.json that GRACE's AWQ releases carry."""
    return {"bits": 4, "group_size": group_size, "zero_point": ZERO_POINT, "version": "gemm"}


def read_module(t, name: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Verified signed codes (out, in) and the scales (out, in/G) as stored of one AutoAWQ GEMM
    module of the files ``t`` (zero point 8): GRACE's format B and the ``awq`` export share it."""
    qweight, qzeros, scales = (t.get(name + s) for s in (".qweight", ".qzeros", ".scales"))
    _check_tensors(t, name, group_size, qweight, qzeros, scales)
    try:
        codes, scales = unpack_awq(qweight, qzeros, scales, name)
    except GraceFormatError as e:
        raise GraceFormatError(f"{t.file_of(name + '.qzeros')}: {e}") from None
    _check_scales(t, name, scales)
    out_f, in_f = codes.shape
    if in_f % scales.shape[1] or in_f // scales.shape[1] != effective_group_size(in_f, group_size):
        raise GraceFormatError(f"{t.file_of(name + '.scales')}: {name}.scales has {scales.shape[1]} "
                               f"groups per row for in_features {in_f} and group size {group_size}")
    return codes, scales


def _check_scales(t, name: str, scales: torch.Tensor) -> None:
    s32 = scales.to(torch.float32)
    if not torch.isfinite(s32).all() or not (s32 > 0).all():
        raise GraceFormatError(f"{t.file_of(name + '.scales')}: {name}.scales must be finite and > 0")


def _check_tensors(t, name, group_size, qweight, qzeros, scales) -> None:
    """dtypes and shapes of one AWQ module: qweight (in, out/8) and qzeros (in/G, out/8) int32,
    scales (in/G, out) floating point, with G the effective group size."""
    for key, tensor in ((".qweight", qweight), (".qzeros", qzeros)):
        if tensor.dtype != torch.int32:
            raise GraceFormatError(f"{t.file_of(name + key)}: {name}{key} is {tensor.dtype}, expected int32")
    if not scales.is_floating_point():
        raise GraceFormatError(f"{t.file_of(name + '.scales')}: {name}.scales is {scales.dtype}, expected "
                               f"float16 (a floating-point dtype)")
    if qweight.dim() != 2:
        raise GraceFormatError(f"{t.file_of(name + '.qweight')}: {name}.qweight has shape "
                               f"{tuple(qweight.shape)}, expected 2-D (in, out/8)")
    in_f, out_f = qweight.shape[0], qweight.shape[1] * PACK
    groups = in_f // effective_group_size(in_f, group_size) if in_f else 0
    for key, tensor, expected in ((".qzeros", qzeros, (groups, out_f // PACK)),
                                  (".scales", scales, (groups, out_f))):
        if tuple(tensor.shape) != expected:
            raise GraceFormatError(
                f"{t.file_of(name + key)}: {name}{key} has shape {tuple(tensor.shape)}, expected {expected} "
                f"for qweight {tuple(qweight.shape)} ({out_f}x{in_f}) and group size {group_size} "
                f"({groups} groups per row)")


class AWQ(Format):
    name = "awq"
    description = "GRACE format B: AWQ-packed 4-bit, zero point 8, no quantization_config"
    order = 10
    marker_order = 1
    fixture_bits = (4,)
    side_files = (AWQ_MODULES_NAME,)
    grid_weights = False
    module_leaves = ("qweight", "qzeros", "scales", "bias")

    def marked(self, path, config, tensor_names):
        return os.path.isfile(os.path.join(path, AWQ_MODULES_NAME)) or bool(config.get("awq_packing"))

    def claims(self, o):
        return (os.path.exists(os.path.join(o.path, AWQ_MODULES_NAME)) or bool(o.config.get("awq_packing"))
                or any(k.endswith(".qweight") for k in o.tensors.keys()))

    def open(self, o):
        path, config, tensors = o.path, o.config, o.tensors
        awq_json = os.path.join(path, AWQ_MODULES_NAME)
        meta = {}
        if os.path.exists(awq_json):
            try:
                with open(awq_json) as f:
                    meta = json.load(f)
            except ValueError as e:
                raise GraceFormatError(f"{awq_json}: not valid JSON ({e})") from None
            if not isinstance(meta, dict):
                raise GraceFormatError(f"{awq_json}: expected a JSON object, got {type(meta).__name__}")
        cfg_path = os.path.join(path, CONFIG_NAME)
        packing = config.get("awq_packing") or {}
        if not isinstance(packing, dict):
            raise GraceFormatError(f"{cfg_path}: awq_packing must be a JSON object, got {type(packing).__name__}")
        zp = packing.get("zero_point", ZERO_POINT)
        if zp != ZERO_POINT:
            raise GraceFormatError(f"{cfg_path}: awq_packing.zero_point is {zp}; "
                                   f"GRACE AWQ checkpoints use the constant zero point 8")
        meta_bits, meta_gs = (declared_int(meta, k, awq_json) for k in ("bits", "group_size"))
        pack_bits, pack_gs = (declared_int(packing, k, cfg_path, "awq_packing.") for k in ("bits", "group_size"))
        if meta_bits is not None:
            b, where = meta_bits, awq_json
        elif pack_bits is not None:
            b, where = pack_bits, cfg_path
        else:
            b, where = int(o.bits or 4), path
        if b != 4:
            raise GraceFormatError(f"{where}: AWQ-packed GRACE checkpoints are 4-bit, got bits={b}")
        gs = meta_gs or pack_gs or int(o.group_size or DEFAULT_GROUP_SIZE)
        packed = sorted((k[: -len(".qweight")] for k in tensors.keys() if k.endswith(".qweight")),
                        key=natural_key)
        listed = meta.get("modules", packed)
        if not isinstance(listed, list) or not all(isinstance(m, str) for m in listed):
            raise GraceFormatError(f"{awq_json}: modules must be a list of module names")
        modules = sorted(listed, key=natural_key)
        missing = [m for m in modules if m not in packed]
        extra = [m for m in packed if m not in modules]
        if missing or extra:
            raise GraceFormatError(
                f"{awq_json}: module list and packed tensors disagree "
                f"(listed without .qweight: {missing[:3]}, packed but not listed: {extra[:3]})")
        for m in modules:
            for suffix in (".qzeros", ".scales"):
                if m + suffix not in tensors:
                    raise GraceFormatError(f"{path}: {m}{suffix} missing for AWQ module {m}")
        check_architecture(path, config, modules)
        return Record(path, self.name, 4, gs, modules, config, tensors)

    # -- the whole checkpoint ----------------------------------------------------------------------

    def module_shape(self, rec, name):
        in_f, packed_out = rec.tensors.shape(name + ".qweight")
        return packed_out * PACK, in_f

    def scales(self, rec, name):
        return rec.tensors.get(name + ".scales").to(torch.float32).t().contiguous()

    def steps_dtype(self, rec):
        if not rec.modules:
            return torch.float32
        return SAFETENSORS_DTYPES.get(rec.tensors.dtype(rec.modules[0] + ".scales"), torch.float32)

    def check_served(self, rec):
        """What ``inspect`` checks short of unpacking the codes: dtypes and shapes against the group
        size, scales finite and > 0, every zero point 8 (reads only the small qzeros and scales)."""
        t = rec.tensors
        for name in rec.modules:
            _check_tensors(t, name, rec.group_size, *(t.meta(name + s) for s in (".qweight", ".qzeros", ".scales")))
            _check_scales(t, name, t.get(name + ".scales"))
            qzeros = t.get(name + ".qzeros")
            try:
                unpack_awq(torch.zeros(0, qzeros.shape[-1] if qzeros.dim() == 2 else 0, dtype=torch.int32),
                           qzeros, t.get(name + ".scales"), name)
            except GraceFormatError as e:
                raise GraceFormatError(f"{t.file_of(name + '.qzeros')}: {e}") from None

    def quantized(self, rec, name):
        t = rec.tensors
        bias = t.get(name + ".bias") if name + ".bias" in t else None
        codes, scales = read_module(t, name, rec.group_size)
        return QuantizedLinear(name, codes.to(torch.int8), scales.to(torch.float32), 4, rec.group_size, bias)

    def stock_config(self, rec):
        return {"quant_method": "awq", "bits": 4, "group_size": rec.group_size, "zero_point": True,
                "modules_to_not_convert": []}

    # -- one rank ----------------------------------------------------------------------------------

    def rank_tensors(self, out_pp, in_pp, groups_pp, weight_dtype):
        if out_pp % PACK:
            raise GraceFormatError(f"{out_pp} output channels on this rank are not a multiple of {PACK}, "
                                   f"which AWQ packing needs")
        return [RankTensor("qweight", (in_pp, out_pp // PACK), torch.int32, output_dim=1, packed=PACK),
                RankTensor("qzeros", (groups_pp, out_pp // PACK), torch.int32, output_dim=1, packed=PACK,
                           grouped=True),
                # fp32 holds the checkpoint's fp16 steps exactly; cast to the activation dtype later
                RankTensor("scales", (groups_pp, out_pp), torch.float32, output_dim=1, grouped=True,
                           nan_fill=True)]

    def rank_codes(self, loaded, bits, group, name, inferred=False):
        scales = loaded["scales"]
        if not bool(torch.isfinite(scales).all()) or not bool((scales > 0).all()):
            raise GraceFormatError(f"{name}: scales must be finite and > 0 (missing from the checkpoint?)")
        codes, steps = unpack_awq(loaded["qweight"], loaded["qzeros"], scales, name=name)
        return codes.to(torch.int8), steps.to(torch.float32)

    # -- synthetic checkpoints ---------------------------------------------------------------------

    def fixture_module(self, base, w_dq, log_scale, bits, group_size, sidecar):
        out_f, in_f = w_dq.shape
        g = effective_group_size(in_f, group_size)
        scales = torch.exp(log_scale).reshape(out_f, in_f // g)
        codes = recover_codes(w_dq, scales, bits, group_size, base)
        # grace_qat.packing builds its shift/zero tensors on the CPU: pack there.
        return {f"{base}.{k}": v for k, v in pack_awq(codes.cpu(), scales.cpu(), group_size).items()}

    def fixture_files(self, out_dir, modules, group_size, sidecar):
        with open(os.path.join(out_dir, AWQ_MODULES_NAME), "w") as f:
            json.dump({"bits": 4, "group_size": group_size, "modules": modules}, f, indent=2, ensure_ascii=False)
            f.write("\n")

    def fixture_config(self, group_size):
        return {"awq_packing": awq_packing(group_size)}


FORMAT = register(AWQ())
