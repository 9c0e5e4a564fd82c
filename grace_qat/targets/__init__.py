"""The standard layouts ``grace-qat convert`` writes and ``grace-qat inspect`` reads: one module per
layout, each registering one :class:`Target` that owns both directions.

Adding a layout = one new module here (a ``Target`` subclass, registered) plus its tests;
``convert``, ``standard`` and the CLI take it from the registry.
"""
from .base import ModuleFiles, Target, declared, get, names, register
# each registers its target; this order is the order `convert --to` lists them in
from . import gptq, compressed_tensors, awq, bf16  # noqa: E401,F401,I001

__all__ = ["ModuleFiles", "Target", "declared", "get", "names", "register"]
