"""``qat-grid``: BF16 weights on the grid and nothing else (a release without sidecar, or what
``convert --to bf16`` writes). Steps are derived from the grid; without stated bits the first
module's narrowest grid gives them, and a directory on no 4/8-bit grid is a plain checkpoint."""
from __future__ import annotations

from dataclasses import replace

from ..errors import GraceFormatError
from ..quantizer import SUPPORTED_BITS, derive_scales
from ._qat import QATFormat
from .base import register


class QATGrid(QATFormat):
    name = "qat-grid"
    description = ("BF16 weights on a GRACE grid, no stored steps (a release without sidecar, or what "
                   "`convert --to bf16` writes); stock engines serve it as BF16, the plugin as packed ints")
    order = 40
    stored_steps = False

    def claims(self, o):
        return bool(o.candidates)

    def open(self, o):
        from .plain import FORMAT as PLAIN
        rec = o.record(self.name, o.candidates)
        if rec.bits is None:
            first = o.candidates[0]
            w = self.checked_weight(rec, first)
            for b in SUPPORTED_BITS:
                try:
                    derive_scales(w, b, rec.group_size, first)
                    rec = replace(rec, bits=b, bits_inferred=True)
                    break
                except GraceFormatError:
                    continue
            else:
                return PLAIN.open(o)
        return self._finish_open(rec, o)

    def scales(self, rec, name):
        return self.quantized(rec, name).scales


FORMAT = register(QATGrid())
