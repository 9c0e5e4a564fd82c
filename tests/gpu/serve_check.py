#!/usr/bin/env python3
"""Serve a GRACE checkpoint over the engine's OpenAI-compatible HTTP server with the grace_qat plugin,
then the GPTQ export of the same weights on the stock engine, and compare greedy tokens.

    python3 tests/gpu/serve_check.py --engine vllm|sglang --model DIR [--reference GPTQ_DIR] --out FILE

The plugin's server starts with the command a model card gives (``grace_qat.vllm_server.serve_flags``:
no ``--quantization`` where the plugin detects the checkpoint), so the check also proves the
detection; a plugin side that then runs no quantized kernel fails.

Two chats per server (temperature 0, ``ignore_eos``, ``--max-tokens`` tokens each): an image+text
chat (a generated picture) and a text-only chat. The token sequences come from the response's
``logprobs`` (vLLM: ``return_tokens_as_token_ids``, so they are token ids). The exit status is 0
only when both servers answered both chats and every sequence equals stock's exactly; otherwise 1
with one line on stderr naming each failure. The JSON written to ``--out`` holds both runs (tokens,
text, usage, start-up seconds, the kernel lines of the plugin's log) and the comparison.

Why identical tokens are the right expectation: the plugin hands the engine the codes and scales
the GPTQ export stores, and the engine runs them on the kernel it picks for that export. On vLLM the
plugin therefore runs with ``GRACE_QAT_DUAL_KERNEL=0`` (one packed copy, vLLM's own kernel choice;
``--dual-kernel`` keeps Marlin at small batches, whose tokens may part from stock's Machete: reported,
not failed). On SGLang both sides run GPTQ-Marlin (the plugin with ``GRACE_QAT_DUAL_KERNEL=0`` too, so
no kernel table adds a second kernel; format B: AWQ-Marlin on the plugin's side, the
export's GPTQ-Marlin on stock's: reported, not failed) and the stock server has the plugin switched
off (``SGLANG_PLUGINS`` set to a name no plugin has). Where no export is given, one is written with
``grace_qat.convert.convert(DIR, COPY, to="gptq")``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for p in (ROOT, HERE, os.path.join(ROOT, "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)

from grace_qat.vllm_server import (VLLMServer, kernels_in_log, no_quantized_kernel, serve_flags,  # noqa: E402
                                   wait_healthy)   # plain HTTP helpers, no vLLM import

QUESTION = "Describe the image in one sentence."
SGLANG_SIDE_BY_SIDE_TOKENS = 16384      # KV pool per server side by side: 1.8 GiB (2B), 8 GiB (7B)
TEXT_QUESTION = "Write one sentence about the sea."


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=("vllm", "sglang"), required=True)
    p.add_argument("--model", required=True, help="GRACE checkpoint directory (any format)")
    p.add_argument("--reference", help="GPTQ export to serve on the stock engine (default: convert one)")
    p.add_argument("--out", required=True, help="JSON result file")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--startup-timeout", type=int, default=900, help="seconds per server start")
    p.add_argument("--dual-kernel", action="store_true",
                   help="keep the plugin's second kernels where a kernel table has them (tokens may part "
                        "from stock: not a failure)")
    p.add_argument("--tokenizer-path", help="SGLang: tokenizer/processor directory (original-layout LLaVA)")
    p.add_argument("--chat-template", help="SGLang: chat template name")
    p.add_argument("--engine-arg", action="append", default=[], help="one more server argument")
    p.add_argument("--side-by-side", action="store_true",
                   help="start the plugin's and the stock server at once on one GPU, each with a fixed KV "
                        "cache (vLLM: --kv-cache-memory-bytes and 0.4 of the memory; SGLang: "
                        "--max-total-tokens and 0.45), halving the wall time; a side that fails to "
                        "start so is started again alone")
    return p.parse_args(argv)


class SGLangServer(VLLMServer):
    """``python -m sglang.launch_server`` on a loopback port (VLLMServer's chat, log and stop)."""

    def __enter__(self) -> "SGLangServer":
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", self.model,
               "--host", "127.0.0.1", "--port", str(self.port)] + self.args
        self._log = open(self.log_path, "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        self.startup_s = wait_healthy(self, "sglang.launch_server", t0, poll_s=2)
        return self


def image_data_url() -> str:
    from vllm_run import _image_data_url      # the picture the benchmarks use (benchmarks/vllm_run.py)
    return _image_data_url()


def server_setup(args, model: str, plugin: bool, work: str) -> tuple[type, list[str], dict]:
    """(server class, server arguments, environment) of one side of the comparison."""
    extra = list(args.engine_arg)
    if args.engine == "vllm":
        share = ["--gpu-memory-utilization", "0.4", "--kv-cache-memory-bytes", str(8 * 2 ** 30)] \
            if args.side_by_side else ["--gpu-memory-utilization", "0.85"]
        srv = ["--max-model-len", "4096", "--seed", "0"] + share + extra
        env = {}
        if plugin:
            srv = serve_flags(model) + srv      # the model card's command: no flag where the plugin detects
            if not args.dual_kernel:
                env["GRACE_QAT_DUAL_KERNEL"] = "0"
        return VLLMServer, srv, env
    from sglang_serve_check import (DISABLED_PLUGINS, STOCK_LLAVA_TEMPLATE, architecture, ensure_entry_point,
                                    read_config, sglang_vision_attention)
    # SGLang sizes its KV pool from the memory free when it measures, less (1 - fraction) of what was
    # free before its weights loaded: beside a second server, capped pools keep both measurements
    # positive whatever the order (each server holds its weights, ~2-8 GiB of pool, ~1 GiB of
    # image buffers: far under 0.45 of an 80 GiB GPU)
    share = ["--mem-fraction-static", "0.45", "--max-total-tokens", str(SGLANG_SIDE_BY_SIDE_TOKENS)] \
        if args.side_by_side else ["--mem-fraction-static", "0.6"]
    srv = ["--attention-backend", "triton", "--context-length", "4096", "--random-seed", "0",
           "--disable-radix-cache", "--log-level", "info"] + share
    for key, val in sglang_vision_attention().items():
        srv += ["--" + key.replace("_", "-"), val]
    for flag, val in (("--tokenizer-path", args.tokenizer_path), ("--chat-template", args.chat_template)):
        if val:
            srv += [flag, val]
    eps = ensure_entry_point(work)      # the scheduler processes find the plugin by its entry point
    env = {"PYTHONPATH": os.pathsep.join(x for x in (ROOT, eps, os.environ.get("PYTHONPATH")) if x)}
    if plugin:
        srv += serve_flags(model)           # as for vLLM: no flag where the plugin detects the checkpoint
        if not args.dual_kernel:         # Marlin alone, as stock runs the export (no table's second kernel)
            env["GRACE_QAT_DUAL_KERNEL"] = "0"
    else:
        env["SGLANG_PLUGINS"] = DISABLED_PLUGINS
        if architecture(model) == "LlavaLlamaForCausalLM":   # as sglang_serve_check: the processor's <image> id
            srv += ["--json-model-override-args",
                    json.dumps({"image_token_index": read_config(model)["vocab_size"]})]
            if not args.chat_template:   # the processor's template is vLLM's: SGLang fails its warm-up on it
                srv += ["--chat-template", STOCK_LLAVA_TEMPLATE]
    return SGLangServer, srv + extra, env


def chat_tokens(reply: dict) -> list | None:
    """The generated tokens of a chat completion, from its logprobs (None when it has none)."""
    content = ((reply.get("choices") or [{}])[0].get("logprobs") or {}).get("content")
    return None if content is None else [c.get("token") for c in content]


def serve_once(args, model: str, plugin: bool, work: str, log_path: str, port: int | None = None) -> dict:
    cls, srv_args, env = server_setup(args, model, plugin, work)
    res = {"model": model, "server_args": srv_args, "env": env, "log": log_path, "requests": {}}
    extra = {"ignore_eos": True, "logprobs": True, "top_logprobs": 1, "seed": 0}
    if args.engine == "vllm":
        extra["return_tokens_as_token_ids"] = True
    try:
        with cls(model, srv_args, port=port, log_path=log_path, env=env,
                 startup_timeout=args.startup_timeout) as server:
            res["startup_s"] = round(server.startup_s, 1)
            for name, question, image in (("image_text", QUESTION, image_data_url()),
                                          ("text", TEXT_QUESTION, None)):
                t = time.perf_counter()
                reply = None
                for attempt in range(10):        # a server that just turned healthy may still say 503
                    try:
                        reply = server.chat(question, image, max_tokens=args.max_tokens, **extra)
                        break
                    except urllib.error.HTTPError as e:
                        if e.code != 503 or attempt == 9:
                            raise RuntimeError(f"HTTP {e.code}: {e.read()[:500]!r}") from None
                        time.sleep(6)
                res["requests"][name] = {
                    "seconds": round(time.perf_counter() - t, 2), "tokens": chat_tokens(reply),
                    "text": reply["choices"][0]["message"].get("content"), "usage": reply.get("usage")}
            log = server.log()
    except Exception as e:
        res["exception"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        res["traceback"] = traceback.format_exc()[-4000:]
        log = ""
        if os.path.exists(log_path):
            with open(log_path, errors="replace") as f:
                log = f.read()
    if args.engine == "vllm":
        res["kernels"] = kernels_in_log(log) if plugin else sorted(set(re.findall(r"Using (\w+LinearKernel)", log)))
    else:
        from vllm_bench import sglang_kernels_in_log
        res["kernels"] = sglang_kernels_in_log(log)
    return res


def first_difference(a: list, b: list) -> int | None:
    """Index of the first position where two token sequences part (a length difference counts)."""
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if i is None and len(a) != len(b):
        i = min(len(a), len(b))
    return i


def compare(plugin: dict, stock: dict) -> dict:
    out = {}
    for name in ("image_text", "text"):
        a = ((plugin.get("requests") or {}).get(name) or {}).get("tokens")
        b = ((stock.get("requests") or {}).get(name) or {}).get("tokens")
        if a is None or b is None:
            out[name] = {"identical": None}
            continue
        d = first_difference(a, b)
        out[name] = {"identical": d is None, "first_difference": d, "plugin_len": len(a), "stock_len": len(b)}
    return out


def failures(result: dict) -> list[str]:
    """Every reason the check fails: a server that did not answer, or tokens that are not stock's
    (unless ``expect_identical`` is off, e.g. vLLM's dual kernel: then reported only)."""
    bad = []
    for side in ("plugin", "stock"):
        r = result.get(side) or {}
        if "exception" in r or not r:
            bad.append(f"{side} server failed: {r.get('exception', 'did not run')} (log {r.get('log')})")
    kernels = (result.get("plugin") or {}).get("kernels")
    if result.get("gpu") and "exception" not in (result.get("plugin") or {"exception": 1}) and \
            no_quantized_kernel(kernels):
        bad.append(f"plugin served no quantized kernel on the GPU ({kernels or 'none reported'})")
    for name, c in (result.get("comparison") or {}).items():
        if c.get("identical") is None:
            bad.append(f"{name}: no tokens to compare")
        elif not c["identical"] and result.get("expect_identical", True):
            bad.append(f"{name}: plugin tokens differ from stock from position {c['first_difference']} "
                       f"({c['plugin_len']} vs {c['stock_len']} tokens)")
    return bad


def main(argv=None) -> int:
    args = parse_args(argv)
    args.model = os.path.abspath(args.model)
    from grace_qat.checkpoint import GraceCheckpoint
    ckpt = GraceCheckpoint.open(args.model)
    result = {"engine": args.engine, "model": args.model, "checkpoint": ckpt.describe(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(),
              "python": platform.python_version(), "argv": sys.argv[1:]}
    from importlib.metadata import PackageNotFoundError, version
    for dist in (args.engine, "torch", "transformers"):
        try:
            result[f"{dist}_version"] = version(dist)
        except PackageNotFoundError:
            result[f"{dist}_version"] = None
    # identical tokens are expected where both sides run one and the same kernel (module docstring)
    result["expect_identical"] = not args.dual_kernel and not (
        args.engine == "sglang" and ckpt.format == "awq")
    logs = os.path.splitext(os.path.abspath(args.out))[0] + "_logs"
    os.makedirs(logs, exist_ok=True)
    work = tempfile.mkdtemp(prefix="serve_check_")

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)

    ref = args.reference
    if ref is None or not os.path.exists(os.path.join(ref, "config.json")):
        from grace_qat.convert import convert
        ref = ref or os.path.join(work, "gptq")
        t = time.perf_counter()
        convert(args.model, ref, to="gptq", force=True)
        result["reference_conversion_s"] = round(time.perf_counter() - t, 1)
    result["reference"] = os.path.abspath(ref)
    try:
        import torch
        result["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        result["gpu"] = None
    sides = (("plugin", args.model, True), ("stock", os.path.abspath(ref), False))
    if args.side_by_side:
        from concurrent.futures import ThreadPoolExecutor

        from grace_qat.vllm_server import free_port
        ports = [free_port() for _ in sides]
        while ports[0] == ports[1]:
            ports[1] = free_port()
        t = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            futs = {name: pool.submit(serve_once, args, m, plugin, work, os.path.join(logs, f"{name}.log"), port)
                    for (name, m, plugin), port in zip(sides, ports)}
            for name, fut in futs.items():
                result[name] = fut.result()
        result["side_by_side_s"] = round(time.perf_counter() - t, 1)
        # a server that did not start beside the other (memory, a port) is started again alone: a
        # failure of the plugin's own then shows on its own, and the check is not lost to sharing
        for name, m, plugin in sides:
            if result[name].get("startup_s") is None:
                result.setdefault("started_again_alone", []).append(name)
                result[name + "_beside"] = result[name]
                save()
                args_alone = argparse.Namespace(**dict(vars(args), side_by_side=False))
                result[name] = serve_once(args_alone, m, plugin, work, os.path.join(logs, f"{name}-alone.log"))
    else:
        result["plugin"] = serve_once(args, args.model, True, work, os.path.join(logs, "plugin.log"))
        save()
        result["stock"] = serve_once(args, os.path.abspath(ref), False, work, os.path.join(logs, "stock.log"))
    result["comparison"] = compare(result["plugin"], result["stock"])
    bad = failures(result)
    result["failures"], result["passed"] = bad, not bad
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    shutil.rmtree(work, ignore_errors=True)     # the entry-point shim and, unless given, the GPTQ copy
    print(json.dumps({"passed": result["passed"], "comparison": result["comparison"],
                      "kernels": result["plugin"].get("kernels")}, indent=1))
    if bad:
        print(f"serve_check: FAILED {args.engine} {args.model}: {'; '.join(bad)}", file=sys.stderr, flush=True)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
