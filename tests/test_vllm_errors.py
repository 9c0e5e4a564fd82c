"""First errors a vLLM user meets: one actionable line each (real vLLM, real entry point)."""
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

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
