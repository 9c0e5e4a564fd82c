"""Writing an output directory (``convert``, ``fixture``) so that nothing is lost or left behind.

The output is written into a temporary directory next to it (same filesystem, so the final rename is
atomic) and renamed into place only when complete. An existing non-empty output is refused unless
``force``; it is then replaced only after the new one is complete, and put back if the swap fails.
A location that cannot be written is one line (a :class:`GraceFormatError`), not a traceback.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable, TypeVar

from .errors import GraceFormatError

T = TypeVar("T")


def _non_empty(path: str) -> bool:
    return not os.path.isdir(path) or os.path.islink(path) or bool(os.listdir(path))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _unwritable(dst: str, e: OSError) -> GraceFormatError:
    """One line; names the path that failed only where it is not ``dst`` or a temporary of ours."""
    reason, where = e.strerror or str(e), str(e.filename or "")
    parent, base = os.path.split(dst)
    if where and where != dst and not os.path.basename(where).startswith((f".{base}.", "tmp")):
        reason = f"{where}: {reason}"
    return GraceFormatError(f"{dst}: cannot write the output here ({reason}); nothing was written")


def write_dir(dst: str, write: Callable[[str], T], force: bool = False) -> T:
    """``write(tmp)`` fills a fresh temporary directory, which then becomes ``dst``; returns its result."""
    dst = os.path.abspath(dst)
    if os.path.lexists(dst) and not force and _non_empty(dst):
        raise GraceFormatError(f"{dst} already exists; choose another output or pass --force to replace it")
    parent, base = os.path.split(dst)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{base}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise _unwritable(dst, e) from None
    try:
        result = write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())                 # mkdtemp makes it 0700
        _swap(tmp, dst)
    except OSError as e:
        # a file the writer could not create or fill in its own directory (read errors of the
        # source name another path and keep their own type)
        if e.filename is None or os.path.abspath(str(e.filename)).startswith((tmp, dst)):
            raise _unwritable(dst, e) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)           # gone already after a successful swap
    return result


def _swap(tmp: str, dst: str) -> None:
    if not os.path.lexists(dst) or not _non_empty(dst):
        os.replace(tmp, dst)                             # also replaces an empty directory
        return
    old = tmp + ".old"
    os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except OSError:
        os.replace(old, dst)                             # put the old output back
        raise
    shutil.rmtree(old, ignore_errors=True)
