"""Which second kernel a layer shape keeps for small batches: per GPU, engine version and engine kernel.

Why a table at all: an engine picks one mixed-precision kernel per layer (vLLM 0.34 on Hopper:
Machete, or what ``--linear-backend`` / ``VLLM_DISABLED_KERNELS`` say), and that kernel is not the
fastest at every token count. A second packed copy for another kernel pays only where it was
measured faster, and crossovers move with the GPU, the engine's kernels and their versions: a
table measured with vLLM 0.26's Marlin and Machete made grace_qat slower than stock vLLM 0.34. So an
entry applies only on the exact device name, engine and engine version it was measured with, and
only next to the kernel the engine chose now; everything else keeps one copy and the engine's choice.

A table file (``table-*.json`` beside this module, or ``GRACE_QAT_CROSSOVER_FILE``)::

    {"device": "NVIDIA H100 80GB HBM3", "engine": "vllm", "engine_version": "0.34.0",
     "measured": "how and when", "shapes": {"w4g128 n4096 k2048": {
        "large": "MacheteLinearKernel", "small": "HummingLinearKernel", "max_m": 16,
        "gain": 1.31, "configs": []}}}

``small`` runs for M <= ``max_m``; ``gain`` is the smallest measured speed-up of ``small`` over
``large`` at those M (``entry_from_timings`` keeps only shapes with gain >= MIN_GAIN). Tables
written before gains were recorded (vLLM 0.26) carry no ``gain``.

A table may also say which kernel to use, with one copy, where the engine picks a kernel by its own
ranking (no ``--linear-backend`` or other choice of the user's), because stock vLLM with that kernel
chosen by a flag decoded faster at every measured batch size on this device and engine version::

    "engine_default": {"instead_of": "MacheteLinearKernel", "use": "HummingLinearKernel",
                       "bits": [4], "measured": "what, where, ratios"}

``bits``: the weight widths it was measured with (absent: all); layers of another width keep the
engine's choice. The shapes' second kernels then apply next to ``use`` (their ``large`` must name it).
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import logging
import os

from grace_qat import settings
from grace_qat.errors import GraceFormatError

MIN_GAIN = 1.05                  # a second copy must be at least 5% faster at every M it serves
TABLE_GLOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "table-*.json")


def device_name() -> str:
    """The name tables are keyed by: torch's name of the current CUDA device, or "cpu"."""
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def shape_key(bits: int, group: int, n: int, k: int) -> str:
    """Key of one layer shape on one rank: n = output features, k = input features."""
    return f"w{bits}g{group} n{n} k{k}"


@dataclasses.dataclass(frozen=True)
class Plan:
    """The second kernel of one layer shape: ``small`` (a kernel name; None keeps one copy and the
    engine's kernel) for M <= ``max_m``; ``reason`` says why, for the log; ``configs`` are launch
    configs of the project's own kernels."""
    small: str | None
    max_m: int
    reason: str
    configs: tuple = ()


@functools.lru_cache(maxsize=None)
def tables(extra: str | None = None) -> tuple[dict, ...]:
    """Every table file shipped beside this module, then ``extra`` (a later entry wins)."""
    out = []
    for path in sorted(glob.glob(TABLE_GLOB)) + ([extra] if extra else []):
        with open(path) as f:
            t = json.load(f)
        missing = {"device", "engine", "engine_version", "shapes"} - set(t)
        if missing:
            raise ValueError(f"{path}: not a kernel table (no {', '.join(sorted(missing))})")
        out.append(dict(t, path=path))
    return tuple(out)


def table_for(device: str, engine: str, version: str, extra: str | None = None) -> dict | None:
    """The shapes measured on exactly this device, engine and engine version (merged), or None; its
    ``engine_default`` is the last one any of those tables gives (a lease's crossover file of shapes
    alone keeps the shipped table's engine default)."""
    found = [t for t in tables(extra)
             if (t["device"], t["engine"], t["engine_version"]) == (device, engine, version)]
    if not found:
        return None
    shapes = {}
    for t in found:
        shapes.update(t["shapes"])
    merged = dict(found[-1], shapes=shapes)
    default = next((t["engine_default"] for t in reversed(found) if t.get("engine_default")), None)
    if default:
        merged["engine_default"] = default
    return merged


