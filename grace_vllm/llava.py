"""LLaVA-1.5 in its original layout on vLLM: the ``LlavaLlamaForCausalLM`` model class and its
multimodal processor. vLLM imports this module lazily (the plugin registers the class by name).

The model is vLLM's own LLaVA (CLIP tower -> 2-layer GELU projector -> Llama) with
  * weight names mapped from the original layout (``model.*``, ``model.mm_projector.{0,2}``,
    ``model.vision_tower.vision_tower.*``, ``lm_head``), so ``grace_qat`` sees the language-model
    linears as ``language_model.model.layers.N...`` and the tower and projector stay unquantized;
  * the CLIP weights taken from the checkpoint when it carries them, else from the CLIP directory
    (``$GRACE_CLIP_PATH`` or ``mm_vision_tower``: a directory or a Hub id in the local cache).
The processor reproduces LLaVA-1.5's own input pipeline: images padded to a square with the CLIP mean
colour, resized (bicubic) and normalized; the prompt split at ``<image>``, each chunk tokenized on its
own (the first keeps BOS, later ones keep SentencePiece's leading "▁"), one placeholder per image in
between, which vLLM expands to one token per image feature (576 for CLIP ViT-L/14-336).

vLLM 0.26 hands the processor the prompt text (or token ids) and expects it to tokenize; vLLM 0.32+
tokenizes first and hands over token ids. Both APIs are served by the same class below: methods of
one API are never called by the other.
"""
from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from transformers import BatchFeature

from vllm.config import VllmConfig
from vllm.model_executor.models.llava import (BaseLlavaProcessingInfo, LlavaDummyInputsBuilder,
                                              LlavaForConditionalGeneration,
                                              LlavaMultiModalProcessor)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY

from grace_qat.errors import GraceFormatError
from grace_qat.llava_hf import CLIP_MEAN, CLIP_STD

from .llava_config import ARCHITECTURE, IMAGE_TOKEN, LlavaOriginalConfig, vision_tower_weights_dir


# -- LLaVA-1.5's input pipeline -------------------------------------------------------------------

def expand_to_square(image, background: tuple[int, int, int]):
    """LLaVA's ``expand2square``: centre the image on a square canvas of the background colour."""
    from PIL import Image
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def preprocess_image(image, size: int, pad: bool = True) -> torch.Tensor:
    """One image as LLaVA-1.5 feeds CLIP: (3, size, size) float32.

    ``pad`` ("image_aspect_ratio": "pad"): square with the CLIP mean colour first. Then what the
    CLIP image processor does: shortest edge to ``size`` (bicubic, PIL), centre crop, scale to
    [0, 1], normalize with the CLIP mean and std.
    """
    from PIL import Image
    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim not in (2, 3):
            raise TypeError(f"LLaVA: expected a PIL image or an HxW(xC) uint8 array, got "
                            f"{type(image).__name__} {getattr(array, 'dtype', '')}")
        image = Image.fromarray(array)
    image = image.convert("RGB")
    if pad:
        image = expand_to_square(image, tuple(int(m * 255) for m in CLIP_MEAN))
    width, height = image.size
    short, long = min(width, height), max(width, height)
    long = int(size * long / short)
    image = image.resize((size, long) if width <= height else (long, size), Image.BICUBIC)
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


@functools.lru_cache(maxsize=8)
def _sentencepiece(model_file: str | None):
    if not model_file or not os.path.isfile(model_file):
        return None
    import sentencepiece
    return sentencepiece.SentencePieceProcessor(model_file=model_file)


