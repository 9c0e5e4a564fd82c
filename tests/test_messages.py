"""One-line messages that say what is wrong and never advise unsafe loading (issue 17, items 5, 6)."""
import os
import pickle
import shutil
import subprocess
import sys

import pytest
from requires import require
import torch

from grace_qat.checkpoint import GraceCheckpoint, load_sidecar
from grace_qat.errors import GraceFormatError

CLI = os.path.join(os.path.dirname(sys.executable), "grace-qat")
SIDECAR = "qat_quantized_weights.bin"
M = "model.language_model.layers.2.mlp.down_proj"


def run(*args):
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=300)


class _Payload:
    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize("container", ["top", "nested"])
def test_hostile_pickle_refusal_never_advises_weights_only_false(tmp_path, container):
    p = tmp_path / SIDECAR
    obj = _Payload() if container == "top" else {M + ".log_scale": _Payload()}
    torch.save(obj, p)
    with pytest.raises(GraceFormatError) as e:
        load_sidecar(str(p))
    msg = str(e.value)
    assert msg.startswith(f"{p}: refused to load: it holds more than tensors") and "\n" not in msg
    assert "weights_only" not in msg and "weights_only=False" not in msg, msg
    assert "trust" not in msg.lower(), msg
    # a plain pickle (not a torch.save zip) goes through the same refusal
    with open(p, "wb") as f:
        pickle.dump(obj, f)
    with pytest.raises(GraceFormatError) as e:
        load_sidecar(str(p))
    assert "weights_only" not in str(e.value), str(e.value)


@pytest.fixture(scope="module")
def s4(tiny):
    return tiny["qat-sidecar"]


def test_sidecar_missing_one_log_scale_names_that_module(s4, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(s4, d)
    side = dict(torch.load(d / SIDECAR, weights_only=True))
    del side[M + ".log_scale"]
    torch.save(side, d / SIDECAR)
    with pytest.raises(GraceFormatError) as e:
        GraceCheckpoint.open(str(d))
    msg = str(e.value)
    assert msg.startswith(f"{d / SIDECAR}: {M}.log_scale missing"), msg
    assert "unexpected entry" not in msg


def test_fixture_awq_8_bit_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "fx"
    r = run("fixture", str(out), "--format", "awq", "--bits", "8")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "4-bit only" in r.stderr and str(out) in r.stderr
    assert not out.exists()


def test_demo_help_prints_the_demos_help():
    require("vllm")
    r = run("demo", "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: grace-qat demo") and "--question" in r.stdout, r.stdout


def test_missing_path_says_does_not_exist(tmp_path, s4):
    r = run("inspect", str(tmp_path / "nope"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nope: does not exist" in r.stderr, r.stderr
    f = tmp_path / "file"
    f.write_text("x")
    r = run("inspect", str(f))
    assert r.returncode == 2 and "file: not a directory" in r.stderr, r.stderr
