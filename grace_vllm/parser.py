"""vLLM's HF config parser, wrapped so that a GRACE checkpoint gets its ``quantization_config`` injected:
``vllm serve Owner/Name`` without ``--quantization grace_qat``, as the model cards say (the same role
as :mod:`grace_sglang.parser`).

Without a ``quantization_config`` in config.json vLLM would serve format A silently as BF16 (4x the
weight memory) and could not load format B at all. The hook: vLLM parses every config.json through
the parser registered for the format "hf" (``vllm.transformers_utils.config``'s parser registry,
present from 0.26 to 0.33 at least). The plugin puts a subclass of that parser in its place which,
for a GRACE checkpoint (local directory or Hub id, :func:`grace_qat.detection.find_grace_checkpoint`),
adds ``quantization_config = {"quant_method": "grace_qat", "format": ...}``, exactly what
``grace-qat convert --to grace_qat`` writes to disk. vLLM then routes the checkpoint to
:class:`grace_vllm.config.GraceQATConfig` by that quant_method, as for an explicit flag.

``GRACE_QAT_AUTODETECT=0`` turns it off (the stock parser stays in place).
"""
from __future__ import annotations

import logging
import os
import sys

from grace_qat.files import check_model_dir
from grace_qat import settings
from grace_qat.detection import bare_grid_bits, find_grace_checkpoint

from . import QUANT_METHOD

logger = logging.getLogger("vllm.grace_qat")

_PARSERS: dict[type, type] = {}
_LOGGED_ENV = "_GRACE_QAT_DETECTED_LOGGED"


def _flag_given() -> bool:
    """``vllm serve ... --quantization X`` on this process's command line: then the variable that
    turns detection off changes nothing, and the detection line does not offer it."""
    return any(a in ("-q", "--quantization") or a.startswith("--quantization=") for a in sys.argv[1:])


def _hint_bare_grid(path: str) -> None:
    """A bare grid (no marker) is served as BF16 without the flag: say so, once, where its weights
    show it (grace_qat.detection.bare_grid_bits: 64 rows of one tensor)."""
    if os.environ.get(_LOGGED_ENV) == path:
        return
    bits = bare_grid_bits(path)
    if bits is not None:
        os.environ[_LOGGED_ENV] = path
        logger.info("grace_qat: %s: the weights lie on a %d-bit grid (a GRACE checkpoint without sidecar "
                    "or log-steps?); served as BF16 as stored, --quantization %s serves them packed",
                    path, bits, QUANT_METHOD)


def _grace_parser(base: type) -> type:
    if base in _PARSERS:
        return _PARSERS[base]

    class GraceHFConfigParser(base):  # type: ignore[misc, valid-type]
        """vLLM's HF config parser, plus the grace_qat quantization_config for GRACE checkpoints."""
        _grace_base = base

        def parse(self, model, trust_remote_code, revision=None, code_revision=None, **kwargs):
            try:
                config_dict, config = super().parse(model, trust_remote_code, revision=revision,
                                                    code_revision=code_revision, **kwargs)
            except Exception:
                if os.path.isdir(str(model)):    # a broken config.json: one line instead of a traceback
                    check_model_dir(str(model))
                raise
            if (config_dict.get("quantization_config") is None
                    and getattr(config, "quantization_config", None) is None
                    and settings.autodetect()):
                found = find_grace_checkpoint(str(model), revision)
                if found is not None:
                    path, fmt = found
                    # once per checkpoint, in the first process only (the engine core and the
                    # workers parse the config again and inherit this environment)
                    if os.environ.get(_LOGGED_ENV) != path:
                        os.environ[_LOGGED_ENV] = path
                        where = path if os.path.abspath(str(model)) == path else f"{model} ({path})"
                        hint = "" if _flag_given() else f" ({settings.AUTODETECT}=0 turns this off)"
                        logger.info("grace_qat: %s is a GRACE %s checkpoint; serving it with quantization "
                                    "grace_qat%s", where, fmt, hint)
                    injected = {"quant_method": QUANT_METHOD, "format": fmt}
                    config_dict["quantization_config"] = injected
                    config.quantization_config = dict(injected)
                elif os.path.isdir(str(model)) and not _flag_given():
                    _hint_bare_grid(os.path.abspath(str(model)))
            return config_dict, config

    GraceHFConfigParser.__qualname__ = GraceHFConfigParser.__name__
    _PARSERS[base] = GraceHFConfigParser
    return GraceHFConfigParser


def install_config_parser() -> None:
    """Put the detecting parser in place of vLLM's "hf" config parser (idempotent; feature-detected)."""
    try:
        from vllm.transformers_utils import config as tu_config
    except ImportError:  # pragma: no cover - a vLLM without transformers_utils.config
        return
    registry = getattr(tu_config, "_CONFIG_FORMAT_TO_CONFIG_PARSER", None)
    current = registry.get("hf") if isinstance(registry, dict) else None
    if current is None:
        logger.warning("grace_qat: this vLLM has no 'hf' config parser registry; GRACE checkpoints "
                       "need --quantization %s", QUANT_METHOD)
        return
    base = getattr(current, "_grace_base", current)
    registry["hf"] = _grace_parser(base)
