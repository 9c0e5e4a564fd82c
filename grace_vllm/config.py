"""GraceQATConfig: vLLM's QuantizationConfig for GRACE checkpoints (both on-disk formats).

How vLLM builds it (verified against vLLM 0.32 and the 0.26 notes):
  * ``--quantization grace_qat`` on a checkpoint without ``quantization_config``: ``get_config_filenames()``
    is empty, so vLLM calls ``GraceQATConfig()`` with no arguments; right after, in the same (first)
    process, it calls ``maybe_update_config(model_dir, hf_config=...)``, where the checkpoint is
    validated;
  * a config.json carrying ``quantization_config: {"quant_method": "grace_qat", ...}`` (written by
    ``grace-qat convert --to grace_qat``, or injected by :mod:`grace_vllm.parser`): vLLM routes it here
    by its quant_method (the flag becomes optional) and calls ``from_config(dict)``, then
    ``maybe_update_config`` as above.
The names, the validation and the reader's lifecycle are the core's
(:class:`grace_qat.engine_config.GraceQATConfigBase`, shared with the SGLang adapter): the object is
pickled to the engine core and the workers with small, plain state only, and each process opens the
checkpoint when a layer needs it and drops it once every quantized layer is processed. Engine layer
names map to checkpoint modules by their decoder-layer-relative name (:mod:`grace_qat.layer_names`),
so vLLM's ``WeightsMapper`` renames need no replay.
"""
from __future__ import annotations

from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from grace_qat.engine_config import GraceQATConfigBase

from . import QUANT_METHOD

logger = init_logger("vllm.grace_qat")


class GraceQATConfig(GraceQATConfigBase, QuantizationConfig):
    """Quantization config for ``--quantization grace_qat``."""

    engine = "vLLM"
    logger = logger

    def __init__(self, checkpoint_dir: str | None = None, fmt: str | None = None, bits: int | None = None,
                 group_size: int | None = None):
        QuantizationConfig.__init__(self)
        self.init_checkpoint(checkpoint_dir, fmt, bits, group_size)

    # -- QuantizationConfig API ---------------------------------------------------------------

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        # vLLM's int4/int8 kernels (Machete, Marlin, CPUWNA16) take 16-bit activations only.
        return [torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        # Marlin needs 75 (Turing); below that no kernel applies and layers fall back to 16 bits.
        return 70

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GraceQATConfig":
        return cls(fmt=config.get("format"), bits=config.get("bits"), group_size=config.get("group_size"))

    def maybe_update_config(self, model_name: str, hf_config: Any = None,
                            revision: str | None = None) -> None:
        self.validate(model_name, revision)

    def on_validated(self) -> None:
        logger.info("grace_qat: %s checkpoint, W%d g%d, %d quantized linear modules",
                    self.format, self.bits, self.group_size, len(self.modules))

    def engine_model_path(self) -> str | None:
        from vllm.config import get_current_vllm_config
        return get_current_vllm_config().model_config.model

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
        if not isinstance(layer, LinearBase):
            return None
        names = self.checkpoint_modules(prefix)
        if names is None:
            return UnquantizedLinearMethod()
        from .linear import make_linear_method
        self.layer_started()
        return make_linear_method(self, names)
