"""LLaVA-1.5 original layout -> llava-hf layout (``LlavaForConditionalGeneration``).

The GRACE LLaVA releases keep the original repository's layout (``LlavaLlamaForCausalLM``, flat Llama
fields, ``model.mm_projector.{0,2}``, no ``<image>`` token), which stock engines cannot load without
grace_vllm's shim. ``grace-qat convert ... --layout llava-hf`` writes the layout of the
``llava-hf/llava-1.5-*-hf`` repositories instead, so stock vLLM / SGLang / Transformers serve the same
weights (in GPTQ, compressed-tensors, AWQ or BF16):

* tensors renamed (``language_model.model.*``, ``language_model.lm_head``, ``vision_tower.vision_model.*``,
  ``multi_modal_projector.linear_{1,2}``); the CLIP tower must be inside the checkpoint or given;
* two tokens appended to the vocabulary, ``<image>`` and ``<pad>``, as llava-hf does; their embedding
  and lm_head rows copy ``<unk>``'s (id 0), which LLaVA never emits, so the new ids get ``<unk>``'s
  logit and the original ids' outputs are unchanged;
* a ``LlavaConfig`` (text and vision sub-configs from the flat fields), the tokenizer files with the
  two tokens, LLaVA-1.5's "pad" image preprocessing (``LlavaImageProcessor``, ``do_pad``) and its
  vicuna_v1 chat template.

The same module knows where an original-layout checkpoint's CLIP tower is (:func:`find_clip_dir`) and
writes the llava-hf *processor* files alone (:func:`write_processor`): what an engine that serves the
original layout natively (SGLang's ``LlavaLlamaForCausalLM``) needs as ``--tokenizer-path``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from . import settings
from .errors import GraceFormatError
from .files import read_config

CHAT_TEMPLATE = Path(__file__).with_name("llava_vicuna_v1.jinja")
IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"
UNK_ID = 0
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)   # LLaVA-1.5 pads images with this colour
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# CLIP ViT-L/14-336, the tower of every LLaVA-1.5 release (used when the config does not describe it)
CLIP_L_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
              "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "projection_dim": 768,
              "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
_LLAMA_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "hidden_act",
                 "rope_theta", "rope_scaling", "attention_bias", "bos_token_id", "eos_token_id")
_RENAMES = [   # original layout -> llava-hf, first match wins
    (re.compile(r"^model\.vision_tower\.vision_tower\.vision_model\."), "vision_tower.vision_model."),
    (re.compile(r"^model\.mm_projector\.0\."), "multi_modal_projector.linear_1."),
    (re.compile(r"^model\.mm_projector\.2\."), "multi_modal_projector.linear_2."),
    (re.compile(r"^model\."), "language_model.model."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
]
VOCAB_TENSORS = ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")


# The system prompt of LLaVA's "llava_v1" conversation (USER/ASSISTANT turns, " " and "</s>"
# separators), which GRACE's LLaVA tooling prompts with; the same text is in llava_vicuna_v1.jinja.
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant "
                   "gives helpful, detailed, and polite answers to the human's questions.")


# -- where the CLIP tower is ------------------------------------------------------------------------

def hf_cache_snapshot(repo_id: str) -> str | None:
    """The cached snapshot directory of a Hub repository (offline: never touches the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        path = try_to_load_from_cache(repo_id, "config.json")
    except Exception:   # not a valid repo id, no cache, ...
        return None
    return os.path.dirname(path) if isinstance(path, str) else None


def find_clip_dir(mm_vision_tower: str | None) -> tuple[str | None, list[str]]:
    """The local CLIP directory to use, and a description of every place looked at.

    ``$GRACE_CLIP_PATH`` when set (it must then be a directory), else ``mm_vision_tower`` as a local
    directory, else ``mm_vision_tower`` as a Hub id in the Hugging Face cache.
    """
    env = settings.clip_path()
    if env:
        return (env, []) if os.path.isdir(env) else (None, [f"{settings.CLIP_PATH}={env} (not a directory)"])
    if not mm_vision_tower:
        return None, ["mm_vision_tower (not set)"]
    if os.path.isdir(mm_vision_tower):
        return mm_vision_tower, []
    snapshot = hf_cache_snapshot(mm_vision_tower)
    if snapshot:
        return snapshot, []
    from huggingface_hub import constants
    return None, [f"mm_vision_tower={mm_vision_tower!r} as a directory",
                  f"in the Hugging Face cache {constants.HF_HUB_CACHE}"]


def is_original_llava(config: dict) -> bool:
    """An original-layout LLaVA config dict: vision tower named by ``mm_vision_tower``, no sub-configs."""
    return "mm_vision_tower" in config and config.get("text_config") is None


def rename(name: str) -> str:
    for pattern, repl in _RENAMES:
        if pattern.match(name):
            return pattern.sub(repl, name, count=1)
    raise GraceFormatError(f"tensor {name}: not part of an original-layout LLaVA-1.5 checkpoint")


def extend_vocab(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """embed_tokens / lm_head (llava-hf names) gain the rows of <image> and <pad>: copies of <unk>'s."""
    if name not in VOCAB_TENSORS:
        return tensor
    return torch.cat([tensor, tensor[UNK_ID:UNK_ID + 1].expand(2, -1)], dim=0)


def clip_vision_tensors(clip_dir: str) -> dict[str, torch.Tensor]:
    """``vision_model.*`` tensors of a CLIP directory (CLIPModel or CLIPVisionModel safetensors),
    under their llava-hf names."""
    from safetensors.torch import load_file
    out = {}
    for fname in sorted(os.listdir(clip_dir)):
        if fname.endswith(".safetensors"):
            for k, v in load_file(os.path.join(clip_dir, fname)).items():
                if k.startswith("vision_model."):
                    out["vision_tower." + k] = v
    if not out:
        raise GraceFormatError(f"{clip_dir}: no vision_model.* tensors in its *.safetensors (a CLIP "
                               f"checkpoint such as openai/clip-vit-large-patch14-336 was expected)")
    return out


def _vision_config(config: dict, clip_dir: str | None) -> dict:
    vision = config.get("mm_vision_tower_config")
    if not vision and clip_dir:
        clip = read_config(clip_dir)
        vision = clip.get("vision_config", clip)
    vision = dict(vision or CLIP_L_336)
    vision["model_type"] = "clip_vision_model"
    return vision


def _feature_strategy(config: dict) -> str:
    """LLaVA's "patch" drops CLS (llava-hf's "default"); "cls_patch" keeps it ("full")."""
    return "full" if config.get("mm_vision_select_feature") == "cls_patch" else "default"


def hf_config(config: dict, vocab_size: int, clip_dir: str | None = None) -> dict:
    """The llava-hf ``config.json`` (without quantization_config) for an original-layout one."""
    dtype = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    text = {k: config[k] for k in _LLAMA_FIELDS if k in config}
    text.update(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab_size + 2,
                pad_token_id=vocab_size + 1, tie_word_embeddings=False, torch_dtype=dtype)
    strategy = _feature_strategy(config)
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "image_token_index": vocab_size, "pad_token_id": vocab_size + 1,
            "projector_hidden_act": "gelu", "vision_feature_layer": config.get("mm_vision_select_layer", -2),
            "vision_feature_select_strategy": strategy, "tie_word_embeddings": False,
            "torch_dtype": dtype, "text_config": text, "vision_config": _vision_config(config, clip_dir)}


def write_side_files(src: str, dst: str, config: dict, vocab_size: int, clip_dir: str | None = None) -> None:
    """Tokenizer (with <image> and <pad>), image processor, processor and chat template."""
    for fname in ("tokenizer.model", "generation_config.json"):
        if os.path.exists(os.path.join(src, fname)):
            shutil.copy2(os.path.join(src, fname), os.path.join(dst, fname))
    tok_cfg = {}
    if os.path.exists(os.path.join(src, "tokenizer_config.json")):
        with open(os.path.join(src, "tokenizer_config.json")) as f:
            tok_cfg = json.load(f)
    added = dict(tok_cfg.get("added_tokens_decoder") or {})
    for i, content in ((vocab_size, IMAGE_TOKEN), (vocab_size + 1, PAD_TOKEN)):
        added[str(i)] = {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": True}
    tok_cfg.update(added_tokens_decoder=added, pad_token=PAD_TOKEN, extra_special_tokens={"image_token": IMAGE_TOKEN},
                   chat_template=CHAT_TEMPLATE.read_text())
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=2)
    special = {}
    if os.path.exists(os.path.join(src, "special_tokens_map.json")):
        with open(os.path.join(src, "special_tokens_map.json")) as f:
            special = json.load(f)
    special["pad_token"] = PAD_TOKEN
    with open(os.path.join(dst, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    vision = _vision_config(config, clip_dir)
    size = vision["image_size"]
    with open(os.path.join(dst, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "LlavaImageProcessor", "processor_class": "LlavaProcessor",
                   "do_pad": True, "do_resize": True, "size": {"shortest_edge": size},
                   "do_center_crop": True, "crop_size": {"height": size, "width": size},
                   "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                   "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_convert_rgb": True,
                   "resample": 3}, f, indent=2)
    with open(os.path.join(dst, "processor_config.json"), "w") as f:
        json.dump({"processor_class": "LlavaProcessor", "image_token": IMAGE_TOKEN,
                   "patch_size": vision["patch_size"], "num_additional_image_tokens": 1,
                   "vision_feature_select_strategy": _feature_strategy(config)}, f, indent=2)
    shutil.copy2(CHAT_TEMPLATE, os.path.join(dst, "chat_template.jinja"))


def write_processor(src: str, dst: str, clip_dir: str | None = None) -> str:
    """Write only the llava-hf processor files for the original-layout checkpoint ``src`` into ``dst``:
    the tokenizer with ``<image>`` (id = vocab size) and ``<pad>``, the image processor (sized from
    the CLIP tower's config when one is found, else CLIP ViT-L/14-336), the processor config and
    the vicuna_v1 chat template. No weights are read or written."""
    config = read_config(src)
    if not is_original_llava(config):
        raise GraceFormatError(f"{src}/config.json: not an original-layout LLaVA-1.5 config "
                               f"(mm_vision_tower and no text_config expected; architectures = "
                               f"{config.get('architectures')})")
    if not os.path.exists(os.path.join(src, "tokenizer.model")):
        raise GraceFormatError(f"{src}: no tokenizer.model (LLaVA-1.5's SentencePiece tokenizer) to extend")
    if clip_dir is None and not config.get("mm_vision_tower_config"):
        clip_dir, _ = find_clip_dir(config.get("mm_vision_tower"))
        if clip_dir is not None and not os.path.exists(os.path.join(clip_dir, "config.json")):
            clip_dir = None
    os.makedirs(dst, exist_ok=True)
    write_side_files(src, dst, config, config["vocab_size"], clip_dir)
    return dst


def image_token_id(tokenizer_dir: str) -> int | None:
    """The id of ``<image>`` among a local tokenizer's added tokens (``tokenizer_config.json`` or
    ``tokenizer.json``), or None when it has none. Reads JSON only: no tokenizer is built."""
    try:
        with open(os.path.join(tokenizer_dir, "tokenizer_config.json")) as f:
            added = json.load(f).get("added_tokens_decoder") or {}
        for idx, tok in added.items():
            if isinstance(tok, dict) and tok.get("content") == IMAGE_TOKEN:
                return int(idx)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(tokenizer_dir, "tokenizer.json")) as f:
            for tok in json.load(f).get("added_tokens") or []:
                if tok.get("content") == IMAGE_TOKEN:
                    return int(tok["id"])
    except (OSError, ValueError):
        pass
    return None
