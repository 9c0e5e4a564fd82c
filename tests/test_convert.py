"""grace-qat convert: bit-exact standard checkpoints, loadable by stock Transformers."""
import json
import os
import subprocess
import sys

import pytest
import torch

from grace_qat import fixtures
from grace_qat.checkpoint import GraceCheckpoint
from grace_qat.convert import convert
from ckpt_files import load_all_tensors as _tensors




def _unpack_loop(words, bits):
    """Little-endian nibble/byte extraction written out plainly (independent of grace_qat.packing)."""
    mask = (1 << bits) - 1
    w = words.to(torch.int64) & 0xFFFFFFFF
    parts = [(w >> (bits * k)) & mask for k in range(32 // bits)]
    return torch.stack(parts, dim=-1)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return fixtures.write_qwen3vl(str(tmp_path_factory.mktemp("src") / "w4"), size="tiny", fmt="qat-sidecar", bits=4)


@pytest.fixture(scope="module")
def src8(tmp_path_factory):
    return fixtures.write_qwen3vl(str(tmp_path_factory.mktemp("src8") / "w8"), size="tiny", fmt="qat-sidecar", bits=8)


def _reference_weight(src_dir, name):
    return _tensors(src_dir)[name + ".weight"]


@pytest.mark.parametrize("which", ["w4", "w8"])
def test_gptq_export_dequantizes_to_source_grid(tmp_path, src, src8, which):
    s = src if which == "w4" else src8
    bits = 4 if which == "w4" else 8
    out = str(tmp_path / "gptq")
    convert(s, out, to="gptq")
    cfg = json.load(open(os.path.join(out, "config.json")))
    qc = cfg["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == ("gptq", bits, 128, True, False)
    assert "awq_packing" not in cfg
    t = _tensors(out)
    ckpt = GraceCheckpoint.open(s)
    off = 2 ** (bits - 1)
    for name in ckpt.modules[:7]:
        qweight, scales = t[name + ".qweight"], t[name + ".scales"]
        u = _unpack_loop(qweight, bits)                 # (in/pf, out, pf)
        u = u.permute(0, 2, 1).reshape(-1, qweight.shape[1])        # (in, out)
        codes = (u - off).t().float()                                # (out, in)
        side = torch.load(os.path.join(s, "qat_quantized_weights.bin"), weights_only=True)
        s32 = torch.exp(side[name + ".log_scale"].float()).reshape(codes.shape[0], -1)
        w = (codes.reshape(*s32.shape, -1) * s32[..., None]).reshape(codes.shape).to(torch.bfloat16)
        assert torch.equal(w, _reference_weight(s, name)), name
        assert scales.dtype == torch.bfloat16 and torch.equal(scales, s32.t().to(torch.bfloat16))
    # everything else is copied untouched
    src_t = _tensors(s)
    for k, v in src_t.items():
        if k.rsplit(".", 1)[0] not in set(ckpt.modules):
            assert torch.equal(t[k], v), k
    assert os.path.exists(os.path.join(out, "tokenizer.json"))
    assert not os.path.exists(os.path.join(out, "qat_quantized_weights.bin"))


def test_awq_export_roundtrips_through_reader(tmp_path, src):
    out = str(tmp_path / "awq")
    convert(src, out, to="awq")
    a, b = GraceCheckpoint.open(src), GraceCheckpoint.open(out)
    assert b.format == "awq" and b.modules == a.modules
    for name in a.modules[:7]:
        assert torch.equal(a.quantized(name).codes, b.quantized(name).codes)


def test_awq_export_of_8bit_refused(tmp_path, src8):
    r = subprocess.run([sys.executable, "-m", "grace_qat.cli", "convert", src8, str(tmp_path / "x"), "--to", "awq"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "AWQ export is 4-bit only" in r.stderr


def test_grace_qat_tag_keeps_files_and_declares_method(tmp_path, src):
    out = str(tmp_path / "tagged")
    convert(src, out, to="grace_qat")
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert qc == {"quant_method": "grace_qat", "format": "qat-sidecar", "bits": 4, "group_size": 128}
    assert os.path.exists(os.path.join(out, "qat_quantized_weights.bin"))
    assert GraceCheckpoint.open(out).format == "qat-sidecar"


def test_compressed_tensors_export_loads_in_stock_transformers(tmp_path, src):
    """The Done-when of the converter: stock Transformers (with the compressed-tensors library)
    loads the export, and its logits match the dequantized model's."""
    pytest.importorskip("compressed_tensors")
    transformers = pytest.importorskip("transformers")
    ct_dir, bf16_dir = str(tmp_path / "ct"), str(tmp_path / "bf16")
    convert(src, ct_dir, to="compressed-tensors")
    convert(src, bf16_dir, to="bf16")
    # the bf16 export is exactly the source grid (dequantized with fp32 steps, as GRACE does)
    tb, ts = _tensors(bf16_dir), _tensors(src)
    assert all(torch.equal(tb[k], ts[k]) for k in ts)
    cls = transformers.AutoModelForImageTextToText
    ref = cls.from_pretrained(bf16_dir, dtype=torch.bfloat16).eval()
    ct = cls.from_pretrained(ct_dir, dtype=torch.bfloat16).eval()
    ids = torch.tensor([[5, 17, 42, 99, 123, 7, 8, 9, 250, 31]])
    with torch.no_grad():
        lr, lc = ref(input_ids=ids).logits.float(), ct(input_ids=ids).logits.float()
    rel = (lr - lc).norm() / lr.norm()
    assert rel < 2e-2, rel
    assert (lr.argmax(-1) == lc.argmax(-1)).float().mean() >= 0.8
    # after the forward, Transformers has decompressed every quantized linear: each must hold exactly
    # q * bf16(s), computed here from the source files (the only change is the scale's bf16 rounding)
    side = torch.load(os.path.join(src, "qat_quantized_weights.bin"), weights_only=True)
    modules = dict(ct.named_modules())
    for name in GraceCheckpoint.open(src).modules:
        w = ts[name + ".weight"].float()
        s32 = torch.exp(side[name + ".log_scale"].float()).reshape(w.shape[0], -1)
        q = torch.round(w.reshape(*s32.shape, -1) / s32[..., None])
        expected = (q * s32.to(torch.bfloat16).float()[..., None]).reshape(w.shape).to(torch.bfloat16)
        assert torch.equal(modules[name].weight.data, expected), name
