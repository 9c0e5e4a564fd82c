"""SGLang on a model card's own command: ``--model-path Owner/Name`` (a Hub id, no flag).

Run in the SGLang virtual environment (scripts/test.sh does). No hub is reachable: a pre-populated
local Hugging Face cache (tests/hub_cache.py) under a temporary ``HF_HOME``, ``HF_HUB_OFFLINE=1``,
and SGLang's own server-argument parsing, ``ModelConfig`` and ``get_quant_config`` in a fresh
interpreter (huggingface_hub reads ``HF_HOME`` when it is imported).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from requires import require

pytestmark = pytest.mark.sglang

require("sglang", reason="SGLang is not installed in this environment (tests for "
                          "grace_sglang need the .venv-sglang environment)")

from hub_cache import add_to_hub_cache  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPOS = {"GraceTest/Qwen3-VL-tiny-GRACE-W4G128": "qat-sidecar",
         "GraceTest/Qwen3-VL-tiny-GRACE-AWQ": "awq",
         "GraceTest/Qwen3-VL-tiny-plain": "plain"}

SCRIPT = r"""
import json, os
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.configs.load_config import LoadConfig
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.model_loader.weight_utils import get_quant_config
from sglang.srt.server_args import prepare_server_args
out = {}
for repo in %(repos)r:
    sa = prepare_server_args(["--model-path", repo, "--device", "cpu"])
    mc = ModelConfig.from_server_args(sa) if hasattr(ModelConfig, "from_server_args") else ModelConfig(model_path=repo)
    row = {"quantization": mc.quantization}
    if mc.quantization == "grace_qat":
        qc = get_quant_config(mc, LoadConfig(), {})
        row.update(path=qc.checkpoint().path, format=qc.format, bits=qc.bits, modules=len(qc.checkpoint().modules),
                   sidecar=qc.checkpoint().sidecar_path)
    out[repo] = row
print(json.dumps(out))
"""


@pytest.mark.parametrize("autodetect", ["1", "off"])
def test_sglang_hub_id_without_flag(tmp_path, autodetect, tiny):
    home = str(tmp_path / "hf_home")
    snapshots = {repo: add_to_hub_cache(home, repo, tiny[fmt])
                 for repo, fmt in REPOS.items()}
    env = {**os.environ, "HF_HOME": home, "HF_HUB_OFFLINE": "1", "GRACE_QAT_AUTODETECT": autodetect,
           "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", SCRIPT % {"repos": list(REPOS)}], capture_output=True,
                       text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for repo, fmt in REPOS.items():
        row = out[repo]
        if fmt == "plain" or autodetect == "off":
            assert row == {"quantization": None}, (repo, row)
            continue
        assert row["quantization"] == "grace_qat" and row["format"] == fmt, (repo, row)
        assert os.path.samefile(row["path"], snapshots[repo])          # the cached snapshot
        assert row["bits"] == 4 and row["modules"] == 28
        if fmt == "qat-sidecar":                                       # sidecar resolved too
            assert os.path.samefile(row["sidecar"], os.path.join(snapshots[repo], "qat_quantized_weights.bin"))
