"""The SGLang plugin (grace_sglang) on a CPU-only machine, against the installed SGLang.

Run in the SGLang virtual environment:  .venv-sglang/bin/python -m pytest -m sglang tests/test_sglang_plugin.py
Skipped, with the reason shown, where SGLang is not importable.

Covered here: the entry point and ``register()``; SGLang's argument parser accepting
``--quantization grace_qat``; auto-detection through the model-config parser; ``ModelConfig`` and
SGLang's ``get_quant_config`` building ``GraceQATConfig`` from tiny fixtures; SGLang's own
QKV / merged-column / row-parallel layers sharding the BF16 weight and the per-group steps for
TP 1, 2 and 4 (ranks simulated the way each SGLang version lets layers be built), and the GPTQ
tensors handed to the Marlin kernel; a whole tiny Qwen3-VL built by SGLang on CPU with a real
(gloo, world size 1) parallel state, loaded through SGLang's weight loader, compared layer by layer
with stock SGLang GPTQ-Marlin on a GPTQ checkpoint tests/reference.py writes from the same files.

Not covered (needs a CUDA GPU, see tests/gpu/sglang_serve_check.py): the Marlin repack and GEMM
(SGLang compiles them with nvcc at first use and they only run on CUDA), serving, and outputs.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import subprocess
import sys

import pytest
from requires import require

pytestmark = pytest.mark.sglang

sglang = require(
    "sglang", reason="SGLang is not installed in this environment (tests for grace_sglang need "
                     "the .venv-sglang environment)")

import torch  # noqa: E402

from grace_qat.checkpoint import GraceCheckpoint  # noqa: E402
from grace_qat.errors import GraceFormatError  # noqa: E402
import reference  # noqa: E402  (tests/reference.py: plain code, nothing from grace_qat)
from ckpt_files import with_inline_log_scales  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu"))   # sglang_serve_check
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FORMATS_A = ["qat-sidecar", "qat-inline", "qat-grid"]


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """Tiny Qwen3-VL GRACE checkpoints: every format, plus an 8-bit one; `convert --to gptq` exports
    ("export:", tested against the files on their own) and, as stock SGLang's input, GPTQ checkpoints
    tests/reference.py writes from the files ("gptq:", plain code, nothing from grace_qat)."""
    from grace_qat.convert import convert
    from grace_qat.synthetic import write_qwen3vl
    from llava_fixtures import write_llava

    base = tmp_path_factory.mktemp("sglang_ckpts")
    out = {}
    for fmt in FORMATS_A + ["awq", "plain"]:
        out[fmt] = write_qwen3vl(str(base / fmt), fmt=fmt, bits=4, seed=0)
    out["w8"] = write_qwen3vl(str(base / "w8"), fmt="qat-sidecar", bits=8, seed=1)
    # format A whose safetensors still hold the log-steps next to the sidecar (issue 27)
    out["sidecar-spare"] = with_inline_log_scales(out["qat-sidecar"], str(base / "sidecar-spare"))
    for fmt in FORMATS_A + ["w8"]:          # each format's own GPTQ export
        out["export:" + fmt] = str(base / ("export-" + fmt))
        convert(out[fmt], out["export:" + fmt], to="gptq")
    out["llava-sidecar"] = write_llava(str(base / "llava-sidecar"), fmt="qat-sidecar", bits=4, seed=2)
    out["llava-awq"] = write_llava(str(base / "llava-awq"), fmt="awq", seed=3)
    # qat-grid stores no steps: its steps are derived, so no reference GPTQ checkpoint can hold them
    for key, fmt, bits in (("qat-sidecar", "qat-sidecar", 4), ("qat-inline", "qat-inline", 4),
                           ("w8", "qat-sidecar", 8), ("llava-sidecar", "qat-sidecar", 4)):
        out["gptq:" + key] = reference.write_standard(out[key], str(base / ("gptq-" + key)), fmt, bits, "gptq")
    out["declared"] = str(base / "declared")
    convert(out["qat-sidecar"], out["declared"], to="grace_qat")
    return out


@pytest.fixture(scope="session")
def plugins_loaded():
    from sglang.srt.plugins import load_plugins
    load_plugins()
    import grace_sglang
    grace_sglang.register()     # no-op when the entry point already ran; idempotent either way
    return True


def _sglang_version() -> str:
    return getattr(sglang, "__version__", "?")


def _text_cfg(path):
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    return cfg.get("text_config") or cfg


# -- registration and argument parsing ----------------------------------------------------------

def test_sglang_version_is_the_one_asked_for():
    """scripts/test.sh runs this suite on both ends of the supported range: make sure each run really
    imports the SGLang it names (the 0.5.17 run is an overlay on the 0.5.23 venv)."""
    expected = os.environ.get("GRACE_EXPECT_SGLANG")
    if expected is None:
        pytest.skip("GRACE_EXPECT_SGLANG not set (scripts/test.sh sets it)")
    assert _sglang_version() == expected


@pytest.mark.parametrize("module", ["huggingface_hub", "numpy", "PIL", "safetensors", "sentencepiece",
                                    "torch", "transformers"])
def test_suite_dependency_imports(module):
    """What this file needs next to SGLang imports in this venv: a missing one fails here instead of
    skipping the tests that use it (the vLLM venv's list: tests/test_dependencies.py)."""
    import importlib
    importlib.import_module(module)


def test_entry_point_declared():
    from importlib.metadata import entry_points
    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get("grace_qat") == "grace_sglang:register", eps
    # The group SGLang itself loads from must be the one we declare.
    from sglang.srt import plugins
    assert plugins.GENERAL_PLUGINS_GROUP == "sglang.srt.plugins"


def test_register_adds_method_and_cli_choice(plugins_loaded):
    import grace_sglang
    from grace_sglang.config import GraceQATConfig
    from sglang.srt.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
    from sglang.srt.server_args import QUANTIZATION_CHOICES

    grace_sglang.register()
    grace_sglang.register()
    assert QUANTIZATION_METHODS["grace_qat"] is GraceQATConfig
    assert get_quantization_config("grace_qat") is GraceQATConfig
    assert QUANTIZATION_CHOICES.count("grace_qat") == 1


def test_argument_parser_accepts_flag(plugins_loaded, ckpts):
    import argparse
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    ns = parser.parse_args(["--model-path", ckpts["qat-sidecar"], "--quantization", "grace_qat"])
    assert ns.quantization == "grace_qat"
    with pytest.raises(SystemExit):
        with contextlib.redirect_stderr(open(os.devnull, "w")):
            parser.parse_args(["--model-path", ckpts["qat-sidecar"], "--quantization", "not_a_method"])


def test_prepare_server_args(plugins_loaded, ckpts):
    from sglang.srt.server_args import prepare_server_args
    argv = ["--model-path", ckpts["qat-sidecar"], "--quantization", "grace_qat"]
    try:
        sa = prepare_server_args(argv)
    except RuntimeError as e:       # 0.5.17 resolves the device eagerly: "No accelerator ..."
        if "accelerator" not in str(e).lower():
            raise
        sa = prepare_server_args(argv + ["--device", "cpu"])
    assert sa.quantization == "grace_qat"


# -- model config, detection, quant config ------------------------------------------------------

@pytest.mark.parametrize("fmt,expected", [("qat-sidecar", "grace_qat"), ("qat-inline", "grace_qat"),
                                          ("awq", "grace_qat"), ("qat-grid", None), ("plain", None),
                                          ("declared", "grace_qat")])
def test_model_config_autodetect(plugins_loaded, ckpts, fmt, expected):
    from sglang.srt.configs.model_config import ModelConfig
    mc = ModelConfig(model_path=ckpts[fmt])
    assert mc.quantization == expected
    assert mc.hf_config.architectures == ["Qwen3VLForConditionalGeneration"]
    assert mc.dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", ["llava-sidecar", "llava-awq"])
def test_model_config_llava(plugins_loaded, ckpts, fmt):
    """Original-layout LLaVA-1.5: detected, and run in fp16 as SGLang forces for LlavaLlamaForCausalLM."""
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_loader.weight_utils import get_quant_config
    mc = ModelConfig(model_path=ckpts[fmt])
    assert mc.quantization == "grace_qat"
    assert mc.hf_config.architectures == ["LlavaLlamaForCausalLM"]
    assert mc.dtype == torch.float16
    qc = get_quant_config(mc, LoadConfig(), {})
    assert qc.format == fmt.split("-", 1)[1].replace("sidecar", "qat-sidecar")
    assert qc.checkpoint_modules("model.layers.3.mlp.gate_up_proj") == [
        "model.layers.3.mlp.gate_proj", "model.layers.3.mlp.up_proj"]
    assert qc.checkpoint_modules("model.mm_projector.0") is None


def test_model_config_flag_for_bare_grid(plugins_loaded, ckpts):
    from sglang.srt.configs.model_config import ModelConfig
    mc = ModelConfig(model_path=ckpts["qat-grid"], quantization="grace_qat")
    assert mc.quantization == "grace_qat"


def test_autodetect_can_be_turned_off(plugins_loaded, ckpts, monkeypatch):
    from sglang.srt.configs.model_config_parser_registry import get_model_config_parser
    from grace_sglang.parser import install_config_parser
    try:
        install_config_parser(wrap_hf=False)
        cfg = get_model_config_parser("hf").parse(ckpts["qat-sidecar"], trust_remote_code=False)
        assert getattr(cfg, "quantization_config", None) is None
        cfg = get_model_config_parser("grace_qat").parse(ckpts["qat-sidecar"], trust_remote_code=False)
        assert cfg.quantization_config["quant_method"] == "grace_qat"
    finally:
        install_config_parser(wrap_hf=True)
    cfg = get_model_config_parser("hf").parse(ckpts["qat-sidecar"], trust_remote_code=False)
    assert cfg.quantization_config["format"] == "qat-sidecar"


@pytest.mark.parametrize("fmt,bits", [("qat-sidecar", 4), ("qat-inline", 4), ("awq", 4), ("w8", 8),
                                      ("declared", 4)])
def test_get_quant_config(plugins_loaded, ckpts, fmt, bits):
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_loader.weight_utils import get_quant_config
    from grace_sglang.config import GraceQATConfig

    mc = ModelConfig(model_path=ckpts[fmt])
    qc = get_quant_config(mc, LoadConfig(), {"qkv_proj": ["q_proj", "k_proj", "v_proj"]})
    assert isinstance(qc, GraceQATConfig)
    ckpt = qc.checkpoint()
    assert os.path.samefile(ckpt.path, ckpts[fmt])
    assert qc.bits == bits and qc.group_size == 128 and len(ckpt.modules) == 28
    assert qc.get_name() == "grace_qat" and qc.get_min_capability() == 80
    assert torch.bfloat16 in qc.get_supported_act_dtypes() and torch.float16 in qc.get_supported_act_dtypes()
    assert qc.get_scaled_act_names() == []
    expected_type = {4: "uint4b8", 8: "uint8b128"}[bits] if fmt != "awq" else "uint4"
    assert expected_type in str(qc.quant_type)


def test_quant_method_selection(plugins_loaded, ckpts):
    from sglang.srt.layers.linear import LinearBase
    from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod
    from grace_sglang.config import GraceQATConfig
    from grace_sglang.linear import GraceQATLinearMethod

    qc = GraceQATConfig(ckpts["qat-sidecar"])
    lin = LinearBase(8, 8)
    p = "model.language_model.layers.2."
    m = qc.get_quant_method(lin, p + "self_attn.qkv_proj")
    assert isinstance(m, GraceQATLinearMethod)
    assert m.names == [f"model.language_model.layers.2.self_attn.{x}_proj" for x in "qkv"]
    assert qc.get_quant_method(lin, p + "mlp.gate_up_proj").names == [
        "model.language_model.layers.2.mlp.gate_proj", "model.language_model.layers.2.mlp.up_proj"]
    assert qc.get_quant_method(lin, p + "mlp.down_proj").names == [p + "mlp.down_proj"]
    # LLaVA-style prefixes map onto the same decoder-layer names
    assert qc.get_quant_method(lin, "model.layers.2.self_attn.o_proj").names == [p + "self_attn.o_proj"]
    for unq in ("model.visual.blocks.0.attn.qkv_proj", "model.visual.merger.linear_fc1",
                "model.visual.deepstack_merger_list.0.linear_fc2", "model.visual.blocks.1.mlp.linear_fc1"):
        assert isinstance(qc.get_quant_method(lin, unq), UnquantizedLinearMethod), unq
    assert qc.get_quant_method(torch.nn.Embedding(4, 4), "lm_head") is None
    assert qc.get_quant_method(torch.nn.Module(), "model.language_model.layers.0.self_attn.attn") is None
    if hasattr(qc, "is_linear_unquantized"):      # 0.5.23
        assert qc.is_linear_unquantized("model.visual.merger.linear_fc1")
        assert not qc.is_linear_unquantized(p + "mlp.down_proj")


def test_bad_checkpoints_are_refused(plugins_loaded, ckpts, tmp_path):
    import shutil
    from grace_sglang.config import GraceQATConfig

    with pytest.raises(GraceFormatError, match="plain checkpoint"):
        GraceQATConfig(ckpts["plain"])
    with pytest.raises(GraceFormatError, match="not a local directory"):
        GraceQATConfig(str(tmp_path / "missing"))
    with pytest.raises(GraceFormatError, match="says format"):
        GraceQATConfig(ckpts["qat-sidecar"], fmt="awq")
    # AWQ zero points other than 8 are refused before anything is loaded
    from safetensors.torch import load_file, save_file
    bad = tmp_path / "awq_bad_zp"
    shutil.copytree(ckpts["awq"], bad)
    st = os.path.join(bad, "model.safetensors")
    tensors = load_file(st)
    key = "model.language_model.layers.1.mlp.up_proj.qzeros"
    tensors[key] = tensors[key] ^ 1            # zero point 8 -> 9 in the lowest nibble
    save_file(tensors, st)
    with pytest.raises(GraceFormatError, match="zero points differ from 8"):
        GraceQATConfig(str(bad))


# -- parallel linear layers: weight and step sharding ---------------------------------------------

def tp_partition(rank: int, size: int):
    """Build layers as TP rank ``rank`` of ``size`` without other processes, on the GPU where there
    is one (as a GPU server builds them), through the serve check's helper."""
    from sglang_serve_check import tp_partition as partition
    return partition(rank, size, device="cuda" if torch.cuda.is_available() else "cpu")


def _build_layer0(qc, path, rank, size, dtype=torch.bfloat16, tensors=None):
    """SGLang's four quantizable layers of decoder layer 0, loaded as the Qwen3-VL model does
    (at TP 4 without o_proj, whose 256 inputs = 2 groups cannot be split 4 ways), from the GRACE
    checkpoint at ``path`` or, for stock SGLang's layers, from ``tensors`` (name -> tensor)."""
    from sglang.srt.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                          RowParallelLinear)
    tc = _text_cfg(path)
    h, inter = tc["hidden_size"], tc["intermediate_size"]
    nh, nkv, hd = tc["num_attention_heads"], tc["num_key_value_heads"], tc["head_dim"]
    p = "model.language_model.layers.0."
    ckpt = GraceCheckpoint.open(path) if tensors is None else None
    names = ckpt.tensors if tensors is None else tensors
    get = ckpt.tensors.get if tensors is None else tensors.__getitem__
    with tp_partition(rank, size) as kw:
        layers = {
            "qkv": QKVParallelLinear(h, hd, nh, nkv, bias=False, quant_config=qc, params_dtype=dtype,
                                     prefix=p + "self_attn.qkv_proj", **kw),
            "gate_up": MergedColumnParallelLinear(h, [inter, inter], bias=False, quant_config=qc,
                                                  params_dtype=dtype, prefix=p + "mlp.gate_up_proj", **kw),
            "down": RowParallelLinear(inter, h, bias=False, quant_config=qc, params_dtype=dtype,
                                      prefix=p + "mlp.down_proj", **kw),
        }
        if (nh * hd) // size % 128 == 0:
            layers["o"] = RowParallelLinear(nh * hd, h, bias=False, quant_config=qc, params_dtype=dtype,
                                            prefix=p + "self_attn.o_proj", **kw)
        feeds = {"qkv": [(f"self_attn.{x}_proj", x) for x in "qkv"], "o": [("self_attn.o_proj", None)],
                 "gate_up": [("mlp.gate_proj", 0), ("mlp.up_proj", 1)], "down": [("mlp.down_proj", None)]}
        feeds = {k: v for k, v in feeds.items() if k in layers}
        for key, parts in feeds.items():
            layer = layers[key]
            params = dict(layer.named_parameters())
            for mod, shard in parts:
                # what the model's load_weights hands this layer: every tensor of the module in the files
                leaves = [leaf for leaf in ("weight", "log_scale", "qweight", "qzeros", "scales", "g_idx")
                          if f"{p}{mod}.{leaf}" in names]
                assert leaves, (path, mod)
                for leaf in leaves:
                    param = params[leaf]
                    args = () if shard is None else (shard,)
                    param.weight_loader(param, get(p + mod + "." + leaf), *args)
    return layers, ckpt


