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
from .quantizer import (DEFAULT_GROUP_SIZE, SUPPORTED_BITS, check_bits, code_range, derive_scales,
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


_ADVICE = re.compile(r"weights[ _]only|check the documentation|safe_globals|trusted source|if you trust", re.I)


def _torch_reason(text: str) -> str:
    """The part of torch.load's error that says what is in the file, without torch's advice on how to
    load it anyway (re-running with weights_only=False, allowlisting globals): a refused file stays
    refused, and a user must never be told to unpickle it."""
    for line in text.splitlines():
        line = re.split(r"\s(?:Please use|You can use|If you trust|To load)", line.strip(), maxsplit=1)[0]
        if line and not _ADVICE.search(line):
            return line.rstrip(".")
    return ""


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
        reason = _torch_reason(str(e)) or "an object that is not a tensor"
        raise GraceFormatError(f"{path}: refused to load: it holds more than tensors ({reason}); a GRACE "
                               f"sidecar holds tensors only") from None
    except Exception as e:   # noqa: BLE001 - corrupt zips/pickles raise many types (KeyError, ValueError,
        # struct.error, zipfile.BadZipFile, UnicodeDecodeError, ...): all mean "not a torch.save file"
        raise GraceFormatError(f"{path}: not a readable torch.save file "
                               f"({type(e).__name__}: {_torch_reason(str(e))})") from None
    if not isinstance(data, dict):
        raise GraceFormatError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    for k, v in data.items():
        if not isinstance(k, str):
            raise GraceFormatError(f"{path}: key {k!r} is {type(k).__name__}, expected a str tensor name")
        if not isinstance(v, torch.Tensor):
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
            except (ValueError, KeyError, TypeError) as e:
                raise GraceFormatError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise GraceFormatError(f"{index}: not a safetensors index (weight_map must map tensor "
                                       f"names to shard file names)")
            for k, fname in weight_map.items():
                if (not fname or fname != os.path.basename(fname) or fname in (".", "..")
                        or os.path.isabs(fname) or "\\" in fname):
                    raise GraceFormatError(f"{index}: shard {fname!r} of tensor {k} is not a file name "
                                           f"inside the checkpoint directory")
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
                if weight_map is None and key in self._file_of:
                    raise GraceFormatError(f"{full}: tensor {key} is also in {self._file_of[key]}; without "
                                           f"{SAFETENSORS_INDEX_NAME} it is ambiguous which one is meant")
                if weight_map is None or weight_map.get(key) == fname or key not in self._file_of:
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
        # True when nobody stated the bits (caller, config.json) and open() took them from the first
        # quantized module: every module computed later must then need exactly that width.
        self.bits_inferred = False

    # -- detection ----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str, bits: int | None = None, group_size: int | None = None,
             fmt: str | None = None) -> "GraceCheckpoint":
        """Detect and validate. A declared format (``fmt``, else config.json's grace_qat
        quantization_config) must match what the files are."""
        ckpt = cls._detect(path, bits, group_size)
        if fmt is None:
            declared = ckpt.config.get("quantization_config") or {}
            fmt = declared.get("format") if declared.get("quant_method") == "grace_qat" else None
        if fmt and fmt != ckpt.format:
            raise GraceFormatError(f"{os.path.join(ckpt.path, CONFIG_NAME)}: quantization_config says format "
                                   f"{fmt!r}, but the files are format {ckpt.format!r}")
        return ckpt

    @classmethod
    def _detect(cls, path: str, bits: int | None, group_size: int | None) -> "GraceCheckpoint":
        path = os.path.abspath(path)
        if not os.path.exists(path):
            raise GraceFormatError(f"{path}: does not exist")
        if not os.path.isdir(path):
            raise GraceFormatError(f"{path}: not a directory")
        config = read_config(path)
        cfg_path = os.path.join(path, CONFIG_NAME)
        declared = config.get("quantization_config") or {}
        if not isinstance(declared, dict):
            raise GraceFormatError(f"{cfg_path}: quantization_config must be a JSON object, "
                                   f"got {type(declared).__name__}")
        if declared.get("quant_method") == "grace_qat":   # validated even when the caller states them
            declared_bits = _declared_int(declared, "bits", cfg_path, "quantization_config.")
            declared_gs = _declared_int(declared, "group_size", cfg_path, "quantization_config.")
            bits, group_size = bits or declared_bits, group_size or declared_gs
        if bits is not None:
            try:
                check_bits(int(bits))
            except (GraceFormatError, TypeError, ValueError) as e:
                raise GraceFormatError(f"{path}: {e}") from None
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
                w = ckpt._checked_weight(first)
                for b in (4, 8):
                    try:
                        derive_scales(w, b, gs, first)
                        ckpt.bits, ckpt.bits_inferred = b, True
                        break
                    except GraceFormatError:
                        continue
                else:
                    return cls(path, FORMAT_PLAIN, None, gs, [], config, tensors)
        ckpt._check_module_set(candidates)
        _check_architecture(path, config, ckpt.modules)
        if ckpt.bits is None:
            ckpt.bits = ckpt._infer_bits()
            ckpt.bits_inferred = True
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
            if not isinstance(meta, dict):
                raise GraceFormatError(f"{awq_json}: expected a JSON object, got {type(meta).__name__}")
        cfg_path = os.path.join(path, CONFIG_NAME)
        packing = config.get("awq_packing") or {}
        if not isinstance(packing, dict):
            raise GraceFormatError(f"{cfg_path}: awq_packing must be a JSON object, got {type(packing).__name__}")
        zp = packing.get("zero_point", 8)
        if zp != 8:
            raise GraceFormatError(f"{cfg_path}: awq_packing.zero_point is {zp}; "
                                   f"GRACE AWQ checkpoints use the constant zero point 8")
        meta_bits, meta_gs = (_declared_int(meta, k, awq_json) for k in ("bits", "group_size"))
        pack_bits, pack_gs = (_declared_int(packing, k, cfg_path, "awq_packing.") for k in ("bits", "group_size"))
        if meta_bits is not None:
            b, where = meta_bits, awq_json
        elif pack_bits is not None:
            b, where = pack_bits, cfg_path
        else:
            b, where = int(bits or 4), path
        if b != 4:
            raise GraceFormatError(f"{where}: AWQ-packed GRACE checkpoints are 4-bit, got bits={b}")
        gs = meta_gs or pack_gs or int(group_size or DEFAULT_GROUP_SIZE)
        packed = sorted((k[: -len(".qweight")] for k in tensors.keys() if k.endswith(".qweight")),
                        key=_natural_key)
        listed = meta.get("modules", packed)
        if not isinstance(listed, list) or not all(isinstance(m, str) for m in listed):
            raise GraceFormatError(f"{awq_json}: modules must be a list of module names")
        modules = sorted(listed, key=_natural_key)
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
        _check_architecture(path, config, modules)
        return cls(path, FORMAT_AWQ, 4, gs, modules, config, tensors)

    @staticmethod
    def _sidecar_modules(sidecar: str, tensors: SafetensorsDir) -> list[str]:
        data = load_sidecar(sidecar)
        modules = sorted((k[: -len(".log_scale")] for k in data if k.endswith(".log_scale")),
                         key=_natural_key)
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
        w = self._checked_weight(first)
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
            ls, where = self._sidecar[key], self.sidecar_path
        elif self.format == FORMAT_QAT_INLINE:
            ls, where = self.tensors.get(name + ".log_scale"), self.tensors.file_of(name + ".log_scale")
        else:
            raise GraceFormatError(f"{self.path}: format {self.format} has no log_scale tensors")
        if not ls.is_floating_point():
            raise GraceFormatError(f"{where}: {name}.log_scale is {ls.dtype}, expected a floating-point "
                                   f"tensor (fp32 log-steps)")
        return ls

    def _scales(self, name: str, shape) -> torch.Tensor:
        out_f, in_f = shape
        if self.format in (FORMAT_QAT_SIDECAR, FORMAT_QAT_INLINE):
            where = self.sidecar_path if self.format == FORMAT_QAT_SIDECAR else self.tensors.file_of(
                name + ".log_scale")
            log_scale = self.log_scale(name)          # its own errors name the file already
            try:
                return scales_from_log_scale(log_scale, out_f, in_f, self.group_size, name)
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
            qweight, qzeros, scales = (t.get(name + s) for s in (".qweight", ".qzeros", ".scales"))
            self._check_awq_tensors(name, qweight, qzeros, scales)
            try:
                codes, scales = unpack_awq(qweight, qzeros, scales, name)
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
        weight = self._checked_weight(name)
        where = self.tensors.file_of(name + ".weight")
        if self.format == FORMAT_QAT_SIDECAR and name + ".weight" in self._sidecar:
            copy = self._sidecar[name + ".weight"]
            if tuple(copy.shape) != tuple(weight.shape):
                raise GraceFormatError(f"{self.sidecar_path}: {name}.weight has shape {tuple(copy.shape)} but "
                                       f"{where} holds it as {tuple(weight.shape)}")
        if self.format != FORMAT_QAT_GRID:
            scales = self._scales(name, weight.shape)   # its errors name the file holding log_scale
        try:
            if self.format == FORMAT_QAT_GRID:
                scales = derive_scales(weight, self.bits, self.group_size, name, self.bits_inferred)
            codes = recover_codes(weight, scales, self.bits, self.group_size, name, self.bits_inferred)
        except GraceFormatError as e:
            raise GraceFormatError(f"{where}: {e}") from None
        return QuantizedLinear(name, codes, scales, self.bits, self.group_size, bias)

    def _check_awq_tensors(self, name, qweight, qzeros, scales) -> None:
        """dtypes and shapes of one AWQ module: qweight (in, out/8) and qzeros (in/G, out/8) int32,
        scales (in/G, out) floating point, with G the effective group size."""
        t = self.tensors
        for key, tensor in ((".qweight", qweight), (".qzeros", qzeros)):
            if tensor.dtype != torch.int32:
                raise GraceFormatError(f"{t.file_of(name + key)}: {name}{key} is {tensor.dtype}, expected int32")
        if not scales.is_floating_point():
            raise GraceFormatError(f"{t.file_of(name + '.scales')}: {name}.scales is {scales.dtype}, expected "
                                   f"float16 (a floating-point dtype)")
        if qweight.dim() != 2:
            raise GraceFormatError(f"{t.file_of(name + '.qweight')}: {name}.qweight has shape "
                                   f"{tuple(qweight.shape)}, expected 2-D (in, out/8)")
        in_f, out_f = qweight.shape[0], qweight.shape[1] * 8
        groups = in_f // effective_group_size(in_f, self.group_size) if in_f else 0
        for key, tensor, expected in ((".qzeros", qzeros, (groups, out_f // 8)),
                                      (".scales", scales, (groups, out_f))):
            if tuple(tensor.shape) != expected:
                raise GraceFormatError(
                    f"{t.file_of(name + key)}: {name}{key} has shape {tuple(tensor.shape)}, expected {expected} "
                    f"for qweight {tuple(qweight.shape)} ({out_f}x{in_f}) and group size {self.group_size} "
                    f"({groups} groups per row)")

    def _checked_weight(self, name: str) -> torch.Tensor:
        """The stored weight of a QAT module, refused unless 2-D and bf16/fp16/fp32."""
        weight = self.tensors.get(name + ".weight")
        if weight.dim() != 2:
            raise GraceFormatError(f"{self.tensors.file_of(name + '.weight')}: {name}.weight has shape "
                                   f"{tuple(weight.shape)}, expected a 2-D linear weight")
        if weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise GraceFormatError(f"{self.tensors.file_of(name + '.weight')}: {name}.weight is "
                                   f"{weight.dtype}, expected bfloat16/float16")
        return weight

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
            config = json.load(f)
    except ValueError as e:    # includes UnicodeDecodeError
        raise GraceFormatError(f"{cfg}: not valid JSON ({e})") from None
    except OSError as e:
        raise GraceFormatError(f"{cfg}: unreadable ({e})") from None
    if not isinstance(config, dict):
        raise GraceFormatError(f"{cfg}: expected a JSON object, got {type(config).__name__}")
    return config


def _declared_int(obj: dict, key: str, where: str, prefix: str = "") -> int | None:
    """An integer setting (bits, group_size) read from a JSON file, validated; None when absent/null."""
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise GraceFormatError(f"{where}: {prefix}{key} must be an integer, got {value!r}")
    if key == "bits" and value not in SUPPORTED_BITS:
        raise GraceFormatError(f"{where}: {prefix}bits must be one of {SUPPORTED_BITS}, got {value}")
    if key == "group_size" and value <= 0:
        raise GraceFormatError(f"{where}: {prefix}group_size must be positive, got {value}")
    return value


# Where each known architecture keeps its language-model decoder layers (Transformers' saved names).
_ARCH_LAYER_PREFIXES = {
    "Qwen3VLForConditionalGeneration": ("model.language_model.layers.",),
    "Qwen2_5_VLForConditionalGeneration": ("model.language_model.layers.", "model.layers."),
    "Qwen2VLForConditionalGeneration": ("model.language_model.layers.", "model.layers."),
    "LlavaLlamaForCausalLM": ("model.layers.",),
    "LlavaForConditionalGeneration": ("model.language_model.layers.", "language_model.model.layers."),
    "LlamaForCausalLM": ("model.layers.",),
    "MistralForCausalLM": ("model.layers.",),
    "Qwen2ForCausalLM": ("model.layers.",),
    "Qwen3ForCausalLM": ("model.layers.",),
}
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _check_architecture(path: str, config: dict, modules: list[str]) -> None:
    """config.json must describe the quantized modules: a known architecture keeps its decoder layers
    under its own prefix, and ``num_hidden_layers`` is the number of quantized decoder layers."""
    cfg = os.path.join(path, CONFIG_NAME)
    archs = config.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise GraceFormatError(f"{cfg}: architectures must be a list of class names, got {archs!r}")
    if not modules:
        return
    for arch in archs or ():
        prefixes = _ARCH_LAYER_PREFIXES.get(arch)
        if prefixes is None:
            continue
        wrong = [m for m in modules if not m.startswith(prefixes)]
        if wrong:
            raise GraceFormatError(
                f"{cfg}: architectures says {arch}, whose decoder layers are {' or '.join(p + '*' for p in prefixes)}, "
                f"but {len(wrong)} quantized modules are not (first: {wrong[0]})")
    text = config.get("text_config")
    n = text.get("num_hidden_layers") if isinstance(text, dict) else None
    if n is None:
        n = config.get("num_hidden_layers")
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise GraceFormatError(f"{cfg}: num_hidden_layers must be a non-negative integer, got {n!r}")
    layers: dict[int, str] = {}
    for m in modules:
        hit = _LAYER_INDEX.search(m)
        if hit:
            layers.setdefault(int(hit.group(1)), m)
    beyond = sorted(i for i in layers if i >= n)
    if beyond:
        raise GraceFormatError(f"{cfg}: num_hidden_layers is {n} but the checkpoint quantizes decoder layer "
                               f"{beyond[0]} (module {layers[beyond[0]]})")
    absent = [i for i in range(n) if i not in layers]
    if absent:
        raise GraceFormatError(f"{cfg}: num_hidden_layers is {n} but the checkpoint has no quantized linears "
                               f"for {len(absent)} of them (first: layer {absent[0]})")
