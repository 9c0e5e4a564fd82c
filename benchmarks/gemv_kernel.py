"""Time grace_qat's CUDA decode GEMV (grace_qat/kernels/cuda_gemv.py) per layer shape and token count
M, next to the BF16 GEMM, grace_qat's Triton kernel and, when vLLM is importable, the engine's
mixed-precision kernels (Marlin, Machete, Humming: those that can run the shape here).

Writes under --out:
* ``small_m.json``: ``meta`` (GPU, versions, the measured device-to-device copy bandwidth) and per
  shape and M, for every kernel: microseconds, the fraction of the copy bandwidth it reaches (packed
  weight + step bytes per second), and its max / relative error against a float64 reference on the
  same dequantized weights; for the CUDA kernel also every launch config tried, with and without
  programmatic dependent launch (after itself, and after a foreign elementwise kernel as in an engine:
  ``cuda_gemv_[pdl_]after_foreign``, the pair timed), and ``cuda_gemv_table`` per shape ([[M, config], ...], the
  ``configs`` of a kernel-table entry); ``targets``: the issue's goals checked (M=1 at >= 0.60 of the
  copy bandwidth on LLaVA-7B's layers, M <= 8 within 1.3x of M=1);
* ``small_m.png`` when matplotlib is there.

Timing as kernel_crossover.py: each GEMM inside a CUDA graph cycling through enough copies of the
weights that they do not stay in L2 (as decode runs).

``--ncu``: instead, profile the kernel under Nsight Compute, one launch per layer shape
(``--ncu-shape``: every TP-1 shape of ``--models``, or a list) and M (``--ncu-m``), each with the
config the timing run in the same ``--out`` chose, with a few metrics (DRAM and SM throughput,
achieved occupancy, issue-slot use, warp stall reasons) and what bounds it (``bound_of``: DRAM
bandwidth, SM, or latency) -> ``ncu.json``, ``ncu.csv``, and each bound into ``small_m.json``.

    python benchmarks/gemv_kernel.py --out /tmp/gemv
    python benchmarks/gemv_kernel.py --out /tmp/gemv --ncu --ncu-m 1
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernel_crossover import _time_us, bench_shapes, layer_shapes, measure_each_shape, plot_per_m, small_m_context  # noqa: E402

from grace_qat.kernels import cuda_gemv as cg  # noqa: E402

MS = (1, 2, 4, 8, 16, 32)
L2_BYTES = 50 * 2 ** 20
ENGINE_KERNELS = {"marlin": "MarlinLinearKernel", "machete": "MacheteLinearKernel",
                  "humming": "HummingLinearKernel"}
NCU_METRICS = (
    "gpu__time_duration.sum",
    "dram__bytes_read.sum",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "sm__warps_active.avg.pct_of_peak_sustained_active",             # achieved occupancy
    "sm__maximum_warps_per_active_cycle_pct",                        # theoretical occupancy
    "smsp__issue_active.avg.pct_of_peak_sustained_active",           # issue slots busy
    "smsp__inst_executed.sum",
    "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
    "launch__registers_per_thread",
    "launch__grid_size",
    "launch__block_size",
    "launch__waves_per_multiprocessor",
    "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_not_selected_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_no_instruction_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio",
)


def candidates(m: int, n: int, k: int, bits: int, sms: int, occ) -> list[cg.Config]:
    """The heuristic's config first, then neighbours: tiles per block, warps, split, stage depth."""
    base = cg.heuristic(m, n, k, bits, sms, occ)
    mt = cg.m_tiles(m)
    out = [base]
    for nt in (1, 2, 4):
        for u in (1, 2, 4):
            if (mt, nt, u) not in cg.INSTANCES:
                continue
            for warps in (4, 8):
                for split in sorted({1, base.split, max(1, base.split // 2), base.split * 2}):
                    cfg = cg.Config(nt, warps, split, u)
                    near = (nt == base.nt) + (u == base.unroll) + (warps == base.warps) + (split == base.split)
                    if cfg not in out and near >= 3:
                        out.append(cfg)
    return out


def device_candidates(m: int, n: int, k: int, bits: int, dtype=torch.bfloat16) -> list[cg.Config]:
    """``candidates`` with this GPU's SM count and the driver's occupancy per compiled instance."""
    mod = cg.module(torch.cuda.current_device(), bits, dtype)
    return candidates(m, n, k, bits, mod.sms, lambda mt, nt, u, w: mod.blocks_per_sm((mt, nt, u), w))


def time_configs(x: torch.Tensor, layers, bits: int, n: int, configs) -> list[dict]:
    """[{"config", "us"}] per launch config in ``configs``: the GEMV of ``x`` over ``layers`` [(wq,
    st), ...] (copies of one layer in the kernel's layout, enough to keep the weights out of L2)."""
    return [{"config": cfg.as_list(),
             "us": _time_us([lambda wq=wq, st=st, cfg=cfg: cg.gemv(x, wq, st, bits, n, config=cfg)
                             for wq, st in layers])}
            for cfg in configs]


def _engine_kernels(bits, group, n, k, weights, vllm_ok):
    """name -> [(kernel, module) per weight copy] for the engine kernels that build here, each on the
    benchmark's own codes and scales ``weights`` (their error is then against the same reference)."""
    if not vllm_ok:
        return {}, {}
    from kernel_crossover import _kernels
    out, failed = {}, {}
    for short, name in ENGINE_KERNELS.items():
        try:
            out[short] = [row[0] for row in _kernels(bits, group, n, k, len(weights), names=(name,),
                                                     weights=weights)]
        except Exception as e:               # not in this vLLM, cannot run the shape, fails to build
            failed[short] = str(e)[:200]
    return out, failed


def _stats(y: torch.Tensor, ref: torch.Tensor) -> dict:
    d = (y.double() - ref)
    return {"max_abs_err": d.abs().max().item(),
            "rel_err": (d.norm() / ref.norm().clamp_min(1e-30)).item()}


class SweepClock:
    """The seconds the launch-config sweep may spend, counted on the sweep alone: timing the engine's
    kernels (several seconds a shape with vLLM there) must not eat it, or later shapes are timed at
    the heuristic's config only (as in the H100 run of 2026-12-07 with vLLM 0.34: 6 of 8 shapes)."""

    def __init__(self, seconds: float):
        self.left = seconds

    def spent(self) -> bool:
        return self.left <= 0

    def run(self, fn):
        start = time.time()
        try:
            return fn()
        finally:
            self.left -= time.time() - start


def measure_shape(bits, group, n, k, ms, copy_bps, vllm_ok, clock: SweepClock, dtype=torch.bfloat16) -> dict:
    from grace_qat.packing import pack_int32
    groups = k // group
    wbytes = n * k * bits // 8 + n * groups * 2
    copies = max(1, math.ceil(3 * L2_BYTES / wbytes))
    gen = torch.Generator(device="cuda").manual_seed(n * 31 + k + bits)
    sets = []
    for _ in range(copies):
        u = torch.randint(0, 2 ** bits, (n, k), dtype=torch.int32, device="cuda", generator=gen)
        s = (torch.rand(n, groups, device="cuda", generator=gen) * 0.02 + 0.001).to(dtype)
        ct = pack_int32(u, bits, dim=1)
        wq, st = cg.pack(ct, s, bits)
        sets.append({"ct": ct, "s": s, "wq": wq, "st": st, "u": u if not sets else None})
    u0, s0 = sets[0].pop("u"), sets[0]["s"]
    w_ref = (u0 - 2 ** (bits - 1)).double() * s0.double().repeat_interleave(group, dim=1)
    del u0
    bf_copies = max(1, math.ceil(3 * L2_BYTES / (n * k * 2)))
    bf = [w_ref.to(dtype)] + [torch.randn(n, k, device="cuda", dtype=dtype) * 0.01 for _ in range(bf_copies - 1)]
    engine, failed = _engine_kernels(bits, group, n, k, [(e["ct"], e["s"]) for e in sets], vllm_ok)
    try:
        from grace_qat.kernels import triton_wna16
    except ImportError:
        triton_wna16 = None
    row = {"bits": bits, "group": group, "n": n, "k": k, "weight_bytes": wbytes, "copies": copies,
           "engine_failed": failed, "m": {}, "cuda_gemv_table": []}
    frac = lambda us, nbytes=wbytes: nbytes / (us * 1e-6) / copy_bps       # noqa: E731
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
        ref = x.double() @ w_ref.t()
        tried = device_candidates(m, n, k, bits, dtype)
        if clock.spent():
            tried = tried[:1]
        r = {"kernels": {}}
        r["cuda_gemv_configs"] = clock.run(lambda: time_configs(x, [(e["wq"], e["st"]) for e in sets], bits, n, tried))
        best = min(r["cuda_gemv_configs"], key=lambda c: c["us"])
        cfg = cg.Config.from_list(best["config"])
        y = cg.gemv(x, sets[0]["wq"], sets[0]["st"], bits, n, config=cfg)
        r["kernels"]["cuda_gemv"] = {"us": best["us"], "config": best["config"], **_stats(y, ref)}
        r["kernels"]["cuda_gemv_heuristic"] = {"us": r["cuda_gemv_configs"][0]["us"],
                                               "config": r["cuda_gemv_configs"][0]["config"]}
        us = _time_us([lambda e=e: cg.gemv(x, e["wq"], e["st"], bits, n, config=cfg, pdl=True) for e in sets])
        y = cg.gemv(x, sets[0]["wq"], sets[0]["st"], bits, n, config=cfg, pdl=True)
        r["kernels"]["cuda_gemv_pdl"] = {"us": us, "config": best["config"], **_stats(y, ref)}
        # In an engine the kernel before the GEMV is another one (a norm, an activation) that does not
        # trigger its dependents early: time foreign elementwise kernel + GEMV pairs, without and with
        # PDL, so the difference is what PDL would buy the plugin there
        xb, one = torch.empty_like(x), torch.ones(k, device="cuda", dtype=dtype)
        def after_foreign(e, pdl):
            torch.mul(x, one, out=xb)
            return cg.gemv(xb, e["wq"], e["st"], bits, n, config=cfg, pdl=pdl)
        for name, pdl in (("cuda_gemv_after_foreign", False), ("cuda_gemv_pdl_after_foreign", True)):
            us = _time_us([lambda e=e, pdl=pdl: after_foreign(e, pdl) for e in sets])
            r["kernels"][name] = {"us": us, "config": best["config"], "includes": "one elementwise kernel",
                                  **_stats(after_foreign(sets[0], pdl), ref)}
        row["cuda_gemv_table"].append([m, best["config"]])
        if triton_wna16 is not None and triton_wna16.supports(bits, group, k):
            mm = triton_wna16.wna16_mm
            us = _time_us([lambda e=e: mm(x, e["ct"], e["s"], bits, group) for e in sets])
            r["kernels"]["triton"] = {"us": us, **_stats(mm(x, sets[0]["ct"], s0, bits, group), ref)}
        r["kernels"]["bf16"] = {"us": _time_us([lambda w=w: F.linear(x, w) for w in bf]),
                                **_stats(F.linear(x, bf[0]), ref)}
        for name, mods in engine.items():
            try:
                us = _time_us([lambda kern=kern, mo=mo: kern.apply_weights(mo, x) for kern, mo in mods])
                y = mods[0][0].apply_weights(mods[0][1], x)
            except Exception as e:             # e.g. a kernel with no path for this M
                r["kernels"][name] = {"error": str(e)[:200]}
                continue
            r["kernels"][name] = {"us": us, **_stats(y, ref)}
        for name, kr in r["kernels"].items():
            if "us" in kr and "includes" not in kr:      # a pair's time is not the GEMV's alone
                kr["copy_fraction"] = frac(kr["us"], n * k * 2 if name == "bf16" else wbytes)
        row["m"][m] = r
        line = "  ".join(f"{name} {kr['us']:.2f}" for name, kr in r["kernels"].items()
                         if "us" in kr and name != "cuda_gemv_heuristic")
        g = r["kernels"]["cuda_gemv"]
        print(f"  w{bits} n{n} k{k} M={m:2d}: ours {g['us']:6.2f} us = {g['copy_fraction']:.2f} of copy, "
              f"cfg {g['config']}, max err {g['max_abs_err']:.2e} | {line}", flush=True)
    del sets, engine, bf
    torch.cuda.empty_cache()
    return row


MAX_REL_ERR = 0.02   # bf16 outputs of the same dequantized weights sit near 0.002 (2026-12-07, H100)


def off_reference(rows: list[dict]) -> list[str]:
    """Every kernel whose output is not the reference's (relative error above MAX_REL_ERR): its time
    is then not comparable (another computation, or a set-up that fed it other weights)."""
    return [f"w{r['bits']} n{r['n']} k{r['k']} M={m} {name}: relative error {kr['rel_err']:.3f}"
            for r in rows for m, per in r["m"].items() for name, kr in per["kernels"].items()
            if kr.get("rel_err", 0.0) > MAX_REL_ERR]


def check_targets(rows: list[dict]) -> dict:
    """The issue's goals on these results: M=1 at >= 0.60 of the copy bandwidth on each LLaVA-7B TP-1
    layer, and every M <= 8 within 1.3x of M=1's time (every shape)."""
    out = {"m1_copy_fraction_0.60_llava7b": {}, "m_le_8_within_1.3x_of_m1": {}}
    llava = {(n, k) for _, n, k in layer_shapes("llava-7b", 1)}
    for r in rows:
        key = f"w{r['bits']} n{r['n']} k{r['k']}"
        t = {m: v["kernels"]["cuda_gemv"]["us"] for m, v in r["m"].items()}
        if 1 not in t:
            continue
        if (r["n"], r["k"]) in llava and r["bits"] == 4:
            f = r["m"][1]["kernels"]["cuda_gemv"]["copy_fraction"]
            out["m1_copy_fraction_0.60_llava7b"][key] = {"fraction": round(f, 3), "ok": f >= 0.60}
        worst = max((t[m] / t[1] for m in t if m <= 8), default=1.0)
        out["m_le_8_within_1.3x_of_m1"][key] = {"worst_ratio": round(worst, 3), "ok": worst <= 1.3}
    return out


def _shape(spec: str) -> tuple[int, int]:
    """'llava-7b:gate_up' (TP 1) or 'N x K' as '22016x4096'."""
    if "x" in spec and ":" not in spec:
        n, k = spec.split("x")
        return int(n), int(k)
    model, layer = spec.split(":")
    for name, n, k in layer_shapes(model, 1):
        if name.startswith(layer):
            return n, k
    raise SystemExit(f"no layer {layer} in {model}")


def kernel_shapes(models: str, tps: str, bits: str, group: int) -> list[tuple]:
    """bench_shapes' rows (model, tp, bits, layer, n, k) the kernel can run."""
    return [s for s in bench_shapes(models, tps, bits) if cg.supports(s[2], group, s[5])]


def swept_configs(path: str | None) -> dict:
    """(bits, n, k) -> [[M, config], ...]: the launch configs this benchmark's sweep chose per M, read
    from its small_m.json at ``path`` ({} where there is none)."""
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = json.load(f)["shapes"]
    return {(r["bits"], r["n"], r["k"]): [[int(m), per["kernels"]["cuda_gemv"]["config"]]
                                          for m, per in sorted(r["m"].items(), key=lambda e: int(e[0]))]
            for r in rows}


def ncu_cases(args) -> list[dict]:
    """What --ncu profiles, one launch each: every distinct TP-1 layer shape of --models at --ncu-bits
    (--ncu-shape all) or the listed shapes, at each --ncu-m; with the config the timing run of the same
    --out chose (its small_m.json), else --ncu-config, else the heuristic's."""
    bits = args.ncu_bits
    if args.ncu_shape == "all":      # the first layer of each distinct shape names it
        first = {}
        for model, _, _, layer, n, k in kernel_shapes(args.models, "1", str(bits), args.group):
            first.setdefault((n, k), f"{model}:{layer}")
        shapes = [(name, n, k) for (n, k), name in first.items()]
    else:
        shapes = [(spec, *_shape(spec)) for spec in args.ncu_shape.split(",")]
    timed = {(*shape, m): cfg for shape, table in swept_configs(os.path.join(args.out, "small_m.json")).items()
             for m, cfg in table}
    given = json.loads(args.ncu_config) if args.ncu_config else None
    cases = []
    for name, n, k in shapes:
        for m in (int(v) for v in str(args.ncu_m).split(",")):
            source, cfg = next((src, c) for src, c in (("small_m.json", timed.get((bits, n, k, m))),
                                                        ("--ncu-config", given),
                                                        ("heuristic", cg.heuristic(m, n, k, bits).as_list())) if c)
            cases.append({"shape": name, "n": n, "k": k, "bits": bits, "m": m, "config": cfg,
                          "config_from": source})
    return cases


def ncu_child(args) -> None:
    """Launch the kernel once per case of --ncu-cases (under ncu, which profiles every launch of it:
    its replays flush the caches, so each profile reads the weights from DRAM as decode does)."""
    from grace_qat.packing import pack_int32
    with open(args.ncu_cases) as f:
        cases = json.load(f)
    for bits in {c["bits"] for c in cases}:
        cg.prepare(torch.cuda.current_device(), bits, torch.bfloat16)
    for c in cases:
        n, k, bits, m = c["n"], c["k"], c["bits"], c["m"]
        u = torch.randint(0, 2 ** bits, (n, k), dtype=torch.int32, device="cuda")
        s = (torch.rand(n, k // args.group, device="cuda") * 0.02 + 0.001).to(torch.bfloat16)
        wq, st = cg.pack(pack_int32(u, bits, dim=1), s, bits)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        y = cg.gemv(x, wq, st, bits, n, config=cg.Config.from_list(c["config"]))
        torch.cuda.synchronize()
        print(f"ncu child: {c['shape']} n{n} k{k} w{bits} M={m} config {c['config']} "
              f"sum {float(y.float().sum()):.3f}", flush=True)


def parse_ncu_csv(text: str) -> list[dict]:
    """ncu --csv --page raw: a header row, a units row, then one row per profiled launch, in launch
    order -> [{metric: (value, unit)}] for the metrics of NCU_METRICS and the kernel name."""
    rows = list(csv.reader(io.StringIO("\n".join(ln for ln in text.splitlines() if ln.startswith('"')))))
    if len(rows) < 3:
        return []
    header, units = rows[0], rows[1]
    return [{h: (v, u) for h, u, v in zip(header, units, row) if h in NCU_METRICS or h == "Kernel Name"}
            for row in rows[2:]]


def _number(metrics: dict, name: str) -> float | None:
    try:
        return float(metrics[name][0].replace(",", ""))
    except (KeyError, ValueError):
        return None


def bound_of(metrics: dict) -> dict:
    """What limits one launch, from its ncu metrics: DRAM bandwidth where DRAM throughput is at 60% of
    its peak or more; the SM (issue slots or a pipe) where SM throughput or issue activity is; else
    latency (neither busy: too few bytes in flight), with the largest warp stall reason."""
    dram = _number(metrics, "dram__throughput.avg.pct_of_peak_sustained_elapsed")
    sm = _number(metrics, "sm__throughput.avg.pct_of_peak_sustained_elapsed")
    issue = _number(metrics, "smsp__issue_active.avg.pct_of_peak_sustained_active")
    stalls = {name.split("stalled_")[1].split("_per_issue")[0]: v for name in NCU_METRICS
              if "stalled_" in name and (v := _number(metrics, name)) is not None}
    top = max(stalls, key=stalls.get) if stalls else None
    if dram is None:
        kind = "unknown"
    elif dram >= 60:
        kind = "DRAM bandwidth"
    elif max(sm or 0, issue or 0) >= 60:
        kind = "SM (issue slots / pipes)"
    else:
        kind = "latency"
    return {"bound": kind, "dram_pct": dram, "sm_pct": sm, "issue_pct": issue, "top_stall": top,
            "stalls_per_issue": stalls}


def run_ncu(args) -> int:
    ncu = shutil.which("ncu") or next((p for p in ("/usr/local/cuda/bin/ncu", "/opt/nvidia/nsight-compute/ncu")
                                       if os.path.exists(p)), None)
    if ncu is None:
        print("ncu not found on PATH")
        return 1
    cases = ncu_cases(args)
    cases_path = os.path.join(args.out, "ncu-cases.json")
    with open(cases_path, "w") as f:
        json.dump(cases, f)
    child = [sys.executable, os.path.abspath(__file__), "--out", args.out, "--ncu-child",
             "--ncu-cases", cases_path, "--group", str(args.group)]
    cmd = [ncu, "--kernel-name", "regex:grace_gemv", "--launch-count", str(len(cases)),
           "--clock-control", "none", "--csv", "--page", "raw", "--metrics", ",".join(NCU_METRICS)] + child
    print(" ".join(cmd), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.ncu_timeout)
    if p.returncode != 0 and "metric" in (p.stdout + p.stderr).lower():
        # a metric this ncu does not know: the basic ones only
        i = cmd.index("--metrics") + 1
        cmd[i] = ",".join(NCU_METRICS[:7])
        print("retrying with fewer metrics:", cmd[i], flush=True)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.ncu_timeout)
    with open(os.path.join(args.out, "ncu.csv"), "w") as f:
        f.write(p.stdout)
    print(p.stderr[-3000:])
    launches = parse_ncu_csv(p.stdout)
    for c, metrics in zip(cases, launches):
        c["metrics"] = {h: {"value": v, "unit": u} for h, (v, u) in metrics.items()}
        c.update(bound_of(metrics))
    complete = p.returncode == 0 and len(launches) == len(cases)
    out = {"rc": p.returncode, "complete": complete, "cases": cases,
           "child_output": [ln for ln in p.stdout.splitlines() if ln.startswith("ncu child")]}
    with open(os.path.join(args.out, "ncu.json"), "w") as f:
        json.dump(out, f, indent=1)
    merge_ncu_into_timings(args.out, cases)
    for c in cases:
        if "bound" in c:
            print(f"  {c['shape']:22s} n{c['n']:6d} k{c['k']:6d} M={c['m']:2d} cfg {c['config']}: {c['bound']} "
                  f"(DRAM {c['dram_pct']}%, SM {c['sm_pct']}%, issue {c['issue_pct']}%, top stall {c['top_stall']})")
    return 0 if complete else 1


def merge_ncu_into_timings(out: str, cases: list[dict]) -> None:
    """Each profiled case's bound into small_m.json (beside the timings of its shape and M), where the
    timing run wrote one in the same --out."""
    path = os.path.join(out, "small_m.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        data = json.load(f)
    for c in (c for c in cases if "bound" in c):
        for row in data["shapes"]:
            r = row["m"].get(str(c["m"])) if (row["bits"], row["n"], row["k"]) == (c["bits"], c["n"], c["k"]) else None
            if r is not None:
                r["ncu"] = {key: c[key] for key in ("bound", "dram_pct", "sm_pct", "issue_pct", "top_stall", "config")}
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llava-7b,qwen3vl-2b")
    ap.add_argument("--tp", default="1")
    ap.add_argument("--bits", default="4,8", help="qwen3vl: these; llava (released as W4): 4 only")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--sweep-seconds", type=float, default=120.0,
                    help="seconds for the launch-config sweep (its own time only); past them, each "
                         "further M is timed at the heuristic's config")
    ap.add_argument("--out", required=True)
    ap.add_argument("--ncu", action="store_true",
                    help="profile the kernel under Nsight Compute instead: one launch per shape and M, each "
                         "with a bound (DRAM, SM, latency) -> ncu.json, and into small_m.json when --out has one")
    ap.add_argument("--ncu-shape", default="all",
                    help="all (every TP-1 layer shape of --models) or a list of MODEL:LAYER / NxK")
    ap.add_argument("--ncu-m", default="1", help="token counts, comma-separated")
    ap.add_argument("--ncu-bits", type=int, default=4)
    ap.add_argument("--ncu-config", default=None, help="a config as JSON [nt, warps, split, unroll]")
    ap.add_argument("--ncu-timeout", type=float, default=300)
    ap.add_argument("--ncu-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ncu-cases", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.ncu_child:
        return ncu_child(args)
    if args.ncu:
        sys.exit(run_ncu(args))
    meta, vllm_version, copy_bw = small_m_context(
        nvrtc=".".join(map(str, cg.nvrtc_version())),
        timing="CUDA-graph replay, weights rotated out of L2; error vs float64 on the same dequantized "
               "weights; copy_fraction = (packed weight + step bytes) / s / copy bandwidth")
    t0 = time.time()
    for bits in {int(b) for b in args.bits.split(",")}:
        cg.prepare(torch.cuda.current_device(), bits, torch.bfloat16)
    print(f"NVRTC build / cache: {time.time() - t0:.1f} s", flush=True)
    clock = SweepClock(args.sweep_seconds)
    ms = [int(m) for m in args.ms.split(",")]
    shapes = kernel_shapes(args.models, args.tp, args.bits, args.group)
    rows = measure_each_shape(shapes, lambda bits, n, k: measure_shape(
        bits, args.group, n, k, ms, copy_bw, vllm_version is not None, clock))
    targets = check_targets(rows)
    with open(os.path.join(args.out, "small_m.json"), "w") as f:
        json.dump({"meta": meta, "targets": targets, "shapes": rows}, f, indent=1)
    for goal, per in targets.items():
        print(goal, json.dumps(per))

    def best_other(r, m):
        return min(v["us"] for name, v in r["m"][m]["kernels"].items() if "us" in v and not name.startswith("cuda_gemv"))
    plot_per_m(rows, meta, os.path.join(args.out, "small_m.png"),
               ("fraction of copy bandwidth (cuda_gemv)", lambda r, m: r["m"][m]["kernels"]["cuda_gemv"]["copy_fraction"]),
               ("best other kernel's time / cuda_gemv's",
                lambda r, m: best_other(r, m) / r["m"][m]["kernels"]["cuda_gemv"]["us"]))
    bad = off_reference(rows)
    if bad:
        print("FAILED, off the reference: " + "; ".join(bad), flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
