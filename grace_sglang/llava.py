"""Original-layout LLaVA-1.5 GRACE checkpoints on SGLang's own ``LlavaLlamaForCausalLM``.

SGLang serves that layout natively, but a local GRACE directory leaves it three things to guess, and
two of the guesses fail without a clear message:

* the CLIP tower: SGLang calls ``CLIPVisionModel.from_pretrained(config.mm_vision_tower)`` (a Hub
  download when it is a Hub id) and picks the class by the substring ``clip``/``siglip`` in that
  string. The model-config parser rewrites ``mm_vision_tower`` to the local directory that
  :func:`grace_qat.llava_hf.find_clip_dir` finds (``$GRACE_CLIP_PATH``, a local directory, the HF
  cache), as the vLLM shim does, and refuses offline setups where none exists;
* the ``<image>`` token: SGLang places the image where ``config.image_token_index`` appears in the
  prompt ids and silently uses position 0 when it is absent. The release tokenizer has no such
  token, so the tokenizer given by ``--tokenizer-path`` must (``grace-qat llava-processor`` writes
  one, as llava-hf does: ``<image>`` = vocabulary size). ``image_token_index`` is set to that id and
  the tokenizer SGLang was started with is checked where the server arguments are known;
* the chat template: SGLang picks its ``vicuna_v1.1`` conversation only for model paths matching
  ``llava-v1.5``, and that one is FastChat's ("a curious user ... the user's questions"), not the
  LLaVA ``llava_v1`` prompt GRACE's LLaVA tooling uses ("a curious human ... the human's
  questions", :data:`grace_qat.llava_hf.LLAVA_V1_SYSTEM`). A conversation ``grace_llava_v1`` (the
  same turns and separators with that system prompt) is registered, and a matcher picks it for
  GRACE LLaVA directories (``--chat-template grace_llava_v1`` names it explicitly). Its image
  placeholder is ``"<image> "``: LLaVA tokenizes the text after the image on its own, so it starts
  with SentencePiece's "▁" piece; one whole-prompt tokenization reproduces that only with the space
  (tests/test_sglang_plugin.py compares the ids with LLaVA's chunked SentencePiece encoding).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional

from grace_qat.errors import GraceFormatError
from grace_qat.files import config_or_none
from grace_qat.settings import CLIP_PATH, hub_offline
from grace_qat.llava_hf import (IMAGE_TOKEN, LLAVA_V1_SYSTEM, find_clip_dir, image_token_id,
                                is_original_llava)

from . import QUANT_METHOD

logger = logging.getLogger(__name__)

CHAT_TEMPLATE = "grace_llava_v1"       # registered below: LLaVA's llava_v1 conversation
_BASE_TEMPLATE = "vicuna_v1.1"          # SGLang's USER/ASSISTANT conversation it is derived from
_TOWER_KINDS = ("clip", "siglip")       # SGLang's LLaVA chooses the tower class by these substrings


def _read_config(model_dir: str) -> Optional[dict]:
    return config_or_none(model_dir)


def original_llava_config(model_dir: Any) -> Optional[dict]:
    """The config.json of a local original-layout LLaVA-1.5 directory, else None."""
    if not isinstance(model_dir, (str, os.PathLike)):
        return None
    cfg = _read_config(os.fspath(model_dir))
    return cfg if cfg is not None and is_original_llava(cfg) else None


def is_grace_llava(model_dir: Any) -> bool:
    """A local original-layout LLaVA-1.5 directory that is a GRACE checkpoint (declared or detected)."""
    cfg = original_llava_config(model_dir)
    if cfg is None:
        return False
    declared = (cfg.get("quantization_config") or {}).get("quant_method")
    if declared is not None:
        return declared == QUANT_METHOD
    from grace_qat.detection import find_grace_checkpoint
    return find_grace_checkpoint(model_dir) is not None


def match_chat_template(model_path: str) -> Optional[str]:
    """SGLang conversation-template matcher: grace_llava_v1 for GRACE LLaVA-1.5 directories."""
    try:
        return CHAT_TEMPLATE if is_grace_llava(model_path) else None
    except Exception:   # a matcher must never break SGLang's template lookup
        return None


def install_chat_template() -> None:
    """Register the ``grace_llava_v1`` conversation and put :func:`match_chat_template` first in
    SGLang's matcher list (idempotent)."""
    try:
        from sglang.srt.parser import conversation
        base = conversation.chat_templates[_BASE_TEMPLATE]
    except (ImportError, KeyError):   # pragma: no cover - a layout we have not seen
        logger.warning("grace_qat: SGLang's %s conversation not found; GRACE LLaVA-1.5 needs a chat "
                       "template with LLaVA's llava_v1 prompt", _BASE_TEMPLATE)
        return
    if CHAT_TEMPLATE not in conversation.chat_templates:
        conversation.register_conv_template(
            dataclasses.replace(base, name=CHAT_TEMPLATE, system_message=LLAVA_V1_SYSTEM, messages=[],
                                image_token=IMAGE_TOKEN + " "))
    registry = conversation.matching_function_registry
    if match_chat_template not in registry:
        registry.insert(0, match_chat_template)


