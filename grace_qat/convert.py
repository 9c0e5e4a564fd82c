"""Convert a GRACE checkpoint into a standard format that stock engines load without the plugin.

Targets:
  * ``gptq``               GPTQ (sym, desc_act=False): vLLM / SGLang GPTQ-Marlin, Transformers (gptqmodel);
  * ``compressed-tensors`` pack-quantized WNA16: vLLM, SGLang, Transformers (compressed-tensors);
  * ``awq``                AutoAWQ GEMM (4-bit only): vLLM / SGLang AWQ-Marlin;
  * ``bf16``               the dequantized model (the reference every quantized path is compared with);
  * ``grace_qat``          an unchanged copy whose config.json declares ``quant_method: grace_qat``,
                           so the engines' plugin picks it up without a ``--quantization`` flag.

Every packed module is unpacked again and compared with the verified codes before it is written,
so a conversion either is bit-exact or fails. Scales are stored in the model's dtype (except AWQ,
whose format fixes fp16), so stock kernels see exactly the scales the grace_qat plugin uses.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from .checkpoint import (AWQ_MODULES_NAME, CONFIG_NAME, FORMAT_PLAIN, SAFETENSORS_INDEX_NAME,
                         SIDECAR_NAME, GraceCheckpoint, QuantizedLinear)
from .errors import GraceFormatError
from .packing import (pack_awq, pack_compressed_tensors, pack_gptq, unpack_awq,
                      unpack_compressed_tensors, unpack_gptq)
from .quantizer import dequantize
from .shards import ShardWriter

TARGETS = ("gptq", "compressed-tensors", "awq", "bf16", "grace_qat")
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


def grace_quantization_config(ckpt: GraceCheckpoint) -> dict:
    return {"quant_method": "grace_qat", "format": ckpt.format, "bits": ckpt.bits,
            "group_size": ckpt.group_size}


def _quantization_config(target: str, ckpt: GraceCheckpoint) -> dict | None:
    if target == "gptq":
        return {"quant_method": "gptq", "bits": ckpt.bits, "group_size": ckpt.group_size, "sym": True,
                "desc_act": False, "lm_head": False, "checkpoint_format": "gptq",
                "modules_in_block_to_quantize": list(ckpt.modules)}
    if target == "compressed-tensors":
        return {"quant_method": "compressed-tensors", "format": "pack-quantized",
                "quantization_status": "compressed", "ignore": UNQUANTIZED_PATTERNS,
                "config_groups": {"group_0": {
                    "targets": ["Linear"], "input_activations": None, "output_activations": None,
                    "weights": {"num_bits": ckpt.bits, "type": "int", "symmetric": True,
                                "strategy": "group", "group_size": ckpt.group_size, "dynamic": False,
                                "actorder": None, "observer": "minmax"}}}}
    if target == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": ckpt.group_size, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": ["visual", "vision_tower", "mm_projector",
                                                              "multi_modal_projector", "lm_head"]}
    if target == "grace_qat":
        return grace_quantization_config(ckpt)
    return None


def _pack_module(target: str, q: QuantizedLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors of one module in the target layout, unpacked again and checked against the codes."""
    name = q.name
    if target == "gptq":
        t = pack_gptq(q.codes, q.scales, q.bits, q.group_size, scale_dtype=dtype)
        back, _ = unpack_gptq(t["qweight"], t["qzeros"], t["scales"], q.bits, name)
    elif target == "compressed-tensors":
        t = pack_compressed_tensors(q.codes, q.scales, q.bits, scale_dtype=dtype)
        back, _ = unpack_compressed_tensors(t["weight_packed"], t["weight_scale"], q.bits)
    elif target == "awq":
        if q.bits != 4:
            raise GraceFormatError(f"{name}: AWQ export is 4-bit only, this checkpoint is {q.bits}-bit")
        t = pack_awq(q.codes, q.scales, q.group_size)
        back, _ = unpack_awq(t["qweight"], t["qzeros"], t["scales"], name)
    elif target == "bf16":
        return {f"{name}.weight": dequantize(q.codes, q.scales, q.group_size, dtype)}
    else:
        raise GraceFormatError(f"unknown target {target!r}; choose one of {TARGETS}")
    if not torch.equal(back.to(torch.int32), q.codes.to(torch.int32)):
        raise GraceFormatError(f"{name}: packed {target} tensors do not unpack to the same codes (bug)")
    return {f"{name}.{k}": v for k, v in t.items()}


def _copy_side_files(src: str, dst: str) -> None:
    """Tokenizer, processor, generation config, chat template...: everything but weights/metadata."""
    skip = {CONFIG_NAME, SIDECAR_NAME, AWQ_MODULES_NAME, SAFETENSORS_INDEX_NAME}
    for fname in os.listdir(src):
        full = os.path.join(src, fname)
        if fname in skip or fname.endswith(".safetensors") or not os.path.isfile(full):
            continue
        shutil.copy2(full, os.path.join(dst, fname))


def convert(src: str, dst: str, to: str, bits: int | None = None, progress: bool = False) -> GraceCheckpoint:
    """Write ``src`` (any GRACE format) into ``dst`` in the ``to`` format; returns the source reader."""
    if to not in TARGETS:
        raise GraceFormatError(f"unknown target {to!r}; choose one of {TARGETS}")
    ckpt = GraceCheckpoint.open(src, bits=bits)
    if ckpt.format == FORMAT_PLAIN:
        raise GraceFormatError(f"{src}: not a GRACE quantized checkpoint (no quantized modules found)")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise GraceFormatError("destination must differ from the source")
    os.makedirs(dst, exist_ok=True)
    config = dict(ckpt.config)
    dtype = model_dtype(config)

    if to == "grace_qat":   # same tensors and sidecar; only config.json changes
        for fname in os.listdir(src):
            full = os.path.join(src, fname)
            if os.path.isfile(full) and fname != CONFIG_NAME:
                shutil.copy2(full, os.path.join(dst, fname))
    else:
        _copy_side_files(src, dst)
        writer = ShardWriter(dst)
        for q in ckpt.iter_quantized(progress=progress):
            for k, v in _pack_module(to, q, dtype).items():
                writer.add(k, v)
            if q.bias is not None:
                writer.add(f"{q.name}.bias", q.bias)
        for name in ckpt.other_tensor_names():
            writer.add(name, ckpt.tensors.get(name))
        writer.close()
        if to == "awq":
            with open(os.path.join(dst, AWQ_MODULES_NAME), "w") as f:
                json.dump({"bits": 4, "group_size": ckpt.group_size, "modules": ckpt.modules}, f, indent=2)

    config.pop("awq_packing", None)
    config.pop("quantization_config", None)
    qc = _quantization_config(to, ckpt)
    if qc is not None:
        config["quantization_config"] = qc
    with open(os.path.join(dst, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    return ckpt
