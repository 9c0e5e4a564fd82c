"""SGLang quantization config for GRACE checkpoints.

``GraceQATConfig`` is what SGLang's loader builds for ``quantization == "grace_qat"``
(``model_loader.weight_utils.get_quant_config``), in each process that loads weights:

* with a ``quantization_config`` in the HF config (injected by :mod:`grace_sglang.parser`, or
  written by ``grace-qat convert --to grace_qat``): ``GraceQATConfig.from_config(dict)``, where the
  dict also carries SGLang's ``packed_modules_mapping`` and ``hf_config`` (whose ``_name_or_path`` is
  the checkpoint directory);
* with only ``--quantization grace_qat``: ``GraceQATConfig()``; the directory is then read from the
  published server arguments (``sglang.srt.runtime_context.get_server_args().model_path``) when the
  first layer asks for its method.

The names, the validation and the reader's lifecycle are the core's
(:class:`grace_qat.engine_config.GraceQATConfigBase`, shared with the vLLM adapter); engine layer
names map to checkpoint modules by their decoder-layer-relative name (:mod:`grace_qat.layer_names`).
Everything about the checkpoint (format, bits, module list, steps, zero points) comes from
``grace_qat.checkpoint.GraceCheckpoint`` and its format; this module only picks the linear method:

* a format whose files a stock SGLang method loads as they are (``Format.stock_config``; the AWQ
  layout: SGLang's own AWQ-Marlin, ``AWQMarlinConfig``);
* every other GRACE format: :class:`grace_sglang.linear.GraceQATLinearMethod` (16-bit grid weights ->
  verified codes -> GPTQ layout -> SGLang's GPTQ-Marlin kernel);
* every other linear layer (vision tower, merger/projector): ``UnquantizedLinearMethod``;
  embeddings, ``lm_head`` and attention: ``None`` (SGLang's unquantized defaults).
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from sglang.srt.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from grace_qat import settings
from grace_qat.engine_config import GraceQATConfigBase
from grace_qat.errors import GraceFormatError

from . import QUANT_METHOD

logger = logging.getLogger(__name__)


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


class GraceQATConfig(GraceQATConfigBase, QuantizationConfig):
    """SGLang ``QuantizationConfig`` for GRACE checkpoints (Format A on GPTQ-Marlin, B on AWQ-Marlin)."""

    engine = "SGLang"
    logger = logger

    def __init__(self, checkpoint_dir: Optional[str] = None, fmt: Optional[str] = None,
                 bits: Optional[int] = None, group_size: Optional[int] = None,
                 packed_modules_mapping: Optional[dict] = None) -> None:
        QuantizationConfig.__init__(self)
        if packed_modules_mapping:
            self.packed_modules_mapping = dict(packed_modules_mapping)
        self._stock = None
        self.quant_type = None
        self.init_checkpoint(checkpoint_dir, fmt, bits, group_size)

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

    def on_validated(self) -> None:
        settings.sglang_kernel()    # misspelt: one line here, before any layer is built, not in a worker
        st = _scalar_types()
        if self.stock_config is not None:
            self.quant_type = st.uint4          # what AWQ-Marlin runs (zero points as a tensor)
        else:
            self.quant_type = st.uint4b8 if self.bits == 4 else st.uint8b128
        logger.info("grace_qat: %s", self)

    def engine_model_path(self) -> Optional[str]:
        return _checkpoint_dir_from_server_args()

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> Optional[QuantizeMethodBase]:
        from sglang.srt.layers.linear import LinearBase
        from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod

        if not isinstance(layer, LinearBase):
            return None          # embeddings, lm_head, attention: SGLang's unquantized defaults
        names = self.checkpoint_modules(prefix)
        if names is None:
            return UnquantizedLinearMethod()
        if self.stock_config is not None:
            return self.stock_method_config().get_quant_method(layer, prefix)
        from .linear import GraceQATLinearMethod
        self.layer_started()
        return GraceQATLinearMethod(self, prefix, names)

    # -- files a stock SGLang method loads as they are ---------------------------------------

    def stock_method_config(self):
        """SGLang's own config for the format's stock layout (AWQ; zero points already checked by the
        format): AWQ-Marlin, what stock SGLang runs an AWQ checkpoint with, or its Humming method where
        ``grace_sglang.linear.engine_kernel`` picks Humming (stock's ``--quantization humming``)."""
        if self._stock is None:
            from .linear import HUMMING, engine_kernel
            self.ensure_validated()
            name, why = engine_kernel(self.bits)
            logger.info("grace_qat: %s layers on SGLang's own %s method (%s)", self.format,
                        "Humming" if name == HUMMING else "AWQ-Marlin", why)
            if name == HUMMING:
                from sglang.srt.layers.quantization.humming import HummingConfig
                stock = HummingConfig.from_config(self.stock_config)
            else:
                from sglang.srt.layers.quantization.awq import AWQMarlinConfig
                try:
                    stock = AWQMarlinConfig.from_config(self.stock_config)
                except ValueError as e:
                    raise GraceFormatError(f"grace_qat: SGLang's AWQ-Marlin kernel cannot run here "
                                           f"({e}); it needs a CUDA GPU of compute capability >= 8.0"
                                           ) from None
            stock.packed_modules_mapping = self.packed_modules_mapping
            self._stock = stock
        return self._stock


__all__ = ["GraceQATConfig"]
