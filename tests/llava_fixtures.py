"""The tests' side of the LLaVA-1.5 fixtures: a tiny CLIP vision tower to serve them with (a
standalone directory, or its weights inside the checkpoint), the prompt LLaVA-1.5 was trained with,
and ``write_llava`` with the tower placed as ``clip_dir`` says. The checkpoint itself is
:func:`grace_qat.synthetic.write_llava`'s, as ``grace-qat fixture --model llava`` writes it.

Test tooling, not installed: the tests, ``tests/gpu/run.sh`` and ``benchmarks/vllm_bench.py``
import it from the repository (``tests/`` on ``sys.path``).
"""
from __future__ import annotations

import os

import torch

from grace_qat import synthetic
from grace_qat.llava_hf import CLIP_MEAN, CLIP_STD, LLAVA_V1_SYSTEM
from grace_qat.quantizer import DEFAULT_GROUP_SIZE
from grace_qat.synthetic import (LLAVA_SIZES_SPEC, meta_state_dict_specs, numel, pick_device, write_json,
                                 write_weights)


def llava_prompt(question: str) -> str:
    """The vicuna_v1 prompt LLaVA-1.5 was trained and evaluated with (one image)."""
    return f"{LLAVA_V1_SYSTEM} USER: <image>\n{question} ASSISTANT:"


def clip_config(size: str = "tiny") -> dict:
    """config.json of the CLIP tower directory (a full CLIPModel, like openai/clip-vit-large-patch14-336)."""
    c = LLAVA_SIZES_SPEC[size]["clip"]
    return {
        "architectures": ["CLIPModel"],
        "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592,
        "model_type": "clip",
        "projection_dim": c["proj"],
        "text_config": {
            "attention_dropout": 0.0, "bos_token_id": 49406, "eos_token_id": 49407, "hidden_act": "quick_gelu",
            "hidden_size": c["t_hidden"], "initializer_factor": 1.0, "initializer_range": 0.02,
            "intermediate_size": c["t_intermediate"], "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
            "model_type": "clip_text_model", "num_attention_heads": c["t_heads"],
            "num_hidden_layers": c["t_layers"], "pad_token_id": 1, "projection_dim": c["proj"],
            "vocab_size": 49408},
        "torch_dtype": "float16",
        "transformers_version": "4.31.0",
        "vision_config": clip_vision_config(size),
    }


def clip_vision_config(size: str = "tiny") -> dict:
    c = LLAVA_SIZES_SPEC[size]["clip"]
    return {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": c["hidden"],
            "image_size": c["image"], "initializer_factor": 1.0, "initializer_range": 0.02,
            "intermediate_size": c["intermediate"], "layer_norm_eps": 1e-05, "model_type": "clip_vision_model",
            "num_attention_heads": c["heads"], "num_channels": 3, "num_hidden_layers": c["layers"],
            "patch_size": c["patch"], "projection_dim": c["proj"]}


def clip_preprocessor_config(size: str = "tiny") -> dict:
    px = LLAVA_SIZES_SPEC[size]["clip"]["image"]
    return {"crop_size": {"height": px, "width": px}, "do_center_crop": True, "do_convert_rgb": True,
            "do_normalize": True, "do_rescale": True, "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": list(CLIP_MEAN), "image_processor_type": "CLIPImageProcessor", "image_std": list(CLIP_STD),
            "processor_class": "CLIPProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
            "size": {"shortest_edge": px}}


def _clip_specs(size: str, vision_only: bool) -> list[tuple[str, tuple[int, ...]]]:
    """CLIPModel's tensors; ``vision_only``: the ``vision_model.*`` ones, i.e. what a (transformers 4.x)
    CLIPVisionModel saves and what LLaVA's CLIPVisionTower holds under ``vision_tower.``."""
    from transformers import CLIPConfig, CLIPModel
    specs = meta_state_dict_specs(CLIPModel, CLIPConfig.from_dict(clip_config(size)))
    return [(k, sh) for k, sh in specs if k.startswith("vision_model.")] if vision_only else specs


def write_clip(out_dir: str, *, size: str = "tiny", seed: int = 0, device: str | None = None) -> str:
    """A standalone CLIP tower directory (config.json, model.safetensors fp16, preprocessor_config.json)."""
    os.makedirs(out_dir, exist_ok=True)
    specs = _clip_specs(size, vision_only=False)
    dev = pick_device(device, sum(numel(sh) for _, sh in specs))
    write_weights(out_dir, specs, fmt="plain", bits=4, group_size=DEFAULT_GROUP_SIZE, seed=seed,
                   dtype=torch.float16, device=dev, max_shard_bytes=10 * 1000 ** 3)
    write_json(os.path.join(out_dir, "config.json"), clip_config(size))
    write_json(os.path.join(out_dir, "preprocessor_config.json"), clip_preprocessor_config(size))
    return out_dir


def cache_clip(size: str = "tiny", *, seed: int = 0, device: str | None = None) -> str:
    """The release's CLIP tower (``openai/clip-vit-large-patch14-336``, the hub id an original-layout
    checkpoint's ``mm_vision_tower`` names) in this machine's Hugging Face cache, as a user who has
    downloaded it has it, with random weights of ``size``; written only where the cache has none.
    Returns the snapshot directory. Stock SGLang's LLaVA loads the tower by that id, offline from
    the cache, and so does the plugin (``grace_qat.llava_hf.find_clip_dir``)."""
    import tempfile

    from huggingface_hub import constants

    from grace_qat.llava_hf import hf_cache_snapshot
    from hub_cache import add_to_hub_cache
    found = hf_cache_snapshot(synthetic.LLAVA_CLIP_HUB_ID)
    if found:
        return found
    os.makedirs(constants.HF_HOME, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=constants.HF_HOME) as tmp:
        return add_to_hub_cache(constants.HF_HOME, synthetic.LLAVA_CLIP_HUB_ID,
                                write_clip(tmp, size=size, seed=seed, device=device))


def write_llava(out_dir: str, *, size: str = "tiny", seed: int = 0, clip_dir: str | None = None,
                device: str | None = None, **kwargs) -> str:
    """:func:`grace_qat.synthetic.write_llava`, with its CLIP tower where ``clip_dir`` says.

    ``clip_dir``: None = no vision tower written (``mm_vision_tower`` keeps the hub id, as in the
    release); "inline" = CLIP vision weights inside the checkpoint under
    ``model.vision_tower.vision_tower.vision_model.*`` (``mm_vision_tower`` keeps the hub id and the
    fixture adds ``mm_vision_tower_config``, the CLIPVisionConfig, since nothing else describes them);
    a path = a standalone CLIP directory written there, ``mm_vision_tower`` = its absolute path.
    """
    if size not in LLAVA_SIZES_SPEC:
        raise ValueError(f"size must be one of {tuple(LLAVA_SIZES_SPEC)}, got {size!r}")
    if clip_dir == "inline":
        kwargs.update(tower_specs=[("model.vision_tower.vision_tower." + k, sh)
                                   for k, sh in _clip_specs(size, vision_only=True)],
                      tower_config={"mm_vision_tower_config": clip_vision_config(size)})
    elif clip_dir is not None:
        kwargs["mm_vision_tower"] = os.path.abspath(str(clip_dir))
    synthetic.write_llava(out_dir, size=size, seed=seed, device=device, **kwargs)   # checks the arguments
    if clip_dir is not None and clip_dir != "inline":
        write_clip(str(clip_dir), size=size, seed=seed, device=device)
    return out_dir
