"""SGLang quantization config for GRACE checkpoints, and the model-config parser that detects them.

``GraceQATConfig`` is what SGLang's loader builds for ``quantization == "grace_qat"``
(``model_loader.weight_utils.get_quant_config``):

* with a ``quantization_config`` in the HF config (injected by the parser below, or written by
  ``grace-qat convert --to grace_qat``): ``GraceQATConfig.from_config(dict)``, where the dict also
  carries SGLang's ``packed_modules_mapping`` and ``hf_config`` (whose ``_name_or_path`` is the
  checkpoint directory);
* with only ``--quantization grace_qat``: ``GraceQATConfig()``; the directory is then read from the
  published server arguments (``sglang.srt.runtime_context.get_server_args().model_path``) when the
  first layer asks for its method.

Everything about the checkpoint (format, bits, module list, scales) comes from
``grace_qat.checkpoint.GraceCheckpoint``; this module only maps SGLang layer prefixes onto those
module names and picks the linear method:

* Format A (``qat-sidecar`` / ``qat-inline`` / ``qat-grid``, 4 or 8 bits):
  :class:`grace_sglang.linear.GraceQATLinearMethod` (BF16 staging -> verified codes -> GPTQ layout ->
  SGLang's GPTQ-Marlin kernel);
* Format B (``awq``): SGLang's own AWQ-Marlin method (``AWQMarlinConfig``), after every ``qzeros``
  tensor on disk was checked to hold the constant zero point 8;
* every other linear layer (vision tower, merger/projector): ``UnquantizedLinearMethod``;
  embeddings, ``lm_head`` and attention: ``None`` (SGLang's unquantized defaults).
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Optional

import torch
from sglang.srt.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from grace_qat.checkpoint import FORMAT_AWQ, FORMAT_PLAIN, QAT_FORMATS, GraceCheckpoint
from grace_qat.errors import GraceFormatError
from grace_qat.hub import find_grace_checkpoint, is_hub_id, local_checkpoint_dir
from grace_qat.packing import unpack_int32

from . import AUTODETECT_ENV, PARSER_NAME, QUANT_NAME, llava

logger = logging.getLogger(__name__)

# SGLang fuses these projections into one parallel layer; the list order is the shard order
# (QKVParallelLinear shard ids "q"/"k"/"v", MergedColumnParallelLinear shard ids 0/1).
DEFAULT_PACKED_MODULES = {
    "qkv_proj": ["q_proj", "k_proj", "v_proj"],
    "gate_up_proj": ["gate_proj", "up_proj"],
}
_QKV_SHARD_INDEX = {"q": 0, "k": 1, "v": 2}
# "...layers.<i>.<rest>": the decoder-layer-relative part of a module name. It is the same in the
# HF checkpoint and in SGLang's layer prefixes for both target models (Qwen3-VL:
# model.language_model.layers.i.*, original LLaVA: model.layers.i.*), whatever the outer prefix.
_LAYER_KEY = re.compile(r"(?:^|\.)(layers\.\d+\..+)$")
AWQ_ZERO_POINT = 8


def _layer_key(name: str) -> Optional[str]:
    m = _LAYER_KEY.search(name)
    return m.group(1) if m else None


def _scalar_types():
    from sglang.srt.layers.quantization.utils import get_scalar_types
    return get_scalar_types()[1]


def _checkpoint_dir_from_server_args() -> Optional[str]:
    """The model path SGLang was started with (both 0.5.17 and 0.5.23 publish it per process)."""
    try:
        from sglang.srt.runtime_context import get_server_args
        sa = get_server_args()
        return getattr(sa, "model_path", None)
    except Exception:  # not published (e.g. a bare unit test) or an older layout
        return None


# -- detection (cheap: file names, config.json keys, safetensors headers) ------------------------

def detect_grace_quantization(model: Any, revision: Optional[str] = None) -> Optional[dict]:
    """The ``quantization_config`` to inject for a GRACE checkpoint, else None.

    ``model`` is a local directory or a Hub id (resolved through the local Hugging Face cache,
    fetching only JSON files and the sidecar unless ``HF_HUB_OFFLINE``). Only cheap markers are used
    (:func:`grace_qat.hub.detect_grace_format`), so running this for every model SGLang loads costs a
    few file lookups. A bare QAT grid has no marker; it needs ``--quantization grace_qat``.
    ``checkpoint_dir`` is the directory, or the Hub id itself (resolved again, with the weights,
    when the quantization config opens the checkpoint in the process that loads them).
    """
    found = find_grace_checkpoint(model, revision)
    if found is None:
        return None
    path, fmt = found
    where = model if is_hub_id(model) else path
    return {"quant_method": QUANT_NAME, "format": fmt, "checkpoint_dir": where}


def _local_dir_or_none(model: Any, revision: Optional[str]) -> Optional[str]:
    found = find_grace_checkpoint(model, revision)
    if found is not None:
        return found[0]
    return os.path.abspath(os.fspath(model)) if isinstance(model, (str, os.PathLike)) \
        and os.path.isdir(model) else None


_PARSER_CLASSES: dict = {}


def _make_parser(base: type) -> type:
    """A subclass of SGLang's stock HF config parser that injects the GRACE quantization_config."""
    if base in _PARSER_CLASSES:
        return _PARSER_CLASSES[base]

    class GraceModelConfigParser(base):  # type: ignore[misc, valid-type]
        _grace_base = base

        def parse(self, model, trust_remote_code: bool, revision=None, **kwargs):
            config = super().parse(model, trust_remote_code=trust_remote_code, revision=revision,
                                   **kwargs)
            if getattr(config, "quantization_config", None) is None:
                try:
                    injected = detect_grace_quantization(model, revision)
                except Exception:  # detection must never break loading an ordinary model
                    logger.debug("grace_qat: detection failed for %r", model, exc_info=True)
                    return config
                if injected is not None:
                    logger.info("grace_qat: %s is a GRACE %s checkpoint; serving it with "
                                "quantization=grace_qat (%s=0 turns this off)",
                                injected["checkpoint_dir"], injected["format"], AUTODETECT_ENV)
                    config.quantization_config = injected
            qc = getattr(config, "quantization_config", None)
            if isinstance(qc, dict) and qc.get("quant_method") == QUANT_NAME:
                local = _local_dir_or_none(model, revision)
                if local is not None and llava.original_llava_config(local) is not None:
                    # original-layout LLaVA: CLIP tower, <image> id, tokenizer check
                    llava.prepare_config(config, local)
            return config

    GraceModelConfigParser.__qualname__ = GraceModelConfigParser.__name__
    _PARSER_CLASSES[base] = GraceModelConfigParser
    return GraceModelConfigParser


