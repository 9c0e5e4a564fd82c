"""Measure, per layer shape, every mixed-precision kernel an engine can run on it, at each token count M.

The kernels, with ``--engine vllm`` (default): vLLM's own choice for the layer
(``choose_mp_linear_kernel``: Machete on Hopper by default) and the others a user can pick with one
flag (Humming, Marlin), plus grace_qat's own (Triton, CUDA GEMV); with ``--engine sglang``: SGLang's
GPTQ-Marlin (what stock SGLang runs GPTQ layers with on CUDA), its Humming (``--quantization
humming``) and grace_qat's own, next to the kernel grace_sglang would choose. Writes under
--out: ``kernel_table.json`` (what ``grace_qat.kernels.table`` reads, keyed by this device name and
the engine's version: copy it to ``grace_qat/kernels/table-<gpu>-<engine><version>.json`` or point
``GRACE_QAT_CROSSOVER_FILE`` at it; a second kernel only where it is >= 1.05x the engine's choice at
every M it serves), ``timings.json`` (microseconds per GEMM, every kernel, every M) and
``timings.png``.

Each GEMM is timed inside a CUDA graph (as vLLM runs decode), cycling through enough copies of the
weights that they do not stay in L2, so the numbers are HBM-bound like a real decode step.

    python benchmarks/kernel_crossover.py --out /tmp/xover [--engine sglang]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LADDER = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)
L2_BYTES = 50 * 2 ** 20          # H100 / H200


def bench_shapes(models: str, tps: str, bits_list: str):
    """(model, tp, bits, layer, n, k) for comma-separated models, TP sizes and bit widths (LLaVA: W4 only,
    as released); shared by this script and small_m_kernel.py."""
    for model in models.split(","):
        for tp in (int(t) for t in tps.split(",")):
            for bits in (int(b) for b in bits_list.split(",")):
                if model.startswith("llava") and bits != 4:
                    continue
                for layer, n, k in layer_shapes(model, tp):
                    yield model, tp, bits, layer, n, k


def layer_shapes(model: str, tp: int) -> list[tuple[str, int, int]]:
    """(name, n = out features, k = in features) of the quantized layers on one of ``tp`` ranks."""
    from grace_qat import synthetic
    if model == "qwen3vl-2b":
        s = synthetic.QWEN3VL_SIZES_SPEC["2b"]
        h, inter, hd, heads, kv = s["hidden"], s["intermediate"], s["head_dim"], s["heads"], s["kv_heads"]
    else:
        s = synthetic.LLAVA_SIZES_SPEC["7b"]
        h, inter, heads, kv = s["hidden"], s["intermediate"], s["heads"], s["kv_heads"]
        hd = h // heads
    return [("qkv_proj", (heads + 2 * kv) * hd // tp, h), ("o_proj", h, heads * hd // tp),
            ("gate_up_proj", 2 * inter // tp, h), ("down_proj", h, inter // tp)]


KERNELS = ("MarlinLinearKernel", "MacheteLinearKernel", "HummingLinearKernel", "TritonWNA16Kernel",
           "CudaGemvKernel")


SGLANG_KERNELS = ("GPTQMarlinLinearKernel", "HummingLinearMethod")   # stock SGLang's, for GPTQ weights


def kernel_class(name: str, engine: str) -> type | None:
    """A kernel by class name: grace_qat's own, or the engine's (vLLM: any registered mixed-precision
    kernel; SGLang: its GPTQ-Marlin or Humming, built by ``_sglang_kernel``)."""
    from grace_qat.kernels.own import OWN_KERNELS
    if engine == "vllm":
        from grace_vllm.dispatch import kernel_class as vllm_kernel_class
        return vllm_kernel_class(name)
    if name in SGLANG_KERNELS:
        from grace_sglang.linear import EngineKernel
        return EngineKernel
    return OWN_KERNELS.get(name)


def _sglang_kernel(name: str, bits: int, group: int, n: int, k: int, codes: torch.Tensor, scales: torch.Tensor):
    """SGLang's GPTQ-Marlin or Humming on one shape, built as grace_sglang builds a layer's:
    (kernel, module)."""
    from grace_qat.packing import pack_gptq
    from grace_sglang.config import _scalar_types
    from grace_sglang.linear import HUMMING, EngineKernel, gptq_parameters, new_humming_kernel, new_marlin_kernel
    st = _scalar_types()
    gptq = pack_gptq(codes - 2 ** (bits - 1), scales, bits, group, scale_dtype=torch.bfloat16)
    mod = torch.nn.Module()
    mod.with_bias = False
    gptq_parameters(mod, gptq["qweight"].cuda(), gptq["scales"].cuda(), bits)
    if name == HUMMING:
        kernel = new_humming_kernel(mod, bits, group, (k, n), k, [n], torch.bfloat16)
    else:
        kernel = new_marlin_kernel(mod, st.uint4b8 if bits == 4 else st.uint8b128, group, (k, n), (k, n),
                                   torch.bfloat16)
    return EngineKernel(name, kernel), mod


def _kernels(bits: int, group: int, n: int, k: int, copies: int,
             names=("MarlinLinearKernel", "MacheteLinearKernel"), engine: str = "vllm", weights=None,
             own_configs: dict | None = None):
    """``copies`` lists of (kernel, module) on random codes of one shape, one per name in ``names``
    (in that order), each module holding its own repacked copy; ``weights`` (vLLM's kernels and
    grace_qat's only): the copies' (codes packed by ``pack_int32(codes, bits, dim=1)``, scales)
    instead, so that a caller can check each kernel's output against its own reference;
    ``own_configs``: grace_qat kernel name -> its launch-config table ([[max M, config], ...])."""
    if weights is not None and engine != "vllm":
        raise ValueError("weights are taken by vLLM's kernels and grace_qat's only")
    from grace_qat.kernels.own import OWN_KERNELS
    from grace_qat.packing import pack_int32
    cfg = None
    if engine == "vllm":
        from grace_vllm.linear import kernel_holder, mp_layer_config, new_kernel
        cfg = mp_layer_config(bits, group, (k, n), (k, n), torch.bfloat16)
    classes = []
    for name in names:
        cls = kernel_class(name, engine)
        ok, why = _can_run(cls, cfg, bits, group, k) if cls is not None else (False, f"not in this {engine}")
        if not ok:
            raise RuntimeError(f"{name} cannot run w{bits}g{group} n{n} k{k}: {why}")
        classes.append(cls)
    sets = []
    for i in range(copies):
        if weights is not None:
            packed, scales = weights[i]
        else:
            codes = torch.randint(0, 2 ** bits, (n, k), dtype=torch.int32, device="cuda")
            packed = pack_int32(codes, bits, dim=1)
            scales = (torch.rand(n, k // group, device="cuda") * 0.02 + 0.001).to(torch.bfloat16)
        row = []
        for name, cls in zip(names, classes):
            if engine == "sglang" and name in SGLANG_KERNELS:
                row.append(_sglang_kernel(name, bits, group, n, k, codes.cpu(), scales.cpu()))
                continue
            mod = (kernel_holder(input_size=k, input_size_per_partition=k, output_size=n,
                                 output_partition_sizes=[n], params_dtype=torch.bfloat16, has_bias=False)
                   if engine == "vllm" else torch.nn.Module())
            if cls in OWN_KERNELS.values():          # grace_qat's own: their layout on the holder
                row.append((cls.attach(mod, packed, scales, bits, group, (own_configs or {}).get(name, ())), mod))
            else:
                row.append((new_kernel(cls, cfg, mod, packed.clone(), scales.clone()), mod))
        sets.append(row)
    return sets


def _can_run(cls: type, vllm_config, bits: int, group: int, k: int) -> tuple[bool, str | None]:
    """vLLM's kernels (and grace_qat's beside them) judge vLLM's layer config; with SGLang, its
    kernels run what stock SGLang gives them and grace_qat's kernels judge the plain facts."""
    if vllm_config is not None:
        return cls.can_implement(vllm_config)
    return cls.can_run(bits, group, k, torch.bfloat16) if hasattr(cls, "can_run") else (True, None)


