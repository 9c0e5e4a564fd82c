"""SGLang's HF model-config parser, wrapped so that a GRACE checkpoint gets its ``quantization_config``
injected (the ``--quantization grace_qat`` flag becomes optional; the same role as
:mod:`grace_vllm.parser`), plus the LLaVA config fix-ups."""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

from grace_qat.detection import find_grace_checkpoint
from grace_qat.hub import is_hub_id
from grace_qat.settings import SGLANG_AUTODETECT

from . import PARSER_NAME, QUANT_METHOD, llava

logger = logging.getLogger(__name__)


def detect_grace_quantization(model: Any, revision: Optional[str] = None) -> Optional[dict]:
    """The ``quantization_config`` to inject for a GRACE checkpoint, else None.

    ``model`` is a local directory or a Hub id (resolved through the local Hugging Face cache,
    fetching only JSON files and the sidecar unless ``HF_HUB_OFFLINE``). Only cheap markers are used
    (:func:`grace_qat.detection.detect_grace_format`), so running this for every model SGLang loads
    costs a few file lookups. A bare QAT grid has no marker; it needs ``--quantization grace_qat``.
    ``checkpoint_dir`` is the directory, or the Hub id itself (resolved again, with the weights,
    when the quantization config opens the checkpoint in the process that loads them).
    """
    found = find_grace_checkpoint(model, revision)
    if found is None:
        return None
    path, fmt = found
    where = model if is_hub_id(model) else path
    return {"quant_method": QUANT_METHOD, "format": fmt, "checkpoint_dir": where}


def _local_dir_or_none(model: Any, revision: Optional[str]) -> Optional[str]:
    found = find_grace_checkpoint(model, revision)
    if found is not None:
        return found[0]
    return os.path.abspath(os.fspath(model)) if isinstance(model, (str, os.PathLike)) \
        and os.path.isdir(model) else None

_PARSER_CLASSES: dict = {}


def _make_parser(base: type) -> type:
    """A subclass of SGLang's stock HF config parser that injects the GRACE quantization_config."""
    if base in _PARSER_CLASSES:
        return _PARSER_CLASSES[base]

    class GraceModelConfigParser(base):  # type: ignore[misc, valid-type]
        _grace_base = base

        def parse(self, model, trust_remote_code: bool, revision=None, **kwargs):
            config = super().parse(model, trust_remote_code=trust_remote_code, revision=revision,
                                   **kwargs)
            if getattr(config, "quantization_config", None) is None:
                try:
                    injected = detect_grace_quantization(model, revision)
                except Exception:  # detection must never break loading an ordinary model
                    logger.debug("grace_qat: detection failed for %r", model, exc_info=True)
                    return config
                if injected is not None:
                    logger.info("grace_qat: %s is a GRACE %s checkpoint; serving it with "
                                "quantization=grace_qat (%s=0 turns this off)",
                                injected["checkpoint_dir"], injected["format"], SGLANG_AUTODETECT)
                    config.quantization_config = injected
            qc = getattr(config, "quantization_config", None)
            if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD:
                local = _local_dir_or_none(model, revision)
                if local is not None and llava.original_llava_config(local) is not None:
                    # original-layout LLaVA: CLIP tower, <image> id, tokenizer check
                    llava.prepare_config(config, local)
            return config

    GraceModelConfigParser.__qualname__ = GraceModelConfigParser.__name__
    _PARSER_CLASSES[base] = GraceModelConfigParser
    return GraceModelConfigParser


def install_config_parser(wrap_hf: bool = True) -> None:
    """Register the GRACE parser as ``grace_qat`` and (``wrap_hf``) in place of ``hf``.

    The stock parser module is imported first so that its own ``@register_model_config_parser("hf")``
    cannot later overwrite ours; the registry dict is written directly to avoid SGLang's
    "already registered; overwriting" warning in every process.
    """
    try:
        from sglang.srt.configs import model_config_parser_registry as reg
        import sglang.srt.utils.hf_transformers.config  # noqa: F401  (registers "hf")
    except ImportError:
        logger.warning("grace_qat: this SGLang has no model-config parser registry; GRACE "
                       "checkpoints need --quantization grace_qat")
        return
    registry = getattr(reg, "_MODEL_CONFIG_PARSER_REGISTRY", None)
    current = registry.get("hf") if registry is not None else None
    if current is None:
        logger.warning("grace_qat: SGLang's 'hf' config parser not found; auto-detection is off")
        return
    base = getattr(current, "_grace_base", current)
    parser = _make_parser(base)
    registry[PARSER_NAME] = parser
    if wrap_hf:
        registry["hf"] = parser
    elif current is parser:
        registry["hf"] = base


__all__ = ["install_config_parser", "detect_grace_quantization"]
