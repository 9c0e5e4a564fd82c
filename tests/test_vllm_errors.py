"""First errors a vLLM user meets: one actionable line each (real vLLM, real entry point)."""
import subprocess
import sys

import pytest

from requires import require

require("vllm")

SCRIPT = r"""
import logging, sys
import vllm.logger   # vLLM configures its loggers on import (dictConfig): attach the handler after
import grace_vllm
grace_vllm._KERNEL_MODULE = "vllm.model_executor.kernels.no_such_module"   # as on vLLM < 0.26
records = []
class H(logging.Handler):
    def emit(self, r): records.append(r.getMessage())
logging.getLogger("vllm").addHandler(H())
grace_vllm.register()
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
print("REGISTERED", "grace_qat" in QUANTIZATION_METHODS)
print("MESSAGES", len(records))
print("MSG", records[0] if records else "")
"""


def test_too_old_vllm_is_one_actionable_line():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                       env={"VLLM_PLUGINS": "", "PATH": "/usr/bin:/bin"})
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.split(" ", 1)[0] in
               ("REGISTERED", "MESSAGES", "MSG"))
    assert out["REGISTERED"] == "False", r.stdout + r.stderr
    assert out["MESSAGES"] == "1"
    assert "not supported" in out["MSG"] and "install vLLM >= 0.26" in out["MSG"] and "\n" not in out["MSG"]


def test_supported_vllm_registers():
    r = subprocess.run([sys.executable, "-c", "import grace_vllm; print(grace_vllm._unsupported_vllm())"],
                       capture_output=True, text=True, timeout=300)
    assert r.stdout.strip().splitlines()[-1] == "None", r.stderr


# -- a bad checkpoint through the real `vllm serve` command -------------------------------------------

def _nan_step_checkpoint(path, module):
    """A tiny GRACE format-A checkpoint whose sidecar has one NaN log-step in ``module``."""
    import torch
    from grace_qat.synthetic import write_qwen3vl
    write_qwen3vl(str(path), fmt="qat-sidecar", bits=4, seed=0)
    sidecar = path / "qat_quantized_weights.bin"
    steps = torch.load(sidecar, weights_only=True)
    key = module + ".log_scale"
    steps[key] = steps[key].clone()
    steps[key].view(-1)[3] = float("nan")
    torch.save(steps, sidecar)
    return sidecar, key


def _awq_group_size_checkpoint(path, module):
    """A tiny GRACE AWQ checkpoint whose awq_quantized_modules.json says group size 64 for tensors
    packed with 128 (issue 27: it passed the first process and killed the worker after 37 s)."""
    import json
    from grace_qat.synthetic import write_qwen3vl
    write_qwen3vl(str(path), fmt="awq", bits=4, seed=0)
    meta = path / "awq_quantized_modules.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "group_size": 64}))
    return path / "model.safetensors", module + ".qzeros"


def _bad_json_config(path, module):
    """A config.json that is no JSON: vLLM reads it before anything of the plugin sees the model."""
    path.mkdir()
    (path / "config.json").write_text('{"architectures": [')
    return path / "config.json", ""


@pytest.mark.parametrize("module,make,says", [
    # read while vLLM validates its config (pydantic)
    ("model.language_model.layers.0.mlp.down_proj", _nan_step_checkpoint, "finite"),
    ("model.language_model.layers.1.self_attn.q_proj", _nan_step_checkpoint, "finite"),  # was: worker
    ("model.language_model.layers.0.mlp.down_proj", _awq_group_size_checkpoint, "group size 64"),
    (None, _bad_json_config, "not valid JSON"),          # before the plugin's checks (issue 27)
])
def test_vllm_serve_bad_checkpoint_is_our_first_and_last_line(tmp_path, module, make, says):
    """`vllm serve DIR` on a checkpoint with a NaN log-step, or an AWQ group size its tensors
    contradict, exits non-zero before any engine starts, and what it says about the failure is one
    line of ours (file, tensor, expectation): no traceback, no pydantic ValidationError, no
    "Engine core initialization failed"."""
    import os

    import re

    from grace_qat.vllm_server import free_port, vllm_command
    ckpt = tmp_path / "bad"
    sidecar, key = make(ckpt, module)
    cmd = vllm_command() + [str(ckpt), "--max-model-len", "1024", "--port", str(free_port())]
    assert os.path.basename(cmd[0]) == "vllm" and cmd[1] == "serve", cmd   # the documented command
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    errors = [line for line in out.splitlines()
              if re.search(r"Traceback|ValidationError|RuntimeError|GraceFormatError|^ERROR| ERROR ", line)]
    assert len(errors) == 1, "\n".join(errors)[-6000:]
    assert errors[0].startswith(f"ERROR: {sidecar}: {key}") and says in errors[0], errors[0]
    assert out.rstrip().splitlines()[-1] == errors[0]
    assert "Engine core" not in out and "ValidationError" not in out


def test_vllm_command_runs_in_the_set_up_venv():
    """The documented `vllm` command starts in the venv scripts/setup.sh made (on vllm-cpu it used to
    die with PackageNotFoundError: No package metadata was found for vllm)."""
    import os

    import vllm
    script = os.path.join(os.path.dirname(sys.executable), "vllm")
    r = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1].startswith(vllm.__version__), r.stdout


# -- a model path that is no model: the first errors, before any check of the plugin's ------------------

PATH_SCRIPT = r"""
import json, sys
import grace_vllm
grace_vllm.register()
from vllm.engine.arg_utils import EngineArgs
for path, quant in json.loads(sys.argv[1]):
    try:
        EngineArgs(model=path, quantization=quant, max_model_len=1024).create_engine_config()
        print("RESULT", json.dumps([path, quant, None]))
    except BaseException as e:          # what reaches vllm serve's top level (and our excepthook)
        err = grace_vllm.grace_error(e)
        print("RESULT", json.dumps([path, quant, None if err is None else str(err)]))
"""


def test_model_path_errors_are_one_line(tmp_path):
    """A path that does not exist, a file, an empty directory, a directory without config.json, a
    config.json that is no JSON: vLLM refuses each before the plugin's hooks see the model (issue 27:
    60-74 lines of traceback); the excepthook's line says what is wrong, with or without the flag.
    The vLLM code is the real `vllm serve` path (EngineArgs.create_engine_config)."""
    import json
    import os
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "noconf").mkdir()
    (tmp_path / "noconf" / "model.safetensors").write_bytes(b"\0" * 8)
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text('{"architectures": [')
    want = {"nope": f"{tmp_path}/nope: does not exist", "afile": f"{tmp_path}/afile: not a directory",
            "empty": f"{tmp_path}/empty: empty directory", "noconf": f"{tmp_path}/noconf/config.json: missing",
            "badjson": f"{tmp_path}/badjson/config.json: not valid JSON"}
    cases = [[str(tmp_path / name), quant] for name in want for quant in (None, "grace_qat")]
    r = subprocess.run([sys.executable, "-c", PATH_SCRIPT, json.dumps(cases)], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    got = [json.loads(line[len("RESULT "):]) for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(got) == len(cases), r.stdout[-3000:] + r.stderr[-6000:]
    for path, quant, line in got:
        expect = want[os.path.basename(path)]
        assert line is not None and line.startswith(expect) and "\n" not in line, (path, quant, line)
