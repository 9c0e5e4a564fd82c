"""grace_sglang: serve GRACE checkpoints on SGLang's Marlin kernels.

Installed as the SGLang general plugin ``grace_qat`` (entry-point group ``sglang.srt.plugins``).
SGLang calls :func:`register` in every process that builds a model config or loads weights (the
launcher before it parses the command line, ``sglang.Engine``, and each scheduler / TP rank), so
``--quantization grace_qat`` is accepted and GRACE directories are recognised without the flag.

What ``register`` does (tested against SGLang 0.5.17 and 0.5.23):

* adds ``grace_qat`` -> :class:`grace_sglang.config.GraceQATConfig` to
  ``sglang.srt.layers.quantization.QUANTIZATION_METHODS`` (mutated in place: other modules hold
  references to that dict) and to the ``--quantization`` choices;
* wraps SGLang's ``"hf"`` model-config parser so that a local directory holding a GRACE sidecar
  (``qat_quantized_weights.bin``), inline ``*.log_scale`` tensors or the AWQ-packed layout
  (``awq_quantized_modules.json`` / ``awq_packing``), given as a directory or a Hub id (resolved
  through the local Hugging Face cache), gets a ``quantization_config`` with
  ``quant_method: grace_qat`` injected, which makes the flag optional. The same parser is also
  registered under the name ``grace_qat`` (``--model-config-parser grace_qat``). A bare QAT grid
  (no sidecar, no log-scales) is not guessed: pass ``--quantization grace_qat``. Set
  ``GRACE_QAT_SGLANG_AUTODETECT=0`` (or ``GRACE_QAT_AUTODETECT=0``, both engines) to turn the wrapping off. For original-layout LLaVA-1.5 the
  parser also resolves the CLIP tower locally and the ``<image>`` id (:mod:`grace_sglang.llava`);
* registers the ``grace_llava_v1`` conversation (LLaVA's llava_v1 prompt) and a matcher, first in
  SGLang's list, that picks it for GRACE LLaVA-1.5 directories.

Exceptions raised here are swallowed and logged by SGLang's plugin loader; the user would then see
``invalid choice: 'grace_qat'``. ``register`` therefore does little and is idempotent.
"""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

QUANT_METHOD = "grace_qat"
PARSER_NAME = "grace_qat"

_registered = False


def _add_cli_choice() -> None:
    # 0.5.17: defined in sglang.srt.server_args; 0.5.23: sglang.srt.arg_groups.choices, re-exported
    # by server_args. Both are plain lists handed to argparse by reference.
    try:
        from sglang.srt.server_args import QUANTIZATION_CHOICES, add_quantization_method_choices
    except ImportError:  # pragma: no cover - layout of versions we have not seen
        from sglang.srt.arg_groups.choices import (  # type: ignore[no-redef]
            QUANTIZATION_CHOICES, add_quantization_method_choices)
    if QUANT_METHOD not in QUANTIZATION_CHOICES:
        add_quantization_method_choices([QUANT_METHOD])


def register() -> None:
    """Register the ``grace_qat`` quantization method with SGLang (cheap, idempotent)."""
    global _registered
    if _registered:
        return
    from sglang.srt.layers.quantization import QUANTIZATION_METHODS

    from grace_qat import settings

    from .config import GraceQATConfig
    from .parser import install_config_parser

    if QUANTIZATION_METHODS.get(QUANT_METHOD) is not GraceQATConfig:
        QUANTIZATION_METHODS[QUANT_METHOD] = GraceQATConfig
    _add_cli_choice()
    try:
        wrap = settings.sglang_autodetect()
    except ValueError as e:   # a misspelt flag: say so in one line, keep the default
        logger.error("grace_qat: %s; auto-detection stays on", e)
        wrap = True
    install_config_parser(wrap_hf=wrap)
    from .llava import install_chat_template
    install_chat_template()
    _registered = True
    logger.debug("grace_qat: registered quantization method and config parser")


__all__ = ["register", "QUANT_METHOD", "PARSER_NAME"]
