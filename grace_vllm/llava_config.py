"""LLaVA-1.5 in its original layout (``LlavaLlamaForCausalLM``): config translation, vision-tower
lookup and registration with vLLM. Light on purpose: the plugin imports it in every vLLM process;
the model and multimodal processor live in :mod:`grace_vllm.llava` (imported lazily by vLLM).

An original-layout ``config.json`` says ``model_type: "llava"`` but is not a Transformers
``LlavaConfig``: the Llama settings sit at the top level (``hidden_size``, ``rms_norm_eps``, ...), the
vision tower is named by ``mm_vision_tower`` (a Hub id or a directory) and there is no image token.
Parsed as a ``LlavaConfig`` it would silently get Llama and CLIP *defaults* (wrong epsilon, context
length and, for anything but the 7B shape, wrong sizes), and Transformers would pick a tokenizer
without SentencePiece's dummy prefix for ``model_type`` "llava". So the plugin maps such configs, and
only those, to :class:`LlavaOriginalConfig` (``model_type`` "llava_llama", the original LLaVA code's own
name), a ``LlavaConfig`` whose ``text_config``/``vision_config`` are built from the flat fields.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any

from transformers import AutoConfig, LlamaConfig, LlavaConfig, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from grace_qat.errors import GraceFormatError
from grace_qat.files import config_or_none
# LLaVA-1.5's format facts (vicuna_v1 template, what an original-layout config is) live in the core
from grace_qat.llava_hf import CHAT_TEMPLATE, find_clip_dir, is_original_llava
from grace_qat.settings import CLIP_PATH

ARCHITECTURE = "LlavaLlamaForCausalLM"
MODEL_TYPE = "llava_llama"
IMAGE_TOKEN = "<image>"
# The placeholder id spliced in for each image feature. LLaVA itself uses -200 (never an id); vLLM
# needs a real one that round-trips through the tokenizer: Llama's <unk>, which SentencePiece with
# byte fallback never produces from text. The image features overwrite its embedding anyway.
IMAGE_TOKEN_ID = 0
VISION_WEIGHT_PREFIX = "model.vision_tower.vision_tower."


def _own_fields(cls: type) -> set[str]:
    base = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    return {f.name for f in dataclasses.fields(cls)} - base


# Llama settings copied from the flat config (plus the legacy RoPE keys LlamaConfig still converts).
_LLAMA_KEYS = frozenset(_own_fields(LlamaConfig) | {"rope_theta", "rope_scaling"})


# -- where the CLIP tower is ------------------------------------------------------------------------

def has_weights(directory: str) -> bool:
    return any(glob.glob(os.path.join(directory, p)) for p in ("*.safetensors", "*.bin"))


def _clip_vision_dict(clip_dir: str) -> dict | None:
    cfg = config_or_none(clip_dir)
    if cfg is None:
        return None
    vision = cfg.get("vision_config", cfg)   # a full CLIPModel config, or a CLIPVisionConfig
    return {**vision, "model_type": "clip_vision_model"}


# -- the config ---------------------------------------------------------------------------------------

class LlavaOriginalConfig(LlavaConfig):
    """``LlavaConfig`` of an original-layout LLaVA-1.5 checkpoint, built from its flat fields.

    Text: the top-level Llama fields. Vision: ``mm_vision_tower_config`` if the checkpoint has one,
    else the ``config.json`` of the CLIP directory :func:`find_clip_dir` finds, else Transformers'
    default, CLIP ViT-L/14-336 (the tower of every LLaVA-1.5 release). Setting ``mm_vision_tower``
    later (``--hf-overrides '{"mm_vision_tower": "/path"}'``) re-reads the vision config, and setting
    a top-level Llama field updates ``text_config`` too, so vLLM's overrides behave as on the file.
    """

    model_type = MODEL_TYPE

    def __post_init__(self, **kwargs):
        kwargs.pop("model_type", None)   # "llava" on disk; keep the class's own
        if self.text_config is None:
            text = {k: v for k, v in kwargs.items() if k in _LLAMA_KEYS}
            text.update(model_type="llama", architectures=["LlamaForCausalLM"],
                        tie_word_embeddings=self.tie_word_embeddings)
            dtype = self.dtype if self.dtype is not None else kwargs.get("torch_dtype")
            if dtype is not None:
                text["dtype"] = dtype
            self.text_config = text
        if self.vision_config is None:
            self.vision_config = self._vision_config_dict(kwargs)
        self.image_token_index = IMAGE_TOKEN_ID
        self.vision_feature_layer = kwargs.get("mm_vision_select_layer", -2)
        # "patch" drops CLS (vLLM's "default" strategy); "cls_patch" keeps it ("full").
        self.vision_feature_select_strategy = (
            "full" if kwargs.get("mm_vision_select_feature") == "cls_patch" else "default")
        self.projector_hidden_act = "gelu"
        super().__post_init__(**kwargs)
        self.__dict__["_flat_ready"] = True

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("_flat_ready", None)
        return out

    def _vision_config_dict(self, flat: dict[str, Any]) -> dict | None:
        explicit = flat.get("mm_vision_tower_config")
        if explicit:
            return {**explicit, "model_type": "clip_vision_model"}
        clip_dir, _ = find_clip_dir(flat.get("mm_vision_tower"))
        return _clip_vision_dict(clip_dir) if clip_dir else None   # None: CLIP ViT-L/14-336

    def __setattr__(self, key, value):
        super().__setattr__(key, value)
        if not self.__dict__.get("_flat_ready"):
            return
        if key == "mm_vision_tower" and not getattr(self, "mm_vision_tower_config", None):
            vision = self._vision_config_dict({"mm_vision_tower": value})
            if vision is not None:
                self.vision_config = CONFIG_MAPPING["clip_vision_model"](**vision)
        elif key in _LLAMA_KEYS and isinstance(self.text_config, PreTrainedConfig):
            setattr(self.text_config, key, value)


class _LlavaConfigDispatch(LlavaConfig):
    """Stands in for ``LlavaConfig`` under ``model_type`` "llava" in ``AutoConfig``: an original-layout
    config dict becomes a :class:`LlavaOriginalConfig`; every other one a plain ``LlavaConfig``."""

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        target = LlavaOriginalConfig if is_original_llava(config_dict) else LlavaConfig
        return target.from_dict(config_dict, **kwargs)


# -- vision tower weights (used by the model in the worker) ---------------------------------------

def _local_checkpoint_dir(model: str, revision: str | None = None) -> str | None:
    if os.path.isdir(model):
        return model
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(model, revision=revision, local_files_only=True,
                                 allow_patterns=["*.json", "*.safetensors"])
    except Exception:
        return None


def checkpoint_has_vision_tower(model: str, revision: str | None = None) -> bool:
    """Whether the checkpoint's safetensors carry ``model.vision_tower.vision_tower.*`` tensors."""
    directory = _local_checkpoint_dir(model, revision)
    if directory is None:
        return False
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = json.load(f).get("weight_map", {})
        return any(n.startswith(VISION_WEIGHT_PREFIX) for n in names)
    from safetensors import safe_open
    for path in glob.glob(os.path.join(directory, "*.safetensors")):
        with safe_open(path, framework="pt") as f:
            if any(n.startswith(VISION_WEIGHT_PREFIX) for n in f.keys()):
                return True
    return False


