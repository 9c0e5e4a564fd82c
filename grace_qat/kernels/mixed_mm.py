"""Two kernels for one layer: a custom op that runs the small-M kernel up to a token count, the engine's above.

An adapter gives a layer two kernels only where a kernel table measured the second one faster
(``grace_qat.kernels.table``); the layer then calls ``torch.ops.grace_qat.mixed_mm``, opaque to
torch.compile (no specialisation on M, no recompilation), and each captured CUDA graph records the
kernel for its own batch size. Both engines' layers carry their method as ``layer.quant_method``;
the method's ``dispatch`` is the ``KernelDispatch`` below. Kernels are objects with
``apply_weights(module, x, bias)``: vLLM's own, grace_qat's (``grace_qat.kernels.own``), or an
adapter's wrapper around its engine's kernel.
"""
from __future__ import annotations

import collections
import weakref

import torch

# data_ptr of a layer's key buffer -> layer. The custom op receives that tensor (a graph input, as a
# kernel's weight is) and finds its layer here; no per-layer constant enters the graph, so the
# decoder layers' pieces stay identical and torch.compile compiles them once, not once per layer.
_LAYERS: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()
CALLS: collections.Counter = collections.Counter()   # kernel name -> eager calls (tests, logs)


class KernelDispatch:
    """The two kernels of one CUDA layer: ``large`` on the layer itself and ``small`` on a child
    module (``HOLDER``) holding its own packed copy, used for M <= ``max_m``. Only layers with two
    kernels have one; a layer with one kernel calls it directly."""

    HOLDER = "grace_qat_small_m"
    KEY = "grace_qat_key"

    def __init__(self, layer: torch.nn.Module, large, out_features: int, small=None, max_m: int = 0):
        self.large, self.small, self.max_m = large, small, max_m
        self.out_features = out_features
        # The op's key: a one-element buffer of the layer's own. Not the packed weight: kernels rename
        # or replace their parameters when they repack (Humming moves weight_packed to weight).
        key = torch.zeros(1, dtype=torch.int8, device=next(layer.parameters()).device)
        layer.register_buffer(self.KEY, key, persistent=False)
        _LAYERS[key.data_ptr()] = layer

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.grace_qat.mixed_mm(x, bias, getattr(layer, self.KEY), self.out_features)


def _name(kernel) -> str:
    """A kernel's name for CALLS: its ``name`` (an adapter's wrapper of an engine kernel) or its class's."""
    return getattr(kernel, "name", None) or type(kernel).__name__


def _mixed_mm(x: torch.Tensor, bias: torch.Tensor | None, weight: torch.Tensor, out_features: int) -> torch.Tensor:
    layer = _LAYERS.get(weight.data_ptr())     # ``weight``: the layer's key buffer
    if layer is None:
        raise RuntimeError("grace_qat: mixed_mm called with a weight no grace_qat layer owns (was it "
                           "moved or replaced after loading?)")
    d: KernelDispatch = layer.quant_method.dispatch
    if d.small is not None and x.numel() // x.shape[-1] <= d.max_m:
        holder = getattr(layer, KernelDispatch.HOLDER)
        CALLS[_name(d.small)] += 1
        # The holder keeps its kernel's copy of the bias (Marlin permutes it); the engine passes None
        # where it must not be added (tensor-parallel ranks > 0, skip_bias_add).
        return d.small.apply_weights(holder, x, None if bias is None else holder.bias)
    CALLS[_name(d.large)] += 1
    return d.large.apply_weights(layer, x, bias)


def _mixed_mm_fake(x: torch.Tensor, bias: torch.Tensor | None, weight: torch.Tensor,
                   out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


_lib = torch.library.Library("grace_qat", "FRAGMENT")
_lib.define("mixed_mm(Tensor x, Tensor? bias, Tensor weight, int out_features) -> Tensor")
# CUDA is where the plugin uses it; CPU so that the dispatch logic is testable without a GPU.
for _key in ("CUDA", "CPU"):
    _lib.impl("mixed_mm", _mixed_mm, _key)
torch.library.register_fake("grace_qat::mixed_mm", _mixed_mm_fake, lib=_lib)
