"""Where an engine start goes, function by function: vLLM in one process under cProfile, one checkpoint.

    python benchmarks/startup_profile.py --model DIR [--quantization grace_qat] --out FILE.json

Run it on a GRACE checkpoint with the plugin and on its GPTQ export without, on the same machine:
the JSON holds the wall time of the start and the functions with the most cumulative time (all of
them, and grace_qat's own), so the two starts compare by function (issue: start-up within 10% of
stock). Compare starts on the same kernel (``--linear-backend`` for stock: Humming, for one, builds
its kernels at the first start) and with caches of their own (``run.sh profile-load`` does both).
vLLM's engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that the profile sees
the weight loading and the plugin's processing; the engine is otherwise as served.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import time


def top(stats: pstats.Stats, n: int, match: str = "") -> list[dict]:
    """The ``n`` functions with the most cumulative time whose file path contains ``match``."""
    rows = []
    for (path, line, name), (_, calls, own, cum, _) in stats.stats.items():
        if match in path:
            rows.append({"function": f"{path}:{line}({name})", "calls": calls, "own_s": round(own, 3),
                         "cumulative_s": round(cum, 3)})
    return sorted(rows, key=lambda r: -r["cumulative_s"])[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--quantization", default=None, help="grace_qat for the plugin; leave out for stock (the checkpoint's own method)")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--eager", action="store_true", help="no torch.compile / CUDA graphs")
    ap.add_argument("--linear-backend", default=None, help="vLLM's --linear-backend (machete, humming, marlin, ...)")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    import vllm
    from vllm import LLM

    kwargs = dict(model=args.model, max_model_len=args.max_model_len, enforce_eager=args.eager,
                  limit_mm_per_prompt={"image": 1})
    if torch.cuda.is_available():
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.quantization:
        kwargs["quantization"] = args.quantization
    if args.linear_backend:
        kwargs["linear_backend"] = args.linear_backend
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    llm = LLM(**kwargs)
    profile.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profile)
    result = {"meta": {"model": args.model, "quantization": args.quantization, "vllm": vllm.__version__,
                       "torch": torch.__version__, "device": torch.cuda.get_device_name()
                       if torch.cuda.is_available() else "cpu", "eager": args.eager,
                       "linear_backend": args.linear_backend},
              "start_s": round(wall, 2), "top": top(stats, args.top),
              "grace_qat": top(stats, args.top, "grace_")}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"start {wall:.1f} s; top of grace_qat's own:")
    for r in result["grace_qat"][:12]:
        print(f"  {r['cumulative_s']:8.2f} s  {r['calls']:6d}  {r['function']}")
    del llm


if __name__ == "__main__":
    main()
