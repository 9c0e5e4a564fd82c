"""``compressed-tensors``: pack-quantized symmetric WNA16, ``weight_packed`` (out, in/pf)."""
from __future__ import annotations

from ..errors import GraceFormatError
from ..packing import pack_compressed_tensors, pack_factor, unpack_compressed_tensors
from .base import FLOAT, INT32, UNQUANTIZED_PATTERNS, Target, config_int, register


class CompressedTensors(Target):
    name = quant_method = "compressed-tensors"
    description = "compressed-tensors pack-quantized (symmetric WNA16)"
    module_leaf = "weight_packed"
    scale_leaf = "weight_scale"

    def quantization_config(self, bits, group_size, modules):
        return {"quant_method": "compressed-tensors", "format": "pack-quantized",
                "quantization_status": "compressed", "ignore": UNQUANTIZED_PATTERNS,
                "config_groups": {"group_0": {
                    "targets": ["Linear"], "input_activations": None, "output_activations": None,
                    "weights": {"num_bits": bits, "type": "int", "symmetric": True,
                                "strategy": "group", "group_size": group_size, "dynamic": False,
                                "actorder": None, "observer": "minmax"}}}}

    def pack(self, q, sdtype):
        return pack_compressed_tensors(q.codes, q.scales, q.bits, scale_dtype=sdtype)

    def unpack(self, t, q):
        return unpack_compressed_tensors(t["weight_packed"], t["weight_scale"], q.bits)

    def settings(self, qc, bad):
        if qc.get("format") != "pack-quantized":
            raise bad(f".format is {qc.get('format')!r}, expected 'pack-quantized'")
        groups = qc.get("config_groups")
        if not isinstance(groups, dict) or len(groups) != 1:
            raise bad(".config_groups must hold exactly one group")
        (gname, group), = groups.items()
        w = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(w, dict):
            raise bad(f".config_groups.{gname}.weights must be an object")
        prefix = f".config_groups.{gname}.weights"
        bits, gs = config_int(w, "num_bits", prefix, bad), config_int(w, "group_size", prefix, bad)
        if w.get("symmetric") is not True or w.get("type") != "int" or w.get("strategy") != "group":
            raise bad(f"{prefix}: expected symmetric int weights with strategy 'group', got "
                      f"symmetric={w.get('symmetric')!r}, type={w.get('type')!r}, "
                      f"strategy={w.get('strategy')!r}")
        return bits, gs

    def read(self, m):
        packed = m.get("weight_packed", INT32, 2)
        scales = m.get("weight_scale", FLOAT, 2)
        shape = tuple(int(v) for v in m.get("weight_shape", None, 1).tolist())
        out_f, in_f = packed.shape[0], packed.shape[1] * pack_factor(m.bits)
        if shape != (out_f, in_f):
            raise GraceFormatError(f"{m.file_of('weight_shape')}: {m.name}.weight_shape is "
                                   f"{list(shape)}, but weight_packed holds {out_f}x{in_f}")
        m.check_shape("weight_scale", scales, (out_f, m.groups(in_f)))
        if "weight_zero_point" in m and bool(m.tensors.get(f"{m.name}.weight_zero_point").any()):
            raise GraceFormatError(f"{m.file_of('weight_zero_point')}: {m.name}.weight_zero_point is "
                                   f"not all 0 (expected symmetric weights)")
        return unpack_compressed_tensors(packed, scales, m.bits)


TARGET = register(CompressedTensors())
