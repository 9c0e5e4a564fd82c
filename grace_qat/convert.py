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
so a conversion either is bit-exact or fails. Scales (``Target.written_scale_dtype``): an AWQ-packed source's
fp16 scales stay fp16 (exact); a QAT source's fp32 steps are rounded once to the dtype the engine
computes in, as the grace_qat plugin rounds them when it serves (AWQ targets: fp16, which that format
fixes). That dtype is the model's (config.json) unless ``dtype`` names another: an engine that
serves the model in another dtype than its config's (SGLang runs original-layout LLaVA-1.5 in fp16)
gets the plugin's numbers only from an export in that dtype; its config.json then says it.
"""
from __future__ import annotations

import filecmp
import json
import os
import shutil

import torch

from . import formats, targets
from .checkpoint import GraceCheckpoint
from .files import CONFIG_DTYPES, CONFIG_NAME, QUANT_METHOD, SAFETENSORS_INDEX_NAME, dtype_name, model_dtype
from . import llava_hf
from .errors import GraceFormatError
from .output import write_dir
from .shards import ShardWriter

# Every target: the standard layouts (grace_qat.targets), and a copy that only declares grace_qat.
TARGETS = (*targets.names(), QUANT_METHOD)
LAYOUTS = ("same", "llava-hf")
# what an export may be written for: the 16-bit dtypes config.json can name
DTYPES = {name: d for name, d in CONFIG_DTYPES.items() if d.itemsize == 2}


def exactness(target: str, ckpt: GraceCheckpoint, dtype: str | None = None) -> str:
    """What a conversion keeps exactly, in words, for the CLI's success line."""
    if target == QUANT_METHOD:
        return "files copied unchanged, only config.json declares quant_method grace_qat"
    src, model = ckpt.steps_dtype(), served_dtype(ckpt.config, dtype)
    dst = targets.get(target).written_scale_dtype(src, model)
    if dst is None:
        return (f"codes verified bit-exact, weights = codes x {dtype_name(src)} scales computed in fp32, "
                f"rounded once to {dtype_name(model)}")
    if dst == src:
        how = f"scales exact ({dtype_name(dst)}, as in the source)"
    else:
        how = f"scales rounded from {dtype_name(src)} to {dtype_name(dst)}"
    return f"codes bit-exact, {how}"


def served_dtype(config: dict, dtype: str | None) -> torch.dtype:
    """The dtype an export is written for: ``dtype`` (float16 / bfloat16) where given, else the model's."""
    if dtype is None:
        return model_dtype(config)
    if dtype not in DTYPES:
        raise GraceFormatError(f"unknown dtype {dtype!r}; choose one of {tuple(DTYPES)}")
    return DTYPES[dtype]


def grace_quantization_config(ckpt: GraceCheckpoint) -> dict:
    return {"quant_method": QUANT_METHOD, "format": ckpt.format, "bits": ckpt.bits,
            "group_size": ckpt.group_size}


def _copy_side_files(src: str, dst: str) -> None:
    """Tokenizer, processor, generation config, chat template...: everything but weights/metadata."""
    skip = {CONFIG_NAME, SAFETENSORS_INDEX_NAME, *(f for fmt in formats.all_formats() for f in fmt.side_files)}
    for fname in os.listdir(src):
        full = os.path.join(src, fname)
        if fname in skip or fname.endswith(".safetensors") or not os.path.isfile(full):
            continue
        shutil.copy2(full, os.path.join(dst, fname))


def convert(src: str, dst: str, to: str, bits: int | None = None, progress: bool = False,
            layout: str = "same", clip_dir: str | None = None, force: bool = False,
            dtype: str | None = None) -> GraceCheckpoint:
    """Write ``src`` (any GRACE format) into ``dst`` in the ``to`` format; returns the source reader.
    ``layout="llava-hf"`` (original-layout LLaVA-1.5 only) also renames into the llava-hf layout;
    ``clip_dir`` supplies the CLIP tower when the checkpoint does not carry it (default: found as
    vLLM's shim finds it: ``$GRACE_CLIP_PATH``, a local ``mm_vision_tower``, the HF cache);
    ``dtype`` (float16 / bfloat16; default: config.json's) is the dtype the export is written for.

    Nothing is lost: the output is written into a temporary directory next to ``dst``, read back and
    compared with what was meant to be written, and only then renamed to ``dst``; an existing non-empty
    ``dst`` is refused unless ``force`` (then replaced only after the new one is complete; see
    :func:`grace_qat.output.write_dir`)."""
    if os.path.abspath(src) == os.path.abspath(dst):
        raise GraceFormatError("destination must differ from the source")
    return write_dir(dst, lambda tmp: _convert_into(src, tmp, to, bits, progress, layout, clip_dir, dtype),
                     force=force)


def _convert_into(src: str, dst: str, to: str, bits: int | None, progress: bool, layout: str,
                  clip_dir: str | None, dtype_arg: str | None) -> GraceCheckpoint:
    if to not in TARGETS:
        raise GraceFormatError(f"unknown target {to!r}; choose one of {TARGETS}")
    if layout not in LAYOUTS:
        raise GraceFormatError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    if dtype_arg is not None and to == QUANT_METHOD:
        raise GraceFormatError(f"--dtype applies to the standard targets; --to {QUANT_METHOD} copies the "
                               f"checkpoint unchanged (the plugin serves it in the engine's dtype)")
    ckpt = GraceCheckpoint.open(src, bits=bits)
    if not formats.get(ckpt.format).quantizes:
        raise GraceFormatError(f"{src}: not a GRACE quantized checkpoint (no quantized modules found)")
    config = dict(ckpt.config)
    to_hf = layout == "llava-hf"
    if to_hf and (to == QUANT_METHOD or not llava_hf.is_original_llava(config)):
        raise GraceFormatError(
            f"{src}: --layout llava-hf converts an original-layout LLaVA-1.5 checkpoint (config.json with "
            f"mm_vision_tower, no text_config) to gptq/compressed-tensors/awq/bf16; got "
            f"{config.get('architectures')} to {to}")
    if to_hf and clip_dir is None:   # $GRACE_CLIP_PATH, a local mm_vision_tower, the HF cache
        clip_dir, _ = llava_hf.find_clip_dir(config.get("mm_vision_tower"))
    dtype = served_dtype(config, dtype_arg)
    name_of = llava_hf.rename if to_hf else (lambda n: n)
    modules = [name_of(m) for m in ckpt.modules]

    if to == QUANT_METHOD:   # same tensors and sidecar; only config.json changes
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
        target = targets.get(to)
        sdtype = target.written_scale_dtype(ckpt.steps_dtype(), dtype)
        for q in ckpt.iter_quantized(progress=progress):
            for k, v in target.write_module(q, sdtype, dtype).items():
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
        target.write_side_files(dst, ckpt.group_size, modules)

    if to_hf:
        config = llava_hf.hf_config(config, config["vocab_size"], clip_dir)
    if dtype_arg is not None:   # what the export was written for, where engines read it
        for cfg in (config, config.get("text_config")):
            if isinstance(cfg, dict):
                cfg["dtype" if "dtype" in cfg else "torch_dtype"] = dtype_arg
    config.pop("awq_packing", None)
    config.pop("quantization_config", None)
    qc = grace_quantization_config(ckpt) if to == QUANT_METHOD else targets.get(to).quantization_config(
        ckpt.bits, ckpt.group_size, modules)
    if qc is not None:
        config["quantization_config"] = qc
    with open(os.path.join(dst, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    return ckpt
