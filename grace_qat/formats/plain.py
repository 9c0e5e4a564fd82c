"""``plain``: an unquantized checkpoint (e.g. the GRACE-BF16 release); claims what no other does."""
from __future__ import annotations

from .base import Format, Record, register


class Plain(Format):
    name = "plain"
    description = "an unquantized checkpoint, no GRACE or standard quantization"
    quantizes = False
    order = 1000
    stored_steps = False
    grid_weights = False

    def claims(self, o):
        return True

    def open(self, o):
        return Record(o.path, self.name, None, o.gs, [], o.config, o.tensors)


FORMAT = register(Plain())
