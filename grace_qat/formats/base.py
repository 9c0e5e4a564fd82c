"""What every GRACE format provides, and the one registry that lists them.

A format is one small module in this package with one ``Format`` subclass, registered with
:func:`register`. Everything else asks the registry: detection (:func:`detect`, :func:`marked`),
the CLI's and ``synthetic``'s choices (:func:`names`), the checkpoint reader, and the engine
adapters, which only move the tensors a format names (:meth:`Format.rank_tensors`) through their
loaders and hand what a rank loaded to :meth:`Format.rank_codes` for verified codes and steps.

Data flows one way: :meth:`Format.open` validates a directory and returns a :class:`Record`, a
plain frozen description of it; the reader (``grace_qat.checkpoint.GraceCheckpoint``, a layer above)
holds that record and passes it back to the format's per-module methods. No format knows the reader.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..errors import GraceFormatError
from ..files import load_sidecar
from ..registry import Registry


@dataclass(frozen=True)
class QuantizedLinear:
    """One quantized linear: verified signed codes (out, in) and fp32 steps (out, in/G)."""
    name: str
    codes: torch.Tensor
    scales: torch.Tensor
    bits: int
    group_size: int
    bias: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)


@dataclass(frozen=True)
class RankTensor:
    """One tensor a rank holds for a quantized layer, described for any engine's parameter classes.

    Rows/columns follow the engine's loaders: ``output_dim`` is the dimension that holds output
    features (sharded by column-parallel layers), the other one input features or groups of them
    (sharded by row-parallel layers). ``packed`` > 1: that many codes per int32 along ``output_dim``.
    ``grouped``: the input dimension counts groups, not features. ``source``: "stream" (the model's
    weight loading delivers it) or "checkpoint" (the adapter feeds :meth:`Format.fed_tensor` through
    the same loader per checkpoint module and shard id after loading)."""
    leaf: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    output_dim: int = 0
    packed: int = 1
    grouped: bool = False
    source: str = "stream"
    nan_fill: bool = False           # NaN until loaded: a tensor that never arrives fails verification
    flat_in_checkpoint: bool = False  # stored 1-D (out * groups,) in the files: reshape before sharding

    def blank(self) -> torch.Tensor:
        """The tensor an engine registers before loading (NaN where ``nan_fill``)."""
        if self.nan_fill:
            return torch.full(self.shape, float("nan"), dtype=self.dtype)
        return torch.empty(self.shape, dtype=self.dtype)


@dataclass(frozen=True)
class Record:
    """What a format's ``open`` validated in a checkpoint directory. Frozen: a format returns a new
    record (``dataclasses.replace``) rather than changing one, and reads the files through it."""
    path: str
    format: str
    bits: int | None
    group_size: int
    modules: list[str]
    config: dict
    tensors: object                   # files.SafetensorsDir
    sidecar_path: str | None = None
    # True when nobody stated the bits (caller, config.json) and open() took them from the first
    # quantized module: every module computed later must then need exactly that width.
    bits_inferred: bool = False

    @cached_property
    def sidecar(self) -> dict[str, torch.Tensor]:
        return load_sidecar(self.sidecar_path)


@dataclass
class Opening:
    """What detection has read so far, handed to each format's ``claims`` / ``open``."""
    path: str
    config: dict
    tensors: object                   # files.SafetensorsDir
    bits: int | None
    group_size: int | None
    candidates: list[str] = field(default_factory=list)   # quantizable linears with a .weight

    @property
    def gs(self) -> int:
        """The group size stated (caller, config.json), else GRACE's default."""
        from ..quantizer import DEFAULT_GROUP_SIZE
        return int(self.group_size or DEFAULT_GROUP_SIZE)

    def record(self, fmt: str, modules: list[str], sidecar_path: str | None = None) -> Record:
        """The record of format ``fmt`` with the stated bits and group size."""
        return Record(self.path, fmt, self.bits, self.gs, modules, self.config, self.tensors, sidecar_path)