class LlavaOriginalProcessor:
    """What vLLM calls "the HF processor" of this model (original LLaVA has none): tokenizes the
    LLaVA way and preprocesses images. Placeholders stay single; vLLM expands them."""

    image_token = IMAGE_TOKEN

    def __init__(self, config: LlavaOriginalConfig, tokenizer=None):
        self.tokenizer = tokenizer
        self.image_token_id = config.image_token_index
        self.image_size = config.vision_config.image_size
        self.pad = getattr(config, "image_aspect_ratio", "pad") == "pad"

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """LLaVA's ``tokenizer_image_token``: chunks around ``<image>`` tokenized separately."""
        tok = self.tokenizer
        # The vicuna_v1 template writes "<s> " itself; whether the engine also asks for special
        # tokens differs between vLLM versions and entry points (0.26's LLM.chat does, its server
        # does not). LLaVA's prompts hold exactly one BOS, so a textual one is the BOS.
        if tok.bos_token and text.startswith(tok.bos_token):
            text, add_bos = text[len(tok.bos_token):].removeprefix(" "), True
        ids = [tok.bos_token_id] if add_bos and tok.bos_token_id is not None else []
        for i, chunk in enumerate(text.split(IMAGE_TOKEN)):
            if i:
                ids.append(self.image_token_id)
            ids.extend(self._encode_chunk(chunk))
        return ids

    def _encode_chunk(self, chunk: str) -> list[int]:
        # LLaVA tokenizes with the SentencePiece Llama tokenizer, which puts its "▁" dummy prefix in
        # front of every chunk, also one that starts with a space; Transformers' fast Llama tokenizer
        # does not there. So plain text goes to SentencePiece itself when the checkpoint has its model;
        # text holding special or added tokens (e.g. "</s>" between turns) to the tokenizer, which
        # splits them out first, as LLaVA's tokenizer did.
        tok = self.tokenizer
        sp = _sentencepiece(getattr(tok, "vocab_file", None))
        if sp is not None and not any(t in chunk for t in tok.get_added_vocab()):
            return sp.encode(chunk)
        return tok.encode(chunk, add_special_tokens=False)

    def retokenize(self, ids: Sequence[int]) -> list[int]:
        """Token ids of a whole prompt (tokenized by vLLM in one piece) -> the LLaVA tokenization."""
        tok = self.tokenizer
        has_bos = bool(ids) and tok.bos_token_id is not None and ids[0] == tok.bos_token_id
        text = tok.decode(list(ids[1:] if has_bos else ids), skip_special_tokens=False,
                          clean_up_tokenization_spaces=False)
        if IMAGE_TOKEN not in text:
            return list(ids)
        return self.tokenize(text, add_bos=has_bos)

    def __call__(self, text=None, images=None, add_special_tokens: bool = True, **_) -> BatchFeature:
        data = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            data["input_ids"] = [self.tokenize(t, add_bos=add_special_tokens) for t in texts]
        if images is not None:
            images = images if isinstance(images, (list, tuple)) else [images]
            data["pixel_values"] = torch.stack(
                [preprocess_image(im, self.image_size, self.pad) for im in images])
        return BatchFeature(data)


class LlavaOriginalProcessingInfo(BaseLlavaProcessingInfo):
    def get_hf_processor(self, **kwargs: object) -> LlavaOriginalProcessor:
        return LlavaOriginalProcessor(self.get_hf_config(), self.ctx.tokenizer)


class LlavaOriginalMultiModalProcessor(LlavaMultiModalProcessor):
    """vLLM's LLaVA processor (pixel_values fields, one placeholder -> N image tokens) with
    LLaVA-1.5's own tokenization and image preprocessing."""

    # vLLM >= 0.32: the prompt arrives tokenized in one piece; redo it the LLaVA way.
    def _postprocess_prompt(self, prompt: list[int]) -> list[int]:
        return self.info.get_hf_processor().retokenize(prompt)

    # vLLM 0.26: text prompts go through LlavaOriginalProcessor.__call__ (tokenize), token prompts
    # through here; placeholders are left single for vLLM to expand.
    def _apply_hf_processor_tokens_only(self, prompt_tokens: list[int]) -> list[int]:
        return self.info.get_hf_processor().retokenize(prompt_tokens)

    def _hf_processor_applies_updates(self, prompt_text, mm_items, hf_processor_mm_kwargs,
                                      tokenization_kwargs) -> bool:
        return False

    def _apply_hf_processor_mm_only(self, mm_items, hf_processor_mm_kwargs, tokenization_kwargs):
        # The 0.26 base would call ProcessorMixin internals; run images with a dummy prompt instead.
        _, processed, _ = self._apply_hf_processor_text_mm(
            prompt_text=self.dummy_inputs.get_dummy_text(mm_items.get_all_counts()),
            mm_items=mm_items, hf_processor_mm_kwargs=hf_processor_mm_kwargs,
            tokenization_kwargs=tokenization_kwargs)
        return processed


