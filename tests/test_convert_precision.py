"""convert keeps the source's scale precision where the target can hold it, and says what is exact
(issue 17, item 4). The expected scales are read here from the source files with safetensors."""
import os
import subprocess
import sys

import pytest
import torch

from grace_qat import synthetic
from ckpt_files import load_all_tensors

CLI = os.path.join(os.path.dirname(sys.executable), "grace-qat")
M = "model.language_model.layers.1.mlp.down_proj"


def run(*args):
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def awq_src(tiny):
    return tiny["awq"]


@pytest.mark.parametrize("to,key,transpose", [("gptq", "scales", False),
                                              ("compressed-tensors", "weight_scale", True),
                                              ("awq", "scales", False)])
def test_awq_source_fp16_scales_stay_fp16_and_exact(awq_src, tmp_path, to, key, transpose):
    src = load_all_tensors(awq_src)
    assert src[M + ".scales"].dtype == torch.float16
    out = tmp_path / to
    r = run("convert", awq_src, str(out), "--to", to)
    assert r.returncode == 0, r.stderr
    assert "codes bit-exact, scales exact (fp16, as in the source)" in r.stdout, r.stdout
    got = load_all_tensors(str(out))
    n = 0
    for k, ref in src.items():
        if not k.endswith(".scales"):
            continue
        mod = k[: -len(".scales")]
        s = got[f"{mod}.{key}"]
        assert s.dtype == torch.float16, (k, s.dtype)
        assert torch.equal(s.t() if transpose else s, ref), k
        n += 1
    assert n > 0


def test_qat_source_says_scales_rounded_from_fp32(tmp_path):
    src = synthetic.write_qwen3vl(str(tmp_path / "s4"), size="tiny", fmt="qat-sidecar", bits=4)
    r = run("convert", src, str(tmp_path / "g"), "--to", "gptq")
    assert r.returncode == 0, r.stderr
    assert "codes bit-exact, scales rounded from fp32 to bf16" in r.stdout, r.stdout
    r = run("convert", src, str(tmp_path / "a"), "--to", "awq")
    assert r.returncode == 0 and "scales rounded from fp32 to fp16" in r.stdout, r.stdout + r.stderr
    assert load_all_tensors(str(tmp_path / "a"))[M + ".scales"].dtype == torch.float16
