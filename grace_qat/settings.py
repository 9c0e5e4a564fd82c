"""Every environment variable grace_qat reads, in one module (as vLLM's ``vllm/envs.py``): one name
constant each and one function that reads it. Values are read when asked, never cached, since the
engines' worker processes and the tests set them late. Parsing is strict: a value that is not what
the variable takes is one line naming the variable and what was expected, never a silent guess."""
from __future__ import annotations

import os

from .errors import GraceFormatError

AUTODETECT = "GRACE_QAT_AUTODETECT"                # detection without --quantization, both engines
SGLANG_AUTODETECT = "GRACE_QAT_SGLANG_AUTODETECT"  # the same, SGLang only; wins over AUTODETECT
TRACEBACK = "GRACE_QAT_TRACEBACK"                  # a bad checkpoint stopping vLLM: full traceback too
CLIP_PATH = "GRACE_CLIP_PATH"                      # LLaVA-1.5: the CLIP vision tower's directory
DUAL_KERNEL = "GRACE_QAT_DUAL_KERNEL"              # Hopper: second packed copy for small batches
MARLIN_MAX_M = "GRACE_QAT_MARLIN_MAX_M"            # Hopper: Marlin for calls of at most N tokens
CROSSOVER_FILE = "GRACE_QAT_CROSSOVER_FILE"        # Hopper: a kernel table measured on this GPU
SGLANG_KERNEL = "GRACE_QAT_SGLANG_KERNEL"          # SGLang: marlin or humming for every layer
SGLANG_KERNELS = ("marlin", "humming")             # stock SGLang's GPTQ kernel / --quantization humming
HF_HUB_OFFLINE = "HF_HUB_OFFLINE"                  # huggingface_hub's: the local cache only

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def flag(name: str, default: bool) -> bool:
    """An on/off variable, spelled as huggingface_hub accepts (1/true/yes/on, 0/false/no/off).

    Unset or empty: ``default``. Anything else is an error naming the variable, not a silent guess.
    """
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise GraceFormatError(f"environment variable {name}={os.environ[name]!r}: expected one of "
                           f"{'/'.join(_TRUE)} or {'/'.join(_FALSE)}")


def integer(name: str, minimum: int = 0) -> int | None:
    """A whole-number variable of at least ``minimum``; None when unset or empty."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise GraceFormatError(f"environment variable {name}={os.environ[name]!r}: expected a whole "
                               f"number >= {minimum}")
    return value


def choice(name: str, options: tuple[str, ...]) -> str | None:
    """One of ``options`` (any case); None when unset or empty."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return None
    if raw not in options:
        raise GraceFormatError(f"environment variable {name}={os.environ[name]!r}: expected one of "
                               f"{', '.join(options)}")
    return raw


def text(name: str) -> str | None:
    """A path-like variable; None when unset or empty."""
    return os.environ.get(name) or None


def autodetect() -> bool:
    return flag(AUTODETECT, True)


def sglang_autodetect() -> bool:
    """``GRACE_QAT_SGLANG_AUTODETECT`` if set, else ``GRACE_QAT_AUTODETECT`` (both engines), else on."""
    return flag(SGLANG_AUTODETECT, autodetect())


def traceback() -> bool:
    return flag(TRACEBACK, False)


def clip_path() -> str | None:
    return text(CLIP_PATH)


def dual_kernel() -> bool:
    return flag(DUAL_KERNEL, True)


def marlin_max_m() -> int | None:
    return integer(MARLIN_MAX_M)


def crossover_file() -> str | None:
    return text(CROSSOVER_FILE)


def sglang_kernel() -> str | None:
    return choice(SGLANG_KERNEL, SGLANG_KERNELS)


def hub_offline() -> bool:
    return flag(HF_HUB_OFFLINE, False)
