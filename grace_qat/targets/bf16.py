"""``bf16``: the dequantized model, 16-bit weights in the model's dtype and no quantization_config
(the reference every quantized path is compared with)."""
from __future__ import annotations

from ..quantizer import dequantize
from .base import Target, register


class BF16(Target):
    name = "bf16"

    def written_scale_dtype(self, source, model):
        return None

    def write_module(self, q, sdtype, dtype):
        return {f"{q.name}.weight": dequantize(q.codes, q.scales, q.group_size, dtype)}


TARGET = register(BF16())