def vision_tower_weights_dir(model: str, mm_vision_tower: str | None,
                             revision: str | None = None) -> str | None:
    """Where the CLIP weights come from: None when the checkpoint carries them, else a local CLIP
    directory. Raises a one-line :class:`GraceFormatError` naming every place looked at."""
    if checkpoint_has_vision_tower(model, revision):
        return None
    clip_dir, looked = find_clip_dir(mm_vision_tower)
    if clip_dir is not None and has_weights(clip_dir):
        return clip_dir
    if clip_dir is not None:
        looked = [f"{clip_dir} (a directory without *.safetensors or *.bin weights)"]
    raise GraceFormatError(
        f"LLaVA vision tower not found: {model} has no {VISION_WEIGHT_PREFIX}* weights and the CLIP "
        f"tower is not at {' or '.join(looked)}; point {CLIP_PATH} (or --hf-overrides "
        f"'{{\"mm_vision_tower\": \"/path\"}}') at a local CLIP directory such as a download of "
        f"openai/clip-vit-large-patch14-336")


# -- registration -------------------------------------------------------------------------------------

def register_llava() -> None:
    """Teach vLLM the original LLaVA layout: config mapping, architecture, default chat template.

    Called from the plugin entry point in every vLLM process, before vLLM parses any config.
    The model class is registered lazily (by name), so no model code is imported here.
    """
    CONFIG_MAPPING.register("llava", _LlavaConfigDispatch, exist_ok=True)
    AutoConfig.register(MODEL_TYPE, LlavaOriginalConfig, exist_ok=True)

    from vllm import ModelRegistry
    ModelRegistry.register_model(ARCHITECTURE, f"grace_vllm.llava:{ARCHITECTURE}")

    from vllm.transformers_utils.chat_templates.registry import register_chat_template_fallback_path
    register_chat_template_fallback_path(MODEL_TYPE, CHAT_TEMPLATE)