def _tokenizer_path_from_server_args(model_dir: str) -> Optional[str]:
    """The tokenizer SGLang serves ``model_dir`` with, where this process knows it."""
    try:
        from sglang.srt.runtime_context import get_server_args
        sa = get_server_args()
    except Exception:   # not published in this process (the check runs where it is)
        return None
    model_path = getattr(sa, "model_path", None)
    if not model_path or os.path.abspath(os.fspath(model_path)) != model_dir:
        return None     # these arguments serve another model (e.g. a draft model's config)
    return getattr(sa, "tokenizer_path", None) or model_path


def _resolve_clip(model_dir: str, tower: Optional[str]) -> Optional[str]:
    clip_dir, looked = find_clip_dir(tower)
    if clip_dir is None:
        if hub_offline():
            raise GraceFormatError(
                f"{model_dir}: LLaVA vision tower not found at {' or '.join(looked)} and the Hub is "
                f"offline; point {CLIP_PATH} at a local CLIP directory such as a download of "
                f"openai/clip-vit-large-patch14-336")
        logger.info("grace_qat: CLIP tower %r is not local; SGLang will fetch it from the Hub", tower)
        return None
    clip_dir = os.path.abspath(clip_dir)
    if not any(kind in clip_dir for kind in _TOWER_KINDS):
        raise GraceFormatError(
            f"{clip_dir}: SGLang's LLaVA loads the vision tower only from a path containing 'clip' or "
            f"'siglip' (it picks the model class by that name); rename or symlink this CLIP directory "
            f"(e.g. .../clip-vit-large-patch14-336) and point {CLIP_PATH} at it")
    return clip_dir


def prepare_config(config: Any, model_dir: str) -> None:
    """Point an original-layout GRACE LLaVA config at its local CLIP tower and at the ``<image>`` id,
    and check the tokenizer SGLang was started with. Raises a one-line GraceFormatError."""
    raw = _read_config(model_dir) or {}
    clip_dir = _resolve_clip(model_dir, raw.get("mm_vision_tower"))
    if clip_dir is not None:
        config.mm_vision_tower = clip_dir
    vocab = raw.get("vocab_size")
    if vocab is None:
        raise GraceFormatError(f"{model_dir}/config.json: no vocab_size (an original-layout LLaVA-1.5 "
                               f"config has it at the top level)")
    config.image_token_index = int(vocab)   # where grace-qat llava-processor and llava-hf put <image>
    tokenizer = _tokenizer_path_from_server_args(model_dir)
    if tokenizer is None or not os.path.isdir(tokenizer):
        return   # unknown here, or a Hub id SGLang resolves itself
    found = image_token_id(tokenizer)
    if found != int(vocab):
        what = "has no <image> token" if found is None else f"has <image> at id {found}"
        raise GraceFormatError(
            f"{tokenizer}: SGLang serves LLaVA-1.5 with the tokenizer of --tokenizer-path, which must "
            f"map {IMAGE_TOKEN} to id {vocab}, and this one {what} (the image would be placed at the "
            f"start of the prompt); write one with `grace-qat llava-processor {model_dir} DIR` and "
            f"pass --tokenizer-path DIR")
