"""Reading the standard checkpoints ``grace-qat convert`` writes (and others like them): GPTQ, AutoAWQ
GEMM with a ``quantization_config``, compressed-tensors ``pack-quantized`` and plain 16-bit.

Stock engines serve these without the plugin; ``grace-qat inspect`` uses this module to say what a
directory is, to verify it (symmetric zero points, codes unpacked in range, scales finite and > 0,
bits and group size from its quantization_config), and to compare an export with the GRACE
checkpoint it came from (:func:`compare`). Each layout's own reading lives in :mod:`grace_qat.targets`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import torch

from . import targets
from .checkpoint import GraceCheckpoint
from .files import (CONFIG_NAME, SafetensorsDir, dtype_name, model_dtype, natural_key as _natural_key,
                    read_config)
from .errors import GraceFormatError
from .quantizer import SUPPORTED_BITS, dequantize


@dataclass(frozen=True)
class ExportedLinear:
    """One module of a standard checkpoint: signed codes (out, in) and scales (out, in/G) as stored."""
    name: str
    codes: torch.Tensor
    scales: torch.Tensor


def serve_commands(path: str) -> list[str]:
    """Stock engine commands for a standard checkpoint: the quantization_config tells the engine."""
    return [f"vllm serve {path}", f"python -m sglang.launch_server --model-path {path}"]


class StandardCheckpoint:
    """A GPTQ / AWQ / compressed-tensors directory, its settings validated from quantization_config;
    its layout (``self.target``, from :mod:`grace_qat.targets`) reads every module."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.config = read_config(self.path)
        self.cfg_path = os.path.join(self.path, CONFIG_NAME)
        self.target = targets.declared(self.config)
        if self.target is None:
            raise GraceFormatError(f"{self.cfg_path}: no gptq/awq/compressed-tensors quantization_config")
        self.method = self.target.name
        self.tensors = SafetensorsDir(self.path)
        self.bits, self.group_size = self._settings(self.config["quantization_config"])
        leaf = self.target.module_leaf
        self.modules = sorted((k[: -len(leaf) - 1] for k in self.tensors.keys() if k.endswith("." + leaf)),
                              key=_natural_key)
        if not self.modules:
            raise GraceFormatError(f"{self.path}: quantization_config says {self.method}, but no tensor "
                                   f"ends in .{leaf}")

    def _bad(self, what: str) -> GraceFormatError:
        return GraceFormatError(f"{self.cfg_path}: quantization_config{what}")

    def _settings(self, qc: dict) -> tuple[int, int]:
        bits, gs = self.target.settings(qc, self._bad)
        if bits not in SUPPORTED_BITS:
            raise self._bad(f" bits must be one of {SUPPORTED_BITS}, got {bits}")
        if gs <= 0:
            raise self._bad(f" group_size must be positive, got {gs}")
        return bits, gs

    # -- per module ---------------------------------------------------------------------------

    def quantized(self, name: str) -> ExportedLinear:
        """Codes and scales of one module, verified; GraceFormatError names file, tensor, expectation."""
        codes, scales = self.target.read(targets.ModuleFiles(self.tensors, self.path, self.method, self.bits,
                                                             self.group_size, name))
        leaf = self.target.scale_leaf
        s32 = scales.to(torch.float32)
        if not bool(torch.isfinite(s32).all()) or not bool((s32 > 0).all()):
            raise GraceFormatError(f"{self.tensors.file_of(f'{name}.{leaf}')}: {name}.{leaf}: "
                                   f"{int((~torch.isfinite(s32) | (s32 <= 0)).sum())} scales are not "
                                   f"finite and > 0")
        return ExportedLinear(name, codes.to(torch.int16), scales.contiguous())

    def iter_quantized(self) -> Iterator[ExportedLinear]:
        for name in self.modules:
            yield self.quantized(name)

    def scale_dtype(self) -> torch.dtype:
        return self.tensors.get(f"{self.modules[0]}.{self.target.scale_leaf}").dtype


def _name_map(src: GraceCheckpoint, export_names) -> callable:
    """Export tensor name of a source tensor: the same, or the llava-hf renaming when the export
    was written with --layout llava-hf."""
    from . import llava_hf
    names = set(export_names)
    if src.modules and src.modules[0] + ".weight" not in names and llava_hf.is_original_llava(src.config):
        return llava_hf.rename
    return lambda n: n


