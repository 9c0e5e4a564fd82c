"""Whether a model is a GRACE checkpoint, and which format, from cheap markers only (file names,
config.json keys, tensor names), so that the engines can ask it for every model they load; shared by
the vLLM and SGLang adapters (their config parsers) and the demo.
"""
from __future__ import annotations

import json
import os

from . import formats
from .errors import GraceFormatError
from .files import SAFETENSORS_INDEX_NAME, config_or_none
from .hub import is_hub_id, local_checkpoint_dir


def _tensor_names(path: str) -> list[str]:
    """Tensor names from the safetensors index, else from the headers of the files present."""
    index = os.path.join(path, SAFETENSORS_INDEX_NAME)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        return list(weight_map) if isinstance(weight_map, dict) else []
    from safetensors import safe_open
    names: list[str] = []
    for fname in sorted(os.listdir(path)):
        if fname.endswith(".safetensors"):
            with safe_open(os.path.join(path, fname), framework="pt") as f:
                names.extend(f.keys())
    return names


def detect_grace_format(path: str) -> str | None:
    """The GRACE format of a local directory from cheap markers, else None.

    Each format names its own markers (:meth:`grace_qat.formats.Format.marked`): the sidecar file
    (``qat-sidecar``), the AWQ module list or ``awq_packing`` key (``awq``), ``*.log_scale`` tensor
    names (``qat-inline``). A bare QAT grid has no marker (it needs ``--quantization grace_qat``); a
    config.json that declares a quantization or compression config is left to it. Never raises: an
    unreadable directory is simply not detected.
    """
    try:
        cfg = config_or_none(path)
        if cfg is None or cfg.get("quantization_config") or cfg.get("compression_config"):
            return None
        return formats.marked(path, cfg, lambda: _tensor_names(path))
    except Exception:  # detection must never break loading an ordinary model
        return None


GRID_PROBE_ROWS = 64


def bare_grid_bits(path: str) -> int | None:
    """The bit width (4 or 8) on whose grid the first rows of the first language-model linear lie,
    else None: a GRACE checkpoint without sidecar or log-steps (no marker), which an engine serves
    as BF16 unless ``--quantization grace_qat``. Reads 64 rows of one tensor; never raises."""
    try:
        from .architectures import is_quantizable_module
        from .files import SafetensorsDir, natural_key
        from .quantizer import DEFAULT_GROUP_SIZE, SUPPORTED_BITS, derive_scales
        tensors = SafetensorsDir(path)
        names = sorted((k for k in tensors.keys() if k.endswith(".weight")
                        and is_quantizable_module(k[: -len(".weight")])), key=natural_key)
        if not names:
            return None
        w = tensors.rows(names[0], GRID_PROBE_ROWS)
        if w.dim() != 2 or not w.is_floating_point():
            return None
        for bits in SUPPORTED_BITS:
            try:
                derive_scales(w, bits, DEFAULT_GROUP_SIZE, names[0])
                return bits
            except GraceFormatError:
                continue
    except Exception:  # a hint must never break loading an ordinary model
        return None
    return None


def find_grace_checkpoint(model: object, revision: str | None = None) -> tuple[str, str] | None:
    """``(directory, format)`` when ``model`` (a directory or a Hub id) is a GRACE checkpoint, else None.

    For a Hub id only the JSON files and the sidecar are fetched (from the cache when offline);
    a Hub id that cannot be resolved is not detected (the engine then reports it as usual).
    """
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str):
        return None
    if os.path.isdir(model):
        path = os.path.abspath(model)
    elif is_hub_id(model):
        try:
            path = local_checkpoint_dir(model, revision, weights=False)
        except GraceFormatError:
            return None
    else:
        return None
    fmt = detect_grace_format(path)
    return (path, fmt) if fmt else None


__all__ = ["detect_grace_format", "find_grace_checkpoint", "bare_grid_bits"]
