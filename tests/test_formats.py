"""The format registry and its one rank-level interface (grace_qat.formats), against the
independent references of tests/reference.py: what a rank loads, turned into codes and steps."""
import pytest
import torch

import reference
from grace_qat import formats
from grace_qat.checkpoint import GraceCheckpoint
from grace_qat.errors import GraceFormatError
from grace_qat.detection import detect_grace_format

QUANTIZED = ["qat-sidecar", "qat-inline", "qat-grid", "awq"]
M = "model.language_model.layers.1.mlp.down_proj"


def test_registry_lists_every_format_once_and_the_cli_offers_them():
    from grace_qat import synthetic
    from grace_qat.cli import build_parser
    assert formats.names() == ("qat-sidecar", "qat-inline", "qat-grid", "awq", "plain")
    assert formats.quantized_names() == tuple(QUANTIZED)
    assert synthetic.FORMATS == formats.names()
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert tuple(next(a for a in sub["fixture"]._actions if a.dest == "format").choices) == formats.names()
    with pytest.raises(ValueError):
        formats.register(formats.get("awq"))            # a name is registered once
    with pytest.raises(GraceFormatError, match="unknown GRACE format 'gptq'"):
        formats.get("gptq")


@pytest.mark.parametrize("fmt", QUANTIZED + ["plain"])
def test_detection_and_markers(tiny, fmt):
    ckpt = GraceCheckpoint.open(tiny[fmt])
    assert ckpt.format == fmt and isinstance(ckpt.format, str)
    # cheap markers: a bare grid and a plain checkpoint carry none
    assert detect_grace_format(tiny[fmt]) == (fmt if fmt in ("qat-sidecar", "qat-inline", "awq") else None)


