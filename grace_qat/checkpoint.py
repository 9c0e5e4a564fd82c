"""Reading GRACE checkpoint directories: detect the format, list quantized modules, and hand out
verified integer codes and fp32 steps per module. Engine-independent: torch + safetensors only.

Formats (shared/grace-format.md):
  * ``qat-sidecar``: BF16 weights on the grid + ``qat_quantized_weights.bin`` (log-scales);
  * ``qat-inline``:  BF16 weights on the grid with ``<module>.log_scale`` still in the safetensors;
  * ``qat-grid``:    BF16 weights on the grid and nothing else: steps are derived from the grid;
  * ``awq``:         AutoAWQ GEMM packed 4-bit, zero point 8, ``awq_quantized_modules.json``;
  * ``plain``:       an unquantized checkpoint (e.g. the GRACE-BF16 release).
"""
from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator

import torch
from safetensors import safe_open

from .errors import GraceFormatError
from .packing import unpack_awq
from .quantizer import (DEFAULT_GROUP_SIZE, check_bits, code_range, derive_scales,
                        effective_group_size, recover_codes, scales_from_log_scale)

SIDECAR_NAME = "qat_quantized_weights.bin"
AWQ_MODULES_NAME = "awq_quantized_modules.json"
CONFIG_NAME = "config.json"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"

FORMAT_QAT_SIDECAR = "qat-sidecar"
FORMAT_QAT_INLINE = "qat-inline"
FORMAT_QAT_GRID = "qat-grid"
FORMAT_AWQ = "awq"
FORMAT_PLAIN = "plain"
QAT_FORMATS = (FORMAT_QAT_SIDECAR, FORMAT_QAT_INLINE, FORMAT_QAT_GRID)

# The linears GRACE quantizes: attention and MLP projections of every language-model decoder layer.
_QUANTIZABLE = re.compile(r"(^|\.)layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")
_VISION = re.compile(r"(^|\.)(visual|vision_tower|vision_model|mm_projector)(\.|$)")


