"""Convert a GRACE checkpoint into a standard format that stock engines load without the plugin.

Targets:
  * ``gptq``               GPTQ (sym, desc_act=False): vLLM / SGLang GPTQ-Marlin, Transformers (gptqmodel);
  * ``compressed-tensors`` pack-quantized WNA16: vLLM, SGLang, Transformers (compressed-tensors);
  * ``awq``                AutoAWQ GEMM (4-bit only): vLLM / SGLang AWQ-Marlin;
  * ``bf16``               the dequantized model (the reference every quantized path is compared with);
  * ``grace_qat``          an unchanged copy whose config.json declares ``quant_method: grace_qat``,
                           so the engines' plugin picks it up without a ``--quantization`` flag.

Layouts: ``same`` (default) keeps the source's tensor names and config; ``llava-hf`` turns an
original-layout LLaVA-1.5 checkpoint into the llava-hf layout (:mod:`grace_qat.llava_hf`).

Every packed module is unpacked again and compared with the verified codes before it is written,
so a conversion either is bit-exact or fails. Scales (:func:`scale_dtype`): an AWQ-packed source's
fp16 scales stay fp16 (exact); a QAT source's fp32 steps are rounded once to the model's dtype, as
the grace_qat plugin rounds them when it serves (AWQ targets: fp16, which that format fixes).
"""
from __future__ import annotations

import filecmp
import json
import os
import shutil
from dataclasses import dataclass
from typing import Callable

import torch

from . import formats
from .checkpoint import GraceCheckpoint, QuantizedLinear
from .files import AWQ_MODULES_NAME, CONFIG_NAME, SAFETENSORS_INDEX_NAME
from . import llava_hf
from .errors import GraceFormatError
from .output import write_dir
from .packing import (pack_awq, pack_compressed_tensors, pack_gptq, unpack_awq,
                      unpack_compressed_tensors, unpack_gptq)
from .quantizer import dequantize
from .shards import ShardWriter



@dataclass(frozen=True)
class Packer:
    """How one packed target lays out a module: ``pack(q, sdtype)`` -> tensors (leaf -> tensor),
    ``unpack(tensors, q)`` -> (codes, scales), read back before anything is written."""
    pack: Callable[[QuantizedLinear, torch.dtype], dict]
    unpack: Callable[[dict, QuantizedLinear], tuple]
    config: Callable[[GraceCheckpoint, list], dict]       # the export's quantization_config
    scale_dtype: torch.dtype | None = None                # fixed by the layout (else: see scale_dtype)
    side_file: Callable[[str, GraceCheckpoint, list], None] | None = None   # (dst, source, module names)


def _awq_modules_file(dst: str, ckpt: GraceCheckpoint, modules: list[str]) -> None:
    with open(os.path.join(dst, AWQ_MODULES_NAME), "w") as f:
        json.dump({"bits": 4, "group_size": ckpt.group_size, "modules": modules}, f, indent=2)


def _awq_pack(q, sdtype):
    if q.bits != 4:
        raise GraceFormatError(f"{q.name}: AWQ export is 4-bit only, this checkpoint is {q.bits}-bit")
    return pack_awq(q.codes, q.scales, q.group_size, scale_dtype=sdtype)


PACKERS = {
    "gptq": Packer(lambda q, sd: pack_gptq(q.codes, q.scales, q.bits, q.group_size, scale_dtype=sd),
                   lambda t, q: unpack_gptq(t["qweight"], t["qzeros"], t["scales"], q.bits, q.name),
                   lambda c, m: _gptq_config(c, m)),
    "compressed-tensors": Packer(
        lambda q, sd: pack_compressed_tensors(q.codes, q.scales, q.bits, scale_dtype=sd),
        lambda t, q: unpack_compressed_tensors(t["weight_packed"], t["weight_scale"], q.bits),
        lambda c, m: _compressed_tensors_config(c, m)),
    "awq": Packer(_awq_pack, lambda t, q: unpack_awq(t["qweight"], t["qzeros"], t["scales"], q.name),
                  lambda c, m: _awq_config(c, m), scale_dtype=torch.float16, side_file=_awq_modules_file),
}
# Every target: the packed ones, the dequantized model, and a copy that only declares grace_qat.
TARGETS = (*PACKERS, "bf16", "grace_qat")
LAYOUTS = ("same", "llava-hf")
# Linear layers that GRACE never quantizes; stock engines must leave them alone too.
UNQUANTIZED_PATTERNS = ["lm_head", "re:.*visual.*", "re:.*vision_tower.*", "re:.*mm_projector.*",
                        "re:.*multi_modal_projector.*"]
_STRING_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def model_dtype(config: dict) -> torch.dtype:
    """The dtype the checkpoint's unquantized tensors are meant to run in (bf16 unless stated)."""
    for cfg in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if cfg.get(key) in _STRING_DTYPES:
                return _STRING_DTYPES[cfg[key]]
    return torch.bfloat16