def _loaded(ckpt, name, files, out_rows=None):
    """The tensors of Format.rank_tensors for one module at TP 1, as an engine's loader would hold
    them: stream tensors from the files (flat ones reshaped), checkpoint-fed ones from fed_tensor."""
    out_f, in_f = ckpt.module_shape(name)
    g = reference.group_of(in_f)
    specs = formats.get(ckpt.format).rank_tensors(out_f, in_f, in_f // g, torch.bfloat16)
    loaded = {}
    for t in specs:
        if t.source == "checkpoint":
            v = ckpt.fed_tensor(name, t.leaf)
        else:
            v = files[f"{name}.{t.leaf}"]
            if t.flat_in_checkpoint:
                v = v.reshape(t.shape)
        assert tuple(v.shape) == t.shape, (t.leaf, tuple(v.shape), t.shape)
        loaded[t.leaf] = v.to(t.dtype)
    return specs, loaded, g


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_rank_codes_equal_the_reference(tiny, fmt):
    ckpt = GraceCheckpoint.open(tiny[fmt])
    files = reference.tensors(tiny[fmt])
    side = reference.sidecar(tiny[fmt]) if fmt == "qat-sidecar" else None
    # qat-grid stores no steps: its codes are the sidecar fixture's (same seed, same weights)
    src, ref_fmt = (tiny["qat-sidecar"], "qat-sidecar") if fmt == "qat-grid" else (tiny[fmt], fmt)
    ref_side = reference.sidecar(src) if ref_fmt == "qat-sidecar" else side
    ref_files = reference.tensors(src)
    for name in ckpt.modules:
        specs, loaded, g = _loaded(ckpt, name, files)
        codes, steps = formats.get(ckpt.format).rank_codes(loaded, ckpt.bits, g, name)
        r = reference.module(src, name, ref_fmt, ckpt.bits, files=ref_files, side=ref_side)
        assert torch.equal(codes.long(), r["codes"]), name
        if fmt != "qat-grid":
            assert torch.equal(steps, r["steps"]), name
        else:   # derived: the same grid, so the same dequantized weight
            assert torch.equal(reference.dequant(codes.long(), steps), r["weight"]), name


def test_the_reference_reads_weights_whose_exp_was_rounded_elsewhere(tmp_path):
    """A checkpoint written on a GPU: its steps came from CUDA's exp(), one fp32 ulp above this CPU's
    for some groups (here: every group), which moves some weights to the neighbouring bf16 value. The
    reference still recovers the codes; a weight two bf16 steps off the grid is refused."""
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(7)
    out_f, in_f = 1024, 1024
    log_scale = torch.rand(out_f * in_f // 128, generator=gen) * 2 - 6             # fp32
    codes = torch.randint(-8, 8, (out_f, in_f), generator=gen)
    steps_here = torch.exp(log_scale).reshape(out_f, -1)
    weight = reference.dequant(codes, torch.nextafter(steps_here, torch.tensor(1.0)))
    moved = int((weight != reference.dequant(codes, steps_here)).sum())
    assert moved > 0, "no weight moved: the test plants nothing"
    name = "model.layers.0.mlp.down_proj"
    save_file({name + ".weight": weight, name + ".log_scale": log_scale}, str(tmp_path / "model.safetensors"))
    r = reference.module(str(tmp_path), name, "qat-inline", 4)
    assert torch.equal(r["codes"], codes)
    bits = weight.view(torch.int16).clone()
    bits[3, 5] += 2 if bits[3, 5] >= 0 else -2                        # two bf16 steps away from the grid
    save_file({name + ".weight": bits.view(torch.bfloat16), name + ".log_scale": log_scale},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(AssertionError, match="1 values off"):
        reference.module(str(tmp_path), name, "qat-inline", 4)


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_rank_codes_of_row_slices_are_slices(tiny, fmt):
    """Adapters hand over any slice of output rows (chunks, one module of a fused layer)."""
    ckpt = GraceCheckpoint.open(tiny[fmt])
    files = reference.tensors(tiny[fmt])
    specs, loaded, g = _loaded(ckpt, M, files)
    codes, steps = formats.get(ckpt.format).rank_codes(loaded, ckpt.bits, g, M)
    r0, r1 = 8, 24
    part = {}
    for t in specs:
        rows = slice(r0 // t.packed, r1 // t.packed)
        part[t.leaf] = loaded[t.leaf][rows] if t.output_dim == 0 else loaded[t.leaf][:, rows]
    c, s = formats.get(ckpt.format).rank_codes(part, ckpt.bits, g, M)
    assert torch.equal(c, codes[r0:r1]) and torch.equal(s, steps[r0:r1])


def test_rank_codes_refuse_what_the_files_would_refuse(tiny):
    ckpt = GraceCheckpoint.open(tiny["qat-inline"])
    specs, loaded, g = _loaded(ckpt, M, reference.tensors(tiny["qat-inline"]))
    nan = dict(loaded, log_scale=torch.full_like(loaded["log_scale"], float("nan")))
    with pytest.raises(GraceFormatError, match=f"{M}.log_scale: .* non-finite"):
        formats.get(ckpt.format).rank_codes(nan, ckpt.bits, g, M)
    off = dict(loaded, weight=loaded["weight"].clone())
    off["weight"][3, 5] = off["weight"][3, 5] * 1.01 + 1e-3
    with pytest.raises(GraceFormatError, match=r"off the quantization grid"):
        formats.get(ckpt.format).rank_codes(off, ckpt.bits, g, M)
    awq = GraceCheckpoint.open(tiny["awq"])
    specs, loaded, g = _loaded(awq, M, reference.tensors(tiny["awq"]))
    loaded["qzeros"] = loaded["qzeros"] - 1             # the lowest nibble 8 -> 7
    with pytest.raises(GraceFormatError, match="zero points differ from 8"):
        formats.get(awq.format).rank_codes(loaded, 4, g, M)


def test_layer_feeds_per_module_and_shard_id(tiny):
    """What an engine adapter feeds after loading (grace_qat.tensor_parallel): the sidecar's log-steps of
    each module behind a layer, with that module's loader shard id; nothing for formats whose
    stream carries them. Against tests/reference.py."""
    from grace_qat import tensor_parallel
    p = "model.language_model.layers.1."
    qkv = [p + f"self_attn.{x}_proj" for x in "qkv"]
    gate_up = [p + "mlp.gate_proj", p + "mlp.up_proj"]
    assert tensor_parallel.module_shards("l", "QKV", qkv, qkv=True, merged=False) == list(zip(qkv, "qkv"))
    assert tensor_parallel.module_shards("l", "Merged", gate_up, qkv=False, merged=True) == list(zip(gate_up, (0, 1)))
    assert tensor_parallel.module_shards("l", "Row", [M], qkv=False, merged=False) == [(M, None)]
    with pytest.raises(ValueError, match=r"layer l \(Column\) fuses checkpoint modules"):
        tensor_parallel.module_shards("l", "Column", gate_up, qkv=False, merged=False)
    for fmt in QUANTIZED:
        ckpt = GraceCheckpoint.open(tiny[fmt])
        specs = formats.get(ckpt.format).rank_tensors(8, 256, 2, torch.bfloat16)
        fed = list(tensor_parallel.checkpoint_feeds(ckpt, specs, list(zip(qkv, "qkv"))))
        if fmt != "qat-sidecar":
            assert fed == [], fmt
            continue
        files, side = reference.tensors(tiny[fmt]), reference.sidecar(tiny[fmt])
        assert [(leaf, args) for leaf, _, args in fed] == [("log_scale", (x,)) for x in "qkv"]
        for (_, full, _), name in zip(fed, qkv):
            steps = reference.module(tiny[fmt], name, fmt, ckpt.bits, files=files, side=side)["steps"]
            assert torch.equal(torch.exp(full), steps), name
