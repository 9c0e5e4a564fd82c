"""The demo: serve a GRACE checkpoint with ``vllm serve`` (the flag ``--quantization grace_qat`` only
where the plugin cannot detect the format) and answer an image+text chat request over the
OpenAI-compatible HTTP API.

With no checkpoint given it generates the embedded default (a tiny GRACE W4 checkpoint with random
weights: the answer is noise by design, every step of the serving path is real) and serves it. It
prints the exact command it runs, the server's log file and the start-up steps with elapsed time. It prints the answer, which
kernel ran, and the bytes the 4-bit codes save. The server itself is :mod:`grace_qat.vllm_server`.
"""
from __future__ import annotations

import argparse
import base64
import os
import shlex
import sys
import tempfile

from .vllm_server import VLLMServer, kernels_in_log, sample_image_data_url, serve_flags


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="grace-qat demo", description=(
        "Serve a GRACE checkpoint with vllm serve and answer one image+text chat request over the "
        "OpenAI-compatible HTTP API; prints the command, the server log, the start-up steps, the "
        "answer, the kernel that ran and the bytes the packed weights save."))
    ap.add_argument("model", nargs="?", help="GRACE checkpoint: a directory or a Hub id (Owner/Name); "
                    "default: generate a tiny one with random weights")
    ap.add_argument("--question", default="What is in this image?")
    ap.add_argument("--image", help="path of an image file (default: a generated gradient)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--vllm-arg", action="append", default=[], help="extra argument for vllm serve")
    args = ap.parse_args(argv)

    from .checkpoint import GraceCheckpoint

    model = args.model
    generated = model is None
    if generated:
        from . import synthetic
        model = os.path.join(tempfile.gettempdir(), "grace-qat-default")
        if not os.path.exists(os.path.join(model, "config.json")):
            print(f"[demo] generating the embedded default GRACE checkpoint in {model}", flush=True)
            synthetic.write_default(model)
    from .hub import local_checkpoint_dir
    ckpt = GraceCheckpoint.open(local_checkpoint_dir(model))
    params = sum(o * i for o, i in (ckpt.module_shape(m) for m in ckpt.modules))
    bf16_bytes = params * 2
    packed_bytes = params * ckpt.bits // 8 + params // ckpt.group_size * 2
    image_url = sample_image_data_url()
    if args.image:
        with open(args.image, "rb") as f:
            mime = "png" if args.image.lower().endswith(".png") else "jpeg"
            image_url = f"data:image/{mime};base64," + base64.b64encode(f.read()).decode()
    serve_args = serve_flags(ckpt.path) + ["--max-model-len", "2048", "--dtype", "bfloat16"] + args.vllm_arg
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "VLLM_CPU_INT4_W4A8": os.environ.get("VLLM_CPU_INT4_W4A8", "0")}
    log_path = os.path.join(tempfile.gettempdir(), f"grace-qat-demo-vllm-{os.getpid()}.log")
    server = VLLMServer(model, serve_args, env=env, log_path=log_path,
                        progress=lambda line: print(f"[demo] {line}", flush=True))
    if generated:
        print("[demo] note: this generated checkpoint has random weights, so its answer is noise by design; "
              "a meaningful answer needs a trained GRACE checkpoint with its tokenizer and processor files, "
              "e.g. ./scripts/demo.sh ForeverBlue/Qwen3-VL-2B-GRACE-W4G128 (a Hub id or a directory)", flush=True)
    print(f"[demo] running: {' '.join(shlex.quote(c) for c in server.cmd)}", flush=True)
    print(f"[demo] server log: {log_path} (the first start compiles the model: about 100 s on 2 CPU cores)",
          flush=True)
    with server:
        print(f"[demo] {server.startup_s:5.0f} s  healthy; sending an image+text chat request", flush=True)
        reply = server.chat(args.question, image_url, max_tokens=args.max_tokens)
        kernels = kernels_in_log(server.log())
        startup = server.startup_s
    answer = reply["choices"][0]["message"]["content"]
    print(f"\nmodel:    {model} ({ckpt.format}, W{ckpt.bits} g{ckpt.group_size}, {len(ckpt.modules)} quantized linears)")
    print(f"server:   up in {startup:.1f} s")
    print(f"question: {args.question} (+ image)")
    print(f"answer:   {answer!r}{'  (random weights: noise by design)' if generated else ''}")
    print(f"usage:    {reply.get('usage')}")
    print(f"kernel:   {', '.join(kernels) or 'none reported'}")
    print(f"bytes:    {bf16_bytes / 1e6:.2f} MB of BF16 weights -> {packed_bytes / 1e6:.2f} MB packed "
          f"({bf16_bytes - packed_bytes:,} bytes saved, {bf16_bytes / packed_bytes:.2f}x smaller"
          f"{'' if any('fallback' not in k for k in kernels) else '; not on this machine: no int kernel'})")
    print(f"log:      {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
