"""The model cards' own command on vLLM: ``vllm serve Owner/Name`` with no flag, from the Hub cache.

GRACE checkpoints without a ``quantization_config`` used to be served silently as BF16 (format A)
or not at all (format B) unless ``--quantization grace_qat`` was given, and Hub ids were resolved
only on the flag path. No hub is reachable here: every test runs against a pre-populated local
Hugging Face cache (tests/hub_cache.py) under a temporary ``HF_HOME`` with ``HF_HUB_OFFLINE=1``,
through vLLM's own config parser and ``ModelConfig`` and, end to end, the real ``vllm serve``
command over HTTP.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hub_cache import add_to_hub_cache

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_A, REPO_B, REPO_PLAIN = "GraceTest/Qwen3-VL-tiny-GRACE-W4G128", "GraceTest/Qwen3-VL-tiny-GRACE-AWQ", \
    "GraceTest/Qwen3-VL-tiny-plain"


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny):
    """HF_HOME with three cached repositories: format A (sidecar), format B (AWQ), a plain model."""
    base = tmp_path_factory.mktemp("hub")
    home = str(base / "hf_home")
    snapshots = {}
    for repo, fmt in ((REPO_A, "qat-sidecar"), (REPO_B, "awq"), (REPO_PLAIN, "plain")):
        src = tiny[fmt]
        snapshots[repo] = add_to_hub_cache(home, repo, src)
    env = {"HF_HOME": home, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(HERE), HERE, os.environ.get("PYTHONPATH", "")])}
    return {"home": home, "env": env, "snapshots": snapshots, "cwd": str(base)}


def _run(code: str, env: dict, cwd: str) -> dict:
    """Run ``code`` in a fresh interpreter (huggingface_hub reads HF_HOME at import) and parse the
    JSON it prints last."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, **env}, cwd=cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- the shared env-flag helper ------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "on", "On", "0", "false", "no", "off", "OFF"])
def test_env_flag_reads_flags_as_huggingface_hub_does(value, monkeypatch):
    from huggingface_hub.constants import _is_true   # huggingface_hub's own reading of HF_HUB_OFFLINE
    from grace_qat.settings import flag as env_flag, hub_offline
    monkeypatch.setenv("GRACE_QAT_TEST_FLAG", value)
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert env_flag("GRACE_QAT_TEST_FLAG", not _is_true(value)) is _is_true(value)
    assert hub_offline() is _is_true(value)


def test_env_flag_refuses_a_misspelt_value_in_one_line(monkeypatch):
    from grace_qat.errors import GraceFormatError
    from grace_qat.settings import flag as env_flag
    monkeypatch.setenv("GRACE_QAT_AUTODETECT", "nope")
    with pytest.raises(GraceFormatError) as e:
        env_flag("GRACE_QAT_AUTODETECT", True)
    assert "GRACE_QAT_AUTODETECT='nope'" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv("GRACE_QAT_AUTODETECT", "")
    assert env_flag("GRACE_QAT_AUTODETECT", True) is True


# -- vLLM's config path, without an engine --------------------------------------------------------------

PARSE = r"""
import json, os
import grace_vllm
grace_vllm.register()
from vllm.transformers_utils.config import get_config
from grace_qat.hub import local_checkpoint_dir
out = {}
for repo in %(repos)r:
    cfg = get_config(repo, trust_remote_code=False)
    out[repo] = getattr(cfg, "quantization_config", None)
out["resolved"] = local_checkpoint_dir(%(repo_a)r)
out["sidecar"] = os.path.isfile(os.path.join(out["resolved"], "qat_quantized_weights.bin"))
print(json.dumps(out))
"""


@pytest.mark.parametrize("autodetect", ["on", "0"])
def test_vllm_config_parser_detects_hub_checkpoints_offline(hub, autodetect):
    """vLLM's real get_config on Hub ids: GRACE repos get quant_method grace_qat, the plain one not;
    GRACE_QAT_AUTODETECT=0 leaves every config as it is on disk."""
    repos = [REPO_A, REPO_B, REPO_PLAIN]
    out = _run(PARSE % {"repos": repos, "repo_a": REPO_A},
               {**hub["env"], "GRACE_QAT_AUTODETECT": autodetect, "VLLM_PLUGINS": ""}, hub["cwd"])
    if autodetect == "0":
        assert [out[r] for r in repos] == [None, None, None]
    else:
        assert out[REPO_A] == {"quant_method": "grace_qat", "format": "qat-sidecar"}
        assert out[REPO_B] == {"quant_method": "grace_qat", "format": "awq"}
        assert out[REPO_PLAIN] is None
    # the Hub id resolves to the cached snapshot, sidecar included
    assert os.path.samefile(out["resolved"], hub["snapshots"][REPO_A]) and out["sidecar"]


