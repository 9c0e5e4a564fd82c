"""Where a checkpoint is: a local directory, or a Hugging Face Hub id resolved through the local cache.

A model may be named by a local directory or by a Hugging Face Hub id (``Owner/Name``, as the model
cards' own commands do). A Hub id is resolved to its snapshot directory in the local Hugging Face
cache (``$HF_HOME/hub/models--Owner--Name/snapshots/<rev>``), downloading only what is missing unless
``HF_HUB_OFFLINE`` is set. Whether a directory is a GRACE checkpoint is :mod:`grace_qat.detection`'s.
"""
from __future__ import annotations

import os
import re

from .errors import GraceFormatError
from .files import SIDECAR_NAME
from .settings import hub_offline

# "Owner/Name" as the Hub spells repository ids
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def is_hub_id(model: object) -> bool:
    """A string that names a Hub repository rather than a local path."""
    return (isinstance(model, str) and bool(_HUB_ID.match(model)) and not os.path.exists(model))


def _snapshot(model: str, revision: str | None, patterns: list[str]) -> str:
    import huggingface_hub
    return huggingface_hub.snapshot_download(model, revision=revision, local_files_only=hub_offline(),
                                             allow_patterns=patterns)


def local_checkpoint_dir(model: str, revision: str | None = None, weights: bool = True) -> str:
    """The checkpoint directory: the path itself, or the local snapshot of a Hub repository.

    ``weights=False`` fetches only the JSON files and the sidecar (enough to detect the format).
    Raises a one-line :class:`GraceFormatError` when neither a directory nor a reachable snapshot.
    """
    if os.path.isdir(model):
        return os.path.abspath(model)
    if not is_hub_id(model):
        raise GraceFormatError(f"grace_qat: {model}: not a local directory, and not a Hugging Face Hub "
                               f"id (Owner/Name)")
    patterns = ["*.json", SIDECAR_NAME] + (["*.safetensors"] if weights else [])
    try:
        return _snapshot(model, revision, patterns)
    except Exception as e:  # hub errors come in many types; the message is what matters
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if hub_offline() else \
            "locally or on the Hugging Face Hub"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise GraceFormatError(f"grace_qat: cannot find the checkpoint {model!r} {where} "
                               f"({type(e).__name__}: {first})") from None


__all__ = ["is_hub_id", "local_checkpoint_dir"]
