"""The scripts that only run elsewhere (the engine-image workflow on a GPU runner, tests/gpu/run.sh
on the GPU machine) still have to parse and point at files that exist: checked here, in CI."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "engine-images.yml"
RUN_SH = ROOT / "tests" / "gpu" / "run.sh"


def _repo_paths(text: str) -> set[str]:
    return set(re.findall(r"\b((?:tests|benchmarks|scripts)/[\w/.-]+\.(?:py|sh))\b", text))


def test_engine_image_workflow_parses_and_covers_both_engines():
    flow = yaml.safe_load(WORKFLOW.read_text())
    jobs = flow["jobs"]
    images = {name: job["strategy"]["matrix"]["image"] for name, job in jobs.items()}
    # the oldest supported release, the current ones named in the README's support matrix, and latest
    assert images == {"vllm": ["vllm/vllm-openai:v0.26.0", "vllm/vllm-openai:v0.32.0",
                               "vllm/vllm-openai:v0.33.0", "vllm/vllm-openai:latest"],
                      "sglang": ["lmsysorg/sglang:v0.5.17", "lmsysorg/sglang:v0.5.21",
                                 "lmsysorg/sglang:v0.5.23", "lmsysorg/sglang:latest"]}
    for name, job in jobs.items():
        runs = "\n".join(step.get("run", "") for step in job["steps"])
        assert "pip install" in runs and "-e ." in runs, f"{name}: the package is not installed"
        for path in _repo_paths(runs):
            assert (ROOT / path).exists(), f"{WORKFLOW.name} job {name} runs {path}, which does not exist"
    # SGLang builds its Marlin kernels before the first engine starts (minutes of nvcc)
    steps = [step.get("run", "") for step in jobs["sglang"]["steps"]]
    jit = next(i for i, run in enumerate(steps) if "sglang_jit_warmup.py" in run)
    serve = next(i for i, run in enumerate(steps) if "sglang_serve_check.py" in run)
    assert jit < serve


def test_gpu_stage_script_parses_and_every_documented_stage_exists():
    subprocess.run(["bash", "-n", str(RUN_SH)], check=True)
    text = RUN_SH.read_text()
    documented = set(re.findall(r"^#   ([a-z0-9-]+)", text, flags=re.M))
    labels = set(re.findall(r"^  ([a-z0-9|-]+)\)", text, flags=re.M))
    stages = {s for label in labels for s in label.split("|")}
    assert documented and documented <= stages, documented - stages
    for path in _repo_paths(text):
        assert (ROOT / path).exists(), f"run.sh uses {path}, which does not exist"


def test_engine_image_workflow_stages_exist_and_results_are_uploaded():
    """Inside a published image there is no bundle: the workflow calls only stages run.sh has, each
    artifact it writes lies under the uploaded folder, and nothing waits for a bundle marker."""
    flow = yaml.safe_load(WORKFLOW.read_text())
    text = RUN_SH.read_text()
    labels = {s for label in re.findall(r"^  ([a-z0-9|-]+)\)", text, flags=re.M) for s in label.split("|")}
    for name, job in flow["jobs"].items():
        runs = [step.get("run", "") for step in job["steps"]]
        upload = next(step["with"]["path"] for step in job["steps"] if "upload-artifact" in step.get("uses", ""))
        stages = [m for run in runs for m in re.findall(r"tests/gpu/run\.sh (\S+)", run)]
        assert stages and set(stages) <= labels, f"{name}: {set(stages) - labels} are not run.sh stages"
        assert stages[0] in ("engine", "sglang-engine"), f"{name}: says which engine it tests first"
        for out in re.findall(r"--out (\S+)", "\n".join(runs)):
            assert out.startswith(upload + "/"), f"{name}: {out} is not under the uploaded {upload}/"
        envs = [step.get("env", {}).get("OUT") for step in job["steps"] if "run.sh" in step.get("run", "")]
        assert all(o in (None, upload) for o in envs), envs
        assert "site-" not in "\n".join(runs), f"{name}: a published image has no bundle"


# -- scripts/setup.sh and setup-sglang.sh: a failed install fails the script ---------------------------

SCRIPTS = ROOT / "scripts"


def _fake_venv(tmp_path, pip_rc: int) -> Path:
    """A venv whose python succeeds at everything (so the scripts skip creating it) and whose pip
    prints one line of known noise and one real error, then exits with ``pip_rc``."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\nexit 0\n")
    (venv / "bin" / "pip").write_text(
        "#!/bin/sh\necho 'WARNING: Location noise'\necho 'ERROR: real problem from pip'\n"
        f"exit {pip_rc}\n")
    for f in ("python", "pip"):
        (venv / "bin" / f).chmod(0o755)
    return venv


