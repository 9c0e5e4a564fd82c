"""Which checkpoint modules stand behind an engine's linear layer, for both engine adapters.

An engine names its layers after its own module tree (vLLM: ``language_model.model.layers.3.mlp.
gate_up_proj`` for Qwen3-VL, after the model's ``WeightsMapper``; SGLang: ``model.layers.3...``), and
fuses projections into one parallel layer (``qkv_proj``, ``gate_up_proj``). Whatever the outer
prefix, every supported architecture keeps the decoder-layer-relative name
(:func:`grace_qat.architectures.decoder_layer_key`, ``layers.3.mlp.gate_proj``) of the checkpoint,
so both adapters match an engine layer's parts to checkpoint modules by that key: one rule, no
replay of an engine's renames, and no match outside the language model (a vision tower's encoder
layers are spelt ``layers.<i>.self_attn.*`` too, and are never quantized).
"""
from __future__ import annotations

from .architectures import decoder_layer_key
from .errors import GraceFormatError

# vLLM and SGLang fuse these projections into one parallel layer; the list order is the shard order
# (QKVParallelLinear shard ids "q"/"k"/"v", MergedColumnParallelLinear shard ids 0, 1, ...).
FUSED_MODULES = {
    "qkv_proj": ["q_proj", "k_proj", "v_proj"],
    "gate_up_proj": ["gate_proj", "up_proj"],
}


def fused_parts(leaf: str, packed_modules_mapping: dict | None = None) -> list[str]:
    """Checkpoint leaf names behind an engine layer's leaf name (``qkv_proj`` -> q/k/v_proj), in
    shard order; the engine's own mapping first, then the fusions every supported model uses."""
    for mapping in (packed_modules_mapping or {}, FUSED_MODULES):
        parts = mapping.get(leaf)
        if isinstance(parts, (list, tuple)) and parts and all(isinstance(p, str) for p in parts):
            return list(parts)
    return [leaf]


def module_index(path: str, modules: list[str]) -> dict[str, str]:
    """Decoder-layer key -> checkpoint module, for every quantized module (plain, picklable state);
    refuses a module outside the decoder layers and two modules with one key."""
    index: dict[str, str] = {}
    for name in modules:
        key = decoder_layer_key(name)
        if key is None:
            raise GraceFormatError(f"{path}: quantized module {name} is not inside a decoder "
                                   f"layer (layers.<i>.*); not a GRACE language-model linear")
        if key in index:
            raise GraceFormatError(f"{path}: modules {index[key]} and {name} both end in {key}; "
                                   f"cannot map them onto the engine's layers")
        index[key] = name
    return index


def checkpoint_modules(index: dict[str, str], prefix: str, packed_modules_mapping: dict | None,
                       path: str, engine: str) -> list[str] | None:
    """Checkpoint modules behind engine layer ``prefix``, in shard order (several for a fused
    layer); None when the layer is not quantized. A fused layer whose parts are only partly
    quantized cannot be served and raises."""
    parent, _, leaf = prefix.rpartition(".")
    parts = [f"{parent}.{p}" if parent else p for p in fused_parts(leaf, packed_modules_mapping)]
    keys = [decoder_layer_key(p) for p in parts]
    found = [index.get(k) if k is not None else None for k in keys]
    if all(f is None for f in found):
        return None
    if any(f is None for f in found):
        missing = [p for p, f in zip(parts, found) if f is None]
        raise GraceFormatError(f"{path}: {engine} fuses {parts} into {prefix}, but {missing} are not "
                               f"quantized in the checkpoint; a fused layer needs all or none")
    return found


__all__ = ["FUSED_MODULES", "fused_parts", "module_index", "checkpoint_modules"]