_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def source_scale_dtype(ckpt: GraceCheckpoint) -> torch.dtype:
    """The precision the source stores its steps in: AWQ-packed scales as written (fp16), QAT
    log-steps as fp32 exp(log_scale)."""
    return ckpt.steps_dtype()


def scale_dtype(target: str, ckpt: GraceCheckpoint) -> torch.dtype | None:
    """The dtype ``target``'s scales are written in (None: no scales, e.g. bf16 weights). The
    source's own 16-bit precision is kept wherever the target can hold it; fp32 steps are rounded to
    the model's dtype (what the engines compute with), or to fp16 where the format fixes it (AWQ)."""
    if target not in PACKERS:
        return None
    src = source_scale_dtype(ckpt)
    if PACKERS[target].scale_dtype is not None:
        return PACKERS[target].scale_dtype
    return src if src in (torch.float16, torch.bfloat16) else model_dtype(ckpt.config)


def exactness(target: str, ckpt: GraceCheckpoint) -> str:
    """What a conversion keeps exactly, in words, for the CLI's success line."""
    if target == "grace_qat":
        return "files copied unchanged, only config.json declares quant_method grace_qat"
    src = source_scale_dtype(ckpt)
    if target == "bf16":
        return (f"codes verified bit-exact, weights = codes x {_DTYPE_NAMES[src]} scales computed in fp32, "
                f"rounded once to {_DTYPE_NAMES[model_dtype(ckpt.config)]}")
    dst = scale_dtype(target, ckpt)
    if dst == src:
        how = f"scales exact ({_DTYPE_NAMES[dst]}, as in the source)"
    else:
        how = f"scales rounded from {_DTYPE_NAMES[src]} to {_DTYPE_NAMES[dst]}"
    return f"codes bit-exact, {how}"


def grace_quantization_config(ckpt: GraceCheckpoint) -> dict:
    return {"quant_method": "grace_qat", "format": ckpt.format, "bits": ckpt.bits,
            "group_size": ckpt.group_size}


def _gptq_config(ckpt: GraceCheckpoint, modules: list[str]) -> dict:
    return {"quant_method": "gptq", "bits": ckpt.bits, "group_size": ckpt.group_size, "sym": True,
            "desc_act": False, "lm_head": False, "checkpoint_format": "gptq",
            "modules_in_block_to_quantize": modules}


def _compressed_tensors_config(ckpt: GraceCheckpoint, modules: list[str]) -> dict:
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "ignore": UNQUANTIZED_PATTERNS,
            "config_groups": {"group_0": {
                "targets": ["Linear"], "input_activations": None, "output_activations": None,
                "weights": {"num_bits": ckpt.bits, "type": "int", "symmetric": True,
                            "strategy": "group", "group_size": ckpt.group_size, "dynamic": False,
                            "actorder": None, "observer": "minmax"}}}}


def _awq_config(ckpt: GraceCheckpoint, modules: list[str]) -> dict:
    return {"quant_method": "awq", "bits": 4, "group_size": ckpt.group_size, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": ["visual", "vision_tower", "mm_projector",
                                                          "multi_modal_projector", "lm_head"]}


def _quantization_config(target: str, ckpt: GraceCheckpoint, modules: list[str]) -> dict | None:
    if target == "grace_qat":
        return grace_quantization_config(ckpt)
    return PACKERS[target].config(ckpt, modules) if target in PACKERS else None