class Format:
    """One on-disk GRACE format. Subclasses set the class attributes and override what differs."""
    name: str = ""
    description: str = ""             # one line for ``grace-qat inspect``
    quantizes: bool = True            # False: an unquantized checkpoint (``quantized`` reads a module)
    order: int = 100                  # detection order: lower first; the first that claims wins
    marker_order: int = 100           # order in which cheap markers are looked at
    fixture_bits: tuple[int, ...] = (4, 8)
    side_files: tuple[str, ...] = ()  # files of the directory that belong to this format only
    stored_steps: bool = True         # steps are in the files (else derived from the weights)
    grid_weights: bool = True         # 16-bit weights on the grid (else packed integer codes)
    # leaves a quantized module may have in the safetensors: those the format reads, and spare ones
    # it does not read (a real export can leave them behind); a spare tensor is cross-checked in
    # ``check_served`` and the adapters' loaders skip it. Any other leaf is refused at open.
    module_leaves: tuple[str, ...] = ("weight", "bias")
    spare_leaves: tuple[str, ...] = ()

    # -- detection -------------------------------------------------------------------------------

    def marked(self, path: str, config: dict, tensor_names) -> bool:
        """Cheap markers (file names, config keys, tensor names) that say "this format" without
        reading a tensor; False for a format that has none (it then needs ``--quantization``)."""
        return False

    def claims(self, o: Opening) -> bool:
        raise NotImplementedError

    def open(self, o: Opening) -> Record:
        """The record of a directory this format claims (validated)."""
        raise NotImplementedError

    # -- the whole checkpoint (``rec``: the Record open() returned) --------------------------------

    def module_shape(self, rec, name: str) -> tuple[int, int]:
        raise NotImplementedError

    def scales(self, rec, name: str) -> torch.Tensor:
        raise NotImplementedError

    def quantized(self, rec, name: str) -> QuantizedLinear:
        raise GraceFormatError(f"{rec.path}: not a quantized checkpoint (format {self.name})")

    def log_scale(self, rec, name: str) -> torch.Tensor:
        raise GraceFormatError(f"{rec.path}: format {self.name} has no log_scale tensors")

    def check_served(self, rec) -> None:
        """Verify the small tensors (steps, zero points) of every module now, before an engine
        builds anything: an error in a worker reaches the user only as "initialization failed"."""

    def steps_dtype(self, rec) -> torch.dtype:
        """The precision the files store the steps in."""
        return torch.float32

    def weight_dtype(self, rec) -> torch.dtype | None:
        """The storage dtype of the 16-bit grid weights (None: the files hold packed codes)."""
        return None

    def stock_config(self, rec) -> dict | None:
        """A stock ``quantization_config`` under which an engine's own method loads the files as
        they are (used where that engine's method is the right kernel); None when there is none."""
        return None

    # -- one rank of one layer ---------------------------------------------------------------------

    def rank_tensors(self, out_pp: int, in_pp: int, groups_pp: int, weight_dtype: torch.dtype
                     ) -> list[RankTensor]:
        raise NotImplementedError

    def fed_tensor(self, rec, name: str, leaf: str) -> torch.Tensor:
        """The full (out, groups) tensor ``leaf`` of module ``name`` for a "checkpoint" RankTensor."""
        raise GraceFormatError(f"{rec.path}: format {self.name} feeds no {leaf} tensors")

    def rank_codes(self, loaded: dict[str, torch.Tensor], bits: int, group: int, name: str,
                   inferred: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Verified signed codes (rows, in_pp) and fp32 steps (rows, groups) from the tensors of
        :meth:`rank_tensors` as a rank loaded them (any slice of output rows; raises naming ``name``).
        ``loaded["steps"]``, where given, are this rank's shard of :meth:`scales` (or of steps derived
        from the full weight) and replace the format's own step tensors."""
        raise NotImplementedError

    # -- synthetic checkpoints (grace_qat.synthetic) --------------------------------------------

    def fixture_module(self, base: str, w_dq: torch.Tensor, log_scale: torch.Tensor, bits: int,
                       group_size: int, sidecar: dict) -> dict[str, torch.Tensor]:
        """The safetensors entries of one quantized module (``sidecar``: entries for the sidecar)."""
        return {f"{base}.weight": w_dq}

    def fixture_bias(self, name: str, bias: torch.Tensor, sidecar: dict) -> None:
        pass

    def fixture_files(self, out_dir: str, modules: list[str], group_size: int, sidecar: dict) -> None:
        pass

    def fixture_config(self, group_size: int) -> dict:
        return {}


_REGISTRY = Registry("format", "unknown GRACE format {name!r}; known: {names}")
register = _REGISTRY.register
get = _REGISTRY.get
names = _REGISTRY.names      # in registration order: what the CLI and grace_qat.synthetic offer


def all_formats() -> list[Format]:
    """In detection order."""
    return sorted(_REGISTRY.items(), key=lambda f: f.order)


def quantized_names() -> tuple[str, ...]:
    return tuple(f.name for f in _REGISTRY.items() if f.quantizes)


def detect(o: Opening) -> Record:
    """The record of the first format (in detection order) that claims the directory."""
    for fmt in all_formats():
        if fmt.claims(o):
            rec = fmt.open(o)
            check_leaves(rec)
            return rec
    raise GraceFormatError(f"{o.path}: no GRACE format claims this directory")  # pragma: no cover


def check_leaves(rec) -> None:
    """Every safetensors entry of a quantized module is one its format reads or a spare one it
    accounts for: an engine's loader would otherwise meet a tensor no layer parameter fits."""
    fmt, mods = get(rec.format), set(rec.modules)
    for key in rec.tensors.keys():
        base, _, leaf = key.rpartition(".")
        if base in mods and leaf not in fmt.module_leaves + fmt.spare_leaves:
            raise GraceFormatError(
                f"{rec.tensors.file_of(key)}: {key}: format {fmt.name} does not use a {leaf!r} tensor for "
                f"quantized module {base} (expected {', '.join(fmt.module_leaves)})")


def spare_tensors(rec) -> list[str]:
    """The safetensors entries the checkpoint's format accounts for but does not read."""
    return [f"{m}.{leaf}" for leaf in get(rec.format).spare_leaves for m in rec.modules
            if f"{m}.{leaf}" in rec.tensors]


def spare_note(rec) -> str | None:
    """The one log line an adapter prints about spare tensors (after ``check_served``), else None."""
    spare = spare_tensors(rec)
    if not spare:
        return None
    return (f"{rec.path}: the safetensors also hold {len(spare)} tensors format {rec.format} does not "
            f"read (first: {spare[0]}); they equal the ones served and are skipped")


def marked(path: str, config: dict, tensor_names) -> str | None:
    """The format whose cheap markers the directory carries, else None."""
    names_ = tensor_names if callable(tensor_names) else (lambda: tensor_names)
    for fmt in sorted(_REGISTRY.items(), key=lambda f: f.marker_order):
        if fmt.marked(path, config, names_):
            return fmt.name
    return None