_PROJECTOR = re.compile(r"^mlp(\d+)x_gelu$")


def _check_supported(config: LlavaOriginalConfig) -> None:
    def bad(what: str) -> GraceFormatError:
        return GraceFormatError(f"original-layout LLaVA: {what} is not supported (LLaVA-1.5 only: "
                                f"mlp2x_gelu projector, flat patches, no image start/end tokens)")
    projector = getattr(config, "mm_projector_type", "linear")
    match = _PROJECTOR.match(projector)
    if not match or match.group(1) != "2":
        raise bad(f"mm_projector_type {projector!r}")
    if getattr(config, "mm_use_im_start_end", False):
        raise bad("mm_use_im_start_end")
    if getattr(config, "mm_patch_merge_type", "flat") != "flat":
        raise bad(f"mm_patch_merge_type {config.mm_patch_merge_type!r}")
    if getattr(config, "image_aspect_ratio", "pad") not in ("pad", "square", None):
        raise bad(f"image_aspect_ratio {config.image_aspect_ratio!r}")
    mm_hidden = getattr(config, "mm_hidden_size", config.vision_config.hidden_size)
    if mm_hidden != config.vision_config.hidden_size:
        raise GraceFormatError(
            f"original-layout LLaVA: the projector takes {mm_hidden}-wide features (mm_hidden_size) but "
            f"the vision tower config says hidden_size {config.vision_config.hidden_size}; "
            f"mm_vision_tower={getattr(config, 'mm_vision_tower', None)!r} is not the tower it was "
            f"trained with")


@MULTIMODAL_REGISTRY.register_processor(LlavaOriginalMultiModalProcessor,
                                        info=LlavaOriginalProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class LlavaLlamaForCausalLM(LlavaForConditionalGeneration):
    """LLaVA-1.5, original layout. Prefix rules apply in order, each to the already renamed name."""

    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            "model.vision_tower.vision_tower.": "vision_tower.",
            "model.mm_projector.0.": "multi_modal_projector.linear_1.",
            "model.mm_projector.2.": "multi_modal_projector.linear_2.",
            "lm_head.": "language_model.lm_head.",
            "model.": "language_model.model.",
            # The CLIP directory is a whole CLIPModel: its text half is not used.
            "vision_tower.text_model.": None,
            "vision_tower.text_projection.": None,
            "vision_tower.visual_projection.": None,
            "vision_tower.logit_scale": None,
        },
        # Older CLIP checkpoints store this buffer; vLLM's CLIP does not load it.
        orig_to_new_suffix={"embeddings.position_ids": None},
    )

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        model_config = vllm_config.model_config
        config = model_config.hf_config
        if not isinstance(config, LlavaOriginalConfig):
            raise GraceFormatError(f"{ARCHITECTURE}: expected an original-layout LLaVA config (with "
                                   f"mm_vision_tower), got {type(config).__name__}")
        # the tower lookup first: a missing tower also shows as a width mismatch (default CLIP config)
        clip_dir = vision_tower_weights_dir(model_config.model, config.mm_vision_tower, model_config.revision)
        _check_supported(config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._dtype = model_config.dtype
        if clip_dir is not None:
            from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
            self.secondary_weights = [DefaultModelLoader.Source(
                model_or_path=clip_dir, revision=None, prefix="vision_tower.")]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # CLIP towers ship in FP16 and GRACE LLMs in BF16: cast the tower's tensors up front (the same
        # rounding the parameter copy does) rather than have vLLM warn once per tensor.
        def cast(named):
            for name, tensor in named:
                if name.startswith(("vision_tower.", "model.vision_tower.")) and tensor.is_floating_point():
                    tensor = tensor.to(self._dtype)
                yield name, tensor
        return super().load_weights(cast(weights))
