"""The demo: serve a GRACE checkpoint with ``vllm serve`` (the flag ``--quantization grace_qat`` only
where the plugin cannot detect the format) and answer an image+text chat request over the
OpenAI-compatible HTTP API.

With no checkpoint given it generates the embedded default (a tiny GRACE W4 checkpoint with random
weights: the answer is noise by design, every step of the serving path is real) and serves it. It
prints the exact command it runs, the server's log file and the start-up steps with elapsed time. It prints the answer, which
kernel ran, and the bytes the 4-bit codes save. ``VLLMServer`` is reused by the tests.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_image_data_url(width: int = 160, height: int = 120) -> str:
    """A small deterministic PNG (colour gradient) as a data URL: no files, no network."""
    from PIL import Image

    img = Image.new("RGB", (width, height))
    img.putdata([((x * 255) // width, (y * 255) // height, 128) for y in range(height) for x in range(width)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# Milestones of a vLLM start in its log (0.26-0.33 wording), shown as progress by the demo.
START_STEPS = [
    ("non-default args", "reading the configuration"),
    ("is a GRACE", "GRACE checkpoint detected"),
    (" quantized linear modules", "checkpoint recognised by grace_qat (format, bits, steps)"),
    ("Initializing a V1 LLM engine", "starting the engine core"),
    ("Starting to load model", "loading the weights"),
    ("Loading weights took", "weights loaded"),
    ("Model loading took", "model loaded"),
    ("Warming up model for the compilation", "compiling and warming up (the longest step on CPU)"),
    ("KV cache size", "KV cache allocated"),
    ("init engine (profile, create kv cache, warmup model) took", "engine ready"),
    ("Starting vLLM", "HTTP server starting"),
]


def vllm_command() -> list[str]:
    """How this Python environment starts ``vllm serve``: the ``vllm`` script next to the
    interpreter, else its module. The CPU wheel registers no "vllm" distribution, which the
    command needs for its version (scripts/setup.sh adds it); without one, the OpenAI server module
    is started directly (same server, different argument spelling: ``--model``)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        version("vllm")
    except PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
    script = os.path.join(os.path.dirname(sys.executable), "vllm")
    if os.access(script, os.X_OK):
        return [script, "serve"]
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"]


def wait_healthy(server, what: str, t0: float, poll_s: float, on_tick=None) -> float:
    """Poll ``server.url``/health until it answers 200 (seconds since ``t0``); the server process
    exiting, or ``server.startup_timeout`` passing (the server is then stopped), raises with the
    log's tail. Shared by the vLLM and SGLang servers of the demo and the GPU scripts."""
    while time.perf_counter() - t0 < server.startup_timeout:
        if on_tick is not None:
            on_tick()
        if server.proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:      # SGLang answers 503 while starting
            with urllib.request.urlopen(server.url + "/health", timeout=max(2, 2 * poll_s)) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(poll_s)
    server.__exit__(None, None, None)
    raise TimeoutError(f"{what} not healthy after {server.startup_timeout}s:\n{server.log_tail()}")


class VLLMServer:
    """``vllm serve`` in a subprocess on a loopback port; always stopped on exit (context manager).

    ``progress(line)``, if given, is called with each start-up milestone (``START_STEPS``) seen in
    the server's log, prefixed with the seconds since the start."""

    def __init__(self, model: str, args: list[str] | None = None, port: int | None = None,
                 log_path: str | None = None, env: dict | None = None, startup_timeout: float = 600,
                 progress=None):
        self.model, self.args, self.port = model, list(args or []), port or free_port()
        self.log_path = log_path or tempfile.mktemp(prefix="vllm-serve-", suffix=".log")
        self.env = {**os.environ, **(env or {})}
        self.startup_timeout = startup_timeout
        self.progress = progress
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None
        self.cmd = vllm_command() + [self.model, "--host", "127.0.0.1", "--port", str(self.port)] + self.args

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _report(self, seen: set, t0: float) -> None:
        if self.progress is None:
            return
        log, now = self.log(), time.perf_counter()
        for marker, what in START_STEPS:
            if marker not in seen and marker in log:
                seen.add(marker)
                self._last_step = (what, now)
                self.progress(f"{now - t0:5.0f} s  {what}")
        what, since = self._last_step
        if now - since >= 30:   # a heartbeat when a step takes long (compilation on CPU)
            self._last_step = (what, now)
            self.progress(f"{now - t0:5.0f} s  ... still: {what}")

    def __enter__(self) -> "VLLMServer":
        self._log = open(self.log_path, "w")
        t0 = time.perf_counter()
        seen: set = set()
        self._last_step = ("starting vllm serve", t0)
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        self.startup_s = wait_healthy(self, "vllm serve", t0, poll_s=1, on_tick=lambda: self._report(seen, t0))
        return self

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def log_tail(self, n: int = 4000) -> str:
        return self.log()[-n:]

    def chat(self, question: str, image_url: str | None = None, max_tokens: int = 32,
             timeout: float = 300, **extra) -> dict:
        content = [{"type": "text", "text": question}]
        if image_url:
            content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
        body = {"model": self.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": max_tokens, "temperature": 0.0, **extra}
        req = urllib.request.Request(self.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())


def kernels_in_log(log: str) -> list[str]:
    """Kernels the plugin handed layers to, or the reason it ran the exact BF16 fallback."""
    found = sorted(set(re.findall(r"grace_qat: using (\w+)", log))
                   | set(re.findall(r"grace_qat: W\d+ g\d+ \d+x\d+ layers: (\w+) for <=", log)))
    fallback = re.search(r"grace_qat: no vLLM W\d+ kernel for this platform \(first layer [^:]*: (.*?)\); such layers", log)
    if fallback:
        found.append(f"exact BF16 fallback ({fallback.group(1)})")
    return found


def serve_flags(path: str) -> list[str]:
    """No flag where the plugin detects the checkpoint (the model cards' command), else the flag."""
    from grace_qat.files import config_or_none
    from grace_qat.hub import detect_grace_format
    declared = ((config_or_none(path) or {}).get("quantization_config") or {}).get("quant_method") == "grace_qat"
    return [] if declared or detect_grace_format(path) else ["--quantization", "grace_qat"]


def no_quantized_kernel(kernels: list[str] | None) -> bool:
    """Whether a plugin run's kernels (``kernels_in_log``) name no quantized kernel: nothing reported, or
    the exact BF16 fallback, which on a GPU means a kernel was expected and did not run."""
    return not kernels or any("fallback" in k for k in kernels)


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

    from grace_qat.checkpoint import GraceCheckpoint

    model = args.model
    generated = model is None
    if generated:
        from grace_qat import fixtures
        model = os.path.join(tempfile.gettempdir(), "grace-qat-default")
        if not os.path.exists(os.path.join(model, "config.json")):
            print(f"[demo] generating the embedded default GRACE checkpoint in {model}", flush=True)
            fixtures.write_default(model)
    from grace_qat.hub import local_checkpoint_dir
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