def _pack_module(target: str, q: QuantizedLinear, dtype: torch.dtype,
                 sdtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Tensors of one module in the target layout (scales in ``sdtype``), unpacked again and checked
    against the codes and the scales rounded to ``sdtype``."""
    name = q.name
    if target == "bf16":
        return {f"{name}.weight": dequantize(q.codes, q.scales, q.group_size, dtype)}
    if target not in PACKERS:
        raise GraceFormatError(f"unknown target {target!r}; choose one of {TARGETS}")
    t = PACKERS[target].pack(q, sdtype)
    back, back_s = PACKERS[target].unpack(t, q)
    if not torch.equal(back.to(torch.int32), q.codes.to(torch.int32)):
        raise GraceFormatError(f"{name}: packed {target} tensors do not unpack to the same codes (bug)")
    if back_s.dtype != sdtype or not torch.equal(back_s, q.scales.to(sdtype)):
        raise GraceFormatError(f"{name}: packed {target} scales are not the source's rounded to {sdtype} (bug)")
    return {f"{name}.{k}": v for k, v in t.items()}


def _copy_side_files(src: str, dst: str) -> None:
    """Tokenizer, processor, generation config, chat template...: everything but weights/metadata."""
    skip = {CONFIG_NAME, SAFETENSORS_INDEX_NAME, *(f for fmt in formats.all_formats() for f in fmt.side_files)}
    for fname in os.listdir(src):
        full = os.path.join(src, fname)
        if fname in skip or fname.endswith(".safetensors") or not os.path.isfile(full):
            continue
        shutil.copy2(full, os.path.join(dst, fname))


def convert(src: str, dst: str, to: str, bits: int | None = None, progress: bool = False,
            layout: str = "same", clip_dir: str | None = None, force: bool = False) -> GraceCheckpoint:
    """Write ``src`` (any GRACE format) into ``dst`` in the ``to`` format; returns the source reader.
    ``layout="llava-hf"`` (original-layout LLaVA-1.5 only) also renames into the llava-hf layout;
    ``clip_dir`` supplies the CLIP tower when the checkpoint does not carry it (default: found as
    vLLM's shim finds it: ``$GRACE_CLIP_PATH``, a local ``mm_vision_tower``, the HF cache).

    Nothing is lost: the output is written into a temporary directory next to ``dst``, read back and
    compared with what was meant to be written, and only then renamed to ``dst``; an existing non-empty
    ``dst`` is refused unless ``force`` (then replaced only after the new one is complete; see
    :func:`grace_qat.output.write_dir`)."""
    if os.path.abspath(src) == os.path.abspath(dst):
        raise GraceFormatError("destination must differ from the source")
    return write_dir(dst, lambda tmp: _convert_into(src, tmp, to, bits, progress, layout, clip_dir), force=force)


def _convert_into(src: str, dst: str, to: str, bits: int | None, progress: bool, layout: str,
                  clip_dir: str | None) -> GraceCheckpoint:
    if to not in TARGETS:
        raise GraceFormatError(f"unknown target {to!r}; choose one of {TARGETS}")
    if layout not in LAYOUTS:
        raise GraceFormatError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    ckpt = GraceCheckpoint.open(src, bits=bits)
    if not ckpt.kind.quantized:
        raise GraceFormatError(f"{src}: not a GRACE quantized checkpoint (no quantized modules found)")
    config = dict(ckpt.config)
    to_hf = layout == "llava-hf"
    if to_hf and (to == "grace_qat" or not llava_hf.is_original_llava(config)):
        raise GraceFormatError(
            f"{src}: --layout llava-hf converts an original-layout LLaVA-1.5 checkpoint (config.json with "
            f"mm_vision_tower, no text_config) to gptq/compressed-tensors/awq/bf16; got "
            f"{config.get('architectures')} to {to}")
    if to_hf and clip_dir is None:   # $GRACE_CLIP_PATH, a local mm_vision_tower, the HF cache
        clip_dir, _ = llava_hf.find_clip_dir(config.get("mm_vision_tower"))
    dtype = model_dtype(config)
    name_of = llava_hf.rename if to_hf else (lambda n: n)

    if to == "grace_qat":   # same tensors and sidecar; only config.json changes
        for fname in os.listdir(src):
            full = os.path.join(src, fname)
            if os.path.isfile(full) and fname != CONFIG_NAME:
                shutil.copy2(full, os.path.join(dst, fname))
                if not filecmp.cmp(full, os.path.join(dst, fname), shallow=False):
                    raise GraceFormatError(f"{os.path.join(dst, fname)}: copy does not read back as {full}")
    else:
        if to_hf:
            llava_hf.write_side_files(src, dst, config, config["vocab_size"], clip_dir)
        else:
            _copy_side_files(src, dst)
        writer = ShardWriter(dst, verify=True)
        sdtype = scale_dtype(to, ckpt)
        for q in ckpt.iter_quantized(progress=progress):
            for k, v in _pack_module(to, q, dtype, sdtype).items():
                writer.add(name_of(k), v)
            if q.bias is not None:
                writer.add(name_of(f"{q.name}.bias"), q.bias)
        others = list(ckpt.other_tensor_names())
        for name in others:
            tensor = ckpt.tensors.get(name)
            if to_hf:
                tensor = llava_hf.extend_vocab(name_of(name), tensor)
            writer.add(name_of(name), tensor)
        if to_hf and not any(n.startswith("model.vision_tower.") for n in others):
            if clip_dir is None:
                raise GraceFormatError(
                    f"{src}: the llava-hf layout needs the CLIP tower's weights and the checkpoint has none "
                    f"(no model.vision_tower.* tensors; mm_vision_tower = {config.get('mm_vision_tower')!r}): "
                    f"pass the CLIP directory (--clip-dir)")
            for name, tensor in llava_hf.clip_vision_tensors(clip_dir).items():
                writer.add(name, tensor)
        writer.close()
        writer.verify()
        side_file = PACKERS[to].side_file if to in PACKERS else None
        if side_file is not None:
            side_file(dst, ckpt, [name_of(m) for m in ckpt.modules])

    if to_hf:
        config = llava_hf.hf_config(config, config["vocab_size"], clip_dir)
    config.pop("awq_packing", None)
    config.pop("quantization_config", None)
    qc = _quantization_config(to, ckpt, [name_of(m) for m in ckpt.modules])
    if qc is not None:
        config["quantization_config"] = qc
    with open(os.path.join(dst, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    return ckpt
