"""Reading GRACE checkpoints: detection, verified codes, and clear errors for broken inputs.

Expected codes are computed here from the raw files (safetensors + sidecar) with plain torch, not
through the reader under test."""
import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from grace_qat.checkpoint import GraceCheckpoint, load_sidecar
from grace_qat.errors import GraceFormatError
from ckpt_files import load_all_tensors as _all_tensors

Q0 = "model.language_model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def qwen_dirs(tiny_checkpoint):
    return {(fmt, bits): tiny_checkpoint(fmt, bits) for fmt, bits in [
        ("qat-sidecar", 4), ("qat-sidecar", 8), ("qat-inline", 4), ("qat-grid", 4), ("awq", 4), ("plain", 4)]}




def _copy(src, tmp_path, name="broken"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return str(dst)


@pytest.mark.parametrize("fmt,bits", [("qat-sidecar", 4), ("qat-sidecar", 8), ("qat-inline", 4),
                                      ("qat-grid", 4), ("awq", 4)])
def test_detects_format_bits_and_modules(qwen_dirs, fmt, bits):
    ckpt = GraceCheckpoint.open(qwen_dirs[(fmt, bits)])
    cfg = json.load(open(os.path.join(qwen_dirs[(fmt, bits)], "config.json")))
    layers = cfg["text_config"]["num_hidden_layers"]
    assert (ckpt.format, ckpt.bits, ckpt.group_size) == (fmt, bits, 128)
    assert len(ckpt.modules) == 7 * layers
    assert all("visual" not in m for m in ckpt.modules)


def test_plain_checkpoint_is_plain(qwen_dirs):
    ckpt = GraceCheckpoint.open(qwen_dirs[("plain", 4)])
    assert ckpt.format == "plain" and ckpt.modules == []


@pytest.mark.parametrize("bits", [4, 8])
def test_sidecar_codes_match_independent_math(qwen_dirs, bits):
    path = qwen_dirs[("qat-sidecar", bits)]
    raw = _all_tensors(path)
    side = torch.load(os.path.join(path, "qat_quantized_weights.bin"), weights_only=True)
    ckpt = GraceCheckpoint.open(path)
    for name in ckpt.modules[:7]:
        w = raw[name + ".weight"].float()
        s = torch.exp(side[name + ".log_scale"].float()).reshape(w.shape[0], -1)
        expected = torch.round(w.reshape(w.shape[0], s.shape[1], -1) / s[..., None]).reshape(w.shape)
        q = ckpt.quantized(name)
        assert torch.equal(q.codes.float(), expected)
        assert torch.equal(q.scales, s)
        # and the codes dequantize to the stored BF16 weight exactly
        assert torch.equal((q.codes.float().reshape(*s.shape, -1) * s[..., None]).reshape(w.shape)
                           .to(torch.bfloat16), raw[name + ".weight"])


def test_awq_codes_equal_sidecar_codes(qwen_dirs):
    a = GraceCheckpoint.open(qwen_dirs[("qat-sidecar", 4)])
    b = GraceCheckpoint.open(qwen_dirs[("awq", 4)])
    assert a.modules == b.modules
    for name in a.modules[:7]:
        qa, qb = a.quantized(name), b.quantized(name)
        assert torch.equal(qa.codes, qb.codes)
        assert torch.equal(qb.scales, qa.scales.half().float())


def test_inline_and_grid_agree_with_sidecar(qwen_dirs):
    a = GraceCheckpoint.open(qwen_dirs[("qat-sidecar", 4)])
    for fmt in ("qat-inline", "qat-grid"):
        b = GraceCheckpoint.open(qwen_dirs[(fmt, 4)])
        assert torch.equal(a.quantized(Q0).codes, b.quantized(Q0).codes), fmt


def test_sharded_checkpoint_with_index(tmp_path, qwen_dirs):
    src = qwen_dirs[("qat-sidecar", 4)]
    dst = _copy(src, tmp_path)
    raw = _all_tensors(dst)
    os.remove(os.path.join(dst, "model.safetensors"))
    names = sorted(raw)
    half = len(names) // 2
    files = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for f, ks in files.items():
        save_file({k: raw[k] for k in ks}, os.path.join(dst, f))
    json.dump({"metadata": {}, "weight_map": {k: f for f, ks in files.items() for k in ks}},
              open(os.path.join(dst, "model.safetensors.index.json"), "w"))
    ckpt = GraceCheckpoint.open(dst)
    assert ckpt.format == "qat-sidecar" and len(ckpt.modules) == len(GraceCheckpoint.open(src).modules)
    assert torch.equal(ckpt.quantized(ckpt.modules[-1]).codes,
                       GraceCheckpoint.open(src).quantized(ckpt.modules[-1]).codes)
    os.remove(os.path.join(dst, "model-00002-of-00002.safetensors"))
    with pytest.raises(GraceFormatError, match="model-00002-of-00002.safetensors: listed in .* but missing"):
        GraceCheckpoint.open(dst)


def _rewrite_sidecar(path, edit):
    side_path = os.path.join(path, "qat_quantized_weights.bin")
    side = dict(torch.load(side_path, weights_only=True))
    edit(side)
    torch.save(side, side_path)


def test_sidecar_missing_module(tmp_path, qwen_dirs):
    d = _copy(qwen_dirs[("qat-sidecar", 4)], tmp_path)
    _rewrite_sidecar(d, lambda s: [s.pop(Q0 + ".log_scale"), s.pop(Q0 + ".weight")])
    with pytest.raises(GraceFormatError, match=r"qat_quantized_weights.bin: no scales for 1 quantizable .*q_proj"):
        GraceCheckpoint.open(d)


def test_sidecar_extra_module(tmp_path, qwen_dirs):
    d = _copy(qwen_dirs[("qat-sidecar", 4)], tmp_path)
    extra = "model.language_model.layers.99.mlp.up_proj"
    _rewrite_sidecar(d, lambda s: s.update({extra + ".log_scale": torch.zeros(8), extra + ".weight": torch.zeros(2, 2)}))
    with pytest.raises(GraceFormatError, match=r"scales for 1 modules that have no weight .*layers.99.mlp.up_proj"):
        GraceCheckpoint.open(d)


@pytest.mark.parametrize("bad,match", [(float("nan"), "non-finite"), (float("inf"), "non-finite"),
                                       (-50.0, "outside the trained range")])
def test_bad_scales_named(tmp_path, qwen_dirs, bad, match):
    d = _copy(qwen_dirs[("qat-sidecar", 4)], tmp_path)

    def edit(s):
        s[Q0 + ".log_scale"] = s[Q0 + ".log_scale"].clone()
        s[Q0 + ".log_scale"][3] = bad
    _rewrite_sidecar(d, edit)
    with pytest.raises(GraceFormatError, match=rf"qat_quantized_weights.bin: {Q0}.log_scale: .*{match}"):
        GraceCheckpoint.open(d).quantized(Q0)


def test_wrong_scale_length_named(tmp_path, qwen_dirs):
    d = _copy(qwen_dirs[("qat-sidecar", 4)], tmp_path)
    _rewrite_sidecar(d, lambda s: s.update({Q0 + ".log_scale": s[Q0 + ".log_scale"][:-1].clone()}))
    with pytest.raises(GraceFormatError, match=rf"{Q0}.log_scale: expected \d+ groups"):
        GraceCheckpoint.open(d).quantized(Q0)


def test_off_grid_weight_named(tmp_path, qwen_dirs):
    d = _copy(qwen_dirs[("qat-sidecar", 4)], tmp_path)
    st = os.path.join(d, "model.safetensors")
    raw = load_file(st)
    w = raw[Q0 + ".weight"].float()
    w[0, 0] += w.abs().max() * 0.013
    raw[Q0 + ".weight"] = w.to(torch.bfloat16)
    save_file(raw, st)
    with pytest.raises(GraceFormatError, match=rf"model.safetensors: {Q0}.weight: 1 of \d+ values are off"):
        GraceCheckpoint.open(d).quantized(Q0)


def test_truncated_safetensors_named(tmp_path, qwen_dirs):
    d = _copy(qwen_dirs[("qat-sidecar", 4)], tmp_path)
    st = os.path.join(d, "model.safetensors")
    with open(st, "r+b") as f:
        f.truncate(os.path.getsize(st) // 2)
    with pytest.raises(GraceFormatError, match="model.safetensors"):
        ckpt = GraceCheckpoint.open(d)
        for m in ckpt.modules:
            ckpt.quantized(m)


def test_awq_zero_point_not_8(tmp_path, qwen_dirs):
    d = _copy(qwen_dirs[("awq", 4)], tmp_path)
    st = os.path.join(d, "model.safetensors")
    raw = load_file(st)
    qz = raw[Q0 + ".qzeros"].clone()
    qz[0, 0] = 0x77777777
    raw[Q0 + ".qzeros"] = qz
    save_file(raw, st)
    with pytest.raises(GraceFormatError, match=rf"model.safetensors: {Q0}.qzeros: \d+ zero points differ from 8"):
        GraceCheckpoint.open(d).quantized(Q0)


def test_bits_not_4_or_8(qwen_dirs):
    with pytest.raises(GraceFormatError, match="bits must be one of"):
        GraceCheckpoint.open(qwen_dirs[("qat-sidecar", 4)], bits=3)


def test_8bit_checkpoint_read_as_4bit_is_refused(qwen_dirs):
    ckpt = GraceCheckpoint.open(qwen_dirs[("qat-sidecar", 8)], bits=4)
    with pytest.raises(GraceFormatError, match="outside the 4-bit range"):
        ckpt.quantized(Q0)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/grace_qat_pwned",))


def test_malicious_sidecar_refused_without_running_code(tmp_path, qwen_dirs):
    d = _copy(qwen_dirs[("qat-sidecar", 4)], tmp_path)
    marker = "/tmp/grace_qat_pwned"
    if os.path.exists(marker):
        os.remove(marker)
    side = dict(torch.load(os.path.join(d, "qat_quantized_weights.bin"), weights_only=True))
    side["evil"] = _Payload()
    torch.save(side, os.path.join(d, "qat_quantized_weights.bin"))
    with pytest.raises(GraceFormatError, match="refused to load: it holds more than tensors"):
        load_sidecar(os.path.join(d, "qat_quantized_weights.bin"))
    with pytest.raises(GraceFormatError, match="refused to load"):
        GraceCheckpoint.open(d)
    assert not os.path.exists(marker)
    # a plain pickle (not torch.save) with the same payload is refused too
    with open(os.path.join(d, "qat_quantized_weights.bin"), "wb") as f:
        pickle.dump({"x": _Payload()}, f)
    with pytest.raises(GraceFormatError):
        load_sidecar(os.path.join(d, "qat_quantized_weights.bin"))
    assert not os.path.exists(marker)


def test_declared_format_must_match_the_files(tmp_path, qwen_dirs):
    d = _copy(qwen_dirs[("qat-sidecar", 4)], tmp_path)
    cfg_path = os.path.join(d, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["quantization_config"] = {"quant_method": "grace_qat", "format": "awq", "bits": 4, "group_size": 128}
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(GraceFormatError, match=r"config.json: quantization_config says format "
                                               r"'awq', but the files are format 'qat-sidecar'"):
        GraceCheckpoint.open(d)
    cfg["quantization_config"]["format"] = "qat-sidecar"
    json.dump(cfg, open(cfg_path, "w"))
    assert GraceCheckpoint.open(d).format == "qat-sidecar"
