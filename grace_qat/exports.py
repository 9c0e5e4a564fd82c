"""Reading the standard checkpoints ``grace-qat convert`` writes (and others like them): GPTQ, AutoAWQ
GEMM with a ``quantization_config``, compressed-tensors ``pack-quantized`` and plain 16-bit.

Stock engines serve these without the plugin; ``grace-qat inspect`` uses this module to say what a
directory is, to verify it (symmetric zero points, codes unpacked in range, scales finite and > 0,
bits and group size from its quantization_config), and to compare an export with the GRACE
checkpoint it came from (:func:`compare`). Unpacking itself lives in :mod:`grace_qat.packing`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import torch

from .checkpoint import GraceCheckpoint
from .files import CONFIG_NAME, SafetensorsDir, natural_key as _natural_key, read_config
from .errors import GraceFormatError
from .packing import pack_factor, unpack_awq, unpack_compressed_tensors, unpack_gptq
from .quantizer import SUPPORTED_BITS, dequantize, effective_group_size

GPTQ, AWQ, CT = "gptq", "awq", "compressed-tensors"
STANDARD_METHODS = (GPTQ, AWQ, CT)
DESCRIPTION = {
    GPTQ: "GPTQ (symmetric, packed along the input dimension)",
    AWQ: "AutoAWQ GEMM (packed along the output dimension, zero point 8)",
    CT: "compressed-tensors pack-quantized (symmetric WNA16)",
}
_FLOAT16 = (torch.float16, torch.bfloat16, torch.float32)


def standard_method(config: dict) -> str | None:
    """The standard quant_method a config.json declares (gptq, awq, compressed-tensors), else None."""
    qc = config.get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    return method if method in STANDARD_METHODS else None


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
    """A GPTQ / AWQ / compressed-tensors directory, its settings validated from quantization_config."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.config = read_config(self.path)
        self.cfg_path = os.path.join(self.path, CONFIG_NAME)
        self.method = standard_method(self.config)
        if self.method is None:
            raise GraceFormatError(f"{self.cfg_path}: no gptq/awq/compressed-tensors quantization_config")
        self.tensors = SafetensorsDir(self.path)
        self.bits, self.group_size = self._settings(self.config["quantization_config"])
        leaf = "weight_packed" if self.method == CT else "qweight"
        self.modules = sorted((k[: -len(leaf) - 1] for k in self.tensors.keys() if k.endswith("." + leaf)),
                              key=_natural_key)
        if not self.modules:
            raise GraceFormatError(f"{self.path}: quantization_config says {self.method}, but no tensor "
                                   f"ends in .{leaf}")

    def _bad(self, what: str) -> GraceFormatError:
        return GraceFormatError(f"{self.cfg_path}: quantization_config{what}")

    def _settings(self, qc: dict) -> tuple[int, int]:
        def integer(obj, key, prefix):
            v = obj.get(key)
            if isinstance(v, bool) or not isinstance(v, int):
                raise self._bad(f"{prefix}.{key} must be an integer, got {v!r}")
            return v

        if self.method == CT:
            if qc.get("format") != "pack-quantized":
                raise self._bad(f".format is {qc.get('format')!r}, expected 'pack-quantized'")
            groups = qc.get("config_groups")
            if not isinstance(groups, dict) or len(groups) != 1:
                raise self._bad(".config_groups must hold exactly one group")
            (gname, group), = groups.items()
            w = group.get("weights") if isinstance(group, dict) else None
            if not isinstance(w, dict):
                raise self._bad(f".config_groups.{gname}.weights must be an object")
            prefix = f".config_groups.{gname}.weights"
            bits, gs = integer(w, "num_bits", prefix), integer(w, "group_size", prefix)
            if w.get("symmetric") is not True or w.get("type") != "int" or w.get("strategy") != "group":
                raise self._bad(f"{prefix}: expected symmetric int weights with strategy 'group', got "
                                f"symmetric={w.get('symmetric')!r}, type={w.get('type')!r}, "
                                f"strategy={w.get('strategy')!r}")
        else:
            bits, gs = integer(qc, "bits", ""), integer(qc, "group_size", "")
            if self.method == GPTQ and (qc.get("sym") is not True or qc.get("desc_act")):
                raise self._bad(f": expected sym true and desc_act false, got sym={qc.get('sym')!r}, "
                                f"desc_act={qc.get('desc_act')!r}")
            if self.method == AWQ and (bits != 4 or str(qc.get("version", "gemm")).lower() != "gemm"):
                raise self._bad(f": expected 4-bit GEMM AWQ, got bits={bits}, version={qc.get('version')!r}")
        if bits not in SUPPORTED_BITS:
            raise self._bad(f" bits must be one of {SUPPORTED_BITS}, got {bits}")
        if gs <= 0:
            raise self._bad(f" group_size must be positive, got {gs}")
        return bits, gs

    # -- per module ---------------------------------------------------------------------------

    def _get(self, name: str, leaf: str, dtypes=None, dims: int | None = None) -> torch.Tensor:
        key = f"{name}.{leaf}"
        if key not in self.tensors:
            raise GraceFormatError(f"{self.path}: {key} missing for {self.method} module {name}")
        t = self.tensors.get(key)
        if dtypes is not None and t.dtype not in dtypes:
            raise GraceFormatError(f"{self.tensors.file_of(key)}: {key} is {t.dtype}, expected "
                                   f"{' or '.join(str(d).split('.')[-1] for d in dtypes)}")
        if dims is not None and t.dim() != dims:
            raise GraceFormatError(f"{self.tensors.file_of(key)}: {key} has shape {tuple(t.shape)}, "
                                   f"expected {dims}-D")
        return t

    def _shape_check(self, name: str, leaf: str, t: torch.Tensor, expected: tuple) -> None:
        if tuple(t.shape) != tuple(expected):
            raise GraceFormatError(f"{self.tensors.file_of(name + '.' + leaf)}: {name}.{leaf} has shape "
                                   f"{tuple(t.shape)}, expected {tuple(expected)} for {self.bits}-bit "
                                   f"group {self.group_size}")

    def quantized(self, name: str) -> ExportedLinear:
        """Codes and scales of one module, verified; GraceFormatError names file, tensor, expectation."""
        i32 = (torch.int32,)
        pf = pack_factor(self.bits)
        if self.method == CT:
            packed = self._get(name, "weight_packed", i32, 2)
            scales = self._get(name, "weight_scale", _FLOAT16, 2)
            shape = tuple(int(v) for v in self._get(name, "weight_shape", None, 1).tolist())
            out_f, in_f = packed.shape[0], packed.shape[1] * pf
            if shape != (out_f, in_f):
                raise GraceFormatError(f"{self.tensors.file_of(name + '.weight_shape')}: {name}.weight_shape is "
                                       f"{list(shape)}, but weight_packed holds {out_f}x{in_f}")
            groups = in_f // effective_group_size(in_f, self.group_size)
            self._shape_check(name, "weight_scale", scales, (out_f, groups))
            if f"{name}.weight_zero_point" in self.tensors and bool(
                    self.tensors.get(f"{name}.weight_zero_point").any()):
                raise GraceFormatError(f"{self.tensors.file_of(name + '.weight_zero_point')}: "
                                       f"{name}.weight_zero_point is not all 0 (expected symmetric weights)")
            codes, scales = unpack_compressed_tensors(packed, scales, self.bits)
        else:
            qweight, qzeros = self._get(name, "qweight", i32, 2), self._get(name, "qzeros", i32, 2)
            raw = self._get(name, "scales", _FLOAT16, 2)
            if self.method == GPTQ:
                in_f, out_f = qweight.shape[0] * pf, qweight.shape[1]
            else:
                in_f, out_f = qweight.shape[0], qweight.shape[1] * 8
            groups = in_f // effective_group_size(in_f, self.group_size)
            self._shape_check(name, "qzeros", qzeros, (groups, out_f // pf))
            self._shape_check(name, "scales", raw, (groups, out_f))
            try:
                if self.method == GPTQ:
                    codes, scales = unpack_gptq(qweight, qzeros, raw, self.bits, name)
                else:
                    codes, scales = unpack_awq(qweight, qzeros, raw, name)
            except GraceFormatError as e:
                raise GraceFormatError(f"{self.tensors.file_of(name + '.qzeros')}: {e}") from None
            if self.method == GPTQ and f"{name}.g_idx" in self.tensors:
                g_idx = self.tensors.get(f"{name}.g_idx")
                want = torch.arange(in_f) // (in_f // groups)
                if tuple(g_idx.shape) != (in_f,) or not torch.equal(g_idx.to(torch.int64), want):
                    raise GraceFormatError(f"{self.tensors.file_of(name + '.g_idx')}: {name}.g_idx is not "
                                           f"the trivial order arange({in_f}) // {in_f // groups} "
                                           f"(desc_act=false)")
        leaf = "weight_scale" if self.method == CT else "scales"
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
        key = self.modules[0] + (".weight_scale" if self.method == CT else ".scales")
        return self.tensors.get(key).dtype


def _dtype_name(d: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(d, str(d))


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
    config = read_config(os.path.abspath(export_path))
    method = standard_method(config)
    from .convert import model_dtype, source_scale_dtype
    if method is None:
        tensors = SafetensorsDir(os.path.abspath(export_path))
        name_of = _name_map(src, tensors.keys())
        dtype = model_dtype(src.config)
        for q in src.iter_quantized():
            key = name_of(q.name) + ".weight"
            if key not in tensors:
                raise GraceFormatError(f"{export_path}: {key} missing (source module {q.name})")
            got, want = tensors.get(key), dequantize(q.codes, q.scales, q.group_size, dtype)
            if got.dtype != want.dtype or not torch.equal(got, want):
                raise GraceFormatError(f"{tensors.file_of(key)}: {key} differs from the source's codes x "
                                       f"scales in {_dtype_name(dtype)}")
        _compare_others(src, tensors, name_of)
        return (f"{len(src.modules)} modules: weights equal to the source's codes x scales rounded to "
                f"{_dtype_name(dtype)}; other tensors equal")
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
    leaf = "weight_scale" if exp.method == CT else "scales"
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
                                   f"the source's scales rounded to {_dtype_name(e.scales.dtype)}")
    _compare_others(src, exp.tensors, name_of)
    s_src = source_scale_dtype(src)
    how = (f"scales exact ({_dtype_name(sdtype)}, as in the source)" if s_src == sdtype else
           f"scales equal to the source's {_dtype_name(s_src)} scales rounded to {_dtype_name(sdtype)}")
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
