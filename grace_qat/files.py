"""Reading the files of a checkpoint directory, whatever its format: config.json, the safetensors
(sharded or not), the sidecar pickle (safely), and the settings a config.json declares. Which
modules an architecture has is :mod:`grace_qat.architectures`'. Engine-independent: torch +
safetensors only."""
from __future__ import annotations

import json
import os
import pickle
import re
import warnings

import torch
from safetensors import safe_open

from .errors import GraceFormatError
from .quantizer import SUPPORTED_BITS

# the quant_method of a GRACE quantization_config (what `convert --to grace_qat` declares and the
# engines' --quantization flag names)
QUANT_METHOD = "grace_qat"
SIDECAR_NAME = "qat_quantized_weights.bin"
AWQ_MODULES_NAME = "awq_quantized_modules.json"
CONFIG_NAME = "config.json"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"

# safetensors dtype names -> torch dtypes (the storage dtypes of 16/32-bit tensors)
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_OTHER_DTYPES = {"F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                 "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
# config.json dtype names -> torch dtypes
CONFIG_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_SHORT_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def dtype_name(d: torch.dtype) -> str:
    """fp16 / bf16 / fp32, as the CLI's messages name precisions."""
    return _SHORT_DTYPE_NAMES.get(d, str(d))


def model_dtype(config: dict) -> torch.dtype:
    """The dtype a checkpoint's unquantized tensors are meant to run in (bf16 unless stated)."""
    for cfg in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if cfg.get(key) in CONFIG_DTYPES:
                return CONFIG_DTYPES[cfg[key]]
    return torch.bfloat16

def natural_key(name: str):
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


def _load_tensors_only(path: str):
    """torch.load with PyTorch's restricted unpickler, memory-mapped where the file allows it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:       # legacy (non-zip) torch.save files cannot be memory-mapped
        if "mmap" not in str(e) and "zip" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def load_sidecar(path: str) -> dict[str, torch.Tensor]:
    """Open ``qat_quantized_weights.bin`` lazily and safely: tensors only, memory-mapped.

    ``weights_only=True`` uses PyTorch's restricted unpickler, which refuses any object other than
    tensors and plain containers, so a pickle carrying code is rejected without running it.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        head = None                     # a directory, unreadable...: torch.load says what it is
    if head is not None and not head.startswith((b"PK\x03\x04", b"\x80")):
        what = "it is empty" if not head else f"it starts with {head!r}, neither a zip archive nor a pickle"
        raise GraceFormatError(f"{path}: not a readable torch.save file ({what})")
    # torch.load's warnings (e.g. "Detected pickle protocol 55" on garbage after a pickle's first
    # byte) are held back: a refused file gets our one line alone, a loaded one its warnings re-issued
    with warnings.catch_warnings(record=True) as held:
        warnings.simplefilter("always")
        try:
            data = _load_tensors_only(path)
        except pickle.UnpicklingError as e:
            reason = _torch_reason(str(e)) or "an object that is not a tensor"
            raise GraceFormatError(f"{path}: refused to load: it holds more than tensors ({reason}); a GRACE "
                                   f"sidecar holds tensors only") from None
        except Exception as e:   # noqa: BLE001 - corrupt zips/pickles raise many types (KeyError, ValueError,
            # struct.error, zipfile.BadZipFile, UnicodeDecodeError, ...): all mean "not a torch.save file"
            raise GraceFormatError(f"{path}: not a readable torch.save file "
                                   f"({type(e).__name__}: {_torch_reason(str(e))})") from None
    for w in held:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
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

    def rows(self, key: str, n: int) -> torch.Tensor:
        """The first ``n`` rows of a tensor, reading only them."""
        try:
            return self._handles[self._file_of[key]].get_slice(key)[:n]
        except Exception as e:
            raise GraceFormatError(f"{self.file_of(key)}: cannot read tensor {key} ({e})") from None

    def meta(self, key: str) -> torch.Tensor:
        """Shape and dtype of a tensor without reading it (a tensor on the meta device)."""
        name = self.dtype(key)
        dtype = SAFETENSORS_DTYPES.get(name) or _OTHER_DTYPES.get(name)
        if dtype is None:
            raise GraceFormatError(f"{self.file_of(key)}: tensor {key} has dtype {name}, which no GRACE "
                                   f"format stores")
        return torch.empty(self.shape(key), dtype=dtype, device="meta")


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


def check_model_dir(path: str) -> dict:
    """config.json of a model directory, or one line saying why ``path`` is not one (the errors a
    user meets first: no such path, a file, an empty directory, no or broken config.json)."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise GraceFormatError(f"{path}: does not exist")
    if not os.path.isdir(path):
        raise GraceFormatError(f"{path}: not a directory (a model is a directory holding {CONFIG_NAME} and "
                               f"*.safetensors, or a Hub id)")
    if not os.listdir(path):
        raise GraceFormatError(f"{path}: empty directory (a model holds {CONFIG_NAME} and *.safetensors)")
    return read_config(path)


def config_or_none(path: str) -> dict | None:
    """config.json of a directory when it is a readable JSON object, else None (never raises): for
    the cheap looks (detection, LLaVA layout checks) that must not break loading an ordinary model."""
    try:
        return read_config(path)
    except (GraceFormatError, OSError, TypeError):
        return None


def declared_int(obj: dict, key: str, where: str, prefix: str = "") -> int | None:
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
