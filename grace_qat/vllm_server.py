"""``vllm serve`` in a subprocess, driven over its OpenAI-compatible HTTP API: the server the demo
(:mod:`grace_qat.demo`) runs, and the tests and GPU scripts reuse; plus what they read in its log
(start-up steps, the kernels grace_qat chose). Imports no engine: the server is another process.
"""
from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


# Ports for servers that bind only after a start-up of a minute or more: below the kernel's
# ephemeral range, which it hands out to outgoing connections meanwhile, and above the range SGLang
# draws its own later-bound ports from (22000-29999, sglang.srt.utils.network).
LATER_BOUND_PORTS_FROM = 30000


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768      # Linux's default


def free_port() -> int:
    """A free loopback port for a server started now, which binds it a minute or more later. Not one
    from ``bind(0)``: the kernel may give that one to any outgoing connection in the meantime (an
    H100 serve check lost its stock server to "address already in use" that way, 2026-12-07)."""
    rng = random.SystemRandom()      # independent of any seed set in this process
    candidates = range(LATER_BOUND_PORTS_FROM, _ephemeral_low())
    for port in rng.sample(candidates, min(64, len(candidates))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:      # no room below the ephemeral range on this machine
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
    from .detection import detect_grace_format
    from .files import config_or_none
    declared = ((config_or_none(path) or {}).get("quantization_config") or {}).get("quant_method") == "grace_qat"
    return [] if declared or detect_grace_format(path) else ["--quantization", "grace_qat"]


def no_quantized_kernel(kernels: list[str] | None) -> bool:
    """Whether a plugin run's kernels (``kernels_in_log``) name no quantized kernel: nothing reported, or
    the exact BF16 fallback, which on a GPU means a kernel was expected and did not run."""
    return not kernels or any("fallback" in k for k in kernels)
