"""The bit width comes from every module, not from the first one (issue 17, item 1).

A W4 checkpoint (no sidecar, or a sidecar) whose first module, layers.0.mlp.down_proj, has one
element at code 9 of its group's step looks 8-bit from that module alone. Every place that computes
all modules' codes (inspect, convert, the engines) must refuse it, naming the widths; the same
element in another module too. The broken weights are built here from the fixture's own sidecar
steps with plain torch (the independent side).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
from requires import require
import torch
from safetensors.torch import load_file, save_file

from grace_qat import synthetic
from grace_qat.checkpoint import GraceCheckpoint
from grace_qat.errors import GraceFormatError

CLI = os.path.join(os.path.dirname(sys.executable), "grace-qat")
LM = "model.language_model.layers"
FIRST = f"{LM}.0.mlp.down_proj"        # the first quantized module in natural order
LATER = f"{LM}.1.self_attn.q_proj"
SIDECAR = "qat_quantized_weights.bin"
ST = "model.safetensors"


def run(*args):
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=300)


def _steps(sidecar_dir: str, module: str) -> torch.Tensor:
    side = torch.load(os.path.join(sidecar_dir, SIDECAR), weights_only=True)
    w = side[module + ".weight"]
    return side[module + ".log_scale"].float().exp().reshape(w.shape[0], -1)


def _put_code_9(d: str, module: str, steps: torch.Tensor) -> None:
    """Element [0, 5] of ``module`` (group 0 of row 0) becomes bf16(9 * step): on the grid, code 9."""
    path = os.path.join(d, ST)
    tensors = load_file(path)
    w = tensors[module + ".weight"].clone()
    w[0, 5] = (9 * steps[0, 0]).to(w.dtype)
    assert torch.round(w[0, 5].float() / steps[0, 0]) == 9
    tensors[module + ".weight"] = w
    save_file(tensors, path, metadata={"format": "pt"})
    side = os.path.join(d, SIDECAR)
    if os.path.exists(side):            # the sidecar repeats the weight: keep the two consistent
        data = torch.load(side, weights_only=True)
        data[module + ".weight"] = w
        torch.save(data, side)


@pytest.fixture(scope="module")
def w4(tiny):
    side, grid = tiny["qat-sidecar"], tiny["qat-grid"]
    # same seed: the grid fixture's weights are the sidecar's, so the sidecar's steps are its steps
    assert torch.equal(load_file(os.path.join(grid, ST))[FIRST + ".weight"],
                       load_file(os.path.join(side, ST))[FIRST + ".weight"])
    assert not os.path.exists(os.path.join(grid, SIDECAR))
    return {"qat-sidecar": side, "qat-grid": grid}


def _broken(w4, fmt, module, tmp_path):
    d = str(tmp_path / f"{fmt}-{module.rsplit('layers.', 1)[1]}")
    shutil.copytree(w4[fmt], d)
    _put_code_9(d, module, _steps(w4["qat-sidecar"], module))
    return d


@pytest.mark.parametrize("fmt", ["qat-sidecar", "qat-grid"])
def test_clean_w4_is_4_bit_and_inferred(w4, fmt):
    ckpt = GraceCheckpoint.open(w4[fmt])
    assert (ckpt.format, ckpt.bits, ckpt.bits_inferred) == (fmt, 4, True)
    assert sum(1 for _ in ckpt.iter_quantized()) == len(ckpt.modules)
    assert GraceCheckpoint.open(w4[fmt], bits=4).bits_inferred is False


@pytest.mark.parametrize("fmt", ["qat-sidecar", "qat-grid"])
def test_first_module_at_code_9_is_refused_by_inspect_and_convert(w4, fmt, tmp_path):
    d = _broken(w4, fmt, FIRST, tmp_path)
    ckpt = GraceCheckpoint.open(d)
    assert (ckpt.bits, ckpt.bits_inferred) == (8, True)     # cheap: open() reads the first module
    with pytest.raises(GraceFormatError) as e:
        list(ckpt.iter_quantized())
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(os.path.join(d, ST) + ": " + f"{LM}.0.mlp.gate_proj.weight")
    assert "4-bit grid" in msg and "inferred as 8 bits" in msg and "disagree" in msg, msg
    r = run("inspect", d)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stdout + r.stderr
    assert "inferred as 8 bits" in r.stderr and "4-bit grid" in r.stderr and "verified" not in r.stdout
    out = tmp_path / "out"
    r = run("convert", d, str(out), "--to", "gptq")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "inferred as 8 bits" in r.stderr, r.stderr
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".out.")]
    # stated width: checked against it, with that width in the message
    r = run("inspect", d, "--bits", "4")
    assert r.returncode == 2 and FIRST in r.stderr and "4-bit" in r.stderr and "8-bit" not in r.stderr, r.stderr


@pytest.mark.parametrize("fmt", ["qat-sidecar", "qat-grid"])
def test_later_module_at_code_9_is_refused_naming_both_widths(w4, fmt, tmp_path):
    d = _broken(w4, fmt, LATER, tmp_path)
    ckpt = GraceCheckpoint.open(d)
    assert ckpt.bits == 4
    r = run("inspect", d)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stdout + r.stderr
    assert LATER + ".weight" in r.stderr and os.path.join(d, ST) in r.stderr
    assert "inferred as 4 bits" in r.stderr and "disagree" in r.stderr, r.stderr
    if fmt == "qat-sidecar":
        assert "worst code 9" in r.stderr and "needs 8 bits" in r.stderr, r.stderr
    else:
        assert "grid of 8-bit codes" in r.stderr, r.stderr
    assert "8-bit range" not in r.stderr


def test_w8_checkpoints_still_infer_8(tmp_path):
    d = synthetic.write_qwen3vl(str(tmp_path / "w8"), size="tiny", fmt="qat-sidecar", bits=8)
    ckpt = GraceCheckpoint.open(d)
    assert (ckpt.bits, ckpt.bits_inferred) == (8, True)
    assert sum(1 for _ in ckpt.iter_quantized()) == len(ckpt.modules)
    r = run("inspect", d)
    assert r.returncode == 0 and "verified" in r.stdout, r.stderr


# -- the real vLLM CPU engine ------------------------------------------------------------------

ENGINE = r"""
import json, sys