def is_quantizable_module(name: str) -> bool:
    """True for a language-model linear that GRACE quantizes (never vision tower or projector)."""
    return bool(_QUANTIZABLE.search(name)) and not _VISION.search(name)


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def load_sidecar(path: str) -> dict[str, torch.Tensor]:
    """Open ``qat_quantized_weights.bin`` lazily and safely: tensors only, memory-mapped.

    ``weights_only=True`` uses PyTorch's restricted unpickler, which refuses any object other than
    tensors and plain containers, so a pickle carrying code is rejected without running it.
    """
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:       # legacy (non-zip) torch.save files cannot be memory-mapped
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GraceFormatError(f"{path}: refused to load: it holds more than tensors ({first})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise GraceFormatError(f"{path}: not a readable torch.save file ({e})") from None
    if not isinstance(data, dict):
        raise GraceFormatError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    for k, v in data.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise GraceFormatError(f"{path}: entry {k!r} is {type(v).__name__}, expected a tensor")
    return data


class SafetensorsDir:
    """Lazy, read-only view of every tensor in a directory's safetensors files (sharded or not)."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, SAFETENSORS_INDEX_NAME)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError) as e:
                raise GraceFormatError(f"{index}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            weight_map = None
        if not files:
            raise GraceFormatError(f"{path}: no *.safetensors files")
        self._file_of: dict[str, str] = {}
        self._handles: dict[str, object] = {}
        for fname in files:
            full = os.path.join(path, fname)
            if not os.path.exists(full):
                raise GraceFormatError(f"{full}: listed in {SAFETENSORS_INDEX_NAME} but missing")
            try:
                handle = safe_open(full, framework="pt")
            except Exception as e:  # safetensors raises its own error types for truncated headers
                raise GraceFormatError(f"{full}: unreadable safetensors file ({e})") from None
            self._handles[fname] = handle
            for key in handle.keys():
                self._file_of[key] = fname
        if weight_map is not None:
            missing = [k for k, f in weight_map.items() if self._file_of.get(k) != f]
            if missing:
                raise GraceFormatError(
                    f"{index}: {len(missing)} tensors are not in the shard the index names "
                    f"(first: {missing[0]} in {weight_map[missing[0]]})")

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def file_of(self, key: str) -> str:
        return os.path.join(self.path, self._file_of[key])

    def get(self, key: str) -> torch.Tensor:
        if key not in self._file_of:
            raise GraceFormatError(f"{self.path}: tensor {key} not found in the safetensors files")
        try:
            return self._handles[self._file_of[key]].get_tensor(key)
        except Exception as e:
            raise GraceFormatError(f"{self.file_of(key)}: cannot read tensor {key} ({e})") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._file_of[key]].get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return self._handles[self._file_of[key]].get_slice(key).get_dtype()


@dataclass(frozen=True)
class QuantizedLinear:
    """One quantized linear: verified signed codes (out, in) and fp32 steps (out, in/G)."""
    name: str
    codes: torch.Tensor
    scales: torch.Tensor
    bits: int
    group_size: int
    bias: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)


class GraceCheckpoint:
    """A GRACE checkpoint directory. ``open`` detects everything; nothing heavy is read until asked."""

    def __init__(self, path: str, fmt: str, bits: int | None, group_size: int, modules: list[str],
                 config: dict, tensors: SafetensorsDir, sidecar_path: str | None = None):
        self.path, self.format, self.bits, self.group_size = path, fmt, bits, group_size
        self.modules, self.config, self.tensors = modules, config, tensors
        self.sidecar_path = sidecar_path

    # -- detection ----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str, bits: int | None = None, group_size: int | None = None) -> "GraceCheckpoint":
        path = os.path.abspath(path)
        if not os.path.isdir(path):
            raise GraceFormatError(f"{path}: not a directory")
        config = read_config(path)
        declared = config.get("quantization_config") or {}
        if declared.get("quant_method") == "grace_qat":
            bits = bits or declared.get("bits")
            group_size = group_size or declared.get("group_size")
        if bits is not None:
            check_bits(int(bits))
        tensors = SafetensorsDir(path)
        awq_json = os.path.join(path, AWQ_MODULES_NAME)
        sidecar = os.path.join(path, SIDECAR_NAME)
        if os.path.exists(awq_json) or config.get("awq_packing") or any(
                k.endswith(".qweight") for k in tensors.keys()):
            return cls._open_awq(path, config, tensors, awq_json, bits, group_size)
        candidates = sorted((k[: -len(".weight")] for k in tensors.keys()
                             if k.endswith(".weight") and is_quantizable_module(k[: -len(".weight")])),
                            key=_natural_key)
        gs = int(group_size or DEFAULT_GROUP_SIZE)
        if os.path.exists(sidecar):
            modules = cls._sidecar_modules(sidecar, tensors)
            ckpt = cls(path, FORMAT_QAT_SIDECAR, bits, gs, modules, config, tensors, sidecar)
        elif any(k.endswith(".log_scale") for k in tensors.keys()):
            modules = sorted((k[: -len(".log_scale")] for k in tensors.keys() if k.endswith(".log_scale")),
                             key=_natural_key)
            ckpt = cls(path, FORMAT_QAT_INLINE, bits, gs, modules, config, tensors)
        else:
            if not candidates:
                return cls(path, FORMAT_PLAIN, None, gs, [], config, tensors)
            ckpt = cls(path, FORMAT_QAT_GRID, bits, gs, candidates, config, tensors)
            if ckpt.bits is None:
                first = candidates[0]
                w = tensors.get(first + ".weight")
                for b in (4, 8):
                    try:
                        derive_scales(w, b, gs, first)
                        ckpt.bits = b
                        break
                    except GraceFormatError:
                        continue
                else:
                    return cls(path, FORMAT_PLAIN, None, gs, [], config, tensors)
        ckpt._check_module_set(candidates)
        if ckpt.bits is None:
            ckpt.bits = ckpt._infer_bits()
        return ckpt

    @classmethod
    def _open_awq(cls, path, config, tensors, awq_json, bits, group_size):
        meta = {}
        if os.path.exists(awq_json):
            try:
                with open(awq_json) as f:
                    meta = json.load(f)
            except ValueError as e:
                raise GraceFormatError(f"{awq_json}: not valid JSON ({e})") from None
        packing = config.get("awq_packing") or {}
        zp = packing.get("zero_point", 8)
        if zp != 8:
            raise GraceFormatError(f"{os.path.join(path, CONFIG_NAME)}: awq_packing.zero_point is {zp}; "
                                   f"GRACE AWQ checkpoints use the constant zero point 8")
        b = int(meta.get("bits", packing.get("bits", bits or 4)))
        if b != 4:
            raise GraceFormatError(f"{awq_json}: AWQ-packed GRACE checkpoints are 4-bit, got bits={b}")
        gs = int(meta.get("group_size", packing.get("group_size", group_size or DEFAULT_GROUP_SIZE)))
        packed = sorted((k[: -len(".qweight")] for k in tensors.keys() if k.endswith(".qweight")),
                        key=_natural_key)
        modules = sorted(meta.get("modules", packed), key=_natural_key)
        missing = [m for m in modules if m not in packed]
        extra = [m for m in packed if m not in modules]
        if missing or extra:
            raise GraceFormatError(
                f"{awq_json}: module list and packed tensors disagree "
                f"(listed without .qweight: {missing[:3]}, packed but not listed: {extra[:3]})")
        for m in modules:
            for suffix in (".qzeros", ".scales"):
                if m + suffix not in tensors:
                    raise GraceFormatError(f"{path}: {m}{suffix} missing for AWQ module {m}")
        return cls(path, FORMAT_AWQ, 4, gs, modules, config, tensors)

    @staticmethod
    def _sidecar_modules(sidecar: str, tensors: SafetensorsDir) -> list[str]:
        data = load_sidecar(sidecar)
        modules = sorted((k[: -len(".log_scale")] for k in data if k.endswith(".log_scale")),
                         key=_natural_key)
        if not modules:
            raise GraceFormatError(f"{sidecar}: holds no <module>.log_scale entries")
        for k in data:
            base = k.rsplit(".", 1)[0]
            if not k.endswith((".log_scale", ".weight", ".bias")) or base not in modules:
                raise GraceFormatError(f"{sidecar}: unexpected entry {k!r} (expected <module>.weight, "
                                       f".log_scale and .bias for quantized modules only)")
        return modules

    def _check_module_set(self, candidates: list[str]) -> None:
        where = self.sidecar_path or self.path
        extra = [m for m in self.modules if m + ".weight" not in self.tensors]
        if extra:
            raise GraceFormatError(f"{where}: scales for {len(extra)} modules that have no weight in the "
                                   f"safetensors (first: {extra[0]})")
        missing = [m for m in candidates if m not in set(self.modules)]
        if missing:
            raise GraceFormatError(f"{where}: no scales for {len(missing)} quantizable linears "
                                   f"(first: {missing[0]}); every language-model projection must be quantized")

    def _infer_bits(self) -> int:
        """The codes' range tells the bits: a 4-bit grid never needs a code beyond [-8, 7]."""
        first = self.modules[0]
        w = self.tensors.get(first + ".weight")
        s = self._scales(first, w.shape)
        codes = torch.round(w.float().reshape(w.shape[0], s.shape[1], -1) / s.unsqueeze(-1))
        lo, hi = code_range(4)
        return 4 if float(codes.min()) >= lo and float(codes.max()) <= hi else 8

    # -- per-module access --------------------------------------------------------------------

    @cached_property
    def _sidecar(self) -> dict[str, torch.Tensor]:
        return load_sidecar(self.sidecar_path)

    def module_shape(self, name: str) -> tuple[int, int]:
        if self.format == FORMAT_AWQ:
            in_f, packed_out = self.tensors.shape(name + ".qweight")
            return packed_out * 8, in_f
        shape = self.tensors.shape(name + ".weight")
        if len(shape) != 2:
            raise GraceFormatError(f"{self.tensors.file_of(name + '.weight')}: {name}.weight has shape "
                                   f"{shape}, expected a 2-D linear weight")
        return shape

    def module_group_size(self, name: str) -> int:
        return effective_group_size(self.module_shape(name)[1], self.group_size)

    def log_scale(self, name: str) -> torch.Tensor:
        """The raw learned log-steps of a QAT module (sidecar or inline)."""
        if self.format == FORMAT_QAT_SIDECAR:
            key = name + ".log_scale"
            if key not in self._sidecar:
                raise GraceFormatError(f"{self.sidecar_path}: missing {key}")
            return self._sidecar[key]
        if self.format == FORMAT_QAT_INLINE:
            return self.tensors.get(name + ".log_scale")
        raise GraceFormatError(f"{self.path}: format {self.format} has no log_scale tensors")

    def _scales(self, name: str, shape) -> torch.Tensor:
        out_f, in_f = shape
        if self.format in (FORMAT_QAT_SIDECAR, FORMAT_QAT_INLINE):
            where = self.sidecar_path if self.format == FORMAT_QAT_SIDECAR else self.tensors.file_of(
                name + ".log_scale")
            try:
                return scales_from_log_scale(self.log_scale(name), out_f, in_f, self.group_size, name)
            except GraceFormatError as e:
                raise GraceFormatError(f"{where}: {e}") from None
        raise GraceFormatError(f"{self.path}: no stored scales in format {self.format}")

    def scales(self, name: str) -> torch.Tensor:
        """fp32 steps (out, in/G) of one module, without reading or verifying its weight (AWQ: read)."""
        if self.format == FORMAT_AWQ:
            return self.tensors.get(name + ".scales").to(torch.float32).t().contiguous()
        if self.format == FORMAT_QAT_GRID:
            return self.quantized(name).scales
        return self._scales(name, self.module_shape(name))

    def quantized(self, name: str) -> QuantizedLinear:
        """Verified codes and steps of one module; raises GraceFormatError naming file and tensor."""
        bias = self.tensors.get(name + ".bias") if name + ".bias" in self.tensors else None
        if self.format == FORMAT_AWQ:
            t = self.tensors
            try:
                codes, scales = unpack_awq(t.get(name + ".qweight"), t.get(name + ".qzeros"),
                                           t.get(name + ".scales"), name)
            except GraceFormatError as e:
                raise GraceFormatError(f"{t.file_of(name + '.qzeros')}: {e}") from None
            scales = scales.to(torch.float32)
            if not torch.isfinite(scales).all() or not (scales > 0).all():
                raise GraceFormatError(f"{t.file_of(name + '.scales')}: {name}.scales must be finite and > 0")
            out_f, in_f = codes.shape
            if in_f % scales.shape[1] or in_f // scales.shape[1] != effective_group_size(in_f, self.group_size):
                raise GraceFormatError(f"{t.file_of(name + '.scales')}: {name}.scales has {scales.shape[1]} "
                                       f"groups per row for in_features {in_f} and group size {self.group_size}")
            return QuantizedLinear(name, codes.to(torch.int8), scales, 4, self.group_size, bias)
        if self.format not in QAT_FORMATS:
            raise GraceFormatError(f"{self.path}: not a quantized checkpoint (format {self.format})")
        weight = self.tensors.get(name + ".weight")
        if weight.dim() != 2:
            raise GraceFormatError(f"{self.tensors.file_of(name + '.weight')}: {name}.weight has shape "
                                   f"{tuple(weight.shape)}, expected a 2-D linear weight")
        if weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise GraceFormatError(f"{self.tensors.file_of(name + '.weight')}: {name}.weight is "
                                   f"{weight.dtype}, expected bfloat16/float16")
        where = self.tensors.file_of(name + ".weight")
        try:
            if self.format == FORMAT_QAT_GRID:
                scales = derive_scales(weight, self.bits, self.group_size, name)
            else:
                scales = self._scales(name, weight.shape)
            codes = recover_codes(weight, scales, self.bits, self.group_size, name)
        except GraceFormatError as e:
            raise GraceFormatError(f"{where}: {e}") from None
        return QuantizedLinear(name, codes, scales, self.bits, self.group_size, bias)

    def iter_quantized(self, progress: bool = False) -> Iterator[QuantizedLinear]:
        modules = self.modules
        if progress:
            from tqdm import tqdm
            modules = tqdm(modules, desc="modules", unit="mod")
        for name in modules:
            yield self.quantized(name)

    def other_tensor_names(self) -> list[str]:
        """Tensors that are not part of a quantized module's weight/scales (embeddings, vision...)."""
        mods = set(self.modules)
        out = []
        for k in self.tensors.keys():
            base, _, leaf = k.rpartition(".")
            if base in mods and leaf in ("weight", "log_scale", "qweight", "qzeros", "scales"):
                continue
            out.append(k)
        return sorted(out, key=_natural_key)

    def describe(self) -> dict:
        return {"path": self.path, "format": self.format, "bits": self.bits,
                "group_size": self.group_size, "modules": len(self.modules)}


def read_config(path: str) -> dict:
    cfg = os.path.join(path, CONFIG_NAME)
    if not os.path.exists(cfg):
        raise GraceFormatError(f"{cfg}: missing")
    try:
        with open(cfg) as f:
            return json.load(f)
    except ValueError as e:
        raise GraceFormatError(f"{cfg}: not valid JSON ({e})") from None