def table_entry(large: str, us: dict[str, dict[int, float]], engine: str) -> dict:
    """One shape's kernel-table entry from its timings: the best second kernel among those the engine's
    adapter can keep next to ``large``. vLLM's keeps any kernel it names; SGLang's only grace_qat's own
    (SGLang's kernels are timed as references: lease 6 of 2026-12-07 wrote its Marlin into a table,
    which the plugin then refused)."""
    from grace_qat.kernels.table import entry_from_timings
    if engine == "sglang":
        from grace_sglang.linear import second_kernel_class
        us = {name: t for name, t in us.items() if name == large or second_kernel_class(name) is not None}
    return entry_from_timings(large, us)


def usable_kernels(bits: int, group: int, n: int, k: int, engine: str = "vllm") -> tuple[str, list[str], dict]:
    """(the engine's choice for this layer, the kernels that can run it, why the others cannot)."""
    cfg = None
    # the kernel grace_qat runs the layer with: the engine's own choice, or a table's engine default
    # (which the second kernels measured here are then partners of)
    if engine == "vllm":
        from vllm.model_executor.kernels.linear import choose_mp_linear_kernel

        from grace_vllm import dispatch
        from grace_vllm.linear import mp_layer_config
        cfg = mp_layer_config(bits, group, (k, n), (k, n), torch.bfloat16)
        large = dispatch.engine_default(choose_mp_linear_kernel(cfg), cfg)[0].__name__
        candidates = (large,) + KERNELS
    else:
        from grace_sglang.linear import engine_kernel
        large = engine_kernel(bits)[0]        # Marlin, or what GRACE_QAT_SGLANG_KERNEL / a table say
        candidates = (large,) + SGLANG_KERNELS + tuple(name for name in KERNELS
                                                       if kernel_class(name, engine) is not None)
    names, skipped = [], {}
    for name in dict.fromkeys(candidates):
        cls = kernel_class(name, engine)
        ok, why = _can_run(cls, cfg, bits, group, k) if cls is not None else (False, f"not in this {engine}")
        if ok and getattr(cls, "get_min_capability", lambda: 0)() > _capability():
            ok, why = False, "needs a newer GPU"
        (names.append(name) if ok else skipped.__setitem__(name, str(why)))
    return large, names, skipped


