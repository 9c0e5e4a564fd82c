"""``qat-sidecar`` (format A): BF16 weights on the grid + ``qat_quantized_weights.bin``, the training
script's pickle of ``<module>.log_scale`` (and copies of ``.weight`` / ``.bias``), read safely."""
from __future__ import annotations

import os

import torch

from ..errors import GraceFormatError
from ..architectures import is_quantizable_module
from ..files import SIDECAR_NAME, load_sidecar, natural_key
from ._qat import QATFormat
from .base import RankTensor, register, spare_tensors


class QATSidecar(QATFormat):
    name = "qat-sidecar"
    description = "GRACE format A: BF16 weights on the grid + qat_quantized_weights.bin (learned steps)"
    order = 20
    marker_order = 0
    side_files = (SIDECAR_NAME,)
    spare_leaves = ("log_scale",)    # an export may leave them in the safetensors: the sidecar's count

    def marked(self, path, config, tensor_names):
        return os.path.isfile(os.path.join(path, SIDECAR_NAME))

    def claims(self, o):
        return os.path.exists(os.path.join(o.path, SIDECAR_NAME))

    def open(self, o):
        sidecar = os.path.join(o.path, SIDECAR_NAME)
        modules = self._sidecar_modules(sidecar)
        return self._finish_open(o.record(self.name, modules, sidecar), o)

    @staticmethod
    def _sidecar_modules(sidecar: str) -> list[str]:
        data = load_sidecar(sidecar)
        modules = sorted((k[: -len(".log_scale")] for k in data if k.endswith(".log_scale")), key=natural_key)
        if not modules:
            raise GraceFormatError(f"{sidecar}: holds no <module>.log_scale entries")
        for m in modules:
            if not is_quantizable_module(m):
                raise GraceFormatError(f"{sidecar}: {m}.log_scale: {m} is not a language-model linear GRACE "
                                       f"quantizes (only self_attn.q/k/v/o_proj and mlp.gate/up/down_proj)")
        for k in data:
            base = k.rsplit(".", 1)[0]
            if k.endswith((".weight", ".bias")) and base not in modules and is_quantizable_module(base):
                raise GraceFormatError(f"{sidecar}: {base}.log_scale missing: the sidecar holds {k} but no "
                                       f"log-steps for module {base}")
            if not k.endswith((".log_scale", ".weight", ".bias")) or base not in modules:
                raise GraceFormatError(f"{sidecar}: unexpected entry {k!r} (expected <module>.weight, "
                                       f".log_scale and .bias for quantized modules only)")
        return modules

    def _log_scale_where(self, rec, name):
        return rec.sidecar_path

    def log_scale(self, rec, name):
        key = name + ".log_scale"
        if key not in rec.sidecar:
            raise GraceFormatError(f"{rec.sidecar_path}: missing {key}")
        return self._checked_log_scale(rec.sidecar[key], rec.sidecar_path, name)

    def check_served(self, rec):
        super().check_served(rec)
        for key in spare_tensors(rec):         # inline copies of the log-steps must agree
            inline, side = rec.tensors.get(key), rec.sidecar[key]
            if inline.numel() != side.numel() or not torch.equal(inline.flatten().float(), side.flatten().float()):
                raise GraceFormatError(f"{rec.tensors.file_of(key)}: {key} differs from the one in "
                                       f"{rec.sidecar_path}, which is served; remove one of them")

    def _check_copy(self, rec, name, weight, where):
        if name + ".weight" in rec.sidecar:
            copy = rec.sidecar[name + ".weight"]
            if tuple(copy.shape) != tuple(weight.shape):
                raise GraceFormatError(f"{rec.sidecar_path}: {name}.weight has shape {tuple(copy.shape)} but "
                                       f"{where} holds it as {tuple(weight.shape)}")

    def _step_tensors(self, out_pp, groups_pp):
        return [RankTensor("log_scale", (out_pp, groups_pp), torch.float32, grouped=True,
                           source="checkpoint", nan_fill=True)]

    def fed_tensor(self, rec, name, leaf):
        steps = self.scales(rec, name)      # validates length, finiteness, range; names file + module
        return self.log_scale(rec, name).to(torch.float32).reshape(steps.shape)

    def fixture_module(self, base, w_dq, log_scale, bits, group_size, sidecar):
        sidecar[f"{base}.weight"] = w_dq.detach().to("cpu").contiguous()
        sidecar[f"{base}.log_scale"] = log_scale.detach().to("cpu").contiguous()
        return {f"{base}.weight": w_dq}

    def fixture_bias(self, name, bias, sidecar):
        sidecar[name] = bias.detach().to("cpu").contiguous()

    def fixture_files(self, out_dir, modules, group_size, sidecar):
        torch.save(sidecar, os.path.join(out_dir, SIDECAR_NAME))


FORMAT = register(QATSidecar())
