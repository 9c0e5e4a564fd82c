"""The distribution a user installs (issue 27, item 4): the wheel and the sdist build from the
checkout, and the wheel, installed without dependencies into a clean venv, registers the console
script and both engine plugins' entry points and carries its data files. The release workflow that
publishes them to PyPI runs the same check before it uploads."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(".git", ".venv*", ".sglang-*", "__pycache__", "build", "dist", "*.egg-info",
                              ".pytest_cache", ".hypothesis", ".devbundle*", ".whl", ".gpu", "*.safetensors")
CHECK = r"""
import importlib.metadata as m, json, os
import grace_qat, grace_vllm, grace_sglang
eps = m.entry_points()
print(json.dumps({
    "scripts": [e.value for e in eps.select(group="console_scripts", name="grace-qat")],
    "vllm": [e.value for e in eps.select(group="vllm.general_plugins", name="grace_qat")],
    "sglang": [e.value for e in eps.select(group="sglang.srt.plugins", name="grace_qat")],
    "version": m.version("grace-qat"),
    "data": sorted(f for f in os.listdir(os.path.join(os.path.dirname(grace_qat.__file__), "kernels"))
                   if f.endswith(".json"))
            + sorted(f for f in os.listdir(os.path.dirname(grace_qat.__file__)) if f.endswith(".jinja")),
    "where": os.path.dirname(os.path.dirname(grace_qat.__file__)),
}))
"""


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """The wheel and the sdist, built by the project's build backend from a copy of the checkout
    (a build writes build/ and *.egg-info next to the sources)."""
    root = tmp_path_factory.mktemp("packaging")
    src, out = root / "src", root / "dist"
    shutil.copytree(ROOT, src, ignore=SKIP)
    built = {}
    for kind in ("sdist", "wheel"):      # PEP 517 hooks, one process each, as a build frontend calls them
        code = f"import sys; from setuptools import build_meta as b; print('BUILT', b.build_{kind}(sys.argv[1]))"
        r = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        built[kind] = out / next(ln for ln in r.stdout.splitlines() if ln.startswith("BUILT ")).split()[1]
        assert built[kind].is_file(), (kind, sorted(os.listdir(out)))
    return {"root": root, **built}


def test_wheel_installs_in_a_clean_venv_and_registers_both_plugins(dist):
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    venv = dist["root"] / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--no-index",
                        "--disable-pip-version-check", str(dist["wheel"])], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}   # only the venv
    r = subprocess.run([str(venv / "bin" / "python"), "-c", CHECK], capture_output=True, text=True, env=env,
                       cwd=dist["root"], timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["where"].startswith(str(venv)), got["where"]         # the installed copy, not the checkout
    assert got["scripts"] == ["grace_qat.cli:main"] and got["vllm"] == ["grace_vllm:register"], got
    assert got["sglang"] == ["grace_sglang:register"] and got["version"] == version, got
    assert got["data"] == ["table-h100-sglang0.5.23.json", "table-h100-vllm0.26.0.json", "table-h100-vllm0.34.0.json",
                           "table-h200-vllm0.26.0.json",
                           "llava_vicuna_v1.jinja"], got
    # the console script runs (without torch: the engines' venvs bring it)
    r = subprocess.run([str(venv / "bin" / "grace-qat"), "--version"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == f"grace-qat {version}", r.stdout + r.stderr


def test_sdist_holds_the_sources_the_wheel_is_built_from(dist):
    with tarfile.open(dist["sdist"]) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    with zipfile.ZipFile(dist["wheel"]) as z:
        in_wheel = {n for n in z.namelist() if n.startswith(("grace_qat/", "grace_vllm/", "grace_sglang/"))}
    assert {"pyproject.toml", "README.md"} <= names
    assert in_wheel and in_wheel <= names, sorted(in_wheel - names)


def test_release_workflow_builds_checks_and_publishes_with_trusted_publishing():
    flow = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yml").read_text())
    on = flow.get("on", flow.get(True))             # YAML 1.1 reads the key `on` as True
    assert on["push"]["tags"] == ["v*"]
    build, publish = flow["jobs"]["build"], flow["jobs"]["publish"]
    runs = "\n".join(s.get("run", "") for s in build["steps"])
    assert "python -m build" in runs and "pip install --no-deps dist/*.whl" in runs and "entry_points" in runs
    assert publish["needs"] == "build" and publish["permissions"] == {"id-token": "write"}
    assert any(s.get("uses", "").startswith("pypa/gh-action-pypi-publish@") for s in publish["steps"])
    assert not any("password" in (s.get("with") or {}) for s in publish["steps"])   # no stored token