def test_unknown_hub_id_offline_is_one_line(hub):
    out = _run(r"""
import json
from grace_qat.errors import GraceFormatError
from grace_qat.hub import local_checkpoint_dir
try:
    local_checkpoint_dir("GraceTest/not-in-the-cache")
    print(json.dumps({"error": None}))
except GraceFormatError as e:
    print(json.dumps({"error": str(e)}))
""", hub["env"], hub["cwd"])
    assert "GraceTest/not-in-the-cache" in out["error"] and "HF_HUB_OFFLINE" in out["error"]
    assert "\n" not in out["error"]


# -- the real `vllm serve`, over HTTP ---------------------------------------------------------------------

@pytest.mark.engine
@pytest.mark.parametrize("repo,fmt", [(REPO_A, "qat-sidecar"), (REPO_B, "awq")])
def test_vllm_serve_hub_id_without_flag(hub, repo, fmt, tmp_path):
    """``vllm serve Owner/Name`` exactly as a model card says (no --quantization): detected, said in
    one log line, served by grace_qat, and answering an image chat."""
    from grace_qat.vllm_server import VLLMServer, sample_image_data_url
    env = {**hub["env"], "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_INT4_W4A8": "0"}
    server = VLLMServer(repo, ["--max-model-len", "1024", "--dtype", "bfloat16", "--enforce-eager",
                               "--limit-mm-per-prompt", json.dumps({"image": 1})],
                        log_path=str(tmp_path / "serve.log"), env=env)
    assert os.path.basename(server.cmd[0]) == "vllm" and server.cmd[1:3] == ["serve", repo], server.cmd
    assert "--quantization" not in server.cmd
    with server:
        reply = server.chat("What is in this image?", sample_image_data_url(), max_tokens=8)
    log = server.log()
    assert reply["usage"]["completion_tokens"] >= 1 and reply["usage"]["prompt_tokens"] > 20
    # (offline, vLLM itself swaps the Hub id for its cached snapshot before parsing the config)
    detected = [line for line in log.splitlines() if f"is a GRACE {fmt} checkpoint" in line]
    assert len(detected) == 1, log[-6000:]                   # one line, in the first process only
    assert hub["snapshots"][repo] in detected[0], detected[0]
    assert "GRACE_QAT_AUTODETECT=0 turns this off" in detected[0]
    assert f"grace_qat: {fmt} checkpoint, W4 g128, 28 quantized linear modules" in log
    assert "quantization=grace_qat" in log                   # vLLM's own engine config line
    assert ("grace_qat: using " in log) or ("grace_qat: no vLLM W4 kernel" in log), log[-4000:]


# -- grace-qat inspect / convert on a Hub id -------------------------------------------------------------

def test_cli_takes_a_hub_id_from_the_cache(hub, tmp_path):
    """`grace-qat inspect/convert Owner/Name` read the cached snapshot, as `vllm serve` and the demo
    do (issue 27: "does not exist"); an id not in the cache is one line, its prefix said once."""
    cli = os.path.join(os.path.dirname(sys.executable), "grace-qat")
    env = {**os.environ, **hub["env"]}
    r = subprocess.run([cli, "inspect", REPO_A, "--json"], capture_output=True, text=True, env=env,
                       cwd=hub["cwd"], timeout=300)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert os.path.samefile(rep["path"], hub["snapshots"][REPO_A]) and rep["format"] == "qat-sidecar"
    out = tmp_path / "gptq"
    r = subprocess.run([cli, "convert", REPO_B, str(out), "--to", "gptq"], capture_output=True, text=True,
                       env=env, cwd=hub["cwd"], timeout=300)
    assert r.returncode == 0 and (out / "config.json").exists(), r.stderr
    r = subprocess.run([cli, "inspect", "GraceTest/not-in-the-cache"], capture_output=True, text=True, env=env,
                       cwd=hub["cwd"], timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("grace-qat: error: cannot find the checkpoint 'GraceTest/not-in-the-cache'"), r.stderr
