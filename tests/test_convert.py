"""grace-qat convert: bit-exact standard checkpoints, loadable by stock Transformers."""
import json
import os
import subprocess
import sys

import pytest

from requires import require
import torch

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
def src(tiny):
    return tiny["qat-sidecar"]


@pytest.fixture(scope="module")
def src8(tiny_checkpoint):
    return tiny_checkpoint("qat-sidecar", 8)


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


def test_gptq_export_for_fp16_rounds_the_fp32_steps_once(tmp_path, src):
    """SGLang serves original-layout LLaVA in fp16 whatever config.json says, and the plugin rounds the
    fp32 steps once to fp16 there: ``--dtype float16`` writes exactly those scales (not fp16 of the
    default export's bf16 scales, which differ) and says so in config.json; inspect --against agrees."""
    from grace_qat.cli import main as cli_main
    out = str(tmp_path / "gptq-fp16")
    assert cli_main(["convert", src, out, "--to", "gptq", "--dtype", "float16"]) == 0
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert (cfg.get("dtype") or cfg.get("torch_dtype")) == "float16"
    t = _tensors(out)
    side = torch.load(os.path.join(src, "qat_quantized_weights.bin"), weights_only=True)
    double_rounded = 0
    for name in GraceCheckpoint.open(src).modules:
        s32 = torch.exp(side[name + ".log_scale"].float()).reshape(t[name + ".scales"].shape[1], -1)
        assert t[name + ".scales"].dtype == torch.float16 and torch.equal(t[name + ".scales"], s32.t().half())
        double_rounded += int((s32.t().half() != s32.t().bfloat16().half()).sum())
    assert double_rounded > 0      # the bf16 export would not have given these numbers
    assert cli_main(["inspect", out, "--against", src]) == 0
    with pytest.raises(SystemExit):
        cli_main(["convert", src, str(tmp_path / "x"), "--to", "gptq", "--dtype", "float32"])


def test_awq_export_holds_the_source_codes(tmp_path, src):
    """The AWQ export decoded by plain nibble arithmetic (tests/reference.py, AutoAWQ order
    0,2,4,6,1,3,5,7, zero point 8) holds the source's codes and fp16(steps) for every module."""
    import reference
    out = str(tmp_path / "awq")
    convert(src, out, to="awq")
    assert GraceCheckpoint.open(out).format == "awq"
    exported, source, side = reference.tensors(out), reference.tensors(src), reference.sidecar(src)
    with open(os.path.join(out, "awq_quantized_modules.json")) as f:
        modules = json.load(f)["modules"]
    assert sorted(modules) == sorted(k[:-len(".log_scale")] for k in side if k.endswith(".log_scale"))
    for name in modules:
        ref = reference.module(src, name, "qat-sidecar", 4, files=source, side=side)
        got = reference.module(out, name, "awq", 4, files=exported)
        assert torch.equal(got["codes"], ref["codes"]), name
        assert torch.equal(exported[name + ".scales"], ref["steps"].t().half()), name


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
    require("compressed_tensors")
    transformers = require("transformers")
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


# -- nothing lost: atomic output, no silent overwrite, read-back ------------------------------------

def _dir_state(path):
    return {f: os.path.getsize(os.path.join(path, f)) for f in sorted(os.listdir(path))}


def test_existing_output_is_refused_without_force_and_replaced_with_it(tmp_path, src):
    out = tmp_path / "out"
    convert(src, str(out), to="bf16")
    before = _dir_state(out)
    with pytest.raises(Exception, match="already exists.*--force"):
        convert(src, str(out), to="gptq")
    assert _dir_state(out) == before                           # untouched
    r = subprocess.run([sys.executable, "-m", "grace_qat.cli", "convert", src, str(out), "--to", "gptq"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "--force" in (r.stderr + r.stdout)
    convert(src, str(out), to="gptq", force=True)
    assert "qweight" in json.dumps(sorted(_tensors(str(out))))  # now the GPTQ export
    assert sorted(os.listdir(tmp_path)) == ["out"]              # no temporary or old directory left


def test_failed_conversion_leaves_nothing_behind(tmp_path, src):
    """A checkpoint that fails verification half-way (one off-grid weight in the last layer) leaves
    neither an output directory nor a temporary one, and an existing output keeps its old content."""
    from safetensors.torch import load_file, save_file
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in os.listdir(src):
        if os.path.isfile(os.path.join(src, f)):
            data = open(os.path.join(src, f), "rb").read()
            (bad / f).write_bytes(data)
    st = next(f for f in os.listdir(bad) if f.endswith(".safetensors"))
    tensors = load_file(str(bad / st))
    name = sorted(k for k in tensors if ".layers.3." in k and k.endswith("down_proj.weight"))[0]
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] += tensors[name][0, 0].abs() * 0.37 + 1e-3   # off the grid
    save_file(tensors, str(bad / st), metadata={"format": "pt"})
    with pytest.raises(Exception, match="down_proj"):
        convert(str(bad), str(tmp_path / "new"), to="gptq")
    assert sorted(os.listdir(tmp_path)) == ["bad"]
    keep = tmp_path / "keep"
    convert(src, str(keep), to="bf16")
    before = _dir_state(keep)
    with pytest.raises(Exception, match="down_proj"):
        convert(str(bad), str(keep), to="gptq", force=True)
    assert _dir_state(keep) == before
    assert sorted(os.listdir(tmp_path)) == ["bad", "keep"]


def test_read_back_catches_a_corrupted_write(tmp_path):
    """verify() rereads every tensor: one flipped byte on disk is named by file and tensor."""
    from grace_qat.errors import GraceFormatError
    from grace_qat.shards import ShardWriter
    w = ShardWriter(str(tmp_path), verify=True)
    w.add("a.weight", torch.arange(64, dtype=torch.float32).reshape(8, 8))
    w.add("b.weight", torch.ones(4, dtype=torch.bfloat16))
    w.close()
    w.verify()                                                     # as written
    path = tmp_path / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40                                                # inside the last tensor's bytes
    path.write_bytes(bytes(raw))
    with pytest.raises(GraceFormatError, match=r"model\.safetensors: tensor [ab]\.weight does not read back"):
        w.verify()