def main(cases):
    import grace_vllm
    grace_vllm.register()
    from vllm import LLM
    for name, path in cases:
        try:
            LLM(path, quantization="grace_qat", dtype="bfloat16", enforce_eager=True, max_model_len=512,
                limit_mm_per_prompt={"image": 0}, distributed_executor_backend="uni", seed=0)
            print("RESULT", json.dumps({"case": name, "loaded": True}), flush=True)
        except BaseException as e:
            chain, cur = [], e
            while cur is not None:
                chain.append(f"{type(cur).__name__}: {cur}")
                cur = cur.__cause__ or cur.__context__
            print("RESULT", json.dumps({"case": name, "loaded": False, "chain": chain}), flush=True)


if __name__ == "__main__":      # vLLM's engine core is a spawned process: it re-imports this file
    main(json.loads(sys.argv[1]))
"""
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_INT4_W4A8": "0", "VLLM_NO_USAGE_STATS": "1",
              "VLLM_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
              "OMP_NUM_THREADS": "1"}


@pytest.mark.engine
def test_vllm_refuses_w4_with_first_module_at_code_9(w4, tmp_path):
    require("vllm")
    cases = [("first", _broken(w4, "qat-sidecar", FIRST, tmp_path)),
             ("later", _broken(w4, "qat-sidecar", LATER, tmp_path))]
    script = tmp_path / "engine_bits.py"
    script.write_text(ENGINE)
    r = subprocess.run([sys.executable, str(script), json.dumps(cases)], capture_output=True, text=True,
                       timeout=900, env={**os.environ, **ENGINE_ENV}, cwd=str(tmp_path))
    out = r.stdout + r.stderr
    results = {}
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
            results[res["case"]] = res
    assert set(results) == {"first", "later"}, out[-6000:]
    expect = {"first": "inferred as 8 bits", "later": "inferred as 4 bits"}
    for name, what in expect.items():
        assert not results[name]["loaded"], f"{name}: vLLM served a W4 checkpoint with a code-9 weight"
        text = "\n".join(results[name]["chain"]) + "\n" + out
        assert any("GraceFormatError" in ln and what in ln and "disagree" in ln for ln in text.splitlines()), \
            f"{name}: no GraceFormatError '{what}':\n{out[-6000:]}"