def measure_each_shape(shapes, measure) -> list[dict]:
    """``measure(bits, n, k)`` once per distinct layer shape of ``shapes`` (bench_shapes' rows); each
    row lists the model layers of its shape under "layers"."""
    rows, seen = [], {}
    for model, tp, bits, layer, n, k in shapes:
        if (bits, n, k) not in seen:
            seen[bits, n, k] = measure(bits, n, k)
            rows.append(seen[bits, n, k])
        seen[bits, n, k].setdefault("layers", []).append(f"{model} tp{tp} {layer}")
    return rows


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (bytes read + bytes written), median of 5:
    the ceiling for a batch-1 decode, which streams the weights once. One definition for every benchmark."""
    n = 2 ** 30 // 2
    a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(10):
            b.copy_(a)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / 10)
    del a, b
    return 2 * 2 ** 30 / sorted(times)[len(times) // 2]


def small_m_context(**extra) -> tuple[dict, str | None, float]:
    """(meta, vLLM version or None, copy bytes/s) of a small-M kernel benchmark on this GPU: vLLM's
    kernels join when vLLM imports (as one rank), TF32 off, the copy bandwidth measured now."""
    import datetime
    vllm_version = None
    try:
        import vllm
        _single_rank()
        vllm_version = vllm.__version__
    except ImportError:
        pass
    device = torch.cuda.get_device_name()
    torch.backends.cuda.matmul.allow_tf32 = False
    meta = {"device": device, "torch": torch.__version__, "vllm": vllm_version, **extra,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "sms": torch.cuda.get_device_properties(0).multi_processor_count}
    meta["copy_bytes_per_s"] = copy_bw = copy_bandwidth()
    print(f"{device}: copy {copy_bw / 1e12:.2f} TB/s, vllm {vllm_version}", flush=True)
    return meta, vllm_version, copy_bw


def plot_per_m(rows: list[dict], meta: dict, path: str, left, right) -> None:
    """Two panels over M, one line per shape: ``left`` and ``right`` are (y label, f(row, m)); no
    plot where matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for r in rows:
        mm = sorted(r["m"])
        for ax, (_, f) in zip(axes, (left, right)):
            ax.plot(mm, [f(r, m) for m in mm], marker=".", label=f"w{r['bits']} n{r['n']} k{r['k']}")
    axes[0].set(xscale="log", xlabel="M", ylabel=left[0],
                title=f"{meta['device']}, torch {meta['torch']}, vLLM {meta['vllm']}")
    axes[1].set(xscale="log", xlabel="M", ylabel=right[0])
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _capability() -> int:
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def _time_us(fns, replays: int = 20) -> float:
    """Microseconds per call of one graph that calls every fn in ``fns`` once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:
            f()                                   # warm-up (lazy init) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(5):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / replays / len(fns))
    return statistics.median(samples)


def measure(bits: int, group: int, n: int, k: int, ladder=LADDER, engine: str = "vllm",
            gemv_table: list | None = None) -> dict:
    """Microseconds per GEMM of every usable kernel at every M, checked against each other; the CUDA
    GEMV with ``gemv_table``'s launch configs, or else with the fastest of gemv_kernel.py's candidate
    configs at each M (its heuristic alone was up to 1.16x slower on an H100, enough to lose a shape to
    the engine's kernel); a second-kernel entry for it carries them."""
    large, names, skipped = usable_kernels(bits, group, n, k, engine)
    weight_bytes = n * k * bits // 8
    copies = max(1, -(-3 * L2_BYTES // weight_bytes))
    sets, failed = None, {}
    while sets is None:
        try:
            sets = _kernels(bits, group, n, k, copies, names, engine,
                            own_configs={"CudaGemvKernel": gemv_table} if gemv_table else None)
        except Exception as e:            # a kernel that fails to build here: time the others
            bad = next((nm for nm in names if nm in str(e)), names[-1])
            if bad == large:
                raise
            failed[bad] = str(e)[:300]
            names = [nm for nm in names if nm != bad]
    us = {name: {} for name in names}
    gemv = names.index("CudaGemvKernel") if "CudaGemvKernel" in names and not gemv_table else None
    swept = []
    for m in ladder:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        if gemv is not None and m <= kernel_class("CudaGemvKernel", engine).MAX_M:
            swept.append([m, _fastest_gemv_config(x, [row[gemv] for row in sets], bits, n)])
            for kern, _ in (row[gemv] for row in sets):
                kern.table = [(mm, kern.module.Config.from_list(c)) for mm, c in swept]
        for idx, name in enumerate(names):
            if m > getattr(kernel_class(name, engine), "MAX_M", m):
                continue                      # a kernel for small M only: its run of M ends here
            fns = [lambda kern=row[idx][0], mod=row[idx][1]: kern.apply_weights(mod, x) for row in sets]
            us[name][m] = _time_us(fns)
        # every kernel computes the same product: a wrong layout would show here, not only in speed
        ref = sets[0][names.index(large)][0].apply_weights(sets[0][names.index(large)][1], x).float()
        for idx, name in enumerate(names):
            if m not in us[name]:
                continue
            y = sets[0][idx][0].apply_weights(sets[0][idx][1], x).float()
            rel = ((y - ref).norm() / ref.norm().clamp_min(1e-6)).item()
            if rel > 1e-2:
                raise RuntimeError(f"{name} and {large} disagree on w{bits}g{group} n{n} k{k} M={m}: rel {rel:.3g}")
    del sets
    torch.cuda.empty_cache()
    entry = table_entry(large, us, engine)
    gemv_table = gemv_table or swept
    if entry["small"] == "CudaGemvKernel" and gemv_table:
        entry["configs"] = gemv_table
    return {"large": large, "us": us, "copies": copies, "skipped": skipped, "failed": failed, "entry": entry,
            "gemv_configs": gemv_table}


def _fastest_gemv_config(x: torch.Tensor, kernels, bits: int, n: int) -> list:
    """The launch config ([nt, warps, split, unroll]) of the CUDA GEMV's candidates (gemv_kernel.py's
    neighbourhood of its heuristic) that ran ``x`` fastest over the (kernel, holder) copies ``kernels``."""
    from gemv_kernel import device_candidates, time_configs     # (it imports this module at its top)
    layers = [(mod.weight_packed, mod.weight_scale) for _, mod in kernels]
    timed = time_configs(x, layers, bits, n, device_candidates(x.shape[0], n, x.shape[1], bits, x.dtype))
    return min(timed, key=lambda c: c["us"])["config"]


def measure_marlin_variants(bits: int, group: int, n: int, k: int, ms=(1, 4, 16, 32)) -> dict:
    """Marlin's own small-M options, for the next step of issue 9: atomic-add reduction across
    K-splits (vLLM turns it on only for n < 2048, k >= 2048) and the fp32 vs bf16 reduction buffer.
    Microseconds per GEMM and the largest relative difference to vLLM's default settings."""
    import functools

    from vllm.model_executor.kernels.linear.mixed_precision import marlin as marlin_kernel
    from vllm.model_executor.layers.quantization.utils import marlin_utils as mu
    weight_bytes = n * k * bits // 8
    copies = max(1, -(-3 * L2_BYTES // weight_bytes))
    mods = [p[0] for p in _kernels(bits, group, n, k, copies)]
    default_atomic = mu.should_use_atomic_add_reduce
    default_apply = marlin_kernel.apply_gptq_marlin_linear   # the name the kernel calls (any version)

    def call(kern, mod, x, fp32_reduce):
        marlin_kernel.apply_gptq_marlin_linear = functools.partial(default_apply, use_fp32_reduce=fp32_reduce)
        try:
            return kern.apply_weights(mod, x)
        finally:
            marlin_kernel.apply_gptq_marlin_linear = default_apply

    forced = lambda **kw: True          # noqa: E731  (atomic-add reduction, whatever the shape)
    variants = [(atomic, fp32) for atomic in (False, True) for fp32 in (True, False)]
    out = {f"atomic={'on' if a else 'default'} fp32_reduce={f}": {"us": {}, "max_rel_diff": 0.0}
           for a, f in variants}
    try:
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = call(*mods[0], x, True).float()                      # vLLM's default settings
            for (atomic, fp32), row in zip(variants, out.values()):
                mu.should_use_atomic_add_reduce = forced if atomic else default_atomic
                row["us"][m] = _time_us([lambda kern=kern, mod=mod: call(kern, mod, x, fp32)
                                         for kern, mod in mods])
                y = call(*mods[0], x, fp32).float()
                row["max_rel_diff"] = max(row["max_rel_diff"],
                                          ((y - ref).norm() / ref.norm().clamp_min(1e-6)).item())
                mu.should_use_atomic_add_reduce = default_atomic
    finally:
        mu.should_use_atomic_add_reduce = default_atomic
        marlin_kernel.apply_gptq_marlin_linear = default_apply
    return out


def _single_rank() -> None:
    """vLLM's parameters ask for the tensor-parallel rank when built: answer for one process."""
    from vllm.model_executor import parameter
    parameter.get_tensor_model_parallel_rank = lambda: 0
    parameter.get_tensor_model_parallel_world_size = lambda: 1


def lease_table(device: str, engine: str, version: str, shapes: dict) -> dict:
    """The kernel table of this run: its shapes, and the engine default in effect while it ran (the
    kernel its shapes' second kernels are partners of), so that the file stands alone when shipped."""
    from grace_qat import settings
    from grace_qat.kernels.table import table_for
    table = {"device": device, "engine": engine, "engine_version": version,
             "measured": f"benchmarks/kernel_crossover.py, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
                         "bf16 activations, CUDA-graph timing, weights rotated out of L2",
             "shapes": shapes}
    default = (table_for(device, engine, version, extra=settings.crossover_file()) or {}).get("engine_default")
    if default and settings.dual_kernel():
        table["engine_default"] = default
    return table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="qwen3vl-2b,llava-7b")
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--bits", default="4,8", help="qwen3vl: these; llava (released as W4): 4 only")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--out", required=True)
    ap.add_argument("--engine", choices=("vllm", "sglang"), default="vllm",
                    help="whose kernel the table is measured against (and keyed by its version)")
    ap.add_argument("--gemv-configs", default=None,
                    help="small_m.json of gemv_kernel.py on this GPU: the CUDA GEMV runs (and the table "
                         "carries) the launch configs its sweep chose")
    ap.add_argument("--marlin-variants", action="store_true",
                    help="also time Marlin's atomic-add / bf16-reduce options at small M (issue 9)")
    args = ap.parse_args()
    if args.marlin_variants and args.engine != "vllm":
        ap.error("--marlin-variants times vLLM's Marlin options")
    os.makedirs(args.out, exist_ok=True)
    device = torch.cuda.get_device_name()
    if args.engine == "vllm":
        _single_rank()
        import vllm as engine_module
    else:
        import sglang as engine_module
    version = engine_module.__version__
    timings, shapes = [], {}
    from gemv_kernel import swept_configs     # (it imports this module at its top)
    tuned = swept_configs(args.gemv_configs)
    from grace_qat.kernels.table import shape_key
    for model, tp, bits, layer, n, k in bench_shapes(args.models, args.tp, args.bits):
        key = shape_key(bits, args.group, n, k)
        if key in shapes:
            continue
        r = measure(bits, args.group, n, k, engine=args.engine, gemv_table=tuned.get((bits, n, k)))
        if args.marlin_variants:
            r["marlin_variants"] = measure_marlin_variants(bits, args.group, n, k)
            for name, row in r["marlin_variants"].items():
                print(f"    {name:34s} us {row['us']}  max rel diff {row['max_rel_diff']:.2e}",
                      flush=True)
        shapes[key] = r["entry"]
        timings.append({"model": model, "tp": tp, "layer": layer, "key": key, **r})
        speed = {name: {m: round(r["us"][r["large"]][m] / t[m], 2) for m in (1, 16, 64, 128) if m in t}
                 for name, t in r["us"].items() if name != r["large"]}
        e = r["entry"]
        print(f"{model} tp{tp} {layer:13s} {key:24s} {r['large']} alone" if not e["small"] else
              f"{model} tp{tp} {layer:13s} {key:24s} {e['small']} <= M {e['max_m']} (>= {e['gain']}x)",
              f"| {r['large']} time / other's: {speed}" + (f" | failed: {list(r['failed'])}" if r["failed"] else ""),
              flush=True)
    table = lease_table(device, args.engine, version, shapes)
    with open(os.path.join(args.out, "kernel_table.json"), "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    with open(os.path.join(args.out, "timings.json"), "w") as f:
        json.dump({"device": device, "engine": args.engine, "engine_version": version, "torch": torch.__version__,
                   "ladder": list(LADDER), "timings": timings}, f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(9, 5))
        for t in timings:
            for name, us in t["us"].items():
                if name == t["large"]:
                    continue
                ms = sorted(us)
                ax.plot(ms, [t["us"][t["large"]][m] / us[m] for m in ms], marker=".",
                        label=f"{t['model']} tp{t['tp']} {t['layer']} {t['key'].split()[0]} {name[:-12]}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set(xscale="log", xlabel="tokens in the GEMM (M)", ylabel=f"{args.engine}'s choice time / kernel's time",
               title=f"Mixed-precision kernels per layer shape ({device}, {args.engine} {version})")
        ax.legend(fontsize=5, ncol=2)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "timings.png"), dpi=110)
    except ImportError:
        pass
    print(f"kernel table: {sum(1 for e in shapes.values() if e['small'])} of {len(shapes)} shapes keep a "
          f"second kernel; {os.path.join(args.out, 'kernel_table.json')}")


if __name__ == "__main__":
    main()