def engine_default(engine: str, version: str, instead_of: str, bits: int | None = None) -> dict | None:
    """The ``engine_default`` entry of the table for this device (``device_name``), ``engine`` and
    ``version`` (with ``GRACE_QAT_CROSSOVER_FILE``) where it replaces ``instead_of`` for ``bits``-bit
    weights (None: any width), else None."""
    t = table_for(device_name(), engine, version, extra=settings.crossover_file())
    pick = (t or {}).get("engine_default") or {}
    if pick.get("instead_of") != instead_of:
        return None
    return None if bits is not None and "bits" in pick and bits not in pick["bits"] else pick


def plan(device: str, engine: str, version: str, large: str, bits: int, group: int, n: int, k: int,
         extra: str | None = None) -> Plan:
    """The small-M partner of ``large`` (the kernel the engine chose) for one layer shape."""
    where = f"{device}, {engine} {version}"
    t = table_for(device, engine, version, extra)
    if t is None:
        return Plan(None, 0, f"no kernel table measured on {where}: {large} alone, the engine's choice")
    e = t["shapes"].get(shape_key(bits, group, n, k))
    if e is None:
        return Plan(None, 0, f"shape not measured on {where}: {large} alone")
    if e["large"] != large:
        return Plan(None, 0, f"measured next to {e['large']}, the engine chose {large}: {large} alone")
    if not e.get("small") or int(e.get("max_m", 0)) <= 0:
        return Plan(None, 0, f"nothing beat {large} by {MIN_GAIN:.2f}x on {where}: {large} alone")
    gain = e.get("gain")
    if gain is not None and gain < MIN_GAIN:
        return Plan(None, 0, f"{e['small']} only {gain:.2f}x {large} on {where}: {large} alone")
    why = (f"measured on {where}" + (f", >= {gain:.2f}x" if gain is not None else "")
           + (", with its measured launch configs" if e.get("configs") else ""))
    return Plan(e["small"], int(e["max_m"]), why, tuple(tuple(c) for c in e.get("configs", ())))


_WARNED: set[str] = set()


def second_kernels_allowed(log: logging.Logger) -> bool:
    """``GRACE_QAT_DUAL_KERNEL`` (on unless set off); a misspelt value says so once and stays on."""
    try:
        return settings.dual_kernel()
    except GraceFormatError as e:
        if settings.DUAL_KERNEL not in _WARNED:
            _WARNED.add(settings.DUAL_KERNEL)
            log.warning("grace_qat: %s; two kernels stay allowed", e)
        return True


def partner(p: Plan, large: str, kernel_class, can_run) -> tuple[type | None, Plan]:
    """The plan's second kernel as a class that can run this layer, or (None, a plan saying why
    ``large``, the engine's kernel, stays alone). ``kernel_class(name)`` finds a kernel among the
    engine's and grace_qat's own (None: unknown here); ``can_run(cls)`` is the class's (ok, why)
    for this layer, as the engine asks its own kernels."""
    if p.small is None:
        return None, p
    cls = kernel_class(p.small)
    if cls is None:
        return None, Plan(None, 0, f"{p.small} is not a kernel this engine has: {large} alone")
    ok, why = can_run(cls)
    if not ok:
        return None, Plan(None, 0, f"{p.small} cannot run this layer ({why}): {large} alone")
    return cls, p


def entry_from_timings(large: str, timings: dict[str, dict[int, float]],
                       min_gain: float = MIN_GAIN) -> dict:
    """One shape's entry from microseconds per M of each kernel (``timings[name][m]``, ``large``
    among them): the kernel that serves the longest run of M from the smallest measured one at
    >= ``min_gain`` times ``large``'s speed (ties: the larger gain), or none."""
    best = dict(large=large, small=None, max_m=0, gain=None)
    ms = sorted(timings[large])
    for name, t in sorted(timings.items()):
        if name == large:
            continue
        max_m, gains = 0, []
        for m in ms:
            if m not in t or t[m] * min_gain > timings[large][m]:
                break
            max_m, gains = m, gains + [timings[large][m] / t[m]]
        if max_m and (max_m > best["max_m"] or max_m == best["max_m"] and min(gains) > best["gain"]):
            best = dict(large=large, small=name, max_m=max_m, gain=round(min(gains), 3))
    return best
