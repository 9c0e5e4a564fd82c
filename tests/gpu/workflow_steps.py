"""Run one job of .github/workflows/engine-images.yml step by step, as a runner inside the published
image would: each `run:` step in `bash -eo pipefail` with the workflow's, job's and step's `env`, in
the repository root, with its `timeout-minutes`. `uses:` steps are not run (the checkout is this tree;
upload-artifact becomes a copy of its `path` to --artifacts). Writes one JSON line per step and a
summary to --out, exits non-zero when any step failed.

Why: the workflow only runs on a self-hosted GPU runner the project does not have; this is how its
steps are checked on the GPU machine, verbatim. On a machine without network pass --offline: pip is
then told to use no index and no build isolation (PIP_NO_INDEX / PIP_NO_BUILD_ISOLATION), the one
change to the steps' environment, and it is recorded in the summary."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "engine-images.yml"


def job_steps(job: str, workflow: Path = WORKFLOW) -> tuple[dict, list[dict]]:
    """(environment of the job, its steps) as the workflow file writes them."""
    flow = yaml.safe_load(workflow.read_text())
    if job not in flow["jobs"]:
        raise SystemExit(f"{workflow}: no job {job!r} (jobs: {', '.join(flow['jobs'])})")
    spec = flow["jobs"][job]
    env = {k: str(v) for k, v in {**flow.get("env", {}), **spec.get("env", {})}.items()}
    return env, spec["steps"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("job", help="vllm or sglang")
    ap.add_argument("--out", type=Path, required=True, help="JSON lines, one per step, then a summary")
    ap.add_argument("--artifacts", type=Path, help="where upload-artifact's path is copied")
    ap.add_argument("--offline", action="store_true", help="pip without an index or build isolation")
    ap.add_argument("--dry-run", action="store_true", help="list the steps, run none")
    ap.add_argument("--workflow", type=Path, default=WORKFLOW)
    args = ap.parse_args(argv)
    job_env, steps = job_steps(args.job, args.workflow)
    env = {**os.environ, **job_env}
    if args.offline:
        env.update(PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    failed, lines = [], []
    for i, step in enumerate(steps):
        name = step.get("name") or step.get("uses") or f"step {i}"
        if "run" not in step:
            rec = {"step": name, "uses": step.get("uses"), "run": False}
            if "upload-artifact" in step.get("uses", "") and args.artifacts and not args.dry_run:
                src = ROOT / step["with"]["path"]
                if src.exists():
                    shutil.copytree(src, args.artifacts, dirs_exist_ok=True)
                rec["copied"] = str(src) if src.exists() else None
            lines.append(rec)
            continue
        rec = {"step": name, "command": step["run"]}
        if not args.dry_run:
            limit = 60 * float(step.get("timeout-minutes", 360))
            t0 = time.monotonic()
            print(f"== {name}", flush=True)
            try:
                rc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
                                    cwd=ROOT, env={**env, **{k: str(v) for k, v in step.get("env", {}).items()}},
                                    timeout=limit).returncode
            except subprocess.TimeoutExpired:
                rc = 124
            rec.update(rc=rc, seconds=round(time.monotonic() - t0, 1))
            print(f"== {name}: rc={rc} ({rec['seconds']} s)", flush=True)
            if rc != 0:
                failed.append(name)
        lines.append(rec)
    summary = {"job": args.job, "workflow": str(args.workflow), "offline": args.offline,
               "steps_run": sum("command" in r for r in lines), "failed": failed, "dry_run": args.dry_run}
    args.out.write_text("".join(json.dumps(r) + "\n" for r in lines + [summary]))
    print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