@pytest.mark.parametrize("script,venv_var", [("setup.sh", "GRACE_VENV"), ("setup-sglang.sh", "GRACE_SGLANG_VENV")])
def test_setup_script_fails_when_pip_fails(tmp_path, script, venv_var):
    venv = _fake_venv(tmp_path, pip_rc=3)
    env = {"PATH": "/usr/bin:/bin", venv_var: str(venv), "GRACE_SGLANG_OLD_DIR": str(tmp_path / "old")}
    r = subprocess.run(["bash", str(SCRIPTS / script)], capture_output=True, text=True, env=env, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 3, out
    assert "FAILED (pip exit 3): pip install" in out
    assert "ERROR: real problem from pip" in out          # pip's own message still shown
    assert "WARNING: Location" not in out                 # the noise filter is kept
    assert "ready" not in out


def test_setup_script_passes_when_pip_succeeds(tmp_path):
    venv = _fake_venv(tmp_path, pip_rc=0)
    r = subprocess.run(["bash", str(SCRIPTS / "setup.sh")], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "GRACE_VENV": str(venv)}, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ready: " in r.stdout and "WARNING: Location" not in r.stdout


# Third-party modules the suite imports -> the pip distribution that provides them.
_PIP_NAME = {"PIL": "pillow", "yaml": "pyyaml", "compressed_tensors": "compressed-tensors",
             "sentencepiece": "sentencepiece", "hypothesis": "hypothesis", "pytest": "pytest",
             "requests": "requests"}
# Provided by the engine's own dependencies (vLLM / SGLang pull them in).
_FROM_ENGINE = {"torch", "safetensors", "transformers", "huggingface_hub", "numpy", "vllm", "sglang",
                "tokenizers", "openai", "torchvision", "triton",   # triton: torch's CUDA build pulls it in
                "cuda",   # cuda-bindings (NVRTC for the CUDA GEMV's tests): torch's CUDA build pulls it in
                "humming"}   # humming-kernels: SGLang's (setup-sglang.sh names it, SGLang goes in with --no-deps)


def _suite_imports() -> set[str]:
    import ast
    import sys
    found = set()
    for path in (ROOT / "tests").rglob("*.py"):
        if "gpu" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
            elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                  and (getattr(node.func, "attr", None) == "importorskip"
                       or getattr(node.func, "id", None) == "require")):      # tests/requires.py
                found.add(str(node.args[0].value).split(".")[0])
    local = {p.stem for d in ("tests", "tests/gpu", "benchmarks") for p in (ROOT / d).glob("*.py")} | {"grace_qat", "grace_vllm", "grace_sglang", "tests"}
    return {m for m in found if m not in sys.stdlib_module_names and m not in local}


def _installed_by(script: str) -> set[str]:
    text = (SCRIPTS / script).read_text()
    words = set()
    for line in re.findall(r"pip_install (.*?)(?<!\\)$", text.replace("\\\n", " "), flags=re.M):
        for w in line.split():
            w = w.strip('"\'')
            if w and not w.startswith("-") and not w.startswith("$"):
                words.add(re.split(r"[<>=!\[]", w)[0].lower())
    return words


def test_setup_installs_every_module_the_suite_imports():
    """A module the tests import but no set-up installs would silently skip whole files in CI."""
    needed = _suite_imports() - _FROM_ENGINE
    unknown = needed - set(_PIP_NAME)
    assert not unknown, f"tests import {sorted(unknown)}: add them to _PIP_NAME and to the set-up"
    for script in ("setup.sh", "setup-sglang.sh"):
        missing = {_PIP_NAME[m] for m in needed} - _installed_by(script)
        assert not missing, f"scripts/{script} does not install {sorted(missing)}"


