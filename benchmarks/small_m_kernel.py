"""Time grace_qat's small-M Triton kernel against BF16, the copy bandwidth, grace_qat's CUDA GEMV
(its heuristic config; benchmarks/gemv_kernel.py sweeps it) and (when vLLM is importable) vLLM's
Marlin and Machete, per layer shape and token count M, sweeping the Triton kernel's launch configs.

Writes under --out:
* ``small_m.json``: ``meta`` (GPU, torch, Triton, vLLM versions), the measured device-to-device
  copy bandwidth, and per shape and M: microseconds of each kernel (every tried launch config of
  ours), the fraction of the copy bandwidth each reaches, and the error of ours and of BF16
  against an fp32 reference;
* ``small_m.png``.

Each GEMM is timed inside a CUDA graph cycling through enough copies of the weights that they do
not stay in L2 (as decode runs), like ``kernel_crossover.py``, which writes the kernel table the
plugin reads (every engine kernel and this one, per device and vLLM version).

    python benchmarks/small_m_kernel.py --out /tmp/small_m
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernel_crossover import _time_us, bench_shapes, measure_each_shape, plot_per_m, small_m_context  # noqa: E402

MS = (1, 2, 4, 8, 16, 32)
L2_BYTES = 60 * 2 ** 20          # H200 (H100: 50 MB); weights rotated over 3x this


def candidates(m: int, n: int, k: int, bits: int, group: int):
    """Launch configs tried per M: the heuristic's, and neighbours in tile width and split."""
    from grace_qat.kernels.triton_wna16 import Config, heuristic
    base = heuristic(m, n, k, bits, group)
    out = [base]
    if not base.use_dot:
        shapes = [(16, 64, 4), (32, 32, 4), (64, 32, 4)]
    else:
        shapes = [(32, 16, 4), (64, 16, 4)]
    for bn, bkp, warps in shapes:
        for split in sorted({1, base.split_k, base.split_k * 2}):
            c = Config(base.block_m, bn, bkp, split, base.use_dot, warps, 3)
            if c not in out:
                out.append(c)
    if base.use_dot:            # one dot of 128 features per step (in-place unpack)
        bkp = 128 // (32 // bits)
        for bn in (32, 64):
            for split in sorted({1, base.split_k}):
                out.append(Config(base.block_m, bn, bkp, split, True, 4, 3, unpack=1))
    return out


