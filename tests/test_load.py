"""The OpenAI-compatible server (``vllm serve <tiny GRACE W4 checkpoint> --quantization grace_qat``,
loopback only) under concurrent load, with clients that go away and images that are not images.

One server for the whole file (startup dominates: about a minute on 2 CPU cores):
  1. a greedy image+text request before the load (its answer is the baseline for step 3: a check of
     consistency under load, not of correctness, which tests/test_vllm_plugin.py checks);
  2. 24 requests, 8 at a time: 14 ordinary image+text chats, 3 streaming chats the client abandons
     after the first chunk, 3 non-streaming chats whose client gives up (closes the socket) while the
     server is still generating, and 4 with malformed images (invalid base64, a truncated PNG, a
     non-image data URL, an image URL with a bad scheme), which must get a 4xx answer;
  3. afterwards: the server is healthy, holds no running or waiting request (the abandoned ones were
     aborted, not left generating), and answers the baseline request as before: the same greedy tokens
     and teacher-forced prompt log-probs where the engine's kernels are reproducible (three scorings
     before the load agree exactly), else log-probs within twice the largest gap between those.

The baseline and the repeat after the load each carry a cache salt of their own, so both prefill the
whole prompt: a repeat that hit the prefix cache would prefill only its last tokens, with another M,
and on a GPU the kernels round other M differently (H100, 2026-12-07: the 2B's greedy tokens on random
weights parted at the second token that way); prompt log-probs bypass the prefix cache in vLLM.

Numbers (requests served, errors, p50/p99 latency, ...) go to ``load_metrics.json`` in the test's tmp
dir (and ``$GRACE_LOAD_OUT`` if set), to stdout (``pytest -s``) and to the JUnit report.

Larger runs (the GPU machine): ``GRACE_LOAD_SCALE=N`` repeats the 24-request mix N times at N x 8
concurrency; ``GRACE_LOAD_MODEL=DIR`` serves an existing checkpoint instead of the tiny one, with
CUDA graphs on (``--enforce-eager`` is only used for the tiny CPU default).
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import select
import socket
import statistics
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from requires import require

pytestmark = pytest.mark.engine

SCALE = max(1, int(os.environ.get("GRACE_LOAD_SCALE", "1")))
N_REQUESTS = 24 * SCALE
CONCURRENCY = 8 * SCALE
MAX_TOKENS = 8
CANCELLED_MAX_TOKENS = 6144   # what the abandoned requests ask for (ignore_eos): they must be aborted
# (far more than an engine generates in the second a client waits before it gives up: with 1536 the
# check below, a quarter of it per request, failed once at 2760 tokens against a bound of 2416; 680
# another time: the tokens before an abort vary 4x with the machine's load)
MAX_MODEL_LEN = 8192          # room for them
LOAD_TIMEOUT_S = 120 * SCALE  # the whole burst; each request also has its own timeout
QUESTION = "What colour is the square in the picture?"
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_INT4_W4A8": "0", "VLLM_NO_USAGE_STATS": "1",
       "VLLM_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}


def _png(width=96, height=72, colour=(200, 40, 40)) -> bytes:
    from PIL import Image
    img = Image.new("RGB", (width, height), (255, 255, 255))
    for x in range(width // 4, 3 * width // 4):
        for y in range(height // 4, 3 * height // 4):
            img.putpixel((x, y), colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _data_url(raw: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny):
    require("vllm")
    vllm_server = require("grace_qat.vllm_server")
    root = tmp_path_factory.mktemp("load")
    model = os.environ.get("GRACE_LOAD_MODEL") or tiny["qat-sidecar"]
    args = ["--quantization", "grace_qat", "--dtype", "bfloat16", "--max-model-len", str(MAX_MODEL_LEN),
            "--max-num-seqs", str(CONCURRENCY), "--limit-mm-per-prompt", json.dumps({"image": 1}),
            "--disable-uvicorn-access-log"]
    if not os.environ.get("GRACE_LOAD_MODEL"):
        args.append("--enforce-eager")
    with vllm_server.VLLMServer(model, args, env=ENV, log_path=str(root / "serve.log"), startup_timeout=300) as srv:
        yield srv


def _body(srv, content, stream=False, max_tokens=MAX_TOKENS, **extra) -> bytes:
    return json.dumps({"model": srv.model, "messages": [{"role": "user", "content": content}],
                       "max_tokens": max_tokens, "temperature": 0.0, "stream": stream,
                       "return_token_ids": True, **extra}).encode()


def _image_content(url: str, question: str = QUESTION) -> list:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]


def _post(srv, body: bytes, timeout: float) -> tuple[int, dict]:
    req = urllib.request.Request(srv.url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"{}")
        except ValueError:
            return e.code, {}


def _answer(reply: dict) -> tuple[str, list | None]:
    choice = reply["choices"][0]
    return choice["message"]["content"], choice.get("token_ids")


def _scores(srv, content) -> list[float]:
    """The teacher-forced log-prob of each prompt token after the first (vLLM's ``prompt_logprobs``)."""
    status, reply = _post(srv, _body(srv, content, max_tokens=1, prompt_logprobs=0), timeout=120)
    assert status == 200, reply
    return [next(iter(pos.values()))["logprob"] for pos in reply["prompt_logprobs"] if pos]


# -- the request kinds -----------------------------------------------------------------------------

def _ok(srv, i, image):
    t0 = time.perf_counter()
    status, reply = _post(srv, _body(srv, _image_content(image, f"{QUESTION} ({i})")), timeout=90)
    return {"kind": "ok", "status": status, "latency_s": time.perf_counter() - t0,
            "tokens": reply.get("usage", {}).get("completion_tokens") if status == 200 else None,
            "error": None if status == 200 else reply}


def _stream_then_hang_up(srv, i, image):
    """A streaming chat abandoned after its first chunk: the client closes the socket mid-flight."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=90)
    try:
        conn.request("POST", "/v1/chat/completions",
                     _body(srv, _image_content(image), stream=True, max_tokens=CANCELLED_MAX_TOKENS, ignore_eos=True),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        first = b""
        while resp.status == 200 and not first.startswith(b"data:"):
            first = resp.fp.readline()
            if not first:
                break
        return {"kind": "stream_cancelled", "status": resp.status, "latency_s": time.perf_counter() - t0,
                "got_chunk": first.startswith(b"data:")}
    finally:
        # close the socket under the response (no draining): the server sees a disconnect
        if conn.sock is not None:
            conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()


def _give_up(srv, i, image):
    """A non-streaming chat whose client stops waiting after a second and closes the connection. It
    gave up mid-generation when no byte of the reply had arrived by then (checked on the socket, not
    inferred from a read timeout, which a client thread scheduled late on a loaded machine misses)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=90)
    try:
        conn.request("POST", "/v1/chat/completions",
                     _body(srv, _image_content(image), max_tokens=CANCELLED_MAX_TOKENS, ignore_eos=True),
                     {"Content-Type": "application/json"})
        time.sleep(1.0)
        answered = bool(select.select([conn.sock], [], [], 0)[0])
        return {"kind": "client_gave_up", "status": None, "latency_s": time.perf_counter() - t0,
                "gave_up": not answered}
    finally:
        if conn.sock is not None:
            conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()


