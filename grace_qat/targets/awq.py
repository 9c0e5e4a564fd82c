"""``awq``: AutoAWQ GEMM, 4-bit, zero point 8 (GRACE's format B plus a quantization_config)."""
from __future__ import annotations

import json
import os

import torch

from ..errors import GraceFormatError
from ..files import AWQ_MODULES_NAME
from ..formats.awq import read_module
from ..packing import pack_awq, unpack_awq
from .base import Target, config_int, register


class AWQ(Target):
    """The files are GRACE's format B with a quantization_config: format B's reader reads them."""
    name = quant_method = "awq"
    description = "AutoAWQ GEMM (packed along the output dimension, zero point 8)"
    module_leaf = "qweight"
    scale_leaf = "scales"
    scale_dtype = torch.float16
    side_files = (AWQ_MODULES_NAME,)

    def pack(self, q, sdtype):
        if q.bits != 4:
            raise GraceFormatError(f"{q.name}: AWQ export is 4-bit only, this checkpoint is {q.bits}-bit")
        return pack_awq(q.codes, q.scales, q.group_size, scale_dtype=sdtype)

    def unpack(self, t, q):
        return unpack_awq(t["qweight"], t["qzeros"], t["scales"], q.name)

    def quantization_config(self, bits, group_size, modules):
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": ["visual", "vision_tower", "mm_projector",
                                                              "multi_modal_projector", "lm_head"]}

    def write_side_files(self, dst, group_size, modules):
        with open(os.path.join(dst, AWQ_MODULES_NAME), "w") as f:
            json.dump({"bits": 4, "group_size": group_size, "modules": modules}, f, indent=2)

    def settings(self, qc, bad):
        bits, gs = config_int(qc, "bits", "", bad), config_int(qc, "group_size", "", bad)
        if bits != 4 or str(qc.get("version", "gemm")).lower() != "gemm":
            raise bad(f": expected 4-bit GEMM AWQ, got bits={bits}, version={qc.get('version')!r}")
        return bits, gs

    def read(self, m):
        return read_module(m.tensors, m.name, m.group_size)


TARGET = register(AWQ())
