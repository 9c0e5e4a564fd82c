"""GraceQATConfig: vLLM's QuantizationConfig for GRACE checkpoints (both on-disk formats).

How vLLM builds it (verified against vLLM 0.32 and the 0.26 notes):
  * ``--quantization grace_qat`` on a checkpoint without ``quantization_config``: ``get_config_filenames()``
    is empty, so vLLM calls ``GraceQATConfig()`` with no arguments; right after, in the same (first)
    process, it calls ``maybe_update_config(model_dir, hf_config=...)``, where the format is detected;
  * a config.json carrying ``quantization_config: {"quant_method": "grace_qat", ...}`` (written by
    ``grace-qat convert --to grace_qat``, or injected by :mod:`grace_vllm.parser`): vLLM routes it here by its quant_method (the flag becomes
    optional) and calls ``from_config(dict)``, then ``maybe_update_config`` as above.
The object is pickled to the engine core and the workers: it keeps only small, plain state (format,
bits, group size, module names, model directory). Each process opens the checkpoint lazily when a
layer needs the sidecar, and drops it once every quantized layer is processed.
"""
from __future__ import annotations

from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from grace_qat import formats, layer_names
from grace_qat.checkpoint import GraceCheckpoint
from grace_qat.errors import GraceFormatError
from grace_qat.hub import local_checkpoint_dir

from . import QUANT_METHOD

logger = init_logger("vllm.grace_qat")

class GraceQATConfig(QuantizationConfig):
    """Quantization config for ``--quantization grace_qat``."""

    def __init__(self, fmt: str | None = None, bits: int | None = None,
                 group_size: int | None = None, modules: list[str] | None = None,
                 checkpoint_dir: str | None = None):
        super().__init__()
        # the same vocabulary as grace_sglang.config.GraceQATConfig
        self.format = fmt
        self.bits = int(bits) if bits is not None else None
        self.group_size = int(group_size) if group_size is not None else None
        self.checkpoint_dir = checkpoint_dir
        self.modules: list[str] = list(modules or [])      # checkpoint module names
        self.weight_dtype: str | None = None     # storage dtype of 16-bit grid weights, e.g. "bfloat16"
        self._mappers: list[Any] = []            # vLLM WeightsMapper objects applied so far, in order
        self._vllm_to_hf: dict[str, str] = {m: m for m in self.modules}
        self._ckpt: GraceCheckpoint | None = None  # per process, never pickled
        self._open_layers = 0                    # quantized layers created but not yet processed

    def __repr__(self) -> str:
        return (f"GraceQATConfig(format={self.format}, bits={self.bits}, group_size={self.group_size}, "
                f"modules={len(self.modules)})")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_ckpt"] = None
        return state

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
        return cls(fmt=config.get("format"), bits=config.get("bits"),
                   group_size=config.get("group_size"))

    def maybe_update_config(self, model_name: str, hf_config: Any = None,
                            revision: str | None = None) -> None:
        path = local_checkpoint_dir(model_name, revision)
        ckpt = GraceCheckpoint.open(path, bits=self.bits, group_size=self.group_size, fmt=self.format)
        ckpt.require_quantized()
        self.format, self.bits, self.group_size = ckpt.format, ckpt.bits, ckpt.group_size
        self.bits_inferred = getattr(self, "bits_inferred", False) or ckpt.bits_inferred  # grace_qat rule
        self.checkpoint_dir = path
        self.modules = list(ckpt.modules)
        stored = ckpt.weight_dtype()
        self.weight_dtype = str(stored).removeprefix("torch.") if stored is not None else None
        # Fail here, in the first process, on bad steps (NaN/inf/zero/out of range) and zero points:
        # an error in a worker reaches the user only as vLLM's "Engine core initialization failed".
        # These tensors are small (one per 128 weights); the workers still verify every code.
        ckpt.check_served()
        spare = formats.spare_note(ckpt)
        if spare:
            logger.info("grace_qat: %s", spare)
        self._remap()
        logger.info("grace_qat: %s checkpoint, W%d g%d, %d quantized linear modules",
                    self.format, self.bits, self.group_size, len(self.modules))

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        # vLLM calls this once per model class that has a mapper (an outer multimodal wrapper, then
        # possibly the inner language model), each time with a rename-only mapper. Renames compose,
        # so apply them in order to the original names; the same mapper twice counts once.
        if any(m == hf_to_vllm_mapper for m in self._mappers):
            return
        self._mappers.append(hf_to_vllm_mapper)
        self._remap()

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
        if not isinstance(layer, LinearBase):
            return None
        if self.format is None:   # built without maybe_update_config (e.g. by hand): detect now
            from vllm.config import get_current_vllm_config
            self.maybe_update_config(get_current_vllm_config().model_config.model)
        hf_names = self.checkpoint_modules(prefix)
        if not any(hf_names):
            return UnquantizedLinearMethod()
        if not all(hf_names):
            raise GraceFormatError(
                f"{self.checkpoint_dir}: vLLM layer {prefix} fuses checkpoint modules of which only some are "
                f"quantized ({[n for n in hf_names if n]}); a fused layer needs all or none")
        from .linear import make_linear_method
        self._open_layers += 1
        return make_linear_method(self, hf_names)

    # -- helpers for the linear methods ---------------------------------------------------------

    def _remap(self) -> None:
        current = {m: m for m in self.modules}
        for mapper in self._mappers:
            map_name = getattr(mapper, "map_name", None) or mapper._map_name   # 0.32+ / 0.26
            current = {(map_name(name) or name): hf for name, hf in current.items()}
        self._vllm_to_hf = current

    def checkpoint_modules(self, prefix: str) -> list[str | None]:
        """Checkpoint module names behind a vLLM layer (several for fused qkv_proj/gate_up_proj),
        in shard order; None where the constituent is not quantized."""
        proj = prefix.rsplit(".", 1)[-1]
        parts = layer_names.fused_parts(proj, self.packed_modules_mapping)
        base = prefix[: len(prefix) - len(proj)]
        return [self._vllm_to_hf.get(base + p) for p in parts]

    def checkpoint(self) -> GraceCheckpoint:
        """This process's reader of the checkpoint (opened on first use)."""
        if self._ckpt is None:
            self._ckpt = GraceCheckpoint.open(self.checkpoint_dir, bits=self.bits, group_size=self.group_size)
        return self._ckpt

    def layer_done(self) -> None:
        """A quantized layer finished processing; close the checkpoint after the last one."""
        self._open_layers = max(0, self._open_layers - 1)
        if self._open_layers == 0:
            self._ckpt = None
