"""Which checkpoint modules stand behind an engine's linear layer, for both engine adapters: the
projections an engine fuses into one parallel layer (``qkv_proj``, ``gate_up_proj``)."""
from __future__ import annotations

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


__all__ = ["FUSED_MODULES", "fused_parts"]
