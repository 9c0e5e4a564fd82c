"""Tensor parallelism, as both engine adapters need it, written once: the loader shard id of each
checkpoint module behind a fused parallel layer (with which an adapter feeds the tensors the weight
stream does not carry through the engine's own loader), how a rank's slice must hold whole
quantization groups, and which group size the kernels are told. Which checkpoint modules stand
behind an engine layer is :mod:`grace_qat.layer_names`'.

Engine-independent; the adapters pass in what their layer objects know (prefix, sizes per rank).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import GraceFormatError
from .quantizer import effective_group_size

# The loader shard ids of a QKVParallelLinear's parts, in shard order (a MergedColumnParallelLinear's
# are 0, 1, ...; the parts themselves: grace_qat.layer_names.fused_parts).
QKV_SHARD_IDS = ("q", "k", "v")


def shard_ids(n: int, qkv: bool) -> list:
    """The loader shard id of each of ``n`` fused checkpoint modules (None: not fused)."""
    if n == 1:
        return [None]
    if qkv:
        if n != len(QKV_SHARD_IDS):
            raise ValueError(f"a QKV layer fuses {len(QKV_SHARD_IDS)} modules, not {n}")
        return list(QKV_SHARD_IDS)
    return list(range(n))


def shard_index(shard_id, n: int) -> int | None:
    """Position (in shard order) of the module a loader's shard id names; None if it names none."""
    if isinstance(shard_id, str):
        idx = QKV_SHARD_IDS.index(shard_id) if shard_id in QKV_SHARD_IDS else None
    elif isinstance(shard_id, int) and not isinstance(shard_id, bool):
        idx = shard_id
    else:
        idx = None
    return idx if idx is not None and 0 <= idx < n else None


def module_shards(prefix: str, layer_type: str, names: list[str], qkv: bool, merged: bool
                  ) -> list[tuple[str, object]]:
    """(checkpoint module, loader shard id) of each module behind one engine layer, in shard order.
    ``qkv`` / ``merged``: the layer is the engine's QKV / merged-column parallel linear."""
    n = len(names)
    qkv = qkv and n == len(QKV_SHARD_IDS)
    if n == 1 or qkv or merged:
        return list(zip(names, shard_ids(n, qkv)))
    raise ValueError(f"grace_qat: layer {prefix} ({layer_type}) fuses checkpoint modules {names}; "
                     f"no rule to load their scales shard by shard")


def checkpoint_feeds(ckpt, tensors, shards):
    """(leaf, full tensor, loader args) for every "checkpoint"-source RankTensor of every
    (module, shard id) in ``shards``: what an adapter pushes through that leaf's own loader after
    loading, so that the engine shards it exactly like the weight stream's tensors."""
    for name, shard_id in shards:
        args = () if shard_id is None else (shard_id,)
        for t in tensors:
            if t.source == "checkpoint":
                yield t.leaf, ckpt.fed_tensor(name, t.leaf), args


def loader_for(t, loader, groups_per_row: int):
    """The engine loader for RankTensor ``t``: a tensor stored flat (out*groups,) in the files
    (``flat_in_checkpoint``) is reshaped first, since the engines' loaders shard (out, groups).
    A "checkpoint"-source tensor is fed by the adapter (:func:`feed_loader`); a copy of it in the
    weight stream (a format's spare tensor, cross-checked when the checkpoint was opened) is skipped."""
    if t.source == "checkpoint":
        def skip_stream_copy(param, loaded_weight, *args, **kwargs):
            return None
        skip_stream_copy.feed = loader
        return skip_stream_copy
    if not t.flat_in_checkpoint:
        return loader

    def load_flat(param, loaded_weight, *args, **kwargs):
        if loaded_weight.dim() == 1:
            loaded_weight = loaded_weight.reshape(-1, groups_per_row)
        return loader(param, loaded_weight, *args, **kwargs)
    return load_flat


def feed_loader(param):
    """The loader an adapter feeds a "checkpoint"-source tensor through (see :func:`loader_for`)."""
    return getattr(param.weight_loader, "feed", param.weight_loader)


@dataclass(frozen=True)
class Geometry:
    """Shapes of one layer on this rank, and the group size the kernel sees."""
    in_pp: int
    out_pp: int
    group: int            # effective group size (the whole row when group_size does not divide in)
    kernel_group: int     # what the kernel is told: -1 for whole-row groups

    @property
    def groups_pp(self) -> int:
        return self.in_pp // self.group

    @classmethod
    def of(cls, prefix: str, input_size: int, output_size: int, in_pp: int, out_pp: int,
           group_size: int) -> "Geometry":
        """Refuses a tensor-parallel split whose input shards do not hold whole groups."""
        group = effective_group_size(input_size, group_size)
        if in_pp != input_size and (group == input_size or in_pp % group):
            tp = input_size // in_pp if in_pp else 0
            groups = "one group per row" if group == input_size else f"{input_size // group} groups"
            raise GraceFormatError(
                f"grace_qat: layer {prefix} (weight {output_size}x{input_size}, quantized in groups of "
                f"{group} along the input dimension: {groups}): tensor parallel size {tp} splits in_features "
                f"{input_size} into input shards of {in_pp}, which do not hold whole groups. Use a tensor "
                f"parallel size that divides the number of groups per row ({input_size // group}).")
        return cls(in_pp, out_pp, group, -1 if group == input_size else group)


__all__ = ["QKV_SHARD_IDS", "shard_ids", "shard_index", "module_shards",
           "checkpoint_feeds", "loader_for", "feed_loader", "Geometry"]