def install_config_parser(wrap_hf: bool = True) -> None:
    """Register the GRACE parser as ``grace_qat`` and (``wrap_hf``) in place of ``hf``.

    The stock parser module is imported first so that its own ``@register_model_config_parser("hf")``
    cannot later overwrite ours; the registry dict is written directly to avoid SGLang's
    "already registered; overwriting" warning in every process.
    """
    try:
        from sglang.srt.configs import model_config_parser_registry as reg
        import sglang.srt.utils.hf_transformers.config  # noqa: F401  (registers "hf")
    except ImportError:
        logger.warning("grace_qat: this SGLang has no model-config parser registry; GRACE "
                       "checkpoints need --quantization grace_qat")
        return
    registry = getattr(reg, "_MODEL_CONFIG_PARSER_REGISTRY", None)
    current = registry.get("hf") if registry is not None else None
    if current is None:
        logger.warning("grace_qat: SGLang's 'hf' config parser not found; auto-detection is off")
        return
    base = getattr(current, "_grace_base", current)
    parser = _make_parser(base)
    registry[PARSER_NAME] = parser
    if wrap_hf:
        registry["hf"] = parser
    elif current is parser:
        registry["hf"] = base


# -- the quantization config -------------------------------------------------------------------

class GraceQATConfig(QuantizationConfig):
    """SGLang ``QuantizationConfig`` for GRACE checkpoints (Format A on GPTQ-Marlin, B on AWQ-Marlin)."""

    def __init__(self, checkpoint_dir: Optional[str] = None, fmt: Optional[str] = None,
                 bits: Optional[int] = None, group_size: Optional[int] = None,
                 packed_modules_mapping: Optional[dict] = None) -> None:
        super().__init__()
        self.checkpoint_dir = checkpoint_dir
        self.declared_format = fmt
        self.declared_bits = int(bits) if bits is not None else None
        self.declared_group_size = int(group_size) if group_size is not None else None
        if packed_modules_mapping:
            self.packed_modules_mapping = dict(packed_modules_mapping)
        self._ckpt: Optional[GraceCheckpoint] = None
        self._index: dict[str, str] = {}
        self._awq = None
        self.quant_type = None
        if checkpoint_dir is not None:
            self._open()

    def __repr__(self) -> str:
        if self._ckpt is None:
            return f"GraceQATConfig(checkpoint_dir={self.checkpoint_dir!r}, not opened)"
        c = self._ckpt
        return (f"GraceQATConfig(format={c.format}, bits={c.bits}, group_size={c.group_size}, "
                f"modules={len(c.modules)}, path={c.path!r})")

    # -- QuantizationConfig API ----------------------------------------------------------------

    def get_name(self) -> str:
        return QUANT_NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # Marlin: Ampere or newer

    @staticmethod
    def get_config_filenames() -> list[str]:
        # No file of its own: the settings come from the (injected) quantization_config, or from
        # the checkpoint directory itself when the user only passed --quantization grace_qat.
        return []

    def get_scaled_act_names(self) -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GraceQATConfig":
        method = str(config.get("quant_method", QUANT_NAME)).lower()
        if method != QUANT_NAME:
            raise GraceFormatError(f"grace_qat: quantization_config declares quant_method={method!r}")
        path = config.get("checkpoint_dir")
        if not path:
            hf_config = config.get("hf_config")
            path = getattr(hf_config, "_name_or_path", None) or _checkpoint_dir_from_server_args()
        if not path:
            raise GraceFormatError("grace_qat: cannot tell which checkpoint directory to read "
                                   "(no checkpoint_dir in quantization_config, no model path)")
        return cls(checkpoint_dir=path, fmt=config.get("format"), bits=config.get("bits"),
                   group_size=config.get("group_size"),
                   packed_modules_mapping=config.get("packed_modules_mapping"))

    # -- checkpoint --------------------------------------------------------------------------

    @property
    def checkpoint(self) -> GraceCheckpoint:
        if self._ckpt is None:
            if self.checkpoint_dir is None:
                self.checkpoint_dir = _checkpoint_dir_from_server_args()
            if self.checkpoint_dir is None:
                raise GraceFormatError("grace_qat: no checkpoint directory: SGLang did not publish a "
                                       "model path and the config names none")
            self._open()
        return self._ckpt

    def _open(self) -> None:
        # a directory, or a Hub id: its snapshot in the local cache (weights fetched unless offline)
        path = local_checkpoint_dir(os.fspath(self.checkpoint_dir))
        ckpt = GraceCheckpoint.open(path, bits=self.declared_bits, group_size=self.declared_group_size,
                                    fmt=self.declared_format)
        if ckpt.format == FORMAT_PLAIN:
            raise GraceFormatError(f"{path}: no GRACE-quantized linear layers found (a plain "
                                   f"checkpoint); serve it without --quantization grace_qat")
        index: dict[str, str] = {}
        for name in ckpt.modules:
            key = _layer_key(name)
            if key is None:
                raise GraceFormatError(f"{path}: quantized module {name} is not inside a decoder "
                                       f"layer (layers.<i>.*); not a GRACE language-model linear")
            if key in index:
                raise GraceFormatError(f"{path}: modules {index[key]} and {name} both end in {key}; "
                                       f"cannot map them onto SGLang's layers")
            index[key] = name
        if ckpt.format == FORMAT_AWQ:
            _check_awq_zero_points(ckpt)
        st = _scalar_types()
        if ckpt.format == FORMAT_AWQ:
            self.quant_type = st.uint4          # what AWQ-Marlin runs (zero points as a tensor)
        else:
            self.quant_type = st.uint4b8 if ckpt.bits == 4 else st.uint8b128
        self._ckpt, self._index = ckpt, index
        logger.info("grace_qat: %s", self)

    @property
    def format(self) -> str:
        return self.checkpoint.format

    @property
    def bits(self) -> int:
        return self.checkpoint.bits

    @property
    def group_size(self) -> int:
        return self.checkpoint.group_size

    def _packed(self) -> dict[str, list[str]]:
        packed = dict(DEFAULT_PACKED_MODULES)
        for k, v in (self.packed_modules_mapping or {}).items():
            if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
                packed.setdefault(k, list(v))
        return packed

    def checkpoint_modules(self, prefix: str) -> Optional[list[str]]:
        """Checkpoint module names behind an SGLang layer prefix, in shard order; None if unquantized.

        ``model.language_model.layers.3.self_attn.qkv_proj`` -> the q/k/v_proj modules of layer 3.
        A fused layer whose parts are only partly quantized cannot be served and raises.
        """
        key = _layer_key(prefix)
        if key is None:
            return None
        _ = self.checkpoint  # opens the directory on first use
        index = self._index
        parent, _, leaf = key.rpartition(".")
        parts = self._packed().get(leaf)
        keys = [f"{parent}.{p}" for p in parts] if parts else [key]
        found = [index.get(k) for k in keys]
        if all(f is None for f in found):
            return None
        if any(f is None for f in found):
            missing = [k for k, f in zip(keys, found, strict=True) if f is None]
            raise GraceFormatError(f"{self.checkpoint.path}: SGLang fuses {keys} into {prefix}, but "
                                   f"{missing} are not quantized in the checkpoint")
        return found  # type: ignore[return-value]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> Optional[QuantizeMethodBase]:
        from sglang.srt.layers.linear import LinearBase
        from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod

        if not isinstance(layer, LinearBase):
            return None          # embeddings, lm_head, attention: SGLang's unquantized defaults
        names = self.checkpoint_modules(prefix)
        if names is None:
            return UnquantizedLinearMethod()
        if self.format == FORMAT_AWQ:
            return self.awq_config().get_quant_method(layer, prefix)
        from .linear import GraceQATLinearMethod
        return GraceQATLinearMethod(self, prefix, names)

    # -- Format B: AWQ-Marlin ----------------------------------------------------------------

    def awq_config(self):
        """SGLang's AWQMarlinConfig for the AWQ-packed format (zero points already checked)."""
        if self._awq is None:
            from sglang.srt.layers.quantization.awq import AWQMarlinConfig
            full = {"quant_method": "awq", "bits": 4, "group_size": self.group_size,
                    "zero_point": True, "modules_to_not_convert": []}
            try:
                awq = AWQMarlinConfig.from_config(full)
            except ValueError as e:
                raise GraceFormatError(f"grace_qat: SGLang's AWQ-Marlin kernel cannot run here "
                                       f"({e}); it needs a CUDA GPU of compute capability >= 8.0"
                                       ) from None
            awq.packed_modules_mapping = self.packed_modules_mapping
            self._awq = awq
        return self._awq


def _check_awq_zero_points(ckpt: GraceCheckpoint) -> None:
    """Every zero point of the AWQ-packed checkpoint must be 8 (reads only the small qzeros)."""
    for name in ckpt.modules:
        key = name + ".qzeros"
        zeros = unpack_int32(ckpt.tensors.get(key), 4, dim=1)
        if not bool((zeros == AWQ_ZERO_POINT).all()):
            bad = zeros[zeros != AWQ_ZERO_POINT]
            raise GraceFormatError(
                f"{ckpt.tensors.file_of(key)}: {key}: {bad.numel()} zero points differ from "
                f"{AWQ_ZERO_POINT} (e.g. {int(bad[0])}); GRACE AWQ checkpoints are symmetric with a "
                f"constant zero point {AWQ_ZERO_POINT}, refusing to serve")


__all__ = ["GraceQATConfig", "detect_grace_quantization", "install_config_parser",
           "DEFAULT_PACKED_MODULES", "QAT_FORMATS"]
