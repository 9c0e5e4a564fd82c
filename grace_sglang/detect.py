"""Whether a model SGLang loads is a GRACE checkpoint, from cheap markers only (no tensor read)."""
from __future__ import annotations

import os
from typing import Any, Optional

from grace_qat.hub import find_grace_checkpoint, is_hub_id

from . import QUANT_METHOD


def detect_grace_quantization(model: Any, revision: Optional[str] = None) -> Optional[dict]:
    """The ``quantization_config`` to inject for a GRACE checkpoint, else None.

    ``model`` is a local directory or a Hub id (resolved through the local Hugging Face cache,
    fetching only JSON files and the sidecar unless ``HF_HUB_OFFLINE``). Only cheap markers are used
    (:func:`grace_qat.hub.detect_grace_format`), so running this for every model SGLang loads costs a
    few file lookups. A bare QAT grid has no marker; it needs ``--quantization grace_qat``.
    ``checkpoint_dir`` is the directory, or the Hub id itself (resolved again, with the weights,
    when the quantization config opens the checkpoint in the process that loads them).
    """
    found = find_grace_checkpoint(model, revision)
    if found is None:
        return None
    path, fmt = found
    where = model if is_hub_id(model) else path
    return {"quant_method": QUANT_METHOD, "format": fmt, "checkpoint_dir": where}


def local_dir_or_none(model: Any, revision: Optional[str]) -> Optional[str]:
    found = find_grace_checkpoint(model, revision)
    if found is not None:
        return found[0]
    return os.path.abspath(os.fspath(model)) if isinstance(model, (str, os.PathLike)) \
        and os.path.isdir(model) else None


__all__ = ["detect_grace_quantization", "local_dir_or_none"]
