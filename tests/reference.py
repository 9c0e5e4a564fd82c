"""Independent references for the tests, written from the on-disk format description alone.

Plain safetensors, ``torch.load(weights_only=True)`` of the sidecar, and bit operations on Python
ints and int64 tensors; nothing is imported from grace_qat, grace_vllm or grace_sglang, so a wrong
code, step, bit order or shard in the package cannot also be in the reference.
"""
from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

GROUP = 128
SIDECAR = "qat_quantized_weights.bin"
# AutoAWQ GEMM: nibble k (bits 4k..4k+3) of packed column c holds output channel c*8 + AWQ_CHANNEL[k]
AWQ_CHANNEL = (0, 2, 4, 6, 1, 3, 5, 7)


def tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file of a checkpoint directory."""
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def sidecar(path: str) -> dict[str, torch.Tensor]:
    """The format-A sidecar: tensors only (weights_only=True: never a general unpickle)."""
    return torch.load(os.path.join(path, SIDECAR), weights_only=True, map_location="cpu")


def code_limits(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def group_of(in_features: int) -> int:
    """128 when it divides the row, else the whole row is one group."""
    return GROUP if in_features % GROUP == 0 else in_features


# -- bits -------------------------------------------------------------------------------------------

def unpack_bits(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> unsigned ``bits``-bit fields (int64); field k = bits [k*bits, (k+1)*bits),
    and field k of word j along ``dim`` becomes element j*(32/bits) + k."""
    word = packed.to(torch.int64).movedim(dim, -1) & 0xFFFFFFFF
    fields = [(word >> (k * bits)) & ((1 << bits) - 1) for k in range(32 // bits)]
    v = torch.stack(fields, dim=-1).reshape(*word.shape[:-1], word.shape[-1] * (32 // bits))
    return v.movedim(-1, dim)


def pack_bits(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of unpack_bits: unsigned fields (any int dtype) -> int32 words along ``dim``."""
    n = 32 // bits
    v = values.to(torch.int64).movedim(dim, -1)
    assert v.shape[-1] % n == 0 and int(v.min()) >= 0 and int(v.max()) < (1 << bits)
    v = v.reshape(*v.shape[:-1], v.shape[-1] // n, n)
    word = torch.zeros(v.shape[:-1], dtype=torch.int64)
    for k in range(n):
        word |= v[..., k] << (k * bits)
    word = torch.where(word >= (1 << 31), word - (1 << 32), word)     # two's complement int32
    return word.to(torch.int32).movedim(-1, dim).contiguous()


# -- dequantization ---------------------------------------------------------------------------------

def per_element(steps: torch.Tensor, in_features: int) -> torch.Tensor:
    """(out, groups) -> (out, in): each group's step repeated over its columns."""
    return steps.repeat_interleave(in_features // steps.shape[1], dim=1)


def dequant(codes: torch.Tensor, steps: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """W = q * s computed in fp32, then cast (the format's definition of W_dq)."""
    return (codes.float() * per_element(steps.float(), codes.shape[1])).to(dtype)


def bf16_ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bf16 steps lie between a and b, elementwise (bit patterns mapped to ordered ints)."""
    def ordered(t):
        bits = t.to(torch.bfloat16).view(torch.int16).to(torch.int64)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)
    return (ordered(a) - ordered(b)).abs()


def codes_from_grid(weight: torch.Tensor, steps: torch.Tensor, bits: int) -> torch.Tensor:
    lo, hi = code_limits(bits)
    q = torch.round(weight.float() / per_element(steps.float(), weight.shape[1]))
    return q.clamp(lo, hi).to(torch.int64)


def awq_codes(qweight: torch.Tensor, qzeros: torch.Tensor) -> torch.Tensor:
    """AutoAWQ GEMM qweight (in, out/8) -> signed codes (out, in); every zero point must be 8."""
    def channels(p):                          # (rows, out/8) words -> (rows, out) nibbles
        rows, cols = p.shape
        word = p.to(torch.int64) & 0xFFFFFFFF
        u = torch.empty(rows, cols * 8, dtype=torch.int64)
        for k, ch in enumerate(AWQ_CHANNEL):
            u[:, ch::8] = (word >> (4 * k)) & 0xF
        return u
    zeros = channels(qzeros)
    assert bool((zeros == 8).all()), "AWQ zero points other than 8"
    return (channels(qweight) - 8).t().contiguous()


def module(path: str, name: str, fmt: str, bits: int = 4, files: dict | None = None,
           side: dict | None = None) -> dict:
    """One quantized linear of a GRACE checkpoint read from its files:
    ``weight`` the dequantized weight W (out, in) bf16 as the format defines it, ``codes`` (out, in)
    int64 and ``steps`` (out, groups) fp32 (None for qat-grid, which stores no steps)."""
    files = tensors(path) if files is None else files
    if fmt == "awq":
        codes = awq_codes(files[name + ".qweight"], files[name + ".qzeros"])
        steps = files[name + ".scales"].float().t().contiguous()          # fp16 steps, exactly
        return {"codes": codes, "steps": steps, "weight": dequant(codes, steps)}
    weight = files[name + ".weight"]
    assert weight.dtype == torch.bfloat16
    if fmt == "qat-grid":
        return {"codes": None, "steps": None, "weight": weight}
    if fmt == "qat-sidecar":
        side = sidecar(path) if side is None else side
        log_scale = side[name + ".log_scale"]
        assert torch.equal(side[name + ".weight"], weight), f"{name}: sidecar weight != safetensors weight"
    elif fmt == "qat-inline":
        log_scale = files[name + ".log_scale"]
    else:
        raise ValueError(fmt)
    out_f, in_f = weight.shape
    steps = torch.exp(log_scale.float()).reshape(out_f, in_f // group_of(in_f))
    codes = codes_from_grid(weight, steps, bits)
    # W = bf16(q * exp(log_scale)) where the trainer computed exp(): CUDA's fp32 exp differs from the
    # CPU's by an ulp for some inputs, which can move W to the neighbouring bf16 value, never further
    apart = bf16_ulps_apart(dequant(codes, steps), weight)
    assert int(apart.max()) <= 1, f"{name}: weight is not q * exp(log_scale) ({int((apart > 1).sum())} values off)"
    return {"codes": codes, "steps": steps, "weight": weight}


# -- engine layouts ---------------------------------------------------------------------------------

def gptq_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ qweight (in/pf, out): stored u = q + 2^(bits-1), packed along the input dimension."""
    return pack_bits(codes.t() + (1 << (bits - 1)), bits, dim=0)


def gptq_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ qweight (in/pf, out) -> signed codes (out, in)."""
    return (unpack_bits(qweight, bits, dim=0) - (1 << (bits - 1))).t().contiguous()


def cpuwna16_codes(weight_packed: torch.Tensor) -> torch.Tensor:
    """vLLM CPUWNA16's W4A16 layout (out/16, 2*in) int32 -> signed codes (out, in): blocks of 16
    output channels, per input row two words of 8 codes along the output dimension, u = q + 8."""
    blocks, two_in = weight_packed.shape
    inp = two_in // 2
    words = weight_packed.view(blocks, inp, 2).permute(1, 0, 2).reshape(inp, blocks * 2)
    return (unpack_bits(words, 4, dim=1) - 8).t().contiguous()


# -- standard checkpoints written from the files, for stock engines --------------------------------

def quantized_modules(path: str, fmt: str, files: dict | None = None) -> list[str]:
    """The quantized linears of a GRACE checkpoint, named by the tensors that only they have."""
    files = tensors(path) if files is None else files
    if fmt == "awq":
        return sorted(k[: -len(".qweight")] for k in files if k.endswith(".qweight"))
    keys = sidecar(path) if fmt == "qat-sidecar" else files
    return sorted(k[: -len(".log_scale")] for k in keys if k.endswith(".log_scale"))


def write_standard(src: str, dst: str, fmt: str, bits: int, to: str) -> str:
    """A checkpoint stock engines load without any plugin, written here from ``src``'s files:
    ``to="bf16"``: every quantized linear's weight W as the format defines it (bf16, the other
    tensors as they are); ``to="gptq"``: GPTQ v1 (sym, desc_act false) with the files' codes,
    qzeros 2^(bits-1) - 1, and the steps as scales (format A's fp32 steps rounded to bf16, AWQ's fp16
    scales as stored). Tokenizer and processor files are copied; the GRACE side files are not."""
    import json
    import shutil

    from safetensors.torch import save_file

    files = tensors(src)
    side = sidecar(src) if fmt == "qat-sidecar" else None
    modules = quantized_modules(src, fmt, files)
    out = {k: v for k, v in files.items() if not k.endswith((".log_scale", ".qweight", ".qzeros", ".scales"))}
    for name in modules:
        m = module(src, name, fmt, bits, files=files, side=side)
        out.pop(name + ".weight", None)
        if to == "bf16":
            out[name + ".weight"] = m["weight"]
            continue
        assert to == "gptq", to
        out_f, in_f = m["codes"].shape
        groups = m["steps"].shape[1]
        out[name + ".qweight"] = gptq_qweight(m["codes"], bits)
        out[name + ".qzeros"] = pack_bits(torch.full((groups, out_f), (1 << (bits - 1)) - 1), bits, dim=1)
        stored = files[name + ".scales"].dtype if fmt == "awq" else torch.bfloat16
        out[name + ".scales"] = m["steps"].t().to(stored).contiguous()
        out[name + ".g_idx"] = (torch.arange(in_f) // (in_f // groups)).to(torch.int32)
    os.makedirs(dst)
    skip = {"config.json", "model.safetensors.index.json", SIDECAR, "awq_quantized_modules.json"}
    for f in os.listdir(src):
        if f not in skip and not f.endswith(".safetensors") and os.path.isfile(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), os.path.join(dst, f))
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(dst, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config.pop("awq_packing", None)
    if to == "gptq":
        config["quantization_config"] = {
            "quant_method": "gptq", "bits": bits, "group_size": GROUP, "sym": True, "desc_act": False,
            "lm_head": False, "checkpoint_format": "gptq", "modules_in_block_to_quantize": modules}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return dst
