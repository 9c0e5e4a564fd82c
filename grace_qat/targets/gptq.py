"""``gptq``: GPTQ (symmetric, desc_act false), ``qweight`` packed along the input dimension."""
from __future__ import annotations

import torch

from ..errors import GraceFormatError
from ..packing import pack_factor, pack_gptq, unpack_gptq
from .base import FLOAT, INT32, Target, config_int, register


class GPTQ(Target):
    name = quant_method = "gptq"
    description = "GPTQ (symmetric, packed along the input dimension)"
    module_leaf = "qweight"
    scale_leaf = "scales"

    def pack(self, q, sdtype):
        return pack_gptq(q.codes, q.scales, q.bits, q.group_size, scale_dtype=sdtype)

    def unpack(self, t, q):
        return unpack_gptq(t["qweight"], t["qzeros"], t["scales"], q.bits, q.name)

    def quantization_config(self, bits, group_size, modules):
        return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": True,
                "desc_act": False, "lm_head": False, "checkpoint_format": "gptq",
                "modules_in_block_to_quantize": modules}

    def settings(self, qc, bad):
        bits, gs = config_int(qc, "bits", "", bad), config_int(qc, "group_size", "", bad)
        if qc.get("sym") is not True or qc.get("desc_act"):
            raise bad(f": expected sym true and desc_act false, got sym={qc.get('sym')!r}, "
                      f"desc_act={qc.get('desc_act')!r}")
        return bits, gs

    def read(self, m):
        qweight, qzeros = m.get("qweight", INT32, 2), m.get("qzeros", INT32, 2)
        raw = m.get("scales", FLOAT, 2)
        pf = pack_factor(m.bits)
        in_f, out_f = qweight.shape[0] * pf, qweight.shape[1]
        groups = m.groups(in_f)
        m.check_shape("qzeros", qzeros, (groups, out_f // pf))
        m.check_shape("scales", raw, (groups, out_f))
        try:
            codes, scales = unpack_gptq(qweight, qzeros, raw, m.bits, m.name)
        except GraceFormatError as e:
            raise GraceFormatError(f"{m.file_of('qzeros')}: {e}") from None
        if "g_idx" in m:
            g_idx = m.tensors.get(f"{m.name}.g_idx")
            want = torch.arange(in_f) // (in_f // groups)
            if tuple(g_idx.shape) != (in_f,) or not torch.equal(g_idx.to(torch.int64), want):
                raise GraceFormatError(f"{m.file_of('g_idx')}: {m.name}.g_idx is not the trivial order "
                                       f"arange({in_f}) // {in_f // groups} (desc_act=false)")
        return codes, scales


TARGET = register(GPTQ())