def compare(export_path: str, src_path: str, bits: int | None = None) -> str:
    """Check an export against its source GRACE checkpoint: every module's codes equal bit for bit,
    scales equal to the source's rounded to the export's dtype (a BF16 export: weights equal to the
    source's codes x scales, as convert computes them); every other tensor equal. Returns a line
    saying what was found exact; raises GraceFormatError at the first difference."""
    src = GraceCheckpoint.open(src_path, bits=bits)
    if not src.modules:
        raise GraceFormatError(f"{src.path}: not a GRACE quantized checkpoint (nothing to compare against)")
    export_config = read_config(os.path.abspath(export_path))
    if targets.declared(export_config) is None:
        tensors = SafetensorsDir(os.path.abspath(export_path))
        name_of = _name_map(src, tensors.keys())
        dtype = model_dtype(export_config)   # what the export was written for
        for q in src.iter_quantized():
            key = name_of(q.name) + ".weight"
            if key not in tensors:
                raise GraceFormatError(f"{export_path}: {key} missing (source module {q.name})")
            got, want = tensors.get(key), dequantize(q.codes, q.scales, q.group_size, dtype)
            if got.dtype != want.dtype or not torch.equal(got, want):
                raise GraceFormatError(f"{tensors.file_of(key)}: {key} differs from the source's codes x "
                                       f"scales in {dtype_name(dtype)}")
        _compare_others(src, tensors, name_of)
        return (f"{len(src.modules)} modules: weights equal to the source's codes x scales rounded to "
                f"{dtype_name(dtype)}; other tensors equal")
    exp = StandardCheckpoint(export_path)
    name_of = _name_map(src, exp.tensors.keys())
    if exp.bits != src.bits or exp.group_size != src.group_size:
        raise GraceFormatError(f"{exp.cfg_path}: {exp.bits}-bit group {exp.group_size}, but the source "
                               f"{src.path} is {src.bits}-bit group {src.group_size}")
    want_mods = sorted((name_of(m) for m in src.modules), key=_natural_key)
    if want_mods != exp.modules:
        missing = sorted(set(want_mods) - set(exp.modules)) or sorted(set(exp.modules) - set(want_mods))
        raise GraceFormatError(f"{exp.path}: quantized modules differ from the source's "
                               f"({len(exp.modules)} vs {len(want_mods)}; first difference {missing[0]})")
    sdtype = exp.scale_dtype()
    leaf = exp.target.scale_leaf
    for q in src.iter_quantized():
        e = exp.quantized(name_of(q.name))
        if tuple(e.codes.shape) != tuple(q.codes.shape) or not torch.equal(e.codes.to(torch.int16),
                                                                          q.codes.to(torch.int16)):
            bad = "shape" if e.codes.shape != q.codes.shape else \
                f"{int((e.codes.to(torch.int16) != q.codes.to(torch.int16)).sum())} codes"
            raise GraceFormatError(f"{exp.path}: {e.name}: {bad} differ from the source's "
                                   f"{q.name} ({src.path})")
        if e.scales.dtype != sdtype or not torch.equal(e.scales, q.scales.to(sdtype)):
            raise GraceFormatError(f"{exp.tensors.file_of(f'{e.name}.{leaf}')}: {e.name}.{leaf} differs from "
                                   f"the source's scales rounded to {dtype_name(e.scales.dtype)}")
    _compare_others(src, exp.tensors, name_of)
    s_src = src.steps_dtype()
    how = (f"scales exact ({dtype_name(sdtype)}, as in the source)" if s_src == sdtype else
           f"scales equal to the source's {dtype_name(s_src)} scales rounded to {dtype_name(sdtype)}")
    return f"{len(src.modules)} modules: codes equal bit for bit, {how}; other tensors equal"


def _compare_others(src: GraceCheckpoint, tensors: SafetensorsDir, name_of) -> None:
    """Every unquantized tensor of the source is in the export, unchanged."""
    for name in src.other_tensor_names():
        key = name_of(name)
        if key not in tensors:
            raise GraceFormatError(f"{tensors.path}: {key} missing (source tensor {name})")
        a, b = tensors.get(key), src.tensors.get(name)
        if a.dim() == b.dim() == 2 and a.shape[0] > b.shape[0] and a.shape[1:] == b.shape[1:]:
            a = a[: b.shape[0]]          # llava-hf extends the vocabulary (<image>, padding): rows kept
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            raise GraceFormatError(f"{tensors.file_of(key)}: {key} differs from the source's {name}")


def describe_plain(path: str) -> dict:
    """A checkpoint with no quantized modules: its tensors' dtypes, for inspect's report."""
    tensors = SafetensorsDir(os.path.abspath(path))
    dtypes: dict[str, int] = {}
    for k in tensors.keys():
        d = tensors.dtype(k)
        dtypes[d] = dtypes.get(d, 0) + 1
    return {"tensors": len(tensors.keys()), "dtypes": dtypes}
