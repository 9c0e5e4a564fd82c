"""The grace-qat command line, run as a user runs it (a subprocess through the console script)."""
import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from requires import require
import torch

import llava_fixtures

CLI = os.path.join(os.path.dirname(sys.executable), "grace-qat")


def run(*args):
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ckpt(tiny):
    return tiny["qat-sidecar"]


def test_inspect_reports_histogram_and_sizes(ckpt):
    r = run("inspect", ckpt, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert (rep["format"], rep["bits"], rep["group_size"], rep["verified"]) == ("qat-sidecar", 4, 128, True)
    hist = {int(k): v for k, v in rep["code_histogram"].items()}
    assert set(hist) == set(range(-8, 8))
    assert sum(hist.values()) == rep["quantized_params"] and hist[-8] > 0
    # independent count from the raw sidecar: parameters = sum of out*in of its weights
    side = torch.load(os.path.join(ckpt, "qat_quantized_weights.bin"), weights_only=True)
    n = sum(v.numel() for k, v in side.items() if k.endswith(".weight"))
    assert rep["quantized_params"] == n
    assert rep["bytes_bf16"] == 2 * n and rep["bytes_packed"] == n // 2 + n // 128 * 2
    human = run("inspect", ckpt)
    assert human.returncode == 0 and "verified" in human.stdout and "qat-sidecar" in human.stdout


def test_bad_input_one_line_nonzero(tmp_path, ckpt):
    r = run("inspect", str(tmp_path / "nope"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
    broken = tmp_path / "b"
    shutil.copytree(ckpt, broken)
    os.remove(broken / "config.json")
    r = run("convert", str(broken), str(tmp_path / "o"), "--to", "gptq")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "config.json: missing" in r.stderr


def test_convert_cli_writes_loadable_gptq(tmp_path, ckpt):
    """The export is loaded by stock vLLM's own GPTQ method (config from its quantization_config,
    every quantized module's tensors through vLLM's weight loaders) and unpacked with vLLM's own
    helper: the codes are the source checkpoint's (plain-code reference), scales its bf16(steps)."""
    require("vllm")
    import reference
    from unittest import mock

    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor import parameter as vp
    from vllm.model_executor.layers import linear as vl
    from vllm.model_executor.layers.quantization import get_quantization_config
    from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32
    from vllm.scalar_type import scalar_types
    r = run("convert", ckpt, str(tmp_path / "g"), "--to", "gptq")
    assert r.returncode == 0, r.stderr
    assert "bit-exact" in r.stdout
    cfg = json.load(open(tmp_path / "g" / "config.json"))
    assert cfg["quantization_config"]["quant_method"] == "gptq"
    qcfg = get_quantization_config("gptq").from_config(cfg["quantization_config"])
    exported, source, side = reference.tensors(str(tmp_path / "g")), reference.tensors(ckpt), reference.sidecar(ckpt)
    modules = sorted(k[:-len(".qweight")] for k in exported if k.endswith(".qweight"))
    assert len(modules) == 7 * cfg["text_config"]["num_hidden_layers"]
    with contextlib.ExitStack() as stack:
        stack.enter_context(set_current_vllm_config(VllmConfig()))
        for mod in (vl, vp):
            stack.enter_context(mock.patch.object(mod, "get_tensor_model_parallel_rank", return_value=0))
            stack.enter_context(mock.patch.object(mod, "get_tensor_model_parallel_world_size", return_value=1))
        for name in modules:
            ref = reference.module(ckpt, name, "qat-sidecar", 4, files=source, side=side)
            out_f, in_f = ref["codes"].shape
            layer = vl.ReplicatedLinear(in_f, out_f, bias=False, params_dtype=torch.bfloat16,
                                        quant_config=qcfg, prefix=name)
            assert type(layer.quant_method).__name__ != "UnquantizedLinearMethod", name
            for suffix in ("qweight", "qzeros", "scales"):
                param = getattr(layer, suffix)
                param.weight_loader(param, exported[f"{name}.{suffix}"])
            u = unpack_quantized_values_into_int32(layer.qweight.data, scalar_types.uint4b8, packed_dim=0)
            assert torch.equal((u.t() - 8).long(), ref["codes"]), f"{name}: codes"
            assert torch.equal(layer.scales.data, ref["steps"].t().to(torch.bfloat16)), f"{name}: scales"
            zeros = unpack_quantized_values_into_int32(layer.qzeros.data, scalar_types.uint4b8, packed_dim=1)
            assert bool((zeros == 7).all()), f"{name}: GPTQ v1 zero points (8 - 1)"


def test_convert_cli_refuses_an_existing_output_unless_force(tmp_path, ckpt):
    """`convert` never overwrites by accident; `--force` on the command line replaces the output
    (its old files gone, the new export complete)."""
    out = tmp_path / "g"
    assert run("convert", ckpt, str(out), "--to", "bf16").returncode == 0
    (out / "old-file").write_text("from an earlier run")
    r = run("convert", ckpt, str(out), "--to", "gptq")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--force" in r.stderr, r.stderr
    assert (out / "old-file").exists()
    assert "quantization_config" not in json.load(open(out / "config.json"))    # still the bf16 export
    r = run("convert", ckpt, str(out), "--to", "gptq", "--force")
    assert r.returncode == 0, r.stderr
    assert not (out / "old-file").exists()
    assert json.load(open(out / "config.json"))["quantization_config"]["quant_method"] == "gptq"


def test_fixture_cli(tmp_path):
    r = run("fixture", str(tmp_path / "f"), "--format", "awq")
    assert r.returncode == 0, r.stderr
    r = run("inspect", str(tmp_path / "f"), "--json")
    assert json.loads(r.stdout)["format"] == "awq"


def test_llava_processor_cli(tmp_path, ckpt):
    """``grace-qat llava-processor``: the llava-hf processor files for an original-layout LLaVA (what
    SGLang needs as --tokenizer-path), sized from the CLIP tower that mm_vision_tower names."""
    from transformers import AutoTokenizer, CLIPImageProcessor
    clip = llava_fixtures.write_clip(str(tmp_path / "clip-vit-tiny"), size="tiny")
    llava = llava_fixtures.write_llava(str(tmp_path / "llava"), size="tiny", fmt="qat-sidecar")
    cfg = json.load(open(os.path.join(llava, "config.json")))
    cfg["mm_vision_tower"] = clip          # a local tower, found without --clip-dir
    json.dump(cfg, open(os.path.join(llava, "config.json"), "w"))
    r = run("llava-processor", llava, str(tmp_path / "proc"))
    assert r.returncode == 0, r.stderr
    assert "--tokenizer-path" in r.stdout
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "proc"))
    release = AutoTokenizer.from_pretrained(llava)
    assert tok.convert_tokens_to_ids("<image>") == cfg["vocab_size"]
    assert len(tok) == cfg["vocab_size"] + 2 and len(release) == cfg["vocab_size"]
    size = json.load(open(os.path.join(clip, "config.json")))["vision_config"]["image_size"]
    proc = CLIPImageProcessor.from_pretrained(str(tmp_path / "proc"))
    assert proc.crop_size == {"height": size, "width": size}
    # not an original-layout LLaVA: one line, exit 2, nothing written
    r = run("llava-processor", ckpt, str(tmp_path / "proc2"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "original-layout" in r.stderr
    assert not os.path.exists(tmp_path / "proc2")


def _one_line_error(r, *words):
    out = r.stdout + r.stderr
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stdout == "", out[-3000:]
    assert r.stderr.startswith("grace-qat: error: ") and "Traceback" not in out, out[-3000:]
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def test_fixture_refuses_an_existing_output_without_force(tmp_path, tiny):
    """`fixture DIR` onto an existing checkpoint used to overwrite it silently (rc 0, a GPTQ export
    became a qat-sidecar fixture): refused as `convert` refuses, replaced with --force."""
    out = tmp_path / "export"
    shutil.copytree(tiny["awq"], out)
    before = sorted(os.listdir(out))
    _one_line_error(run("fixture", str(out)), "already exists", "--force")
    assert sorted(os.listdir(out)) == before and "awq_quantized_modules.json" in before
    r = run("fixture", str(out), "--force")
    assert r.returncode == 0, r.stderr
    assert "qat_quantized_weights.bin" in os.listdir(out) and "awq_quantized_modules.json" not in os.listdir(out)
    (tmp_path / "empty").mkdir()                     # an empty directory is no checkpoint to lose
    assert run("fixture", str(tmp_path / "empty")).returncode == 0
    assert sorted(os.listdir(tmp_path)) == ["empty", "export"]     # no temporary or old directory left


@contextlib.contextmanager
def _read_only(path):
    """``path`` (a directory) made unwritable even for root (chattr +i), or by its mode for others."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        try:
            yield
        finally:
            os.chmod(path, 0o755)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("root without chattr +i here: no way to make a directory read-only")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_unwritable_output_is_one_line_and_leaves_nothing(tmp_path, ckpt):
    """An output that cannot be written: one line, rc 2, nothing left behind (it used to be a
    Python traceback with rc 1): into a path under a file, into a read-only directory, and
    `--force` onto a directory that cannot be replaced."""
    (tmp_path / "afile").write_text("x")
    for cmd in (("convert", ckpt, str(tmp_path / "afile" / "out"), "--to", "gptq"),
                ("fixture", str(tmp_path / "afile" / "out"))):
        _one_line_error(run(*cmd), "cannot write the output", "nothing was written")
    ro = tmp_path / "ro"
    ro.mkdir()
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "config.json").write_text("{}")
    with _read_only(ro):
        for cmd in (("convert", ckpt, str(ro / "out"), "--to", "gptq"), ("fixture", str(ro / "out"))):
            _one_line_error(run(*cmd), f"{ro / 'out'}: cannot write the output")
        assert os.listdir(ro) == []
    if os.geteuid() == 0:     # an immutable directory cannot be renamed; a mode of 555 does not stop that
        with _read_only(keep):
            _one_line_error(run("convert", ckpt, str(keep), "--to", "bf16", "--force"), f"{keep}: cannot write")
            assert os.listdir(keep) == ["config.json"]
    assert sorted(os.listdir(tmp_path)) == ["afile", "keep", "ro"]


def test_kernels_prints_the_table_for_a_device_and_engine_version(tmp_path):
    """`grace-qat kernels` names the table that applies, its engine default and each shape's second
    kernel; on a device and version nothing was measured for, it says every layer keeps one copy."""
    table = tmp_path / "t.json"
    table.write_text(json.dumps({
        "device": "Test GPU", "engine": "vllm", "engine_version": "9.9.1", "measured": "by this test",
        "engine_default": {"instead_of": "MacheteLinearKernel", "use": "HummingLinearKernel", "measured": "m"},
        "shapes": {"w4g128 n4096 k2048": {"large": "HummingLinearKernel", "small": "MarlinLinearKernel",
                                          "max_m": 8, "gain": 1.2},
                   "w4g128 n4096 k4096": {"large": "HummingLinearKernel", "small": "CudaGemvKernel", "max_m": 16,
                                          "gain": 1.1, "configs": [[1, [1, 8, 1, 2]], [16, [2, 8, 1, 2]]]}}}))
    r = run("kernels", "--device", "Test GPU", "--engine-version", "9.9.1", "--table", str(table))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "Test GPU, vllm 9.9.1: by this test",
        "  where the engine picks MacheteLinearKernel by its own ranking: HummingLinearKernel instead (m)",
        "  w4g128 n4096 k2048       next to HummingLinearKernel: MarlinLinearKernel for M <= 8 (>= 1.2x)",
        "  w4g128 n4096 k4096       next to HummingLinearKernel: CudaGemvKernel for M <= 16 (>= 1.1x), "
        "measured launch configs for M 1/16"]
    r = run("kernels", "--device", "Test GPU", "--engine-version", "9.9.2", "--table", str(table))
    assert r.returncode == 0 and "no kernel table measured: every layer keeps one packed copy" in r.stdout
