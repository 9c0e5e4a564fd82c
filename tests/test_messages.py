"""One-line messages that say what is wrong and never advise unsafe loading (issue 17, items 5, 6)."""
import json
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


# -- issue 27, item 11: CLI polish ---------------------------------------------------------------------

def test_top_level_help_and_version_are_plain_and_import_no_torch():
    """`grace-qat --help` took 3 s (torch imported to build the parser) and showed ``markup``;
    there was no --version."""
    import re
    probe = ("import sys\nfrom grace_qat.cli import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print('TORCH', 'torch' in sys.modules)\n")
    for flag in ("--help", "--version"):
        r = subprocess.run([sys.executable, "-c", probe, flag], capture_output=True, text=True, timeout=120)
        assert r.stdout.rstrip().endswith("TORCH False"), (flag, r.stdout, r.stderr)
        assert "``" not in r.stdout, r.stdout
    pyproject = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")).read()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"grace-qat {version}", r.stdout + r.stderr


def test_demo_help_describes_the_demo_in_full():
    r = run("demo", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "over the OpenAI-compatible HTTP API;" in text and "packed weights save." in text, text
    assert "Hub id" in text and "checkpoint directory" not in text, text


def test_junk_sidecar_says_what_the_file_is(tmp_path, s4):
    """A sidecar of junk bytes was reported as '(KeyError: 101)'."""
    d = tmp_path / "junk"
    shutil.copytree(s4, d)
    (d / SIDECAR).write_bytes(b"hello world, this is not a sidecar")
    r = run("inspect", str(d))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{d / SIDECAR}: not a readable torch.save file (it starts with b'hello wo', neither a zip " \
           "archive nor a pickle)" in r.stderr and "KeyError" not in r.stderr, r.stderr


def test_group_size_from_config_json_is_named_as_the_source(tmp_path, s4):
    """A group size config.json states, which the sidecar's log-steps contradict: the line starts at
    config.json (it used to name the sidecar only, as if the sidecar were wrong)."""
    d = tmp_path / "gs"
    shutil.copytree(s4, d)
    cfg = json.load(open(d / "config.json"))
    cfg["quantization_config"] = {"quant_method": "grace_qat", "bits": 4, "group_size": 64}
    json.dump(cfg, open(d / "config.json", "w"))
    r = run("inspect", str(d))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"grace-qat: error: {d / 'config.json'}: quantization_config.group_size 64 "
                               f"does not fit {d / SIDECAR}: "), r.stderr


DETECT_LOG = r"""
import json, logging, os, sys
import vllm.logger   # vLLM configures its loggers on import: attach the handler after
import grace_vllm
grace_vllm.register()
from vllm.transformers_utils.config import get_config
from grace_vllm import parser as detect_hook
lines = []
class H(logging.Handler):
    def emit(self, r): lines.append(r.getMessage())
logging.getLogger("vllm.grace_qat").addHandler(H())
logging.getLogger("vllm.grace_qat").setLevel(logging.INFO)
out = {}
for argv in (["vllm", "serve", sys.argv[1]], ["vllm", "serve", sys.argv[1], "--quantization", "grace_qat"]):
    sys.argv[:] = argv
    os.environ.pop(detect_hook._LOGGED_ENV, None)
    del lines[:]
    get_config(argv[2], trust_remote_code=False)
    out[" ".join(argv[3:]) or "none"] = [x for x in lines if "is a GRACE" in x]
print(json.dumps(out))
"""


def test_detection_line_names_the_path_once_and_offers_the_switch_only_without_the_flag(s4):
    pytest.importorskip("vllm")
    r = subprocess.run([sys.executable, "-c", DETECT_LOG, s4], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "VLLM_PLUGINS": ""})
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    plain, flagged = out["none"], out["--quantization grace_qat"]
    assert len(plain) == len(flagged) == 1, out
    assert plain[0].count(s4) == 1 and "GRACE_QAT_AUTODETECT=0 turns this off" in plain[0], plain
    assert flagged[0].count(s4) == 1 and "GRACE_QAT_AUTODETECT" not in flagged[0], flagged


GRID_HINT = r"""
import json, logging, os, sys
import vllm.logger
import grace_vllm
grace_vllm.register()
from vllm.transformers_utils.config import get_config
lines = []
class H(logging.Handler):
    def emit(self, r): lines.append(r.getMessage())
log = logging.getLogger("vllm.grace_qat")
log.addHandler(H())
log.setLevel(logging.INFO)
out = {}
for name, path, flag in json.loads(sys.argv[1]):
    sys.argv[1:] = ["serve", path] + (["--quantization", "grace_qat"] if flag else [])
    del lines[:]
    cfg = get_config(path, trust_remote_code=False)
    out[name] = {"lines": [x for x in lines if "grid" in x], "qc": getattr(cfg, "quantization_config", None)}
print(json.dumps(out))
"""


def test_bare_grid_served_without_the_flag_says_it_could_be_packed(tiny):
    """A bare grid (no sidecar, no log-steps) without the flag is served as BF16 (documented); the
    detection hook now says so in one line when the weights it probes lie on a 4/8-bit grid
    (issue 27: it happened with no word), and says nothing for a plain model or with the flag."""
    pytest.importorskip("vllm")
    cases = [["grid", tiny["qat-grid"], False], ["plain", tiny["plain"], False],
             ["grid-flag", tiny["qat-grid"], True]]
    r = subprocess.run([sys.executable, "-c", GRID_HINT, json.dumps(cases)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "VLLM_PLUGINS": ""})
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["grid"]["qc"] is None and len(out["grid"]["lines"]) == 1, out
    assert out["grid"]["lines"][0] == (f"grace_qat: {tiny['qat-grid']}: the weights lie on a 4-bit grid (a GRACE "
                                       "checkpoint without sidecar or log-steps?); served as BF16 as stored, "
                                       "--quantization grace_qat serves them packed"), out
    assert out["plain"]["lines"] == [] and out["grid-flag"]["lines"] == [], out


def test_demo_serves_without_the_flag_where_the_plugin_detects(tiny):
    """The README leads with the flagless command; the demo passed --quantization grace_qat anyway."""
    from grace_qat.vllm_server import serve_flags
    assert serve_flags(tiny["qat-sidecar"]) == [] and serve_flags(tiny["awq"]) == []
    assert serve_flags(tiny["qat-inline"]) == []
    assert serve_flags(tiny["qat-grid"]) == ["--quantization", "grace_qat"]     # no marker: the flag
