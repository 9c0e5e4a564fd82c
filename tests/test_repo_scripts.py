"""The scripts that only run elsewhere (the engine-image workflow on a GPU runner, tests/gpu/run.sh
on the GPU machine) still have to parse and point at files that exist: checked here, in CI."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

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
    assert images == {"vllm": ["vllm/vllm-openai:v0.26.0", "vllm/vllm-openai:latest"],
                      "sglang": ["lmsysorg/sglang:v0.5.17", "lmsysorg/sglang:latest"]}
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
