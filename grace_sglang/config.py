"""SGLang quantization config for GRACE checkpoints.

``GraceQATConfig`` is what SGLang's loader builds for ``quantization == "grace_qat"``
(``model_loader.weight_utils.get_quant_config``):

* with a ``quantization_config`` in the HF config (injected by :mod:`grace_sglang.parser`, or
  written by ``grace-qat convert --to grace_qat``): ``GraceQATConfig.from_config(dict)``, where the
  dict also carries SGLang's ``packed_modules_mapping`` and ``hf_config`` (whose ``_name_or_path`` is
  the checkpoint directory);
* with only ``--quantization grace_qat``: ``GraceQATConfig()``; the directory is then read from the
  published server arguments (``sglang.srt.runtime_context.get_server_args().model_path``) when the
  first layer asks for its method.

Everything about the checkpoint (format, bits, module list, steps, zero points) comes from
``grace_qat.checkpoint.GraceCheckpoint`` and its format; this module only maps SGLang layer
prefixes onto those module names and picks the linear method:

* a format whose files a stock SGLang method loads as they are (``Format.stock_config``; the AWQ
  layout: SGLang's own AWQ-Marlin, ``AWQMarlinConfig``);
* every other GRACE format: :class:`grace_sglang.linear.GraceQATLinearMethod` (16-bit grid weights ->
  verified codes -> GPTQ layout -> SGLang's GPTQ-Marlin kernel);
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

from grace_qat import formats, layer_names
from grace_qat.checkpoint import GraceCheckpoint
from grace_qat.errors import GraceFormatError
from grace_qat.hub import local_checkpoint_dir

from . import QUANT_METHOD

logger = logging.getLogger(__name__)

# "...layers.<i>.<rest>": the decoder-layer-relative part of a module name. It is the same in the
# HF checkpoint and in SGLang's layer prefixes for both target models (Qwen3-VL:
# model.language_model.layers.i.*, original LLaVA: model.layers.i.*), whatever the outer prefix.
_LAYER_KEY = re.compile(r"(?:^|\.)(layers\.\d+\..+)$")


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


class GraceQATConfig(QuantizationConfig):
    """SGLang ``QuantizationConfig`` for GRACE checkpoints (Format A on GPTQ-Marlin, B on AWQ-Marlin)."""

    def __init__(self, checkpoint_dir: Optional[str] = None, fmt: Optional[str] = None,
                 bits: Optional[int] = None, group_size: Optional[int] = None,
                 packed_modules_mapping: Optional[dict] = None) -> None:
        super().__init__()
        # the same vocabulary as grace_vllm.config.GraceQATConfig: checkpoint_dir, and (read from the
        # opened checkpoint) format, bits, group_size, modules; what the caller declared is checked
        self.checkpoint_dir = checkpoint_dir
        self._declared = (fmt, int(bits) if bits is not None else None,
                          int(group_size) if group_size is not None else None)
        if packed_modules_mapping:
            self.packed_modules_mapping = dict(packed_modules_mapping)
        self._ckpt: Optional[GraceCheckpoint] = None
        self._index: dict[str, str] = {}
        self._stock = None
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
        return QUANT_METHOD

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
        method = str(config.get("quant_method", QUANT_METHOD)).lower()
        if method != QUANT_METHOD:
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
        fmt, bits, group_size = self._declared
        ckpt = GraceCheckpoint.open(path, bits=bits, group_size=group_size, fmt=fmt).require_quantized()
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
        ckpt.check_served()     # steps and zero points, before anything is loaded
        spare = formats.spare_note(ckpt)
        if spare:
            logger.info("grace_qat: %s", spare)
        st = _scalar_types()
        if ckpt.stock_config() is not None:
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

    @property
    def modules(self) -> list[str]:
        return self.checkpoint.modules

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
        keys = [f"{parent}.{p}" for p in layer_names.fused_parts(leaf, self.packed_modules_mapping)]
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
        if self.checkpoint.stock_config() is not None:
            return self.awq_config().get_quant_method(layer, prefix)
        from .linear import GraceQATLinearMethod
        return GraceQATLinearMethod(self, prefix, names)

    # -- files a stock SGLang method loads as they are ---------------------------------------

    def awq_config(self):
        """SGLang's own config for the format's stock layout (AWQ: AWQMarlinConfig; zero points
        already checked by the format)."""
        if self._stock is None:
            from sglang.srt.layers.quantization.awq import AWQMarlinConfig
            full = self.checkpoint.stock_config()
            try:
                stock = AWQMarlinConfig.from_config(full)
            except ValueError as e:
                raise GraceFormatError(f"grace_qat: SGLang's AWQ-Marlin kernel cannot run here "
                                       f"({e}); it needs a CUDA GPU of compute capability >= 8.0"
                                       ) from None
            stock.packed_modules_mapping = self.packed_modules_mapping
            self._stock = stock
        return self._stock


__all__ = ["GraceQATConfig"]