def _expected_rows(t, rank, size, replicas=1):
    n = t.shape[0] * replicas // size
    r = rank // replicas
    return t[r * n:(r + 1) * n]


def _reference_modules(ckpt, mods):
    """Per module (weight, steps, codes) from the files with plain code (tests/reference.py). qat-grid
    stores no steps: its codes are those of the qat-sidecar fixture with the same weights (seed 0),
    its steps None (derived by the plugin; checked against the learned ones separately)."""
    p = "model.language_model.layers.0."
    src, fmt = ckpt.path, ckpt.format
    if fmt == "qat-grid":
        src, fmt = os.path.join(os.path.dirname(ckpt.path), "qat-sidecar"), "qat-sidecar"
    files = reference.tensors(src)
    side = reference.sidecar(src) if fmt == "qat-sidecar" else None
    out = []
    for mod in mods:
        r = reference.module(src, p + mod, fmt, ckpt.bits, files=files, side=side)
        w = ckpt.tensors.get(p + mod + ".weight")
        assert torch.equal(w, r["weight"]), (ckpt.path, mod, "weights differ from the reference's source")
        out.append((r["weight"], None if ckpt.format == "qat-grid" else r["steps"], r["codes"]))
    return out


def _expected(ckpt, key, rank, size, nkv):
    """Per-rank (weight, steps, codes) expected for one SGLang layer, from the checkpoint files alone
    (steps None for qat-grid)."""
    mods = {"qkv": [f"self_attn.{x}_proj" for x in "qkv"], "o": ["self_attn.o_proj"],
            "gate_up": ["mlp.gate_proj", "mlp.up_proj"], "down": ["mlp.down_proj"]}[key]
    ws, ss, cs = [], [], []
    for i, (w, s, c) in enumerate(_reference_modules(ckpt, mods)):
        if key in ("o", "down"):            # row parallel: split the input columns (whole groups)
            k = w.shape[1] // size
            g = k // ckpt.group_size
            w, c = w[:, rank * k:(rank + 1) * k], c[:, rank * k:(rank + 1) * k]
            s = None if s is None else s[:, rank * g:(rank + 1) * g]
        else:                                # column parallel: split the output rows
            rep = max(1, size // nkv) if key == "qkv" and i > 0 else 1
            w, c = _expected_rows(w, rank, size, rep), _expected_rows(c, rank, size, rep)
            s = None if s is None else _expected_rows(s, rank, size, rep)
        ws.append(w), ss.append(s), cs.append(c)
    return torch.cat(ws), None if ss[0] is None else torch.cat(ss), torch.cat(cs)


@pytest.mark.parametrize("fmt", FORMATS_A + ["w8", "sidecar-spare"])
@pytest.mark.parametrize("tp,rank", [(1, 0), (2, 0), (2, 1), (4, 0), (4, 3)])
def test_layers_shard_weights_and_steps(plugins_loaded, ckpts, fmt, tp, rank):
    from grace_sglang.config import GraceQATConfig
    path = ckpts[fmt]
    qc = GraceQATConfig(path)
    layers, ckpt = _build_layer0(qc, path, rank, tp)
    nkv = _text_cfg(path)["num_key_value_heads"]
    for key, layer in layers.items():
        w_exp, s_exp, c_exp = _expected(ckpt, key, rank, tp, nkv)
        assert torch.equal(layer.weight.data, w_exp), (fmt, tp, rank, key, "weight")
        # the log-steps this rank holds (inline: from the weight stream; sidecar: fed after loading)
        layer.quant_method.feed_from_checkpoint(layer)
        assert hasattr(layer, "log_scale") == (s_exp is not None), (fmt, key)
        if s_exp is not None:
            assert torch.equal(torch.exp(layer.log_scale.data), s_exp), (fmt, tp, rank, key, "log_scale")
        # recover + verify + GPTQ layout; decoded by plain code (tests/reference.py), not grace_qat
        codes, steps = layer.quant_method.pack_gptq_layout(layer)
        if s_exp is None:                    # qat-grid: derived from the grid, close to the learned steps
            s_learned = _expected(GraceCheckpoint.open(os.path.join(os.path.dirname(path), "qat-sidecar")),
                                  key, rank, tp, nkv)[1]
            assert bool(((steps - s_learned).abs() <= 2 ** -7 * s_learned).all()), (fmt, tp, rank, key, "steps")
        else:
            assert torch.equal(steps, s_exp), (fmt, tp, rank, key, "steps")
        assert torch.equal(codes.to(c_exp.dtype), c_exp), (fmt, tp, rank, key, "codes")
        assert torch.equal(reference.gptq_codes(layer.qweight.data, ckpt.bits), c_exp), (fmt, tp, rank, key, "qweight")
        assert torch.equal(layer.qweight.data, reference.gptq_qweight(c_exp, ckpt.bits)), (fmt, tp, rank, key)
        assert torch.equal(layer.scales.data, steps.t().to(torch.bfloat16)), (fmt, tp, rank, key, "scales")
        params = dict(layer.named_parameters())
        assert "weight" not in params and "log_scale" not in params


@pytest.mark.parametrize("fmt", FORMATS_A + ["w8"])
def test_gptq_exports_hold_the_source_codes(ckpts, fmt):
    """`grace-qat convert --to gptq` (what a user feeds stock SGLang), decoded by plain code, holds
    the files' codes and steps (qat-grid: codes of the same weights' sidecar fixture, steps within
    bf16 rounding of the learned ones)."""
    bits = 8 if fmt == "w8" else 4
    src = ckpts["qat-sidecar" if fmt == "qat-grid" else fmt]
    src_fmt = "qat-sidecar" if fmt in ("qat-grid", "w8") else fmt
    out = reference.tensors(ckpts["export:" + fmt])
    files = reference.tensors(src)
    side = reference.sidecar(src) if src_fmt == "qat-sidecar" else None
    names = sorted(k[:-len(".qweight")] for k in out if k.endswith(".qweight"))
    assert len(names) == 7 * _text_cfg(src)["num_hidden_layers"]
    for name in names:
        ref = reference.module(src, name, src_fmt, bits, files=files, side=side)
        assert torch.equal(reference.gptq_codes(out[name + ".qweight"], bits), ref["codes"]), (fmt, name)
        zeros = reference.unpack_bits(out[name + ".qzeros"], bits, dim=1)
        assert bool((zeros == (1 << (bits - 1)) - 1).all()), (fmt, name, "GPTQ v1 zeros")
        want = ref["steps"].t()
        got = out[name + ".scales"].float()
        if fmt == "qat-grid":
            assert bool(((got - want).abs() <= 2 ** -7 * want).all()), (fmt, name)
        else:
            assert torch.equal(got, want.to(out[name + ".scales"].dtype).float()), (fmt, name)


def test_kv_head_replication_tp4(plugins_loaded, ckpts):
    """TP 4 with 2 KV heads: k/v rows (and their steps) are replicated on pairs of ranks."""
    from sglang.srt.layers.linear import QKVParallelLinear
    from grace_sglang.config import GraceQATConfig
    path = ckpts["qat-sidecar"]
    qc = GraceQATConfig(path)
    tc = _text_cfg(path)
    ckpt = qc.checkpoint()
    p = "model.language_model.layers.0.self_attn."
    for rank in range(4):
        with tp_partition(rank, 4) as kw:
            layer = QKVParallelLinear(tc["hidden_size"], tc["head_dim"], tc["num_attention_heads"],
                                      tc["num_key_value_heads"], bias=False, quant_config=qc,
                                      params_dtype=torch.bfloat16, prefix=p + "qkv_proj", **kw)
            for x in "qkv":
                layer.weight.weight_loader(layer.weight, ckpt.tensors.get(f"{p}{x}_proj.weight"), x)
        w_exp, s_exp, c_exp = _expected(ckpt, "qkv", rank, 4, tc["num_key_value_heads"])
        assert torch.equal(layer.weight.data, w_exp), rank
        layer.quant_method.feed_from_checkpoint(layer)      # the sidecar's log-steps, shard by shard
        assert torch.equal(torch.exp(layer.log_scale.data), s_exp), rank
        codes, steps = layer.quant_method.pack_gptq_layout(layer)
        assert torch.equal(steps, s_exp), rank
        assert torch.equal(codes.to(c_exp.dtype), c_exp), rank


def test_tp_that_splits_groups_is_refused(plugins_loaded, ckpts):
    from sglang.srt.layers.linear import RowParallelLinear
    from grace_sglang.config import GraceQATConfig
    qc = GraceQATConfig(ckpts["qat-sidecar"])
    tc = _text_cfg(ckpts["qat-sidecar"])
    # o_proj: in_features 256 = 2 groups of 128; TP 4 would give each rank half a group
    with tp_partition(0, 4) as kw:
        with pytest.raises(GraceFormatError, match=r"tensor parallel size 4 splits in_features 256"):
            RowParallelLinear(tc["num_attention_heads"] * tc["head_dim"], tc["hidden_size"], bias=False,
                              quant_config=qc, params_dtype=torch.bfloat16,
                              prefix="model.language_model.layers.0.self_attn.o_proj", **kw)


def test_marlin_handoff(plugins_loaded, ckpts, monkeypatch):
    """process_weights_after_loading gives SGLang's GPTQMarlinLinearKernel the GPTQ tensors and the
    layer config GPTQMarlinLinearMethod would (the kernel itself is CUDA-only: stubbed here)."""
    import sglang.srt.layers.quantization  # noqa: F401
    from sglang.srt.hardware_backend.gpu.quantization import gptq_kernels
    from sglang.srt.layers.quantization import marlin_utils
    from grace_sglang.config import GraceQATConfig

    seen = {}

    def fake_process(self, layer):
        seen["config"] = self.kernel_config
        seen["params"] = {k: (tuple(v.shape), v.dtype, type(v).__name__) for k, v in layer.named_parameters()}

    def fake_apply(self, layer, x, bias=None):
        return ("marlin", x.shape)

    monkeypatch.setattr(gptq_kernels.GPTQMarlinLinearKernel, "process_weights_after_loading", fake_process)
    monkeypatch.setattr(gptq_kernels.GPTQMarlinLinearKernel, "apply", fake_apply)
    monkeypatch.setattr(marlin_utils, "verify_marlin_supported", lambda **kw: None)
    for fmt, bits in (("qat-sidecar", 4), ("w8", 8)):
        qc = GraceQATConfig(ckpts[fmt])
        layers, _ = _build_layer0(qc, ckpts[fmt], 1, 2)
        down = layers["down"]
        down.quant_method.process_weights_after_loading(down)
        c = seen["config"]
        inter, h = _text_cfg(ckpts[fmt])["intermediate_size"], _text_cfg(ckpts[fmt])["hidden_size"]
        assert c.full_weight_shape == (inter, h) and c.partition_weight_shape == (inter // 2, h)
        assert c.group_size == 128 and not c.zero_points and not c.has_g_idx
        assert c.act_type == torch.bfloat16
        assert str(c.weight_type) == {4: "uint4b8", 8: "uint8b128"}[bits]
        assert seen["params"] == {
            "qweight": ((inter // 2 * bits // 32, h), torch.int32, "PackedvLLMParameter"),
            "scales": ((inter // 2 // 128, h), torch.bfloat16, "GroupQuantScaleParameter")}
        x = torch.zeros(3, inter // 2, dtype=torch.bfloat16)
        assert down.quant_method.apply(down, x) == ("marlin", x.shape)
        down.quant_method.process_weights_after_loading(down)     # a second call is a no-op


def _stub_marlin(monkeypatch=None):
    """SGLang's Marlin kernel is CUDA-only: its set-up does nothing here, and it answers every call
    with 7s (the tests tell its output from the second kernel's by that)."""
    import sglang.srt.layers.quantization  # noqa: F401
    from sglang.srt.hardware_backend.gpu.quantization import gptq_kernels
    from sglang.srt.layers.quantization import marlin_utils

    def apply(self, layer, x, bias=None):
        return torch.full((*x.shape[:-1], self.kernel_config.partition_weight_shape[1]), 7.0, dtype=x.dtype)

    for owner, name, value in ((gptq_kernels.GPTQMarlinLinearKernel, "process_weights_after_loading",
                                lambda self, layer: None), (gptq_kernels.GPTQMarlinLinearKernel, "apply", apply),
                               (marlin_utils, "verify_marlin_supported", lambda **kw: None)):
        (monkeypatch.setattr if monkeypatch else setattr)(owner, name, value)


def _second_kernel_table(path, ckpt_path, version, max_m=4) -> str:
    """A kernel table for this machine ("cpu" without a GPU), SGLang ``version``: the tiny checkpoint's
    down_proj shape at TP 1 gets grace_qat's Triton kernel next to Marlin for M <= ``max_m``."""
    from grace_qat.kernels.table import device_name, shape_key
    tc = _text_cfg(ckpt_path)
    key = shape_key(4, 128, tc["hidden_size"], tc["intermediate_size"])
    with open(path, "w") as f:
        json.dump({"device": device_name(), "engine": "sglang", "engine_version": version, "measured": "a test",
                   "shapes": {key: {"large": "GPTQMarlinLinearKernel", "small": "TritonWNA16Kernel",
                                    "max_m": max_m, "gain": 1.2, "configs": [[4, [4, 16, 16, 2, 0, 1, 1]]]}}}, f)
    return str(path)


@pytest.mark.parametrize("case", ["measured", "other-sglang-version", "dual-kernel-off"])
def test_second_kernel_only_where_this_sglang_version_measured_one(plugins_loaded, ckpts, monkeypatch,
                                                                   tmp_path, case):
    """A layer keeps a second copy for grace_qat's kernel only where a table of this device and this
    SGLang version says so, and never with GRACE_QAT_DUAL_KERNEL=0; one copy (Marlin alone) otherwise."""
    require("triton")
    from grace_qat.kernels.mixed_mm import KernelDispatch
    from grace_sglang.config import GraceQATConfig
    _stub_marlin(monkeypatch)
    version = _sglang_version() if case != "other-sglang-version" else "0.0.1"
    monkeypatch.setenv("GRACE_QAT_CROSSOVER_FILE", _second_kernel_table(tmp_path / "t.json", ckpts["qat-sidecar"], version))
    if case == "dual-kernel-off":
        monkeypatch.setenv("GRACE_QAT_DUAL_KERNEL", "0")
    layers, _ = _build_layer0(GraceQATConfig(ckpts["qat-sidecar"]), ckpts["qat-sidecar"], 0, 1)
    for key, layer in layers.items():
        layer.quant_method.process_weights_after_loading(layer)
        d = layer.quant_method.dispatch
        if case == "measured" and key == "down":
            tc = _text_cfg(ckpts["qat-sidecar"])
            assert type(d.small).__name__ == "TritonWNA16Kernel" and d.max_m == 4
            holder = getattr(layer, KernelDispatch.HOLDER)
            assert holder.weight_packed.shape == (tc["hidden_size"], tc["intermediate_size"] // 8)
        else:                       # not measured: no second copy
            assert d is None and not hasattr(layer, KernelDispatch.HOLDER), (case, key)


def test_second_kernel_computes_the_checkpoints_product(plugins_loaded, ckpts, tmp_path):
    """Up to max_m tokens the layer runs grace_qat's Triton kernel on its own copy (Triton's
    interpreter, in a worker: it must be chosen before Triton is first imported), and the output is
    x @ (code * bf16(step)).T from the checkpoint files (tests/reference.py) up to bf16 rounding;
    above max_m it runs Marlin (stubbed: 7s)."""
    require("triton")
    ckpt = GraceCheckpoint.open(ckpts["qat-sidecar"])
    nkv = _text_cfg(ckpts["qat-sidecar"])["num_key_value_heads"]
    _, steps, codes = _expected(ckpt, "down", 0, 1, nkv)
    w_dq = codes.double() * steps.to(torch.bfloat16).double().repeat_interleave(128, dim=1)
    g = torch.Generator().manual_seed(3)
    xs = {m: torch.randn(m, codes.shape[1], generator=g).to(torch.bfloat16) for m in (1, 3, 4, 5)}
    spec = {"ckpt": ckpts["qat-sidecar"], "xs": {m: x.float().tolist() for m, x in xs.items()},
            "table": _second_kernel_table(tmp_path / "t.json", ckpts["qat-sidecar"], _sglang_version())}
    r = _run_worker("second-kernel", spec, tmp_path, env_extra={"TRITON_INTERPRET": "1"})
    for m, x in xs.items():
        y = torch.tensor(r["ys"][str(m)], dtype=torch.float64)
        if m > 4:
            assert torch.all(y == 7.0), m
            continue
        ref = x.double() @ w_dq.t()
        err = ((y - ref).norm() / ref.norm()).item()
        assert err < 2 ** -8, (m, err)
    assert r["calls"].get("TritonWNA16Kernel") == 3 and r["calls"].get("GPTQMarlinLinearKernel") == 1, r["calls"]


@pytest.mark.parametrize("env,table,expected", [
    ({}, None, "GPTQMarlinLinearKernel"),                                   # stock SGLang's default
    ({"GRACE_QAT_SGLANG_KERNEL": "humming"}, None, "HummingLinearMethod"),  # the user's choice
    ({}, "this", "HummingLinearMethod"),                                     # measured here: faster
    ({"GRACE_QAT_SGLANG_KERNEL": "marlin"}, "this", "GPTQMarlinLinearKernel"),   # the user's choice wins
    ({"GRACE_QAT_DUAL_KERNEL": "0"}, "this", "GPTQMarlinLinearKernel"),     # stock's choice, nothing else
    ({}, "other-version", "GPTQMarlinLinearKernel"),                         # measured with another SGLang
    ({}, "this-w8", "GPTQMarlinLinearKernel"),                               # measured on W8, the layer is W4
])
def test_the_sglang_kernel_is_the_users_then_the_measured_then_marlin(plugins_loaded, monkeypatch, tmp_path,
                                                                      env, table, expected):
    from grace_sglang.linear import engine_kernel
    for name in ("GRACE_QAT_SGLANG_KERNEL", "GRACE_QAT_DUAL_KERNEL", "GRACE_QAT_CROSSOVER_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if table:
        path = tmp_path / "t.json"
        from grace_qat.kernels.table import device_name
        path.write_text(json.dumps({
            "device": device_name(), "engine": "sglang", "measured": "a test", "shapes": {},
            "engine_version": "0.0.1" if table == "other-version" else _sglang_version(),
            "engine_default": {"instead_of": "GPTQMarlinLinearKernel", "use": "HummingLinearMethod",
                               "bits": [8] if table == "this-w8" else [4, 8]}}))
        monkeypatch.setenv("GRACE_QAT_CROSSOVER_FILE", str(path))
    name, why = engine_kernel(4)
    assert name == expected, why


def test_the_shipped_h100_table_runs_w4_on_humming_with_the_sglang_it_was_measured_on(plugins_loaded, monkeypatch):
    """The shipped H100 table (2026-12-07: stock SGLang 0.5.23 decoded faster with --quantization humming
    than with its GPTQ-Marlin at every batch): W4 layers on an H100 with SGLang 0.5.23 run Humming, with
    the CUDA GEMV at small M where lease 6 measured it faster; W8 layers, another SGLang (0.5.17 in CI's
    overlay) and another GPU keep Marlin alone."""
    from grace_qat.kernels import table
    from grace_sglang.linear import engine_kernel
    for name in ("GRACE_QAT_SGLANG_KERNEL", "GRACE_QAT_DUAL_KERNEL", "GRACE_QAT_CROSSOVER_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(table, "device_name", lambda: "NVIDIA H100 80GB HBM3")
    measured_here = _sglang_version() == "0.5.23"
    assert engine_kernel(4)[0] == ("HummingLinearMethod" if measured_here else "GPTQMarlinLinearKernel")
    assert engine_kernel(8)[0] == "GPTQMarlinLinearKernel"
    monkeypatch.setattr(table, "device_name", lambda: "NVIDIA H200")
    assert engine_kernel(4)[0] == "GPTQMarlinLinearKernel"
    # lease 6 (2026-12-07): the CUDA GEMV beside Humming at small M where it was >= 1.05x per shape
    # (2B qkv to M 16: 1.61x); none for the 7B gate_up, where nothing beat Humming
    h100 = ("NVIDIA H100 80GB HBM3", "sglang", "0.5.23", "HummingLinearMethod", 4, 128)
    chosen = lambda p: (p.small, p.max_m)   # noqa: E731
    assert chosen(table.plan(*h100, 4096, 2048)) == ("CudaGemvKernel", 16)
    assert chosen(table.plan(*h100, 22016, 4096)) == (None, 0)
    assert chosen(table.plan(*h100[:2], "0.5.17", *h100[3:], 4096, 2048)) == (None, 0)


@pytest.mark.parametrize("choice,large", [("marlin", "GPTQMarlinLinearKernel"), ("humming", "HummingLinearMethod")])
def test_the_sglang_crossover_measures_next_to_the_kernel_the_layer_runs(plugins_loaded, monkeypatch, choice, large):
    """``kernel_crossover.py --engine sglang``'s reference kernel is the one grace_sglang gives a layer
    of that width (here chosen with GRACE_QAT_SGLANG_KERNEL; a table's engine default the same way),
    and SGLang's two kernels and grace_qat's own are the candidates (the sglang-crossover stage)."""
    import kernel_crossover
    monkeypatch.setenv("GRACE_QAT_SGLANG_KERNEL", choice)
    monkeypatch.setattr(kernel_crossover, "_capability", lambda: 90)      # a Hopper, on this CPU
    got, names, skipped = kernel_crossover.usable_kernels(4, 128, 4096, 2048, engine="sglang")
    assert got == large
    assert {"GPTQMarlinLinearKernel", "HummingLinearMethod"} <= set(names) | set(skipped)
    assert "TritonWNA16Kernel" in set(names) | set(skipped)


def test_the_sglang_crossover_writes_only_second_kernels_the_plugin_can_keep(plugins_loaded):
    """grace_sglang keeps only grace_qat's own kernels as a layer's second copy, so the table entry
    ``kernel_crossover.py --engine sglang`` writes chooses among those: lease 6 of 2026-12-07 (H100,
    LLaVA-7B qkv 12288x4096, microseconds) timed SGLang's Marlin fastest up to M 16, and the entry
    named it, which the plugin then refused; the CUDA GEMV was >= 1.05x Humming up to M 8."""
    import kernel_crossover
    us = {"HummingLinearMethod": {1: 23.9, 8: 24.1, 16: 24.6, 32: 25.0},
          "GPTQMarlinLinearKernel": {1: 21.0, 8: 21.3, 16: 21.9, 32: 40.1},
          "CudaGemvKernel": {1: 19.8, 8: 22.5, 16: 25.1}}
    entry = kernel_crossover.table_entry("HummingLinearMethod", us, engine="sglang")
    assert (entry["small"], entry["max_m"]) == ("CudaGemvKernel", 8)
    assert entry["gain"] == pytest.approx(24.1 / 22.5, abs=1e-3)


def test_a_misspelt_kernel_choice_stops_at_the_config_in_one_line(plugins_loaded, ckpts, monkeypatch):
    from grace_sglang.config import GraceQATConfig
    monkeypatch.setenv("GRACE_QAT_SGLANG_KERNEL", "machete")
    with pytest.raises(GraceFormatError) as e:
        GraceQATConfig(ckpts["qat-sidecar"])
    assert str(e.value) == "environment variable GRACE_QAT_SGLANG_KERNEL='machete': expected one of marlin, humming"


def _stub_humming_kernel_prep(monkeypatch):
    """Humming's last two set-up steps (its layer metadata and the repack for its CUDA kernel) need a
    GPU: skipped here, so that a layer holds what Humming's own conversion made of the GPTQ tensors."""
    from humming.layer import HummingMethod
    monkeypatch.setattr(HummingMethod, "prepare_layer_meta", staticmethod(lambda **kw: None))
    monkeypatch.setattr(HummingMethod, "transform_humming_layer", staticmethod(lambda layer: None))


@pytest.mark.parametrize("key,bits", [("qat-sidecar", 4), ("w8", 8)])
@pytest.mark.parametrize("tp,rank", [(1, 0), (2, 1)])
def test_humming_gets_what_stock_sglang_loads_from_the_gptq_checkpoint(plugins_loaded, ckpts, monkeypatch,
                                                                        key, bits, tp, rank):
    """GRACE_QAT_SGLANG_KERNEL=humming: every layer hands SGLang's Humming method exactly the tensors
    stock SGLang's --quantization humming loads from a GPTQ checkpoint of the same weights (written
    by tests/reference.py from the files, plain code), per rank."""
    require("humming", reason="humming-kernels (a dependency of SGLang 0.5.23) is not installed")
    from sglang.srt.layers.quantization.humming import HummingConfig
    from grace_sglang.config import GraceQATConfig
    _stub_humming_kernel_prep(monkeypatch)
    monkeypatch.setenv("GRACE_QAT_SGLANG_KERNEL", "humming")
    gptq = ckpts["gptq:" + key]
    plugin, _ = _build_layer0(GraceQATConfig(ckpts[key]), ckpts[key], rank, tp)
    stock_qc = HummingConfig.from_config(read_quantization_config(gptq))
    stock, _ = _build_layer0(stock_qc, ckpts[key], rank, tp, tensors=reference.tensors(gptq))
    for name in plugin:
        for layer in (plugin[name], stock[name]):
            layer.quant_method.process_weights_after_loading(layer)
        ours, theirs = plugin[name].state_dict(), stock[name].state_dict()
        assert sorted(ours) == sorted(theirs), (name, sorted(ours), sorted(theirs))
        for t in ours:
            assert torch.equal(ours[t], theirs[t]), (name, t)
        assert {"weight", "weight_scale"} <= set(ours), (name, sorted(ours))
        assert type(stock[name].quant_method).__name__ == "HummingLinearMethod" == plugin[name].quant_method.kernel.name


def read_quantization_config(path) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)["quantization_config"]


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["marlin", "humming"])
def test_gpu_layers_equal_stock_sglang_layers_bit_for_bit(plugins_loaded, ckpts, monkeypatch, kernel):
    """On the GPU, each plugin layer (one copy, GRACE_QAT_SGLANG_KERNEL=marlin / humming) computes
    exactly what stock SGLang's layer computes on a GPTQ checkpoint of the same weights with the same
    kernel (GPTQ-Marlin by default, or --quantization humming), M = 1, 5, 64; stock run twice
    (the kernel's determinism, which the comparison relies on)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: SGLang's kernels")
    from sglang.srt.layers.quantization.gptq.gptq import GPTQMarlinConfig
    from sglang.srt.layers.quantization.humming import HummingConfig
    from grace_sglang.config import GraceQATConfig
    monkeypatch.setenv("GRACE_QAT_SGLANG_KERNEL", kernel)
    monkeypatch.setenv("GRACE_QAT_DUAL_KERNEL", "0")
    key, gptq = "qat-sidecar", ckpts["gptq:qat-sidecar"]
    stock_cls = HummingConfig if kernel == "humming" else GPTQMarlinConfig
    with torch.device("cuda"):
        plugin, _ = _build_layer0(GraceQATConfig(ckpts[key]), ckpts[key], 0, 1)
        stock, _ = _build_layer0(stock_cls.from_config(read_quantization_config(gptq)), ckpts[key], 0, 1,
                                 tensors={k: v.cuda() for k, v in reference.tensors(gptq).items()})
    g = torch.Generator(device="cuda").manual_seed(0)
    for name in plugin:
        for layer in (plugin[name], stock[name]):
            layer.quant_method.process_weights_after_loading(layer)
        for m in (1, 5, 64):
            # inputs on this rank: row-parallel layers hold a share, column-parallel ones all of them
            k = getattr(plugin[name], "input_size_per_partition", None) or plugin[name].input_size
            x = torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16)
            want = stock[name].quant_method.apply(stock[name], x)
            assert torch.equal(stock[name].quant_method.apply(stock[name], x), want), (name, m, "stock")
            assert torch.equal(plugin[name].quant_method.apply(plugin[name], x), want), (name, m, kernel)


def _second_kernel_worker(spec_path: str) -> int:
    """For test_second_kernel_computes_the_checkpoints_product: the down_proj layer with the table's
    second kernel, run on the given inputs."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    spec = json.loads(open(spec_path).read())
    os.environ["GRACE_QAT_CROSSOVER_FILE"] = spec["table"]
    from sglang.srt.plugins import load_plugins
    load_plugins()
    from grace_qat.kernels import mixed_mm
    from grace_sglang.config import GraceQATConfig
    _stub_marlin()
    layers, _ = _build_layer0(GraceQATConfig(spec["ckpt"]), spec["ckpt"], 0, 1)
    down = layers["down"]
    down.quant_method.process_weights_after_loading(down)
    mixed_mm.CALLS.clear()
    ys = {m: down.quant_method.apply(down, torch.tensor(x, dtype=torch.bfloat16)).float().tolist()
          for m, x in spec["xs"].items()}
    with open(spec["out"], "w") as f:
        json.dump({"ys": ys, "calls": dict(mixed_mm.CALLS)}, f)
    return 0


def test_tensors_follow_the_weight_device(plugins_loaded, ckpts):
    """Loading and packing create their helper tensors on the weights' device, not on torch's
    default device (SGLang serves with the weights on the GPU; here: weights on the CPU while the
    default device is "meta", where any stray factory tensor would fail)."""
    from sglang.srt.layers.linear import QKVParallelLinear
    from grace_sglang.config import GraceQATConfig
    path = ckpts["qat-grid"]                 # the steps are derived on load: the most tensor work
    qc = GraceQATConfig(path)
    tc = _text_cfg(path)
    ckpt = qc.checkpoint()
    p = "model.language_model.layers.1.self_attn."
    with tp_partition(0, 1) as kw:
        layer = QKVParallelLinear(tc["hidden_size"], tc["head_dim"], tc["num_attention_heads"],
                                  tc["num_key_value_heads"], bias=False, quant_config=qc,
                                  params_dtype=torch.bfloat16, prefix=p + "qkv_proj", **kw)
    torch.set_default_device("meta")
    try:
        for x in "qkv":
            layer.weight.weight_loader(layer.weight, ckpt.tensors.get(f"{p}{x}_proj.weight"), x)
        layer.quant_method.pack_gptq_layout(layer)
    finally:
        torch.set_default_device(None)
    # qat-grid: codes of the qat-sidecar fixture with the same weights (seed 0), steps within bf16
    # rounding of its learned ones (the derived steps are the plugin's, not a reference)
    sidecar_dir = ckpts["qat-sidecar"]
    files, side = reference.tensors(sidecar_dir), reference.sidecar(sidecar_dir)
    refs = [reference.module(sidecar_dir, f"{p}{x}_proj", "qat-sidecar", 4, files=files, side=side) for x in "qkv"]
    assert all(torch.equal(ckpt.tensors.get(f"{p}{x}_proj.weight"), r["weight"]) for x, r in zip("qkv", refs))
    assert layer.qweight.device.type == "cpu"
    assert torch.equal(layer.qweight.data, reference.gptq_qweight(torch.cat([r["codes"] for r in refs]), 4))
    learned = torch.cat([r["steps"] for r in refs]).t()
    assert bool(((layer.scales.data.float() - learned).abs() <= 2 ** -7 * learned).all())


def test_unloaded_weights_are_reported(plugins_loaded, ckpts):
    from sglang.srt.layers.linear import RowParallelLinear
    from grace_sglang.config import GraceQATConfig
    qc = GraceQATConfig(ckpts["qat-sidecar"])
    tc = _text_cfg(ckpts["qat-sidecar"])
    with tp_partition(0, 1) as kw:
        layer = RowParallelLinear(tc["intermediate_size"], tc["hidden_size"], bias=False, quant_config=qc,
                                  params_dtype=torch.bfloat16,
                                  prefix="model.language_model.layers.3.mlp.down_proj", **kw)
    with pytest.raises(GraceFormatError, match="no weight was loaded"):
        layer.quant_method.pack_gptq_layout(layer)
    # qat-inline: the log-steps come with the weight stream too; a weight alone is not enough
    qc = GraceQATConfig(ckpts["qat-inline"])
    name = "model.language_model.layers.3.mlp.down_proj"
    with tp_partition(0, 1) as kw:
        layer = RowParallelLinear(tc["intermediate_size"], tc["hidden_size"], bias=False, quant_config=qc,
                                  params_dtype=torch.bfloat16, prefix=name, **kw)
    layer.weight.weight_loader(layer.weight, qc.checkpoint().tensors.get(name + ".weight"))
    with pytest.raises(GraceFormatError) as e:
        layer.quant_method.pack_gptq_layout(layer)
    assert str(e.value) == (f"grace_qat: {name}: no log_scale was loaded for ['{name}']; the checkpoint "
                            f"and the model's layer names do not match"), str(e.value)
    # a weight of another shape than the checkpoint's: one line naming the checkpoint and module,
    # not the assertion inside SGLang's loader
    w = qc.checkpoint().tensors.get(name + ".weight")
    with pytest.raises(GraceFormatError) as e:
        layer.weight.weight_loader(layer.weight, w[:, :-128])
    assert str(e.value) == (f"{qc.checkpoint().path}: the weight loaded for {name} has shape "
                            f"{(w.shape[0], w.shape[1] - 128)}, the checkpoint says {tuple(w.shape)}"), str(e.value)


@pytest.mark.parametrize("kernel", ["marlin", "humming"])
@pytest.mark.parametrize("tp,rank", [(1, 0), (2, 1)])
def test_awq_delegates_to_sglangs_own_awq_method(plugins_loaded, ckpts, monkeypatch, tp, rank, kernel):
    """Format B: SGLang's own AWQ-Marlin method and loaders (Marlin support check stubbed: no GPU),
    or with GRACE_QAT_SGLANG_KERNEL=humming its Humming method, as stock SGLang's --quantization
    humming runs an AWQ checkpoint; the layers hold the files' tensors for their rank."""
    from sglang.srt.layers.quantization.awq import awq as awq_mod
    from grace_sglang.config import GraceQATConfig
    monkeypatch.setattr(awq_mod, "verify_marlin_supported", lambda *a, **k: None)
    if kernel == "humming":
        require("humming", reason="humming-kernels (a dependency of SGLang 0.5.23) is not installed")
        monkeypatch.setenv("GRACE_QAT_SGLANG_KERNEL", "humming")
    qc = GraceQATConfig(ckpts["awq"])
    layers, ckpt = _build_layer0(qc, ckpts["awq"], rank, tp)
    if kernel == "humming":
        assert qc.stock_method_config().get_name() == "humming"
        assert type(layers["qkv"].quant_method).__name__ == "HummingLinearMethod"
    else:
        assert qc.stock_method_config().get_name() == "awq_marlin"
        assert type(layers["qkv"].quant_method).__name__ == "AWQLinearMethod"
        assert type(layers["qkv"].scheme).__name__ == "AWQMarlinLinearScheme"
    p = "model.language_model.layers.0."
    get = ckpt.tensors.get
    nkv = _text_cfg(ckpts["awq"])["num_key_value_heads"]
    for key, mods, row in (("qkv", [f"self_attn.{x}_proj" for x in "qkv"], False),
                           ("gate_up", ["mlp.gate_proj", "mlp.up_proj"], False),
                           ("o", ["self_attn.o_proj"], True), ("down", ["mlp.down_proj"], True)):
        layer = layers[key]
        for leaf in ("qweight", "qzeros", "scales"):
            parts = []
            for i, m in enumerate(mods):
                t = get(p + m + "." + leaf)
                if row:     # input rows of (in, out/8) / groups of (in/G, ...)
                    n = t.shape[0] // tp
                    parts.append(t[rank * n:(rank + 1) * n])
                else:
                    rep = max(1, tp // nkv) if key == "qkv" and i > 0 else 1
                    n = t.shape[1] * rep // tp
                    r = rank // rep
                    parts.append(t[:, r * n:(r + 1) * n])
            exp = torch.cat(parts, dim=1)
            got = getattr(layer, leaf).data
            assert torch.equal(got, exp.to(got.dtype)), (key, leaf)


# -- the whole model, built and loaded by SGLang on CPU (subprocess) ------------------------------

def test_full_model_load_matches_stock_gptq(plugins_loaded, ckpts, tmp_path):
    """Qwen3-VL built by SGLang with a real gloo parallel state (world size 1), loaded by SGLang's
    weight loader from each format, packed by the plugin, and compared with stock SGLang GPTQ-Marlin
    loading the GPTQ checkpoint tests/reference.py wrote from the same files (same per-layer
    qweight/scales before the Marlin repack; qat-grid, whose steps are derived, has none).

    Runs in a subprocess: it initialises torch.distributed and stubs vllm's rotary op (SGLang imports
    it on non-CUDA machines), neither of which may leak into this test process.
    """
    spec = {"formats": {f: ckpts[f] for f in FORMATS_A + ["w8", "awq", "declared", "llava-sidecar",
                                                          "llava-awq"]},
            "gptq": {f: ckpts["gptq:" + f] for f in ["qat-sidecar", "qat-inline", "w8", "llava-sidecar"]},
            "grid": ckpts["qat-grid"], "out": str(tmp_path / "result.json")}
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "full-model", str(spec_path)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    if proc.returncode != 0 or not os.path.exists(spec["out"]):
        pytest.fail(f"worker failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    result = json.loads(open(spec["out"]).read())
    print(json.dumps({f: {k: v for k, v in r.items() if k != "errors"} for f, r in result.items()}, indent=1))
    for fmt, r in result.items():
        assert r["errors"] == [], (fmt, r["errors"][:10])
        expected_quant = "grace_qat"
        assert r["quantization"] == expected_quant, fmt
        assert r["quantized_layers"] == 16, fmt       # 4 decoder layers x (qkv, o, gate_up, down)
        if not fmt.startswith("llava"):   # LLaVA's projector is a plain torch Linear, never quantized
            assert r["unquantized_linears"] > 0, fmt  # vision tower, merger, deepstack mergers
        if fmt in spec["gptq"]:
            assert r["compared_with_gptq"] == 16, fmt


# -- original-layout LLaVA-1.5: what SGLang's own LLaVA needs around the weights ---------------------

@pytest.fixture(scope="session")
def llava_local(tmp_path_factory):
    """A GRACE LLaVA whose mm_vision_tower is the Hub id (as released) plus a local CLIP directory,
    and the processor directory ``grace-qat llava-processor`` writes for it."""
    from grace_qat.cli import main as cli_main
    from llava_fixtures import write_clip, write_llava
    base = tmp_path_factory.mktemp("sglang_llava")
    ckpt = write_llava(str(base / "llava"), fmt="qat-sidecar", bits=4, seed=5)
    clip = write_clip(str(base / "clip-vit-tiny"), size="tiny", seed=5)
    assert cli_main(["llava-processor", ckpt, str(base / "processor"), "--clip-dir", clip]) == 0
    return {"ckpt": ckpt, "clip": clip, "processor": str(base / "processor"), "root": str(base)}


def _run_worker(kind: str, spec: dict, tmp_path, env_extra=None) -> dict:
    spec = dict(spec, out=str(tmp_path / f"{kind}.json"))
    spec_path = tmp_path / f"{kind}-spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               **(env_extra or {}))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), kind, str(spec_path)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    if proc.returncode != 0 or not os.path.exists(spec["out"]):
        pytest.fail(f"worker failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads(open(spec["out"]).read())


def test_llava_clip_tower_and_chat_template(plugins_loaded, llava_local, monkeypatch):
    """The released config names the CLIP tower by Hub id: the parser points SGLang's LLaVA at the
    local directory (GRACE_CLIP_PATH), sets the <image> id, and picks LLaVA's llava_v1 conversation."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.parser.conversation import get_conv_template_by_model_path
    from grace_qat.settings import CLIP_PATH as CLIP_ENV
    with open(os.path.join(llava_local["ckpt"], "config.json")) as f:
        raw = json.load(f)
    assert raw["mm_vision_tower"] == "openai/clip-vit-large-patch14-336"
    monkeypatch.setenv(CLIP_ENV, llava_local["clip"])
    mc = ModelConfig(model_path=llava_local["ckpt"])
    assert mc.hf_config.mm_vision_tower == os.path.abspath(llava_local["clip"])
    assert mc.hf_config.image_token_index == raw["vocab_size"]
    assert get_conv_template_by_model_path(llava_local["ckpt"]) == "grace_llava_v1"
    assert get_conv_template_by_model_path(os.path.dirname(llava_local["ckpt"])) != "grace_llava_v1"
    # SGLang caches parsed configs per path; the failures below go through the parser it uses
    from sglang.srt.configs.model_config_parser_registry import get_model_config_parser

    def parse():
        return get_model_config_parser("hf").parse(llava_local["ckpt"], trust_remote_code=False)

    assert parse().mm_vision_tower == os.path.abspath(llava_local["clip"])
    # offline with no tower anywhere: one line naming what was looked at, before any weight loads
    monkeypatch.delenv(CLIP_ENV)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", os.path.join(llava_local["root"], "empty-cache"))
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", os.path.join(llava_local["root"], "empty-cache"))
    with pytest.raises(GraceFormatError, match="GRACE_CLIP_PATH") as e:
        parse()
    assert "\n" not in str(e.value) and "openai/clip-vit-large-patch14-336" in str(e.value)
    # a tower directory SGLang could not recognise by name
    odd = os.path.join(llava_local["root"], "vision-tower")
    if not os.path.exists(odd):
        os.symlink(llava_local["clip"], odd)
    monkeypatch.setenv(CLIP_ENV, odd)
    with pytest.raises(GraceFormatError, match="'clip' or 'siglip'"):
        parse()


def test_llava_inputs_through_sglang(plugins_loaded, llava_local, tmp_path):
    """With --tokenizer-path from ``grace-qat llava-processor``: the conversation SGLang picks renders
    an OpenAI image+text request as GRACE's LLaVA tooling prompts (LLaVA's llava_v1; the spec's
    prompt) and as the processor's own Jinja template (used by vLLM) does, the tokenizer gives exactly one <image> at config.image_token_index and leaves the text's
    ids as the release tokenizer has them, SGLang's LLaVA image processor produces the CLIP tower's
    input, and SGLang's LlavaLlamaForCausalLM loads that tower and expands the <image> position to
    one slot per patch. With the release tokenizer instead, start-up is refused with the fix."""
    r = _run_worker("llava-inputs", {"ckpt": llava_local["ckpt"], "clip": llava_local["clip"],
                                     "processor": llava_local["processor"]}, tmp_path)
    print(json.dumps({k: v for k, v in r.items() if k != "prompt"}, indent=1))
    system = ("A chat between a curious human and an artificial intelligence assistant. The assistant "
              "gives helpful, detailed, and polite answers to the human's questions.")
    spec_prompt = f"{system} USER: <image>\nWhat is in the picture? ASSISTANT:"
    assert r["prompt"].replace("<image> \n", "<image>\n") == spec_prompt, r["prompt"]
    assert r["jinja_prompt"].lstrip("<s>").strip() == spec_prompt
    assert r["image_token_count"] == 1 and r["image_token_id"] == r["vocab_size"]
    # LLaVA's tokenizer_image_token: each chunk around <image> encoded on its own by SentencePiece
    assert r["ids"] == r["llava_reference_ids"], (r["ids"], r["llava_reference_ids"])
    # stock SGLang with the serve check's template sees the plugin's ids exactly (the processor's
    # template, written for vLLM, breaks on SGLang's list content: why the check passes its own)
    assert r["stock_jinja_image_ids"] == r["ids"], r["stock_jinja_image_ids"]
    assert r["stock_jinja_text_ids"] == r["plugin_text_ids"], r["stock_jinja_text_ids"]
    assert "concatenate" in str(r["processor_jinja_image_ids"]), r["processor_jinja_image_ids"]
    assert r["pixel_shape"] == [3, r["clip_image_size"], r["clip_image_size"]]
    assert r["pixels_match_clip_reference"] <= 1e-3
    assert r["vision_tower_from_clip_dir"]
    patches = (r["clip_image_size"] // r["clip_patch_size"]) ** 2
    assert r["image_slots"] == patches and r["padded_len"] == r["prompt_len"] - 1 + patches
    assert r["image_offset"] == r["image_token_position"]
    assert r["sglang_processor"] == "LlavaImageProcessor"
    assert "llava-processor" in r["release_tokenizer_error"] and "\n" not in r["release_tokenizer_error"]


# -- subprocess worker ---------------------------------------------------------------------------

def _stub_vllm_rotary():
    """SGLang's RotaryEmbedding imports vllm._custom_ops on machines that are neither CUDA nor its
    CPU engine; the op is never called when only loading weights."""
    import types
    vllm = types.ModuleType("vllm")
    ops = types.ModuleType("vllm._custom_ops")
    ops.rotary_embedding = None
    vllm._custom_ops = ops
    sys.modules.setdefault("vllm", vllm)
    sys.modules.setdefault("vllm._custom_ops", ops)


def _init_parallel_state(model_path: str) -> None:
    """SGLang's real parallel state on CPU: gloo backend, world size 1 (both 0.5.17 and 0.5.23)."""
    import socket
    from sglang.srt.distributed import parallel_state as ps

    _publish_server_args(model_path)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    ps.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                    distributed_init_method=f"tcp://127.0.0.1:{port}")
    if "tensor_model_parallel_size" in inspect.signature(ps.initialize_model_parallel).parameters:
        ps.initialize_model_parallel(tensor_model_parallel_size=1, backend="gloo")
    else:
        ps.initialize_model_parallel(backend="gloo")
    assert ps.get_tensor_model_parallel_world_size() == 1


def _build_and_load(model_config, quant_config):
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.model_loader.loader import DefaultModelLoader, _initialize_model
    load_config = LoadConfig()
    torch.set_default_dtype(model_config.dtype)
    model = _initialize_model(model_config, load_config, quant_config)
    weights = DefaultModelLoader(load_config)._get_all_weights(model_config, model)
    if hasattr(model, "language_model") and "Llava" in type(model).__name__:
        # LLaVA's own load_weights first fetches the CLIP tower named in mm_vision_tower (and moves
        # it with .cuda() in 0.5.17); it hands every other tensor to the Llama language model
        # one by one, which is what is done here.
        for name, w in weights:
            if not any(x in name for x in ("projector", "vision_tower", "image_newline")):
                model.language_model.load_weights([(name, w)])
    else:
        model.load_weights(weights)
    return model


def _full_model_worker(spec_path: str) -> int:
    _stub_vllm_rotary()
    from sglang.srt.plugins import load_plugins
    load_plugins()
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.layers.linear import LinearBase
    from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod
    from sglang.srt.model_loader.loader import _get_quantization_config
    from grace_sglang.linear import GraceQATLinearMethod

    spec = json.loads(open(spec_path).read())
    _init_parallel_state(spec["grid"])    # --quantization grace_qat alone reads the model path from here
    try:                                   # 0.5.17 model construction reads the DP-attention sizes
        from sglang.srt.layers.dp_attention import initialize_dp_attention
        from sglang.srt.runtime_context import get_server_args
        initialize_dp_attention(get_server_args(), ModelConfig(model_path=spec["grid"]))
    except (ImportError, TypeError):
        pass
    # Stock GPTQ-Marlin checks the GPU's Marlin support when a layer is built; none here.
    from sglang.srt.layers.quantization.gptq.schemes import gptq_marlin as gm_scheme
    from sglang.srt.layers.quantization.awq import awq as awq_mod
    gm_scheme.verify_marlin_supported = lambda *a, **k: None
    awq_mod.verify_marlin_supported = lambda *a, **k: None
    from sglang.srt.layers.quantization.gptq.gptq import GPTQMarlinConfig

    results = {}
    for fmt, path in spec["formats"].items():
        errors: list[str] = []
        mc = ModelConfig(model_path=path, quantization="grace_qat" if fmt == "qat-grid" else None)
        qc = _get_quantization_config(mc, LoadConfig())
        model = _build_and_load(mc, qc)
        ckpt = qc.checkpoint()
        quantized, unquantized, compared, double_rounded, steps32 = {}, 0, 0, 0, {}
        for name, mod in model.named_modules():
            if not isinstance(mod, LinearBase):
                continue
            qm = mod.quant_method
            in_lm = ".layers." in name and "visual" not in name
            if isinstance(qm, UnquantizedLinearMethod):
                unquantized += 1
                if in_lm:
                    errors.append(f"{name}: language-model linear left unquantized")
                continue
            if not in_lm:
                errors.append(f"{name}: quantized, but not a language-model linear")
            quantized[name] = mod
            if isinstance(qm, GraceQATLinearMethod):
                # TP 1: the staging tensors are the checkpoint's, concatenated in shard order
                w = torch.cat([ckpt.tensors.get(m + ".weight") for m in qm.names])
                s = torch.cat([ckpt.quantized(m).scales for m in qm.names])
                if not torch.equal(mod.weight.data, w):
                    errors.append(f"{name}: staged weight differs from the checkpoint")
                qm.feed_from_checkpoint(mod)
                if hasattr(mod, "log_scale") and not torch.equal(torch.exp(mod.log_scale.data), s):
                    errors.append(f"{name}: loaded log-steps differ from the checkpoint")
                steps32[name] = s
                _, steps = qm.pack_gptq_layout(mod)
                if not torch.equal(steps, s):
                    errors.append(f"{name}: recovered steps differ from the checkpoint")
                if {"weight", "log_scale"} & set(dict(mod.named_parameters())):
                    errors.append(f"{name}: loaded tensors not freed")
            elif type(qm).__name__ == "AWQLinearMethod":
                names = qc.checkpoint_modules(name)
                for leaf in ("qweight", "qzeros", "scales"):
                    exp = torch.cat([ckpt.tensors.get(m + "." + leaf) for m in names], dim=1)
                    got = getattr(mod, leaf).data
                    if not torch.equal(got, exp.to(got.dtype)):
                        errors.append(f"{name}.{leaf}: differs from the checkpoint")
            else:
                errors.append(f"{name}: unexpected quant method {type(qm).__name__}")
        lm_head = getattr(model, "lm_head", None)
        if lm_head is not None and type(getattr(lm_head, "quant_method", None)).__name__ not in (
                "UnquantizedEmbeddingMethod", "NoneType"):
            errors.append(f"lm_head quant method {type(lm_head.quant_method).__name__}")
        gptq_dir = spec["gptq"].get(fmt)
        if gptq_dir:
            gmc = ModelConfig(model_path=gptq_dir, model_override_args=json.dumps({"quantization_config": None}))
            with open(os.path.join(gptq_dir, "config.json")) as f:
                gcfg = dict(json.load(f)["quantization_config"])
            gcfg["packed_modules_mapping"] = dict(qc.packed_modules_mapping)
            stock = _build_and_load(gmc, GPTQMarlinConfig.from_config(gcfg))
            from safetensors import safe_open
            with safe_open(os.path.join(gptq_dir, "model.safetensors"), "pt") as f:
                stored_dtype = f.get_slice(ckpt.modules[0] + ".scales").get_dtype()
            stored_dtype = {"BF16": torch.bfloat16, "F16": torch.float16}[stored_dtype]
            stock_mods = dict(stock.named_modules())
            for name, mod in quantized.items():
                ref = stock_mods[name]
                if type(ref.quant_method).__name__ != "GPTQMarlinLinearMethod":
                    errors.append(f"{name}: stock GPTQ used {type(ref.quant_method).__name__}")
                    continue
                if not torch.equal(mod.qweight.data, ref.qweight.data):
                    errors.append(f"{name}.qweight: differs from stock SGLang GPTQ-Marlin's")
                ours, theirs = mod.scales.data, ref.scales.data
                if stored_dtype == mc.dtype:
                    if not torch.equal(ours, theirs):
                        errors.append(f"{name}.scales: differs from stock SGLang GPTQ-Marlin's")
                else:
                    # e.g. LLaVA: the export stores bf16 steps but SGLang runs LLaVA in fp16. The
                    # plugin rounds the fp32 steps to fp16 once; stock SGLang gets fp16(bf16(step)).
                    s32 = steps32[name].t()
                    if not torch.equal(ours, s32.to(mc.dtype)):
                        errors.append(f"{name}.scales: not the fp32 steps rounded to {mc.dtype}")
                    if not torch.equal(theirs, s32.to(stored_dtype).to(mc.dtype)):
                        errors.append(f"{name}.scales: stock GPTQ steps are not the exported ones")
                    double_rounded += int((ours != theirs).sum())
                compared += 1
            del stock
        results[fmt] = {"quantization": mc.quantization, "quantized_layers": len(quantized),
                        "unquantized_linears": unquantized, "compared_with_gptq": compared,
                        "scales_differing_from_gptq_export": double_rounded,
                        "errors": errors}
        del model
    with open(spec["out"], "w") as f:
        json.dump(results, f, indent=1)
    return 0


def _publish_server_args(model_path: str, **kwargs) -> None:
    """What SGLang does in each of its processes: make the server arguments visible to the plugin."""
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import ServerArgs
    sa = ServerArgs(model_path=model_path, device="cpu", **kwargs)
    if "ranks" in inspect.signature(publish).parameters:         # 0.5.23
        from sglang.srt.runtime_context import SpawnRanks
        publish(sa, role="test", ranks=SpawnRanks(world_rank=0, dp_rank=None))
    else:                                                          # 0.5.17
        publish(sa, role="scheduler")


def _llava_inputs_worker(spec_path: str) -> int:
    import asyncio
    import numpy as np
    from PIL import Image
    from transformers import AutoTokenizer, CLIPImageProcessor
    _stub_vllm_rotary()
    from sglang.srt.plugins import load_plugins
    load_plugins()
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest
    from sglang.srt.parser.conversation import generate_chat_conv, get_conv_template_by_model_path
    from sglang.srt.utils.hf_transformers.processor import get_processor
    from grace_qat.llava_hf import CLIP_MEAN

    spec = json.loads(open(spec_path).read())
    ckpt, clip, proc_dir = spec["ckpt"], spec["clip"], spec["processor"]
    os.environ["GRACE_CLIP_PATH"] = clip
    out = {}
    # 1. the release tokenizer is refused where SGLang publishes its arguments
    _init_parallel_state(ckpt)     # publishes model_path (tokenizer_path defaults to it)
    try:
        ModelConfig(model_path=ckpt)
        out["release_tokenizer_error"] = ""
    except GraceFormatError as e:
        out["release_tokenizer_error"] = str(e)
    _publish_server_args(ckpt, tokenizer_path=proc_dir)
    mc = ModelConfig(model_path=ckpt)
    cfg = mc.hf_config
    with open(os.path.join(ckpt, "config.json")) as f:
        out["vocab_size"] = json.load(f)["vocab_size"]
    # 2. the chat template SGLang picks, on an OpenAI request, against the processor's Jinja one
    template = get_conv_template_by_model_path(ckpt)
    image = os.path.join(os.path.dirname(spec["out"]), "image.png")
    Image.new("RGB", (300, 200), (200, 30, 40)).save(image)
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}},
        {"type": "text", "text": "What is in the picture?"}]}])
    conv = generate_chat_conv(req, template)
    out["prompt"] = conv.get_prompt()
    tok = AutoTokenizer.from_pretrained(proc_dir)
    out["jinja_prompt"] = tok.apply_chat_template(   # a "string"-content template, as vLLM feeds it
        [{"role": "user", "content": "<image>\nWhat is in the picture?"}], tokenize=False,
        add_generation_prompt=True)
    # 3. tokenization: one <image>, text ids unchanged
    ids = tok(out["prompt"]).input_ids
    out["image_token_id"] = cfg.image_token_index
    out["image_token_count"] = ids.count(cfg.image_token_index)
    out["image_token_position"] = ids.index(cfg.image_token_index)
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(ckpt, "tokenizer.model"))
    before, after = out["prompt"].replace("<image> \n", "<image>\n").split("<image>")
    out["llava_reference_ids"] = [sp.bos_id()] + sp.encode(before) + [cfg.image_token_index] + sp.encode(after)
    out["ids"] = ids
    out["prompt_len"] = len(ids)
    # 3b. stock SGLang (no plugin) with the serve check's --chat-template, along SGLang's own Jinja
    # path: content format, parts, render, encode, decode, then the text encoded again as the
    # TokenizerManager does for a multimodal model
    from sglang.srt.parser.jinja_template_utils import (detect_jinja_template_content_format,
                                                        process_content_for_template_format)
    text_req = [{"role": "user", "content": "What is in the picture?"}]
    out["plugin_text_ids"] = tok(generate_chat_conv(ChatCompletionRequest(model="m", messages=text_req),
                                                    template).get_prompt()).input_ids
    from sglang_serve_check import STOCK_LLAVA_TEMPLATE
    for name, path in (("stock", STOCK_LLAVA_TEMPLATE), ("processor", None)):
        jinja = open(path).read() if path else tok.chat_template
        fmt = detect_jinja_template_content_format(jinja)
        for kind, messages in (("image", req.model_dump()["messages"]), ("text", text_req)):
            try:
                parts = [process_content_for_template_format(dict(m), fmt, [], [], [], []) for m in messages]
                rendered = tok.apply_chat_template(parts, chat_template=jinja, tokenize=False,
                                                   add_generation_prompt=True)
                text = tok.decode(tok(rendered, add_special_tokens=False).input_ids)
                out[f"{name}_jinja_{kind}_ids"] = tok(text).input_ids
            except Exception as e:      # the processor's (vLLM's) template on SGLang's list content
                out[f"{name}_jinja_{kind}_ids"] = f"{type(e).__name__}: {e}"
    # 4. SGLang's LLaVA image processor (as the TokenizerManager builds and calls it) against CLIP's
    # own preprocessing of LLaVA's padded square
    from types import SimpleNamespace
    from sglang.srt.managers.multimodal_processor import get_mm_processor, import_processors
    from sglang.srt.runtime_context import get_server_args
    processor = get_processor(proc_dir, model_name=ckpt)
    import_processors("sglang.srt.multimodal.processors")
    mm_proc = get_mm_processor(cfg, get_server_args(), processor, "default", model_config=mc)
    out["sglang_processor"] = type(mm_proc).__name__
    result = asyncio.run(mm_proc.process_mm_data_async([image], out["prompt"], SimpleNamespace(modalities=None)))
    pixels = np.asarray(result.mm_items[0].feature)[0]
    with open(os.path.join(clip, "config.json")) as f:
        ccfg = json.load(f)
    ccfg = ccfg.get("vision_config", ccfg)
    out["clip_image_size"], out["clip_patch_size"] = ccfg["image_size"], ccfg["patch_size"]
    out["pixel_shape"] = list(np.asarray(pixels).shape)
    square = Image.new("RGB", (300, 300), tuple(int(x * 255) for x in CLIP_MEAN))
    square.paste(Image.open(image).convert("RGB"), (0, 50))
    ref = CLIPImageProcessor.from_pretrained(clip)(square, return_tensors="np")["pixel_values"][0]
    out["pixels_match_clip_reference"] = float(np.abs(np.asarray(pixels, np.float32) - ref).max())
    # 5. SGLang's LlavaLlamaForCausalLM: its own load_weights fetches the tower from mm_vision_tower
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.model_loader.loader import DefaultModelLoader, _initialize_model, _get_quantization_config
    torch.set_default_dtype(mc.dtype)
    orig_cuda = torch.nn.Module.cuda
    torch.nn.Module.cuda = lambda self, *a, **k: self      # 0.5.17 moves the tower with .cuda()
    try:
        model = _initialize_model(mc, LoadConfig(), _get_quantization_config(mc, LoadConfig()))
        model.load_weights(DefaultModelLoader(LoadConfig())._get_all_weights(mc, model))
    finally:
        torch.nn.Module.cuda = orig_cuda
    from safetensors import safe_open
    with safe_open(os.path.join(clip, "model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("patch_embedding.weight"))
        expected = f.get_tensor(key)
    got = dict(model.vision_tower.named_parameters())
    got = next(v for k, v in got.items() if k.endswith("patch_embedding.weight"))
    out["vision_tower_from_clip_dir"] = bool(torch.equal(got.float(), expected.float()))
    from array import array
    from sglang.srt.managers.schedule_batch import MultimodalInputs
    for item in result.mm_items:
        item.pad_value = 123456
    mm = MultimodalInputs(mm_items=result.mm_items)
    padded = model.pad_input_ids(array("q", ids), mm)
    padded = list(padded)
    out["padded_len"] = len(padded)
    out["image_slots"] = padded.count(123456)
    out["image_offset"] = padded.index(123456)
    with open(spec["out"], "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    workers = {"full-model": _full_model_worker, "llava-inputs": _llava_inputs_worker,
               "second-kernel": _second_kernel_worker}
    if len(sys.argv) == 3 and sys.argv[1] in workers:
        sys.exit(workers[sys.argv[1]](sys.argv[2]))
    sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(workers)}}} SPEC.json")
