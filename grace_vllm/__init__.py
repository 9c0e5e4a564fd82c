"""vLLM adapter for GRACE quantization-aware-trained checkpoints: ``--quantization grace_qat``.

vLLM loads ``register`` through the ``vllm.general_plugins`` entry point in every process it starts
(API server, engine core, each worker). Importing this package is cheap: nothing from torch or vLLM
is imported until ``register()`` runs, and ``register()`` imports only the quantization-config
module (the linear methods and kernels are imported by the workers when they build layers).
"""
from __future__ import annotations

QUANT_METHOD = "grace_qat"

_registered = False


def register() -> None:
    """Register everything grace_qat adds to vLLM. Idempotent; safe to call in any vLLM process."""
    global _registered
    if _registered:
        return
    _register_quantization()
    _register_models()
    _registered = True


def _register_quantization() -> None:
    from vllm.model_executor.layers.quantization import (QUANTIZATION_METHODS,
                                                         register_quantization_config)

    from .config import GraceQATConfig

    # register_quantization_config is itself safe to repeat, but skip the debug "overwritten" line.
    if QUANT_METHOD in QUANTIZATION_METHODS:
        from vllm.model_executor.layers.quantization import get_quantization_config
        if get_quantization_config(QUANT_METHOD) is GraceQATConfig:
            return
    register_quantization_config(QUANT_METHOD)(GraceQATConfig)


def _register_models() -> None:
    """Model-architecture shims (e.g. the original-layout LLaVA ``LlavaLlamaForCausalLM``).

    Register them here, lazily by "module:Class" string so that no model code is imported at plugin
    load: ``ModelRegistry.register_model("LlavaLlamaForCausalLM", "grace_vllm.llava:Cls")``.
    """
    # --- LLaVA-1.5 original layout (grace_vllm/llava_config.py, grace_vllm/llava.py) ---
    from .llava_config import register_llava
    register_llava()
    # --- end LLaVA-1.5 ---


__all__ = ["register", "QUANT_METHOD"]