def test_workflow_step_runner_runs_steps_as_written_and_fails_on_a_failed_step(tmp_path):
    """tests/gpu/workflow_steps.py runs a job's `run:` steps verbatim (bash -e, with the workflow's,
    job's and step's env) and exits non-zero when one fails, so the GPU machine can check the
    engine-image workflow as written."""
    flow = tmp_path / "flow.yml"
    flow.write_text(yaml.safe_dump({
        "env": {"A": "1"},
        "jobs": {"j": {"env": {"B": "2"}, "steps": [
            {"uses": "actions/checkout@v4"},
            {"name": "env", "env": {"C": "3"}, "run": f'echo "$A$B$C" > {tmp_path}/env.txt'},
            {"name": "fails midway", "run": f"false\necho reached > {tmp_path}/after.txt"},
            {"name": "still runs", "run": f"touch {tmp_path}/last.txt"},
        ]}}}))
    out = tmp_path / "steps.jsonl"
    cmd = [sys.executable, str(ROOT / "tests" / "gpu" / "workflow_steps.py"), "j", "--workflow", str(flow),
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (tmp_path / "env.txt").read_text() == "123\n"
    assert not (tmp_path / "after.txt").exists()       # bash -e: the step stopped at `false`
    assert (tmp_path / "last.txt").exists()
    summary = json.loads(out.read_text().splitlines()[-1])
    assert summary["failed"] == ["fails midway"] and summary["steps_run"] == 3
    # the real workflow's vllm job: every run step is listed, in order
    subprocess.run(cmd[:2] + ["vllm", "--dry-run", "--out", str(out)], check=True, capture_output=True)
    listed = [json.loads(line)["command"] for line in out.read_text().splitlines()[:-1]
              if "command" in json.loads(line)]
    assert listed == [s["run"] for s in yaml.safe_load(WORKFLOW.read_text())["jobs"]["vllm"]["steps"] if "run" in s]


def _installed_venv(tmp_path, name: str) -> Path:
    """A venv whose python answers every question as a venv with this checkout installed would (it
    prints the checkout's path and succeeds) and whose pip fails: any install is a failure."""
    venv = tmp_path / name
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f"#!/bin/sh\necho {ROOT}\nexit 0\n")
    (venv / "bin" / "pip").write_text("#!/bin/sh\necho 'ERROR: pip should not run'\nexit 3\n")
    for f in ("python", "pip"):
        (venv / "bin" / f).chmod(0o755)
    return venv


def test_scripts_skip_what_is_installed_and_name_each_test_run(tmp_path):
    """A second demo or test run reinstalled the package every time (15-22 s); `[setup-sglang] ready:`
    had no elapsed time; test.sh printed three unlabelled pytest summaries (issue 27, item 12).
    Runs the real scripts/test.sh (and the set-up scripts it calls) on venvs that have everything."""
    old = tmp_path / "old"
    (old / "sglang").mkdir(parents=True)
    (old / "sglang" / "version.py").write_text("__version__ = '0.5.17'\n")
    env = {"PATH": "/usr/bin:/bin", "GRACE_VENV": str(_installed_venv(tmp_path, "venv")),
           "GRACE_SGLANG_VENV": str(_installed_venv(tmp_path, "venv-sg")), "GRACE_SGLANG_OLD_DIR": str(old)}
    r = subprocess.run(["bash", str(SCRIPTS / "test.sh")], capture_output=True, text=True, env=env, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "pip should not run" not in out, out
    assert re.search(r"^\[setup \d+:\d\d\] grace-qat \(this checkout\) .* already installed$", out, re.M), out
    assert re.search(r"^\[setup-sglang \d+:\d\d\] ready: ", out, re.M), out
    for name in ("vLLM and core", "SGLang 0.5.23", "SGLang 0.5.17"):
        assert f"[test] run: {name}\n" in out and f"[test] {name}: passed\n" in out, (name, out)


def test_a_venv_without_the_package_is_not_taken_for_installed(tmp_path):
    """Run from inside the checkout, `import grace_qat` succeeds whether or not the package is
    installed: the set-up must ask the venv's installed distributions (a fresh clone's SGLang venv was
    once skipped, so its entry point was never registered and the SGLang runs failed)."""
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    r = subprocess.run(["bash", "-c", f'. scripts/pip-steps.sh; installed_checkout "{venv}" os'], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout + r.stderr
    # the project's own venv has this checkout installed editable: it is recognised
    own = ROOT / ".venv"
    if (own / "bin" / "python").exists():
        r = subprocess.run(["bash", "-c", '. scripts/pip-steps.sh; installed_checkout .venv os'], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert r.stdout.strip() == str(ROOT), r.stdout + r.stderr
