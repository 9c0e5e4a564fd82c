"""What every standard export layout provides, and the one registry that lists them.

A target is one small module in this package with one ``Target`` subclass, registered with
:func:`register`. It owns both directions of its layout: writing (``write_module`` packs a
module's verified codes and reads them back before anything is written, ``quantization_config``
and ``write_side_files``) and reading (``settings`` validates its quantization_config, ``read``
unpacks and verifies one module). ``grace_qat.convert`` writes through it and
``grace_qat.standard`` reads through it; neither knows a layout by name.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import GraceFormatError
from ..quantizer import effective_group_size
from ..registry import Registry

INT32 = (torch.int32,)
FLOAT = (torch.float16, torch.bfloat16, torch.float32)
# Linear layers that GRACE never quantizes; stock engines must leave them alone too.
UNQUANTIZED_PATTERNS = ["lm_head", "re:.*visual.*", "re:.*vision_tower.*", "re:.*mm_projector.*",
                        "re:.*multi_modal_projector.*"]


def config_int(obj: dict, key: str, prefix: str, bad) -> int:
    """An integer of a quantization_config (``bad(what)``: the error naming config.json)."""
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"{prefix}.{key} must be an integer, got {v!r}")
    return v


@dataclass(frozen=True)
class ModuleFiles:
    """The stored tensors of one module of a standard checkpoint, with the checks every layout
    makes; errors name the file, the tensor and what was expected."""
    tensors: object                  # files.SafetensorsDir
    path: str
    method: str
    bits: int
    group_size: int
    name: str

    def __contains__(self, leaf: str) -> bool:
        return f"{self.name}.{leaf}" in self.tensors

    def file_of(self, leaf: str) -> str:
        return self.tensors.file_of(f"{self.name}.{leaf}")

    def get(self, leaf: str, dtypes=None, dims: int | None = None) -> torch.Tensor:
        key = f"{self.name}.{leaf}"
        if key not in self.tensors:
            raise GraceFormatError(f"{self.path}: {key} missing for {self.method} module {self.name}")
        t = self.tensors.get(key)
        if dtypes is not None and t.dtype not in dtypes:
            raise GraceFormatError(f"{self.tensors.file_of(key)}: {key} is {t.dtype}, expected "
                                   f"{' or '.join(str(d).split('.')[-1] for d in dtypes)}")
        if dims is not None and t.dim() != dims:
            raise GraceFormatError(f"{self.tensors.file_of(key)}: {key} has shape {tuple(t.shape)}, "
                                   f"expected {dims}-D")
        return t

    def check_shape(self, leaf: str, t: torch.Tensor, expected: tuple) -> None:
        if tuple(t.shape) != tuple(expected):
            raise GraceFormatError(f"{self.file_of(leaf)}: {self.name}.{leaf} has shape "
                                   f"{tuple(t.shape)}, expected {tuple(expected)} for {self.bits}-bit "
                                   f"group {self.group_size}")

    def groups(self, in_f: int) -> int:
        return in_f // effective_group_size(in_f, self.group_size)


class Target:
    """One standard layout ``grace-qat convert --to`` writes. Subclasses set the class attributes
    and override what differs."""
    name: str = ""
    description: str = ""            # one line for ``grace-qat inspect``
    quant_method: str | None = None   # what its quantization_config declares (None: no config)
    module_leaf: str = ""            # the tensor that marks a quantized module
    scale_leaf: str = ""
    scale_dtype: torch.dtype | None = None   # fixed by the layout (else: see written_scale_dtype)
    side_files: tuple[str, ...] = ()

    # -- writing -----------------------------------------------------------------------------------

    def written_scale_dtype(self, source: torch.dtype, model: torch.dtype) -> torch.dtype | None:
        """The dtype the scales are written in (None: no scales). The source's own 16-bit
        precision is kept wherever the layout can hold it; fp32 steps are rounded to the model's
        dtype (what the engines compute with), or to the dtype the layout fixes."""
        if self.scale_dtype is not None:
            return self.scale_dtype
        return source if source in (torch.float16, torch.bfloat16) else model

    def pack(self, q, sdtype: torch.dtype) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def unpack(self, t: dict[str, torch.Tensor], q) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def write_module(self, q, sdtype: torch.dtype | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Tensors of one module (scales in ``sdtype``), unpacked again and checked against the
        codes and the scales rounded to ``sdtype`` before anything is written."""
        t = self.pack(q, sdtype)
        back, back_s = self.unpack(t, q)
        if not torch.equal(back.to(torch.int32), q.codes.to(torch.int32)):
            raise GraceFormatError(f"{q.name}: packed {self.name} tensors do not unpack to the same codes (bug)")
        if back_s.dtype != sdtype or not torch.equal(back_s, q.scales.to(sdtype)):
            raise GraceFormatError(f"{q.name}: packed {self.name} scales are not the source's rounded to "
                                   f"{sdtype} (bug)")
        return {f"{q.name}.{k}": v for k, v in t.items()}

    def quantization_config(self, bits: int, group_size: int, modules: list[str]) -> dict | None:
        return None

    def write_side_files(self, dst: str, group_size: int, modules: list[str]) -> None:
        pass

    # -- reading -----------------------------------------------------------------------------------

    def settings(self, qc: dict, bad) -> tuple[int, int]:
        """(bits, group size) from its quantization_config, validated; ``bad(what)`` is the error."""
        raise NotImplementedError

    def read(self, m: ModuleFiles) -> tuple[torch.Tensor, torch.Tensor]:
        """Signed codes (out, in) and scales (out, in/G) as stored, checked against the layout."""
        raise NotImplementedError


_REGISTRY = Registry("target", "unknown target {name!r}; choose one of {names}")
register = _REGISTRY.register
get = _REGISTRY.get
names = _REGISTRY.names      # in registration order: what ``convert --to`` offers


def declared(config: dict) -> Target | None:
    """The target whose quant_method a config.json declares, else None."""
    qc = config.get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    return next((t for t in _REGISTRY.items() if t.quant_method is not None and t.quant_method == method), None)