def _codes(n, k, bits, group, copies, dtype):
    from grace_qat.packing import pack_int32
    sets = []
    for _ in range(copies):
        u = torch.randint(0, 2 ** bits, (n, k), dtype=torch.int32, device="cuda")
        scales = (torch.rand(n, k // group, device="cuda") * 0.02 + 0.001).to(dtype)
        sets.append((pack_int32(u, bits, dim=1), scales, u))
    return sets


def _rel(y, ref) -> float:
    return ((y.float() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def measure_shape(bits, group, n, k, ms, copy_bps, vllm_ok, deadline) -> dict:
    from grace_qat.kernels.triton_wna16 import wna16_mm
    dtype = torch.bfloat16
    wbytes = n * k * bits // 8 + n * (k // group) * 2
    copies = max(1, math.ceil(3 * L2_BYTES / wbytes))
    sets = _codes(n, k, bits, group, copies, dtype)
    # fp32 reference weight of set 0, dequantized here with plain torch
    u0, s0 = sets[0][2], sets[0][1]
    w_ref = (u0 - 2 ** (bits - 1)).float() * s0.float().repeat_interleave(group, dim=1)
    for i, (p, s, _) in enumerate(sets):
        sets[i] = (p, s)
    bf_copies = max(1, math.ceil(3 * L2_BYTES / (n * k * 2)))
    bf = [w_ref.to(dtype) if i == 0 else torch.randn(n, k, device="cuda", dtype=dtype) * 0.01
          for i in range(bf_copies)]
    gemv_sets = []
    from grace_qat.kernels import cuda_gemv
    if cuda_gemv.available() is None and cuda_gemv.supports(bits, group, k) and max(ms) <= cuda_gemv.MAX_M:
        gemv_sets = [cuda_gemv.pack(p, s, bits) for p, s in sets]
    vk = None
    if vllm_ok:
        from kernel_crossover import _kernels
        vk = _kernels(bits, group, n, k, max(1, math.ceil(3 * L2_BYTES / (n * k * bits // 8))))
    row = {"bits": bits, "group": group, "n": n, "k": k, "weight_bytes": wbytes, "copies": copies,
           "m": {}}
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = x.float() @ w_ref.t()
        r = {"bf16_us": _time_us([lambda w=w: F.linear(x, w) for w in bf]), "configs": []}
        r["bf16_rel_err"] = _rel(F.linear(x, bf[0]), ref)
        tried = candidates(m, n, k, bits, group) if time.time() < deadline else candidates(m, n, k, bits, group)[:1]
        for cfg in tried:
            try:
                us = _time_us([lambda p=p, s=s: wna16_mm(x, p, s, bits, group, config=cfg) for p, s in sets])
            except Exception as e:             # a config the compiler refuses (resources): skip it
                r["configs"].append({"config": cfg.as_list(), "error": str(e)[:200]})
                continue
            r["configs"].append({"config": cfg.as_list(), "us": us})
        ok = [c for c in r["configs"] if "us" in c]
        best = min(ok, key=lambda c: c["us"])
        from grace_qat.kernels.triton_wna16 import Config
        cfg = Config.from_list(best["config"])
        y = wna16_mm(x, sets[0][0], sets[0][1], bits, group, config=cfg)
        r.update(wna16_us=best["us"], wna16_config=best["config"], wna16_rel_err=_rel(y, ref),
                 wna16_max_abs_err=(y.float() - ref).abs().max().item(),
                 wna16_copy_fraction=wbytes / (best["us"] * 1e-6) / copy_bps,
                 bf16_copy_fraction=n * k * 2 / (r["bf16_us"] * 1e-6) / copy_bps)
        if gemv_sets:                          # grace_qat's CUDA GEMV (benchmarks/gemv_kernel.py sweeps it)
            r["cuda_gemv_us"] = _time_us([lambda w=w: cuda_gemv.gemv(x, w[0], w[1], bits, n) for w in gemv_sets])
            y = cuda_gemv.gemv(x, gemv_sets[0][0], gemv_sets[0][1], bits, n)
            r.update(cuda_gemv_rel_err=_rel(y, ref), cuda_gemv_max_abs_err=(y.float() - ref).abs().max().item(),
                     cuda_gemv_copy_fraction=wbytes / (r["cuda_gemv_us"] * 1e-6) / copy_bps)
        if vk is not None:
            for idx, name in ((0, "marlin"), (1, "machete")):
                r[f"{name}_us"] = _time_us([lambda kern=pr[idx][0], mod=pr[idx][1]: kern.apply_weights(mod, x)
                                            for pr in vk])
                r[f"{name}_copy_fraction"] = n * k * bits / 8 / (r[f"{name}_us"] * 1e-6) / copy_bps
        row["m"][m] = r
        print(f"  w{bits} n{n} k{k} M={m:3d}: ours {best['us']:7.2f} us ({r['wna16_copy_fraction']:.2f} of copy) "
              f"cfg {best['config']}  bf16 {r['bf16_us']:7.2f} us"
              + (f"  cuda_gemv {r['cuda_gemv_us']:.2f}" if gemv_sets else "")
              + (f"  marlin {r['marlin_us']:.2f} machete {r['machete_us']:.2f}" if vk else "")
              + f"  rel err ours {r['wna16_rel_err']:.1e} bf16 {r['bf16_rel_err']:.1e}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="qwen3vl-2b,llava-7b")
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--bits", default="4,8", help="qwen3vl: these; llava (released as W4): 4 only")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--sweep-seconds", type=float, default=240.0,
                    help="after this long, time only the heuristic's config")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import triton
    meta, vllm_version, copy_bw = small_m_context(triton=triton.__version__)
    deadline = time.time() + args.sweep_seconds
    ms = [int(m) for m in args.ms.split(",")]
    rows = measure_each_shape(bench_shapes(args.models, args.tp, args.bits), lambda bits, n, k: measure_shape(
        bits, args.group, n, k, ms, copy_bw, vllm_version is not None, deadline))
    with open(os.path.join(args.out, "small_m.json"), "w") as f:
        json.dump({"meta": meta, "shapes": rows}, f, indent=1)
    plot_per_m(rows, meta, os.path.join(args.out, "small_m.png"),
               ("fraction of copy bandwidth (ours)", lambda r, m: r["m"][m]["wna16_copy_fraction"]),
               ("BF16 time / our time", lambda r, m: r["m"][m]["bf16_us"] / r["m"][m]["wna16_us"]))


if __name__ == "__main__":
    main()