def _malformed(url, label):
    def run(srv, i, image):
        t0 = time.perf_counter()
        status, reply = _post(srv, _body(srv, _image_content(url)), timeout=60)
        return {"kind": "malformed", "label": label, "status": status, "latency_s": time.perf_counter() - t0,
                "message": (reply.get("error") or {}).get("message", "")[:300] if isinstance(reply, dict) else ""}
    return run


def _plan(png: bytes) -> list:
    malformed = [
        _malformed("data:image/png;base64,@@not*base64!!" + "A" * 7, "invalid-base64"),
        _malformed(_data_url(png[: len(png) // 2]), "truncated-png"),
        _malformed(_data_url(b"just some text, not pixels", "text/plain"), "non-image-data-url"),
        _malformed("gopher://127.0.0.1/image.png", "bad-url-scheme"),
    ]
    kinds = [_ok] * 14 + [_stream_then_hang_up] * 3 + [_give_up] * 3 + malformed
    assert len(kinds) * SCALE == N_REQUESTS
    # interleave so that cancellations and bad images land while ordinary requests are in flight
    order = [kinds[i] for i in (0, 14, 20, 1, 17, 21, 2, 15, 3, 22, 18, 4, 5, 16, 23, 6, 19, 7, 8, 9, 10, 11, 12, 13)]
    assert sorted(map(id, order)) == sorted(map(id, kinds))
    order = order * SCALE
    return order


def _metrics_text(srv) -> str:
    with urllib.request.urlopen(srv.url + "/metrics", timeout=10) as r:
        return r.read().decode()


def _gauge(text: str, name: str, label: str = "") -> float:
    """Sum of a Prometheus metric's samples (those whose labels contain ``label``). A metric that is
    not there is an error, not 0: the abort checks below would pass on a renamed metric."""
    vals = [float(m.group(2)) for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.eE+-]+)$", text, re.M)
            if label in (m.group(1) or "")]
    assert vals, f"/metrics has no sample of {name}{' with ' + label if label else ''} (renamed by vLLM?)"
    return sum(vals)


def _percentile(xs, p):
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def test_server_under_load(server, tmp_path, record_property):
    png = _png()
    image = _data_url(png)
    ref_content = _image_content(image)
    status, before = _post(server, _body(server, ref_content, cache_salt="before-the-load"), timeout=120)
    assert status == 200, before
    ref_text, ref_ids = _answer(before)
    scores = [_scores(server, ref_content) for _ in range(3)]
    # the run-to-run gap of this engine's kernels: 0.0 where they are reproducible
    noise = max(abs(a - b) for i, s in enumerate(scores) for t in scores[i + 1:] for a, b in zip(s, t))
    assert before["usage"]["completion_tokens"] == MAX_TOKENS or before["choices"][0]["finish_reason"] == "stop"

    plan = _plan(png)
    m0 = _metrics_text(server)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = [pool.submit(fn, server, i, image) for i, fn in enumerate(plan)]
        results = [f.result(timeout=max(1.0, LOAD_TIMEOUT_S - (time.perf_counter() - t0))) for f in futures]
    wall = time.perf_counter() - t0
    assert server.proc.poll() is None, f"server died under load:\n{server.log_tail()}"

    # -- afterwards: healthy, nothing left running, same greedy answer ----------------------------
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        assert r.status == 200
    deadline = time.perf_counter() + 60
    while True:
        m = _metrics_text(server)
        running, waiting = _gauge(m, "vllm:num_requests_running"), _gauge(m, "vllm:num_requests_waiting")
        if running == 0 and waiting == 0 or time.perf_counter() > deadline:
            break
        time.sleep(0.5)
    gen_tokens = _gauge(m, "vllm:generation_tokens_total") - _gauge(m0, "vllm:generation_tokens_total")
    status, after = _post(server, _body(server, ref_content, cache_salt="after-the-load"), timeout=120)
    assert status == 200, after
    after_text, after_ids = _answer(after)
    after_gap = max(abs(a - b) for a, b in zip(scores[0], _scores(server, ref_content)))

    ok = [r for r in results if r["kind"] == "ok"]
    served = [r for r in ok if r["status"] == 200]
    bad = [r for r in results if r["kind"] == "malformed"]
    streams = [r for r in results if r["kind"] == "stream_cancelled"]
    gave_up = [r for r in results if r["kind"] == "client_gave_up"]
    lat = [r["latency_s"] for r in served]
    log = server.log()
    metrics = {
        "requests": len(results), "concurrency": CONCURRENCY, "max_tokens": MAX_TOKENS,
        "served_ok": len(served), "unexpected_errors": len(ok) - len(served),
        "malformed_images": {r["label"]: {"status": r["status"], "message": r["message"]} for r in bad},
        "malformed_4xx": sum(1 for r in bad if r["status"] and 400 <= r["status"] < 500),
        "streams_cancelled_after_first_chunk": sum(1 for r in streams if r.get("got_chunk")),
        "clients_gave_up_mid_generation": sum(1 for r in gave_up if r.get("gave_up")),
        "generated_tokens_during_burst": gen_tokens,
        "generated_tokens_if_nothing_aborted": SCALE * (14 * MAX_TOKENS + 6 * CANCELLED_MAX_TOKENS),
        "latency_s": {"p50": _percentile(lat, 50), "p99": _percentile(lat, 99),
                      "min": min(lat) if lat else None, "max": max(lat) if lat else None,
                      "mean": statistics.fmean(lat) if lat else None},
        "burst_wall_s": wall, "throughput_rps": len(served) / wall if wall else None,
        "server_startup_s": server.startup_s,
        "after_load": {"running": running, "waiting": waiting, "same_greedy_answer": after_text == ref_text
                       and after_ids == ref_ids, "prompt_logprob_gap": after_gap,
                       "prompt_logprob_gap_between_scorings_before": noise},
        "before_load": {"text": ref_text, "token_ids": ref_ids},
        "server_errors_in_log": len(re.findall(r"Traceback|ERROR", log)),
    }
    path = tmp_path / "load_metrics.json"
    path.write_text(json.dumps(metrics, indent=2))
    if os.environ.get("GRACE_LOAD_OUT"):
        os.makedirs(os.environ["GRACE_LOAD_OUT"], exist_ok=True)
        with open(os.path.join(os.environ["GRACE_LOAD_OUT"], "load_metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
    print(f"\nload metrics ({path}):\n{json.dumps(metrics, indent=2)}")
    for key in ("requests", "served_ok", "unexpected_errors", "malformed_4xx", "burst_wall_s"):
        record_property(key, metrics[key])
    record_property("latency_p50_s", metrics["latency_s"]["p50"])
    record_property("latency_p99_s", metrics["latency_s"]["p99"])
    record_property("load_metrics", json.dumps(metrics))

    assert len(served) == len(ok) == 14 * SCALE, [r for r in ok if r["status"] != 200]
    assert all(r["tokens"] and 0 < r["tokens"] <= MAX_TOKENS for r in served)
    for r in bad:
        assert r["status"] is not None and 400 <= r["status"] < 500, f"malformed image {r['label']}: {r}"
    assert all(r["status"] == 200 and r["got_chunk"] for r in streams), streams
    assert all(r["gave_up"] for r in gave_up), gave_up
    assert running == 0 and waiting == 0, f"abandoned requests still running/waiting: {running}/{waiting}"
    # the 6 abandoned requests were aborted in the engine, not generated to their 512 tokens (vLLM has
    # no abort counter in /metrics: count the tokens it generated during the burst instead)
    assert gen_tokens < SCALE * (14 * MAX_TOKENS + 6 * CANCELLED_MAX_TOKENS // 4), metrics
    if noise == 0.0:     # reproducible kernels: the same answer, bit for bit
        assert after_gap == 0.0, f"prompt log-probs {after_gap} from before the load"
        assert after_text == ref_text, (ref_text, after_text)
        if ref_ids is not None:
            assert after_ids == ref_ids
    else:                # e.g. Humming's stream-K: held to its own run-to-run gap
        assert after_gap <= 2 * noise, f"prompt log-probs {after_gap} from before the load (three scorings " \
            f"before it differed by up to {noise}): the load changed the server's answers"


def test_gauge_reads_samples_and_refuses_a_missing_metric():
    text = ('# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name="g"} 0.0\n'
            'vllm:generation_tokens_total{engine="0",model_name="g"} 12.0\n'
            'vllm:generation_tokens_total{engine="1",model_name="g"} 3.0\n')
    assert _gauge(text, "vllm:num_requests_running") == 0.0
    assert _gauge(text, "vllm:generation_tokens_total") == 15.0
    assert _gauge(text, "vllm:generation_tokens_total", 'engine="1"') == 3.0
    with pytest.raises(AssertionError, match="no sample of vllm:num_requests_waiting"):
        _gauge(text, "vllm:num_requests_waiting")
