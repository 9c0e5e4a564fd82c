"""The naming rules of the model architectures GRACE quantizes, shared by every format and both
engine adapters: which linears GRACE quantizes (the language model's decoder-layer projections,
never the vision tower or projector), where each architecture keeps its decoder layers in a
checkpoint, and the decoder-layer-relative name by which an engine's layer and a checkpoint's
module are matched."""
from __future__ import annotations

import os
import re

from .errors import GraceFormatError
from .files import CONFIG_NAME

# The linears GRACE quantizes: attention and MLP projections of every language-model decoder layer.
_QUANTIZABLE = re.compile(r"(^|\.)layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")
_VISION = re.compile(r"(^|\.)(visual|vision_tower|vision_model|mm_projector)(\.|$)")


def is_quantizable_module(name: str) -> bool:
    """True for a language-model linear that GRACE quantizes (never vision tower or projector)."""
    return bool(_QUANTIZABLE.search(name)) and not _VISION.search(name)


# "...layers.<i>.<rest>": the decoder-layer-relative part of a module name
_DECODER_LAYER_KEY = re.compile(r"(?:^|\.)(layers\.\d+\..+)$")


def decoder_layer_key(name: str) -> str | None:
    """``layers.<i>.<rest>`` of a language-model linear's name (a checkpoint module or an engine
    layer), else None (not a linear GRACE quantizes: outside the decoder layers, or in the vision
    tower, whose encoder layers are spelt alike)."""
    if _VISION.search(name):
        return None
    m = _DECODER_LAYER_KEY.search(name)
    return m.group(1) if m else None


# Where each known architecture keeps its language-model decoder layers (Transformers' saved names).
_ARCH_LAYER_PREFIXES = {
    "Qwen3VLForConditionalGeneration": ("model.language_model.layers.",),
    "Qwen2_5_VLForConditionalGeneration": ("model.language_model.layers.", "model.layers."),
    "Qwen2VLForConditionalGeneration": ("model.language_model.layers.", "model.layers."),
    "LlavaLlamaForCausalLM": ("model.layers.",),
    "LlavaForConditionalGeneration": ("model.language_model.layers.", "language_model.model.layers."),
    "LlamaForCausalLM": ("model.layers.",),
    "MistralForCausalLM": ("model.layers.",),
    "Qwen2ForCausalLM": ("model.layers.",),
    "Qwen3ForCausalLM": ("model.layers.",),
}
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_architecture(path: str, config: dict, modules: list[str]) -> None:
    """config.json must describe the quantized modules: a known architecture keeps its decoder layers
    under its own prefix, and ``num_hidden_layers`` is the number of quantized decoder layers."""
    cfg = os.path.join(path, CONFIG_NAME)
    archs = config.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise GraceFormatError(f"{cfg}: architectures must be a list of class names, got {archs!r}")
    if not modules:
        return
    for arch in archs or ():
        prefixes = _ARCH_LAYER_PREFIXES.get(arch)
        if prefixes is None:
            continue
        wrong = [m for m in modules if not m.startswith(prefixes)]
        if wrong:
            raise GraceFormatError(
                f"{cfg}: architectures says {arch}, whose decoder layers are {' or '.join(p + '*' for p in prefixes)}, "
                f"but {len(wrong)} quantized modules are not (first: {wrong[0]})")
    text = config.get("text_config")
    n = text.get("num_hidden_layers") if isinstance(text, dict) else None
    if n is None:
        n = config.get("num_hidden_layers")
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise GraceFormatError(f"{cfg}: num_hidden_layers must be a non-negative integer, got {n!r}")
    layers: dict[int, str] = {}
    for m in modules:
        hit = _LAYER_INDEX.search(m)
        if hit:
            layers.setdefault(int(hit.group(1)), m)
    beyond = sorted(i for i in layers if i >= n)
    if beyond:
        raise GraceFormatError(f"{cfg}: num_hidden_layers is {n} but the checkpoint quantizes decoder layer "
                               f"{beyond[0]} (module {layers[beyond[0]]})")
    absent = [i for i in range(n) if i not in layers]
    if absent:
        raise GraceFormatError(f"{cfg}: num_hidden_layers is {n} but the checkpoint has no quantized linears "
                               f"for {len(absent)} of them (first: layer {absent[0]})")
