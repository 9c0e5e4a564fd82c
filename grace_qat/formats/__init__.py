"""The GRACE on-disk formats: one module per format, each registering one :class:`Format`.

Adding a format = one new module here (a ``Format`` subclass, registered) plus its tests; the
checkpoint reader, detection, ``convert``, the CLI, ``synthetic`` and both engine adapters take it
from the registry.
"""
from .base import (Format, Opening, QuantizedLinear, RankTensor, Record, all_formats, detect, get, marked,
                   names, quantized_names, register, spare_note, spare_tensors)
# each registers its format; this order is the order the CLI and ``synthetic`` list them in
from . import qat_sidecar, qat_inline, qat_grid, awq, plain  # noqa: E401,F401,I001

__all__ = ["Format", "Opening", "QuantizedLinear", "RankTensor", "Record", "all_formats", "detect", "get",
           "marked", "names", "quantized_names", "register", "spare_note", "spare_tensors"]
