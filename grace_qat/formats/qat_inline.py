"""``qat-inline`` (format A): BF16 weights on the grid with ``<module>.log_scale`` (flat fp32
log-steps, one per group) still in the safetensors."""
from __future__ import annotations

import torch

from ..files import natural_key
from ._qat import QATFormat
from .base import RankTensor, register


class QATInline(QATFormat):
    name = "qat-inline"
    description = "GRACE format A: BF16 weights on the grid + <module>.log_scale tensors"
    order = 30
    marker_order = 2
    module_leaves = ("weight", "log_scale", "bias")

    def marked(self, path, config, tensor_names):
        return any(n.endswith(".log_scale") for n in tensor_names())

    def claims(self, o):
        return any(k.endswith(".log_scale") for k in o.tensors.keys())

    def open(self, o):
        modules = sorted((k[: -len(".log_scale")] for k in o.tensors.keys() if k.endswith(".log_scale")),
                         key=natural_key)
        return self._finish_open(o.record(self.name, modules), o)

    def _log_scale_where(self, rec, name):
        return rec.tensors.file_of(name + ".log_scale")

    def log_scale(self, rec, name):
        ls = rec.tensors.get(name + ".log_scale")
        return self._checked_log_scale(ls, rec.tensors.file_of(name + ".log_scale"), name)

    def _step_tensors(self, out_pp, groups_pp):
        # in the weight stream, flat as stored; the loaders shard it as (out, groups)
        return [RankTensor("log_scale", (out_pp, groups_pp), torch.float32, grouped=True, nan_fill=True,
                           flat_in_checkpoint=True)]

    def fixture_module(self, base, w_dq, log_scale, bits, group_size, sidecar):
        return {f"{base}.weight": w_dq, f"{base}.log_scale": log_scale}


FORMAT = register(QATInline())
