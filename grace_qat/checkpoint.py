"""Reading GRACE checkpoint directories: detect the format, list quantized modules, and hand out
verified integer codes and fp32 steps per module. Engine-independent: torch + safetensors only.

The formats (README "Support matrix"; one module each in :mod:`grace_qat.formats`):
  * ``qat-sidecar``: BF16 weights on the grid + ``qat_quantized_weights.bin`` (log-scales);
  * ``qat-inline``:  BF16 weights on the grid with ``<module>.log_scale`` still in the safetensors;
  * ``qat-grid``:    BF16 weights on the grid and nothing else: steps are derived from the grid;
  * ``awq``:         AutoAWQ GEMM packed 4-bit, zero point 8, ``awq_quantized_modules.json``;
  * ``plain``:       an unquantized checkpoint (e.g. the GRACE-BF16 release).
``GraceCheckpoint`` is a thin reader: detection through the registry gives the format's
:class:`~grace_qat.formats.Record` (files, bits, group size, modules), which the reader holds and
hands to its format (``formats.get(self.format)``: ``format`` is always the name) for every per-module
question. Formats never see the reader.
"""
from __future__ import annotations

import os
from typing import Iterator

import torch

from . import formats
from .errors import GraceFormatError
from .architectures import is_quantizable_module
from .files import (CONFIG_NAME, QUANT_METHOD, SIDECAR_NAME, SafetensorsDir, check_model_dir, declared_int,
                    load_sidecar, natural_key, read_config)
from .formats import QuantizedLinear, Record
from .quantizer import check_bits, effective_group_size



def _field(name: str) -> property:
    return property(lambda self: getattr(self.record, name), doc=f"``Record.{name}`` (read-only)")


class GraceCheckpoint:
    """A GRACE checkpoint directory. ``open`` detects everything; nothing heavy is read until asked."""

    def __init__(self, record: Record):
        self.record = record
        self._rules: formats.Format = formats.get(record.format)   # the registered format of that name

    path, format, bits, group_size, modules, config, tensors, sidecar_path, bits_inferred = map(_field, (
        "path", "format", "bits", "group_size", "modules", "config", "tensors", "sidecar_path", "bits_inferred"))

    # -- detection ----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str, bits: int | None = None, group_size: int | None = None,
             fmt: str | None = None) -> "GraceCheckpoint":
        """Detect and validate. A declared format (``fmt``, else config.json's grace_qat
        quantization_config) must match what the files are."""
        ckpt = cls._detect(path, bits, group_size)
        if fmt is None:
            declared = ckpt.config.get("quantization_config") or {}
            fmt = declared.get("format") if declared.get("quant_method") == QUANT_METHOD else None
        if fmt and fmt != ckpt.format:
            raise GraceFormatError(f"{os.path.join(ckpt.path, CONFIG_NAME)}: quantization_config says format "
                                   f"{fmt!r}, but the files are format {ckpt.format!r}")
        return ckpt

    @classmethod
    def _detect(cls, path: str, bits: int | None, group_size: int | None) -> "GraceCheckpoint":
        path = os.path.abspath(path)
        config = check_model_dir(path)
        cfg_path = os.path.join(path, CONFIG_NAME)
        declared = config.get("quantization_config") or {}
        if not isinstance(declared, dict):
            raise GraceFormatError(f"{cfg_path}: quantization_config must be a JSON object, "
                                   f"got {type(declared).__name__}")
        if declared.get("quant_method") == QUANT_METHOD:   # validated even when the caller states them
            declared_bits = declared_int(declared, "bits", cfg_path, "quantization_config.")
            declared_gs = declared_int(declared, "group_size", cfg_path, "quantization_config.")
            bits, group_size = bits or declared_bits, group_size or declared_gs
        if bits is not None:
            try:
                check_bits(int(bits))
            except (GraceFormatError, TypeError, ValueError) as e:
                raise GraceFormatError(f"{path}: {e}") from None
        tensors = SafetensorsDir(path)
        candidates = sorted((k[: -len(".weight")] for k in tensors.keys()
                             if k.endswith(".weight") and is_quantizable_module(k[: -len(".weight")])),
                            key=natural_key)
        return cls(formats.detect(formats.Opening(path, config, tensors, bits, group_size, candidates)))

    def require_quantized(self) -> "GraceCheckpoint":
        """Itself, or the one-line refusal an engine gives a plain checkpoint under grace_qat."""
        if not self._rules.quantizes:
            raise GraceFormatError(
                f"{self.path}: no GRACE-quantized linear layers found (a plain checkpoint: no {SIDECAR_NAME}, "
                f"no .log_scale tensors, no AWQ-packed tensors, weights not on a 4/8-bit grid); serve it "
                f"without --quantization grace_qat")
        return self

    # -- per-module access --------------------------------------------------------------------

    def module_shape(self, name: str) -> tuple[int, int]:
        return self._rules.module_shape(self.record, name)

    def module_group_size(self, name: str) -> int:
        return effective_group_size(self.module_shape(name)[1], self.group_size)

    def log_scale(self, name: str) -> torch.Tensor:
        """The raw learned log-steps of a QAT module (sidecar or inline)."""
        return self._rules.log_scale(self.record, name)

    def scales(self, name: str) -> torch.Tensor:
        """fp32 steps (out, in/G) of one module, without reading or verifying its weight (AWQ: read)."""
        return self._rules.scales(self.record, name)

    def check_served(self) -> None:
        """Verify every module's small tensors (steps, zero points) now; see Format.check_served."""
        self._rules.check_served(self.record)

    def quantized(self, name: str) -> QuantizedLinear:
        """Verified codes and steps of one module; raises GraceFormatError naming file and tensor."""
        return self._rules.quantized(self.record, name)

    def fed_tensor(self, name: str, leaf: str) -> torch.Tensor:
        """The full tensor ``leaf`` of module ``name`` an adapter feeds; see Format.fed_tensor."""
        return self._rules.fed_tensor(self.record, name, leaf)

    def steps_dtype(self) -> torch.dtype:
        """The precision the files store the steps in."""
        return self._rules.steps_dtype(self.record)

    def weight_dtype(self) -> torch.dtype | None:
        """The storage dtype of the 16-bit grid weights (None: the files hold packed codes)."""
        return self._rules.weight_dtype(self.record)

    def stock_config(self) -> dict | None:
        """A stock quantization_config an engine's own method loads the files under, else None."""
        return self._rules.stock_config(self.record)

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
        return sorted(out, key=natural_key)

    def describe(self) -> dict:
        return {"path": self.path, "format": self.format, "bits": self.bits,
                "group_size": self.group_size, "modules": len(self.modules)}


__all__ = ["GraceCheckpoint", "QuantizedLinear", "SafetensorsDir", "load_sidecar", "read_config"]
