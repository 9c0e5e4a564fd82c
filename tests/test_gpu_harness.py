"""The GPU harness's own logic, on CPU: which engine tests/gpu/run.sh stages use (a bundle, or the
engine installed in this Python as in a published image), background jobs that outlive the working
tree, and the verdicts that make the GPU scripts and the benchmark exit non-zero on a failure or a
token mismatch. The engines themselves run on the GPU machine (tests/gpu/RESULTS.md)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN_SH = ROOT / "tests" / "gpu" / "run.sh"
sys.path.insert(0, str(ROOT / "tests" / "gpu"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import serve_check  # noqa: E402
import sglang_serve_check  # noqa: E402
import vllm_bench  # noqa: E402

from requires import in_ci, require  # noqa: E402

# The SGLang venv scripts/setup-sglang.sh makes (scripts/test.sh: $GRACE_SGLANG_VENV, else .venv-sglang
# in this checkout), whatever the checkout's directory is called.
SGLANG_VENV = Path(os.environ.get("GRACE_SGLANG_VENV") or ROOT / ".venv-sglang")
if not SGLANG_VENV.is_absolute():
    SGLANG_VENV = ROOT / SGLANG_VENV
SGLANG_SITE = next(iter(sorted(SGLANG_VENV.glob("lib/python3*/site-packages"))), SGLANG_VENV / "lib" / "site-packages")


def _run_sh(*args, cwd=None, timeout=120, **env):
    """tests/gpu/run.sh with this interpreter as python3 (its venv's bin first on PATH)."""
    full = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env)
    return subprocess.run(["bash", str(RUN_SH), *args], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=timeout)


def _engine_of_this_python() -> str:
    import importlib.util
    return next(e for e in ("vllm", "sglang") if importlib.util.find_spec(e) is not None)


# -- engine resolution ------------------------------------------------------------------------

def test_stage_uses_the_installed_engine_without_a_bundle(tmp_path):
    """A published image has the engine in its Python and no bundle marker: no 15-minute wait."""
    engine = _engine_of_this_python()
    stage = "engine" if engine == "vllm" else "sglang-engine"
    t = time.monotonic()
    r = _run_sh(stage, cwd=tmp_path, OUT="out", GRACE_GPU_SITES=str(tmp_path / "sites"))
    assert r.returncode == 0, r.stdout + r.stderr
    version = __import__(engine).__version__
    assert re.search(rf"^engine: {engine} {re.escape(version)} \(installed\);", r.stdout, re.M), r.stdout
    assert time.monotonic() - t < 90
    assert (tmp_path / "out").is_dir(), "a relative OUT is relative to the caller's directory"


def test_stage_without_engine_or_bundle_fails_with_one_line(tmp_path):
    missing = "sglang" if _engine_of_this_python() == "vllm" else "vllm"
    stage = "sglang-tiny" if missing == "sglang" else "suite"
    r = _run_sh(stage, cwd=tmp_path, OUT=str(tmp_path / "out"), GRACE_GPU_SITES=str(tmp_path),
                GRACE_GPU_BUNDLE_WAIT="0")
    assert r.returncode == 1
    assert r.stdout.strip().splitlines() == [
        f"no {missing} for stage {stage}: no bundle ({tmp_path}/site-{missing}.done) and no {missing} "
        f"importable by {Path(sys.executable).parent}/python3"]


def test_forced_bundle_is_waited_for_even_with_an_installed_engine(tmp_path):
    engine = _engine_of_this_python()
    r = _run_sh("engine" if engine == "vllm" else "sglang-engine", cwd=tmp_path, OUT=str(tmp_path / "o"),
                GRACE_GPU_SITES=str(tmp_path), GRACE_GPU_ENGINE="bundle", GRACE_GPU_BUNDLE_WAIT="0")
    assert r.returncode == 1 and "no bundle" in r.stdout


def test_unpacked_bundle_wins(tmp_path):
    """A bundle is a --target install plus its marker: the SGLang venv's site-packages is one (in
    CI, where scripts/test.sh made that venv, a missing one fails instead of skipping)."""
    if _engine_of_this_python() == "sglang":
        pytest.skip("this Python has SGLang installed itself")
    if not (SGLANG_SITE / "sglang").is_dir():
        if in_ci():
            pytest.fail(f"no SGLang install at {SGLANG_SITE} (set GRACE_SGLANG_VENV)")
        pytest.skip(f"no SGLang install at {SGLANG_SITE} (set GRACE_SGLANG_VENV)")
    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / "site-sglang").symlink_to(SGLANG_SITE)
    (sites / "site-sglang.done").touch()
    r = _run_sh("sglang-engine", cwd=tmp_path, OUT=str(tmp_path / "o"), GRACE_GPU_SITES=str(sites), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    from importlib.metadata import Distribution
    version = Distribution.at(next(SGLANG_SITE.glob("sglang-*.dist-info"))).version
    assert f"engine: sglang {version} (bundle {sites}/site-sglang);" in r.stdout


# -- background jobs ----------------------------------------------------------------------------

def test_chain_runs_from_a_copy_and_outlives_the_tree(tmp_path):
    """Each device call lays the working tree anew: a chain started from it must not live in it."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", ".venv*", ".sglang-*", ".jit-cache", "__pycache__",
                                                              "*.egg-info"))
    bg, res = tmp_path / "bg", tmp_path / "res"
    env = dict(GRACE_GPU_BG=str(bg), GRACE_GPU_RES=str(res), GRACE_GPU_SITES=str(tmp_path))
    stage = "engine" if _engine_of_this_python() == "vllm" else "sglang-engine"
    full = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                OUT=str(tmp_path / "out1"), **env)
    r = subprocess.run(["bash", str(tree / "tests" / "gpu" / "run.sh"), "chain", stage, stage], cwd=tree,
                       env=full, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    pid = int((bg / "chain.pid").read_text())
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except FileNotFoundError:
        raise AssertionError(f"the chain already ended: {(bg / 'chain.log').read_text()} "
                             f"{(res / 'chain.status').read_text() if (res / 'chain.status').exists() else ''}")
    assert cwd == str(bg / "chain"), f"the background chain runs in {cwd}, not in its copy"
    shutil.rmtree(tree)                                # the next call lays the tree anew
    p = _run_sh("poll", "240", cwd=tmp_path, OUT=str(tmp_path / "out2"), timeout=300, **env)
    assert p.returncode == 0, p.stdout + p.stderr
    status = (res / "chain.status").read_text()
    assert status.count(f"{stage} rc=0") == 2, status
    assert "(installed)" in (res / f"{stage}.log").read_text()
    assert (tmp_path / "out2" / "res.tgz").exists() and (tmp_path / "out2" / "bg" / "chain.log").exists()


def test_poll_fails_when_a_chained_stage_failed(tmp_path):
    bg, res = tmp_path / "bg", tmp_path / "res"
    env = dict(GRACE_GPU_BG=str(bg), GRACE_GPU_RES=str(res))
    r = _run_sh("chain", "no-such-stage", cwd=tmp_path, OUT=str(tmp_path / "o"), **env)
    assert r.returncode == 0, r.stdout + r.stderr
    p = _run_sh("poll", "60", cwd=tmp_path, OUT=str(tmp_path / "o2"), **env)
    assert "no-such-stage rc=2" in p.stdout and p.returncode == 1


# -- verdicts: a mismatch fails ------------------------------------------------------------------

def _result(name, tokens, ok=True, dual=False, runs=((1, 100.0),), **kw):
    return dict(dict(name=name, ok=ok, tokens=tokens, logprobs=[], dual_kernel=dual, load_s=10.0, kernels=["K"],
                     runs=[{"batch": b, "decode_tok_s": v} for b, v in runs]), **kw)


def test_bench_fails_on_a_same_kernel_token_mismatch_only(tmp_path):
    meta = {"model": "qwen3vl", "size": "tiny"}
    same = [_result("gptq", [1, 2, 3]), _result("grace-a-single", [1, 2, 3])]
    vllm_bench.write_report(same, meta, str(tmp_path))
    assert vllm_bench.failures(same) == []
    wrong = [_result("gptq", [1, 2, 3]), _result("grace-a-single", [1, 2, 4])]
    vllm_bench.write_report(wrong, meta, str(tmp_path))
    assert vllm_bench.failures(wrong) == [
        "grace-a-single: greedy tokens differ from stock gptq (same kernel) from position 2 (3 vs 3 tokens)"]
    assert vllm_bench.report_failures(wrong) == 1
    # a second kernel for small batches: other tokens pass, held to the stock kernels' gap instead
    scored = dict(prompt_logprobs=[None, -10.0, -11.0], small_m_logprobs=[None, -9.0, None, -8.0])
    dual = [_result("gptq", [1, 2, 3], **scored),
            _result("gptq-marlin", [1, 2, 3], **dict(scored, prompt_logprobs=[None, -10.1, -11.0])),
            _result("grace-a", [1, 9, 9], dual=True, **scored)]
    vllm_bench.write_report(dual, meta, str(tmp_path))
    assert dual[2]["tokens_equal_peer"] is False and vllm_bench.failures(dual) == []
    broken = [_result("gptq", None, ok=False)]
    vllm_bench.write_report(broken, meta, str(tmp_path))
    assert vllm_bench.failures(broken) == ["gptq did not run (see gptq.log)"]


def test_report_from_computes_ratios_within_a_run_only(tmp_path):
    def run(folder, bw, results):
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps(
            {"meta": {"model": "qwen3vl", "size": "2b", "copy_bandwidth_gbs": bw}, "results": results}))
        return str(folder / "results.json")

    bpt = 1_000_000_000
    a = run(tmp_path / "a", 4000.0, [_result("gptq", [1], runs=((1, 200.0),), bytes_per_token=bpt),
                                     _result("grace-a", [1], runs=((1, 300.0),), bytes_per_token=bpt)])
    b = run(tmp_path / "b", 2000.0, [_result("grace-b", [1], runs=((1, 250.0),), bytes_per_token=bpt)])
    merged, metas = vllm_bench.merge_runs([a, b])
    out = tmp_path / "report"
    out.mkdir()
    vllm_bench.write_report(merged, dict(metas[0], merged_from=[a, b]), str(out))
    by = {r["name"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert by["grace-a"]["vs_gptq"] == {"1": 300.0 / 200.0}          # same run: a ratio
    assert "vs_gptq" not in by["grace-b"]                              # other run: none
    assert by["grace-b"]["ratios_not_computed"] == ["vs gptq: measured in another run"]
    # bandwidth efficiency against each run's own copy bandwidth: 1 GB/token at 250 tok/s over 2000 GB/s
    assert by["grace-b"]["bandwidth_efficiency_b1"] == pytest.approx(250.0 / 2000.0)
    assert by["grace-a"]["bandwidth_efficiency_b1"] == pytest.approx(300.0 / 4000.0)
    assert "Merged from 2 separate runs" in (out / "results.md").read_text()


def test_bench_cli_report_from_exits_non_zero_on_a_mismatch(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"meta": {"model": "qwen3vl", "size": "2b"}, "results": [
        _result("gptq", [5, 6]), _result("grace-a-single", [5, 7])]}))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vllm_bench.py"), "--out", str(tmp_path / "o"),
                        "--report-from", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, MPLBACKEND="Agg"))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == ("[bench] FAILED: grace-a-single: greedy tokens differ from stock "
                                                 "gptq (same kernel) from position 1 (2 vs 2 tokens)")


def _engine_run(ids_image, ids_text, rc=0):
    return {"returncode": rc, "log": "x.log", "requests": {"image_text": {"output_ids": ids_image},
                                                           "text": {"output_ids": ids_text}}}


def test_sglang_serve_check_fails_on_a_token_mismatch():
    plugin, stock = _engine_run([1, 2, 3], [4, 5]), _engine_run([1, 2, 3], [4, 5])
    good = {"layer_check": {"passed": True}, "plugin": plugin, "stock": stock,
            "comparison": sglang_serve_check.compare(plugin, stock)}
    assert sglang_serve_check.check_failures(good) == []
    other = _engine_run([1, 2, 3], [4, 6])
    bad = dict(good, stock=other, comparison=sglang_serve_check.compare(plugin, other))
    assert sglang_serve_check.check_failures(bad) == [
        "text: plugin tokens differ from stock from position 1 (2 vs 2 tokens)"]
    short = _engine_run([1, 2], [4, 5])
    assert sglang_serve_check.check_failures(dict(good, stock=short, comparison=sglang_serve_check.compare(
        plugin, short))) == ["image_text: plugin tokens differ from stock from position 2 (3 vs 2 tokens)"]
    crashed = dict(good, plugin={"returncode": 1, "exception": "RuntimeError: boom", "log": "p.log"},
                   comparison=sglang_serve_check.compare({}, stock))
    assert sglang_serve_check.check_failures(crashed) == [
        "plugin engine failed: RuntimeError: boom (log p.log)", "image_text: no tokens to compare",
        "text: no tokens to compare"]
    assert sglang_serve_check.check_failures({"plugin": plugin}) == [      # --skip-reference: nothing compared
        "stock SGLang did not run (--skip-reference): the plugin's tokens were compared with nothing"]


def test_http_serve_check_fails_on_a_token_mismatch():
    def side(a, b):
        return {"requests": {"image_text": {"tokens": a}, "text": {"tokens": b}}}

    good = {"plugin": side(["token_id:1"], ["token_id:2"]), "stock": side(["token_id:1"], ["token_id:2"])}
    good["comparison"] = serve_check.compare(good["plugin"], good["stock"])
    assert serve_check.failures(good) == []
    bad = dict(good, stock=side(["token_id:1"], ["token_id:3"]))
    bad["comparison"] = serve_check.compare(bad["plugin"], bad["stock"])
    assert serve_check.failures(bad) == ["text: plugin tokens differ from stock from position 0 (1 vs 1 tokens)"]
    assert serve_check.failures(dict(bad, expect_identical=False)) == []       # e.g. vLLM's dual kernel
    down = dict(good, stock={"exception": "TimeoutError: not healthy", "log": "s.log"})
    down["comparison"] = serve_check.compare(down["plugin"], down["stock"])
    assert serve_check.failures(down)[0] == "stock server failed: TimeoutError: not healthy (log s.log)"
    reply = {"choices": [{"message": {"content": "ab"}, "logprobs": {"content": [
        {"token": "token_id:7", "logprob": -0.1}, {"token": "token_id:9", "logprob": -0.2}]}}]}
    assert serve_check.chat_tokens(reply) == ["token_id:7", "token_id:9"]
    assert serve_check.chat_tokens({"choices": [{"message": {"content": "ab"}}]}) is None


# -- which kernel the SGLang rows ran -----------------------------------------------------------

def test_sglang_kernel_is_read_from_the_plugins_own_log_line():
    src = (ROOT / "grace_sglang" / "linear.py").read_text()
    fmt = re.search(r'"(grace_qat: using SGLang\'s %s for W%d g%d \(%s activations, %s; %s\))"', src).group(1)
    for kernel in ("GPTQMarlinLinearKernel", "HummingLinearMethod"):
        line = fmt % (kernel, 4, 128, "bfloat16", "uint4b8", "stock SGLang's kernel for GPTQ")
        assert vllm_bench.sglang_kernels_in_log(f"[2026-12-01 TP0] {line}\nother\n") == [kernel]
    src = (ROOT / "grace_sglang" / "config.py").read_text()
    fmt_b = re.search(r'"(grace_qat: %s layers on SGLang\'s own %s method \(%s\))"', src).group(1)
    for method, kernel in (("AWQ-Marlin", "AWQMarlinLinearMethod"), ("Humming", "HummingLinearMethod")):
        line = fmt_b % ("awq", method, "stock SGLang's kernel for GPTQ")
        assert vllm_bench.sglang_kernels_in_log(line) == [kernel]
    stock = "The model is convertible to gptq_marlin during runtime. Using gptq_marlin kernel."
    assert vllm_bench.sglang_kernels_in_log(stock) == ["GPTQMarlinLinearKernel"]    # the plugin's name for it
    assert vllm_bench.sglang_kernels_in_log("nothing here") == []
    assert vllm_bench.sglang_kernels_in_log("nothing here", "humming") == ["HummingLinearMethod"]


@pytest.mark.sglang
def test_sglang_bench_gives_stock_llava_the_image_token_the_serve_check_gives_it(tmp_path):
    """benchmarks/sglang_run.py on an original-layout LLaVA: stock SGLang (plain and --quantization
    humming) gets the processor's <image> id, as the serve check gives it (otherwise stock keeps
    LlavaConfig's 32000 while the plugin sets its own); the plugin's run gets none; the processor's
    tokenizer is passed to both. A Qwen3-VL run gets no override."""
    require("sglang")
    import argparse

    import sglang_run
    from grace_qat import synthetic
    llava = synthetic.write_llava(str(tmp_path / "llava"), size="tiny")
    qwen = synthetic.write_qwen3vl(str(tmp_path / "qwen"), size="tiny")
    vocab = json.loads((Path(llava) / "config.json").read_text())["vocab_size"]

    def kwargs(model, quantization):
        return sglang_run.engine_kwargs(argparse.Namespace(model=model, quantization=quantization, tp=1,
                                                           eager=False, tokenizer_path=str(tmp_path / "proc")))
    for stock in ("none", "humming"):
        got = kwargs(llava, stock)
        assert json.loads(got["json_model_override_args"]) == {"image_token_index": vocab}
        assert got["tokenizer_path"] == str(tmp_path / "proc")
    assert "json_model_override_args" not in kwargs(llava, "grace_qat")
    assert kwargs(llava, "grace_qat")["quantization"] == "grace_qat"
    assert "json_model_override_args" not in kwargs(qwen, "none")


def test_the_bench_hands_the_tokenizer_path_to_sglang_runs_only(tmp_path, monkeypatch):
    """vllm_bench --tokenizer-path reaches benchmarks/sglang_run.py (bench-sglang-llava needs the
    processor's tokenizer there) and not vllm_run.py, which has no such option."""
    import argparse
    seen = []
    monkeypatch.setattr(vllm_bench.subprocess, "run", lambda cmd, **kw: seen.append(cmd))
    args = argparse.Namespace(batches="1", tp=1, gen_tokens=4, eager=False, no_image=True, image_batches="",
                              tokenizer_path="/proc", timeout=5, compile_cache="shared", work=str(tmp_path))
    vllm_bench.run_system("sglang-grace-a", "/m", "sglang:grace_qat", args, str(tmp_path))
    vllm_bench.run_system("grace-a", "/m", "grace_qat", args, str(tmp_path))
    assert os.path.basename(seen[0][1]) == "sglang_run.py" and seen[0][seen[0].index("--tokenizer-path") + 1] == "/proc"
    assert os.path.basename(seen[1][1]) == "vllm_run.py" and "--tokenizer-path" not in seen[1]


# -- SGLang's vision attention -----------------------------------------------------------------

@pytest.mark.sglang
def test_sglang_vision_attention_is_a_server_argument_this_sglang_accepts(monkeypatch):
    """Runs in the SGLang venv (scripts/test.sh's SGLang runs include this file)."""
    require("sglang")
    import argparse

    from sglang.srt.server_args import ServerArgs
    kw = sglang_serve_check.sglang_vision_attention()
    assert kw == {"mm_attention_backend": "triton_attn"}
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    ns = parser.parse_args(["--model-path", "m", "--mm-attention-backend", kw["mm_attention_backend"]])
    assert ns.mm_attention_backend == "triton_attn"
    monkeypatch.setenv("GRACE_SGLANG_MM_ATTENTION", "default")
    assert sglang_serve_check.sglang_vision_attention() == {}
    monkeypatch.setenv("GRACE_SGLANG_MM_ATTENTION", "no-such-backend")
    assert sglang_serve_check.sglang_vision_attention() == {}


def _run_sh_function(name: str, call: str, **env) -> list[str]:
    """One of run.sh's functions, run by bash in the repository root with this Python as python3: its
    output's words."""
    text = RUN_SH.read_text()
    start = text.index(f"{name}() {{")
    body = text[start:text.index("\n}\n", start) + 3]
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    r = subprocess.run(["bash", "-c", body + call], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PATH=path, **env))
    assert r.returncode == 0, (call, r.stdout, r.stderr)
    return r.stdout.split()


def _serve_fixture(engine: str, fmt: str) -> list[str]:
    """run.sh's serve_fixture: MODEL SIZE SOURCE-SYSTEM GPTQ-SYSTEM."""
    return _run_sh_function("serve_fixture", f"serve_fixture {engine} {fmt}")


SERVE_FORMATS = {"qwen-w4a": ("qat-sidecar", 4), "qwen-w4b": ("awq", 4), "qwen-w8a": ("qat-sidecar", 8),
                 "llava-w4a": ("qat-sidecar", 4)}


def test_serve_stages_serve_the_directories_the_benchmark_prepares(tmp_path):
    """run.sh's serve-FORMAT stages (both engines) name a source and a GPTQ-export system of
    vllm_bench.SYSTEMS, and serve the directories ``vllm_bench.py --prepare-only`` says it wrote for
    them, in that order (run.sh names no directory itself; checked on the tiny size, which CI can
    write)."""
    text = RUN_SH.read_text()
    stages = set(re.findall(r"\b((?:sglang-)?serve-[a-z0-9-]+)\b", text))
    assert {f"{p}serve-{f}" for f in SERVE_FORMATS for p in ("", "sglang-")} <= stages
    for engine in ("vllm", "sglang"):
        for fmt_name, expected in SERVE_FORMATS.items():
            model, size, src_sys, ref_sys = _serve_fixture(engine, fmt_name)
            fmt, bits, convert_to, quant = vllm_bench.SYSTEMS[src_sys]
            assert (fmt, bits) == expected and convert_to is None and quant == "grace_qat"
            ref = vllm_bench.SYSTEMS[ref_sys]
            assert ref[:2] == (fmt, bits) and ref[2].split(":")[0] == "gptq" and ref[3] is None
    dirs = _run_sh_function("prepared", "prepared qwen3vl tiny grace-a gptq", WORK=str(tmp_path))
    assert dirs == [vllm_bench.prepare("qwen3vl", "tiny", *vllm_bench.SYSTEMS[s][:3], str(tmp_path))
                    for s in ("grace-a", "gptq")]
    assert all(os.path.exists(os.path.join(d, "config.json")) for d in dirs)


def test_server_ports_are_taken_below_the_ephemeral_range():
    """A serve check starts both servers at once and each binds its port only after a minute of
    start-up; a port from bind(0) lies in the kernel's ephemeral range, which it hands to outgoing
    connections meanwhile (lease 5 of 2026-12-07: stock SGLang died with "address already in use").
    The ports chosen lie below that range and above SGLang's own later-bound ports (22000-29999)."""
    from grace_qat.vllm_server import free_port
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    if ephemeral_low <= 30000:
        pytest.skip(f"this machine's ephemeral range starts at {ephemeral_low}: nothing below it to use")
    ports = [free_port() for _ in range(200)]
    assert all(30000 <= p < ephemeral_low for p in ports), sorted(ports)[-3:]
    assert len(set(ports)) > 100      # drawn at random: two servers started together rarely meet


def test_sglang_llava_serve_check_compares_with_the_export_written_for_fp16(tmp_path):
    """SGLang runs original-layout LLaVA in fp16 (stock and plugin alike) and the plugin rounds the fp32
    steps once to fp16: the SGLang LLaVA stage's stock reference must be the export written for fp16
    (lease 5 of 2026-12-07 compared with the bf16 export, and the tokens differed from position 2;
    lease 6, against the fp16 export: identical). vLLM's keeps the default export; the prepare-bg set
    for SGLang's converts its system, and that export holds fp16 scales."""
    text = RUN_SH.read_text()
    ref_sys = _serve_fixture("sglang", "llava-w4a")[3]
    assert _serve_fixture("vllm", "llava-w4a")[3] == "gptq"
    fmt, bits, convert_to, quant = vllm_bench.SYSTEMS[ref_sys]
    assert (fmt, bits, quant) == ("qat-sidecar", 4, None)
    assert re.search(rf"llava-gptq-fp16\).*\n.*\n.*--systems {re.escape(ref_sys)} ", text)
    served = vllm_bench.prepare("llava", "tiny", fmt, bits, convert_to, str(tmp_path))
    from safetensors import safe_open
    shard = next(f for f in sorted(os.listdir(served)) if f.endswith(".safetensors"))
    with safe_open(os.path.join(served, shard), "pt") as f:
        scales = [k for k in f.keys() if k.endswith(".scales")]
        assert scales and all(f.get_slice(k).get_dtype() == "F16" for k in scales)


def test_every_documented_engine_stage_resolves_its_engine(tmp_path):
    """Each documented stage is known to the engine resolution, with the right engine (no stage
    falls through to 'unknown', no SGLang stage waits for the vLLM bundle)."""
    documented = re.findall(r"^#   ([a-z0-9-]+)", RUN_SH.read_text(), flags=re.M)
    runs_without_engine = {"prepare-bg", "chain", "poll", "bench-hf", "install", "gemv"}
    assert runs_without_engine <= set(documented)
    for stage in sorted(set(documented) - runs_without_engine):
        r = _run_sh(stage, cwd=tmp_path, OUT=str(tmp_path / "o"), GRACE_GPU_SITES=str(tmp_path),
                    GRACE_GPU_ENGINE="bundle", GRACE_GPU_BUNDLE_WAIT="0", timeout=30)
        engine = "sglang" if stage.startswith(("sglang", "bench-sglang")) else "vllm"
        assert (r.returncode, r.stdout.split(":")[0]) == (1, f"no {engine} for stage {stage}"), (stage, r.stdout)


# -- the GPU scripts fail when they should (issue 24) ----------------------------------------------

def test_bench_counts_no_tokens_on_both_sides_as_no_evidence(tmp_path):
    pair = [_result("gptq", None), _result("grace-a-single", None)]
    vllm_bench.write_report(pair, {"model": "qwen3vl", "size": "tiny"}, str(tmp_path))
    assert pair[1]["tokens_equal_peer"] is False
    assert vllm_bench.failures(pair) == [
        "grace-a-single: greedy tokens differ from stock gptq (same kernel) from position 0 (0 vs 0 tokens)"]


def test_bench_holds_a_not_reproducible_kernel_to_the_stock_kernels_gap_not_to_tokens(tmp_path):
    """Humming's stream-K sums in arrival order: stock on it gave other tokens from one lease to the next
    (H100, vLLM 0.34). A plugin run on it passes with other tokens when its teacher-forced gap to stock
    Humming is within twice the gap between two stock kernels of the run; a larger gap fails, and so
    does a run with nothing to bound it by."""
    meta = {"model": "qwen3vl", "size": "tiny"}
    humming = dict(kernels=["HummingLinearKernel"])

    def run(plugin_lp, with_machete=True):
        res = ([_result("gptq", [1, 2, 3], prompt_logprobs=[None, -10.0, -11.0, -12.0], kernels=["MacheteLinearKernel"])]
               if with_machete else [])
        res += [_result("gptq-humming", [1, 2, 3], prompt_logprobs=[None, -10.1, -11.0, -12.0], **humming),
                _result("grace-a", [1, 2, 4], prompt_logprobs=[None] + plugin_lp, **humming)]
        vllm_bench.write_report(res, meta, str(tmp_path))
        return res

    close = run([-10.0, -11.1, -12.0])          # 0.1 from stock Humming; stock Machete vs Humming: 0.1
    assert close[-1]["peer"] == "gptq-humming" and close[-1]["tokens_equal_peer"] is False
    assert close[-1]["peer_gap_bound"] == pytest.approx(0.2) and vllm_bench.failures(close) == []
    assert "gap 0.100 <= 0.200 (HummingLinearKernel, not reproducible run to run)" in (tmp_path / "results.md").read_text()
    far = run([-10.1, -11.0, -12.5])            # a wrong layer: 0.5 from stock Humming
    assert vllm_bench.failures(far) == [
        "grace-a: teacher-forced log-probs 0.500 from stock gptq-humming (HummingLinearKernel, not reproducible "
        "run to run), more than 2x the largest gap between two stock systems of this run (0.100)"]
    alone = run([-10.1, -11.0, -12.0], with_machete=False)
    assert vllm_bench.failures(alone) == [
        "grace-a: HummingLinearKernel, not reproducible run to run, and this run has no two stock systems "
        "that scored the sequence to bound its gap to stock gptq-humming (run two of gptq, gptq-humming, "
        "gptq-marlin)"]
    exact = [_result("gptq", [1, 2, 3], kernels=["MacheteLinearKernel"]),
             _result("grace-a", [1, 2, 4], kernels=["MacheteLinearKernel"])]
    vllm_bench.write_report(exact, meta, str(tmp_path))     # a reproducible kernel: tokens must match
    assert vllm_bench.failures(exact)[0].startswith("grace-a: greedy tokens differ from stock gptq (same kernel)")


def test_bench_compares_start_up_with_stock_on_the_same_kernel(tmp_path):
    """Humming builds its kernels at a first start, Machete does not: the plugin on Humming is held to
    stock Humming's start-up of the same run, not to stock's default kernel."""
    res = [_result("gptq", [1], load_s=100.0, kernels=["MacheteLinearKernel"]),
           _result("gptq-humming", [1], load_s=150.0, kernels=["HummingLinearKernel"]),
           _result("grace-a", [1], load_s=120.0, kernels=["HummingLinearKernel"]),
           _result("grace-a-single", [1], load_s=50.0, kernels=["MacheteLinearKernel"], run="another lease")]
    vllm_bench.write_report(res, {"model": "qwen3vl", "size": "2b"}, str(tmp_path))
    assert res[2]["peer"] == "gptq-humming" and res[2]["load_vs_peer"] == pytest.approx(0.8)
    assert res[2]["load_vs_gptq"] == pytest.approx(1.2)
    assert res[3]["peer"] == "gptq" and "load_vs_peer" not in res[3]   # its peer ran in another run: no ratio
    row = next(ln for ln in (tmp_path / "results.md").read_text().splitlines() if ln.startswith("| grace-a |"))
    assert row.rstrip().endswith("| 0.80 |"), row


def test_bench_systems_start_with_compile_and_humming_caches_of_their_own(tmp_path):
    """--compile-cache fresh: each system's vLLM compile cache and Humming kernel cache are new and its
    own (a shared Humming cache let the second system on Humming start warm); Humming itself (the
    SGLang venv's humming-kernels) must read the variable."""
    a, b = (vllm_bench.system_env(n, "fresh", str(tmp_path)) for n in ("gptq-humming", "grace-a"))
    for var in ("VLLM_CACHE_ROOT", "HUMMING_CACHE_DIR"):
        assert a[var] != b[var] and a[var].startswith(str(tmp_path)) and not os.path.exists(a[var])
    assert vllm_bench.system_env("grace-a-single", "shared", str(tmp_path)) == {"GRACE_QAT_DUAL_KERNEL": "0"}
    python = SGLANG_VENV / "bin" / "python"
    if not python.exists():
        if in_ci():
            pytest.fail(f"no SGLang venv at {SGLANG_VENV} (set GRACE_SGLANG_VENV)")
        pytest.skip(f"no SGLang venv at {SGLANG_VENV}")
    r = subprocess.run([str(python), "-c", "from humming.utils import jit; print(jit.get_humming_cache_dir())"],
                       env=dict(os.environ, **a), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == a["HUMMING_CACHE_DIR"], r.stdout + r.stderr


def test_bench_fails_a_plugin_system_that_ran_no_quantized_kernel_on_a_gpu(tmp_path):
    base = dict(quantization="grace_qat", gpu="NVIDIA H100 80GB HBM3")
    fell_back = _result("grace-a", [1], fallback=True, **base)
    fell_back["kernels"] = ["exact BF16 fallback (no kernel)"]
    nothing = dict(_result("grace-b", [1], **base), kernels=[])
    ok = _result("grace-a-w8", [1], **base)
    assert vllm_bench.failures([fell_back, nothing, ok]) == [
        "grace-a: no quantized kernel on the GPU (['exact BF16 fallback (no kernel)'])",
        "grace-b: no quantized kernel on the GPU (none reported)"]
    on_cpu = dict(fell_back, gpu=None)                   # the CPU fallback is the documented CPU path
    assert vllm_bench.failures([on_cpu]) == []


def test_bench_reports_each_system_against_the_best_one_flag_stock_kernel_per_batch(tmp_path):
    res = [_result("gptq", [1], runs=((1, 400.0), (16, 6000.0))),
           _result("gptq-humming", [1], runs=((1, 500.0), (16, 7000.0))),
           _result("gptq-marlin", [1], runs=((1, 520.0), (16, 6500.0))),
           _result("grace-a", [1], runs=((1, 510.0), (16, 7000.0)))]
    vllm_bench.write_report(res, {"model": "qwen3vl", "size": "2b"}, str(tmp_path))
    best = res[3]["vs_best_stock"]
    assert best[1] == {"ratio": 510.0 / 520.0, "stock": "gptq-marlin"}
    assert best[16] == {"ratio": 1.0, "stock": "gptq-humming"}
    assert "0.98 (gptq-marlin)" in (tmp_path / "results.md").read_text()
    sg = [_result("sglang-gptq", [1], runs=((1, 300.0),)), _result("sglang-gptq-humming", [1], runs=((1, 350.0),)),
          _result("sglang-grace-a", [1], runs=((1, 340.0),))]
    vllm_bench.write_report(sg, {"model": "qwen3vl", "size": "2b"}, str(tmp_path))  # SGLang rows: SGLang's stock
    assert sg[2]["vs_best_stock"][1] == {"ratio": 340.0 / 350.0, "stock": "sglang-gptq-humming"}


def test_best_stock_includes_the_unquantized_weights_but_their_gap_bounds_no_rounding(tmp_path):
    """BF16 on the same weights is one flag away too (no quantization): where it decodes faster (large
    batches) it is the stock to beat. Its gap to the quantized kernels is quantization error, not
    rounding order: it must not widen the bound a not-reproducible kernel is held to."""
    humming = dict(kernels=["HummingLinearKernel"])
    res = [_result("gptq", [1], runs=((1, 400.0), (128, 20000.0)), kernels=["MacheteLinearKernel"],
                   prompt_logprobs=[None, -10.0, -11.0]),
           _result("gptq-humming", [1], runs=((1, 500.0), (128, 21000.0)), prompt_logprobs=[None, -10.1, -11.0],
                   **humming),
           _result("bf16-grid", [1], runs=((1, 250.0), (128, 24000.0)), kernels=[], prompt_logprobs=[None, -9.0, -12.0]),
           _result("grace-a", [2], runs=((1, 505.0), (128, 21500.0)), prompt_logprobs=[None, -10.0, -11.0], **humming)]
    vllm_bench.write_report(res, {"model": "qwen3vl", "size": "2b"}, str(tmp_path))
    best = res[3]["vs_best_stock"]
    assert best[1] == {"ratio": 505.0 / 500.0, "stock": "gptq-humming"}
    assert best[128] == {"ratio": 21500.0 / 24000.0, "stock": "bf16-grid"}
    assert res[3]["peer_gap_bound"] == pytest.approx(0.2)        # Machete vs Humming only, not BF16's 1.0
    sg = [_result("sglang-gptq", [1], runs=((1, 300.0),)), _result("sglang-bf16-grid", [1], runs=((1, 320.0),), kernels=[]),
          _result("sglang-grace-a", [1], runs=((1, 310.0),))]
    vllm_bench.write_report(sg, {"model": "qwen3vl", "size": "2b"}, str(tmp_path))
    assert sg[2]["vs_best_stock"][1] == {"ratio": 310.0 / 320.0, "stock": "sglang-bf16-grid"}
    assert sg[2]["vs_bf16"] == {1: 310.0 / 320.0}


def test_http_serve_check_fails_a_plugin_that_served_no_quantized_kernel_on_a_gpu():
    def side(kernels):
        return {"requests": {"image_text": {"tokens": ["t:1"]}, "text": {"tokens": ["t:2"]}}, "kernels": kernels}

    res = {"gpu": "NVIDIA H100 80GB HBM3", "plugin": side(["exact BF16 fallback (no kernel)"]), "stock": side([])}
    res["comparison"] = serve_check.compare(res["plugin"], res["stock"])
    assert serve_check.failures(res) == [
        "plugin served no quantized kernel on the GPU (['exact BF16 fallback (no kernel)'])"]
    assert serve_check.failures(dict(res, plugin=side(["MacheteLinearKernel"]))) == []
    assert serve_check.failures(dict(res, gpu=None)) == []          # CPU: the fallback is expected


def test_gpu_stages_fail_where_no_cuda_device_is_visible(tmp_path):
    if _engine_of_this_python() != "vllm":
        pytest.skip("the gpu-tests stage needs vLLM in this Python")
    r = _run_sh("gpu-tests", cwd=tmp_path, OUT=str(tmp_path / "o"), GRACE_GPU_SITES=str(tmp_path / "s"),
                CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 1 and "no CUDA device visible" in r.stdout, r.stdout + r.stderr


def test_poll_fails_while_the_chain_is_unfinished(tmp_path):
    """An unfinished chain answers 3, even after a stage failed (2026-12-07: a poll that answered rc=1
    while the bench was still to run was taken for the end, and the machine went back); a finished
    chain with a failed stage answers 1."""
    bg, res = tmp_path / "bg", tmp_path / "res"
    env = dict(GRACE_GPU_BG=str(bg), GRACE_GPU_RES=str(res), GRACE_GPU_SITES=str(tmp_path),
               GRACE_GPU_ENGINE="bundle", GRACE_GPU_BUNDLE_WAIT="20")   # the stage waits 20 s for a bundle
    r = _run_sh("chain", "no-such-stage", "crossover", cwd=tmp_path, OUT=str(tmp_path / "o"), **env)
    assert r.returncode == 0, r.stdout + r.stderr
    p = _run_sh("poll", "3", cwd=tmp_path, OUT=str(tmp_path / "o2"), **env)
    assert "no-such-stage rc=2" in p.stdout and "has not finished" in p.stdout and p.returncode == 3, p.stdout
    p = _run_sh("poll", "60", cwd=tmp_path, OUT=str(tmp_path / "o3"), **env)
    assert p.returncode == 1 and "crossover rc=1" in p.stdout     # finished, the stage failed


def test_poll_on_a_machine_without_a_chain_answers_at_once(tmp_path):
    """A fresh machine (the last one went back) has no chain: poll says so instead of waiting."""
    env = dict(GRACE_GPU_BG=str(tmp_path / "bg"), GRACE_GPU_RES=str(tmp_path / "res"))
    t0 = time.monotonic()
    p = _run_sh("poll", "300", cwd=tmp_path, OUT=str(tmp_path / "o"), **env)
    assert p.returncode == 4 and "no chain on this machine" in p.stdout, p.stdout + p.stderr
    assert time.monotonic() - t0 < 30


def test_v1_runner_variable_is_set_only_where_the_v1_runner_exists(tmp_path):
    """vLLM 0.34 refuses VLLM_USE_V2_MODEL_RUNNER=0 (its V1 runner is gone): run.sh sets it by
    feature, from the engine's files, never by version."""
    import importlib.util
    spec = importlib.util.find_spec("vllm")
    if spec is None:
        pytest.skip("no vLLM in this Python")
    has_v1 = any((Path(d) / "v1" / "worker" / "gpu_model_runner.py").exists()
                 for d in spec.submodule_search_locations)
    r = _run_sh("engine", cwd=tmp_path, OUT=str(tmp_path / "o"), GRACE_GPU_SITES=str(tmp_path / "s"),
                VLLM_USE_V2_MODEL_RUNNER="0")       # set by the caller: still only where it is accepted
    assert r.returncode == 0, r.stdout + r.stderr
    want = "VLLM_USE_V2_MODEL_RUNNER=0" if has_v1 else "VLLM_USE_V2_MODEL_RUNNER=unset"
    assert f"engine env: {want}" in r.stdout, r.stdout


def test_gemv_stage_needs_no_engine_only_a_gpu(tmp_path):
    """The CUDA GEMV stage uses a vLLM when one is there and runs without one; without a GPU it says so."""
    torch = require("torch")
    if torch.cuda.is_available():
        pytest.skip("on a GPU the stage runs for minutes (tests/gpu/run.sh gemv)")
    r = _run_sh("gemv", cwd=tmp_path, OUT=str(tmp_path / "o"), GRACE_GPU_SITES=str(tmp_path),
                GRACE_GPU_ENGINE="bundle", GRACE_GPU_BUNDLE_WAIT="0", timeout=60)
    assert r.returncode == 1 and r.stdout.startswith("no CUDA device visible"), r.stdout


def test_bench_report_shows_where_a_decode_step_goes(tmp_path):
    prof = {"steps": 16, "us_per_step": 1840.0, "launches_per_step": 212.0,
            "kernels": {"humming_gemm_kernel": {"us": 1200.0, "launches": 112.0},
                        "triton_poi_fused_add_rms_norm": {"us": 300.0, "launches": 57.0}}}
    res = [_result("gptq-humming", [1], profile=prof), _result("grace-a-humming", [1])]
    vllm_bench.write_report(res, {"model": "qwen3vl", "size": "2b"}, str(tmp_path))
    rows = [line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("| gptq-humming | 1840")]
    assert rows == ["| gptq-humming | 1840 | 212 | humming_gemm_kernel (1200, 112); "
                    "triton_poi_fused_add_rms_norm (300, 57) |"], rows


def test_bench_report_lists_tensors_laid_out_differently(tmp_path):
    """Profiled systems bring every model tensor's layout (vllm_run.model_tensors); the report lists
    those of the same name that differ (lease 3's profile: one Inductor kernel 2x slower in grace_qat,
    same graph on the CPU), and says none where none does."""
    prof = {"steps": 2, "us_per_step": 10.0, "launches_per_step": 2.0, "kernels": {}}
    same = {"model.norm.weight": ["bfloat16", [8], [1], 0, "cuda:0"]}
    stock = dict(same, **{"rotary_emb.cos_sin_cache": ["bfloat16", [64, 8], [8, 1], 0, "cuda:0"],
                          "layers.0.qweight": ["int32", [4, 8], [8, 1], 0, "cuda:0"]})
    plugin = dict(same, **{"rotary_emb.cos_sin_cache": ["float32", [64, 8], [8, 1], 0, "cuda:0"],
                           "layers.0.weight_packed": ["int32", [8, 4], [4, 1], 0, "cuda:0"]})
    res = [_result("gptq-humming", [1], profile=prof, tensors=stock), _result("grace-a", [1], profile=prof, tensors=plugin)]
    vllm_bench.write_report(res, {"model": "qwen3vl", "size": "2b"}, str(tmp_path))
    text = (tmp_path / "results.md").read_text()
    assert "differently in gptq-humming and grace-a (dtype, shape, strides, data pointer mod 16, device; 1):" in text
    assert "- `rotary_emb.cos_sin_cache`: ['bfloat16', [64, 8], [8, 1], 0, 'cuda:0'] vs ['float32', [64, 8], [8, 1], 0, 'cuda:0']" in text
    res[1]["tensors"] = stock
    vllm_bench.write_report(res, {"model": "qwen3vl", "size": "2b"}, str(tmp_path))
    assert "(dtype, shape, strides, data pointer mod 16, device; 0):\n\n- none" in (tmp_path / "results.md").read_text()


def test_bench_peer_is_the_stock_system_on_the_plugins_kernel(tmp_path):
    """Where grace_qat ran another kernel than stock's default (a table's engine default), its tokens
    are held to the one-flag stock system that ran that kernel, not to the default's."""
    def res(grace_tokens):
        return [dict(_result("gptq", [1, 2, 3]), kernels=["MacheteLinearKernel"]),
                dict(_result("gptq-marlin", [1, 2, 4]), kernels=["MarlinLinearKernel"]),
                dict(_result("grace-a", grace_tokens), kernels=["MarlinLinearKernel"])]
    good = res([1, 2, 4])
    vllm_bench.write_report(good, {"model": "qwen3vl", "size": "2b"}, str(tmp_path))
    assert good[2]["peer"] == "gptq-marlin" and vllm_bench.failures(good) == []
    bad = res([1, 2, 3])
    vllm_bench.write_report(bad, {"model": "qwen3vl", "size": "2b"}, str(tmp_path))
    assert vllm_bench.failures(bad) == [
        "grace-a: greedy tokens differ from stock gptq-marlin (same kernel) from position 2 (3 vs 3 tokens)"]
    # no stock system on its kernel: held to the gap between the stock kernels of the run, and with
    # only one of those nothing bounds it (it used to pass unchecked)
    alone = [dict(_result("gptq", [1, 2, 3]), kernels=["MacheteLinearKernel"]),
             dict(_result("grace-a", [1, 2, 4]), kernels=["MarlinLinearKernel"])]
    vllm_bench.write_report(alone, {"model": "qwen3vl", "size": "2b"}, str(tmp_path))
    assert alone[1]["peer_must_match"] is False and vllm_bench.failures(alone) == [
        "grace-a: MarlinLinearKernel against MacheteLinearKernel, and this run has no two stock systems that "
        "scored the sequence to bound its gap to stock gptq (run two of gptq, gptq-humming, gptq-marlin)"]


def test_bench_holds_a_second_small_batch_kernel_to_the_stock_kernels_gap_on_short_prompts(tmp_path):
    """A second kernel for small batches (CUDA GEMV next to Humming, H100 2026-12-07) never runs in the
    96-token scored prefill: the short prompts score it. The peer is stock on the large-batch kernel; a
    wrong small-batch kernel fails on the short prompts alone, and a plugin system whose stock peer
    did not run fails (it passed unchecked in that lease's bench-llava)."""
    humming, marlin = ["HummingLinearKernel"], ["MarlinLinearKernel"]
    long = [None, -10.0, -11.0, -12.0]

    def run(plugin_short, systems=("gptq-humming", "gptq-marlin")):
        res = [_result("gptq-humming", [1, 2, 3], kernels=humming, prompt_logprobs=long,
                       small_m_logprobs=[None, -9.0, None, -8.0]),
               _result("gptq-marlin", [1, 2, 3], kernels=marlin, prompt_logprobs=[None, -10.1, -11.0, -12.0],
                       small_m_logprobs=[None, -9.05, None, -8.0])]
        res = [r for r in res if r["name"] in systems]
        res.append(_result("grace-a", [7, 8, 9], kernels=["CudaGemvKernel"] + humming, dual=True,
                           prompt_logprobs=long, small_m_logprobs=plugin_short))
        vllm_bench.write_report(res, {"model": "llava", "size": "7b"}, str(tmp_path))
        return res

    good = run([None, -9.02, None, -8.05])
    assert good[-1]["peer"] == "gptq-humming" and vllm_bench.failures(good) == []
    assert good[-1]["small_m_gap_bound"] == pytest.approx(0.1)
    assert "short-prompt gap 0.050 <= 0.100" in (tmp_path / "results.md").read_text()
    bad = run([None, -9.0, None, -8.7])        # the long score equal, the small-batch kernel off by 0.7
    assert vllm_bench.failures(bad) == [
        "grace-a: teacher-forced log-probs of short prompts (small-batch kernels) 0.700 from stock gptq-humming "
        "(CudaGemvKernel,HummingLinearKernel, a second kernel for small batches), more than 2x the largest gap "
        "between two stock systems of this run (0.050)"]
    unchecked = run([None, -9.0, None, -8.0], systems=())
    assert vllm_bench.failures(unchecked) == [
        "grace-a: no stock system on the same weights ran in this run (gptq or another one-flag kernel): "
        "its output is unchecked"]


# -- SGLang's JIT cache, carried from one lease to the next ----------------------------------------

def _jit_cache(root: Path) -> dict[str, bytes]:
    """A cache laid out as SGLang 0.5.23 lays it: target / module / build key / deps key / files."""
    leaf = root / "sm90a" / "sgl_kernel_jit_gptq_marlin" / "build-0123456789abcdef" / "deps-fedcba9876543210"
    leaf.mkdir(parents=True)
    files = {"module.so": os.urandom(3 * 2**20 + 17), "sgl_deps.json": b'{"deps": []}'}
    for name, data in files.items():
        (leaf / name).write_bytes(data)
    (leaf.parent / ".staging-0a1b2c").mkdir()          # a build in progress: never saved
    (leaf.parent / ".staging-0a1b2c" / "half.o").write_bytes(b"x")
    return {str((leaf / n).relative_to(root)): d for n, d in files.items()}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_jit_cache_comes_back_in_parts_and_unpacks_byte_for_byte(tmp_path, monkeypatch):
    import sglang_jit_warmup as jit
    want = _jit_cache(tmp_path / "cache")
    monkeypatch.setattr(jit, "PART_BYTES", 2**20)          # random bytes do not compress: 4 parts
    parts = jit.save_cache(tmp_path / "cache", tmp_path / "out")
    assert len(parts) == 4 and all(p.stat().st_size <= 2**20 for p in parts)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([p.name for p in parts] + ["SHA256SUMS"])
    assert jit.restore_cache(tmp_path / "out", tmp_path / "fresh")
    assert _files(tmp_path / "fresh") == want                # the staging folder stayed behind


def test_jit_cache_part_that_fails_its_checksum_unpacks_nothing(tmp_path, monkeypatch):
    import sglang_jit_warmup as jit
    _jit_cache(tmp_path / "cache")
    monkeypatch.setattr(jit, "PART_BYTES", 2**20)
    parts = jit.save_cache(tmp_path / "cache", tmp_path / "out")
    damaged = bytearray(parts[-1].read_bytes())
    damaged[-1] ^= 1
    parts[-1].write_bytes(bytes(damaged))
    assert not jit.restore_cache(tmp_path / "out", tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    parts[-1].unlink()                                       # a missing part: the same
    assert not jit.restore_cache(tmp_path / "out", tmp_path / "fresh")
    assert not jit.restore_cache(tmp_path / "nothing-carried", tmp_path / "fresh")


def test_jit_cache_archive_cannot_write_outside_the_cache(tmp_path):
    import hashlib
    import io
    import tarfile
    import sglang_jit_warmup as jit
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name in ("./sm90a/fine.so", "../escaped.so"):     # a good member first: not written either
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
    (tmp_path / "in").mkdir()
    part = tmp_path / "in" / f"{jit.ARCHIVE}.part00"
    part.write_bytes(buf.getvalue())
    (tmp_path / "in" / "SHA256SUMS").write_text(f"{hashlib.sha256(part.read_bytes()).hexdigest()}  {part.name}\n")
    assert not jit.restore_cache(tmp_path / "in", tmp_path / "cache")
    assert not (tmp_path / "escaped.so").exists() and not list((tmp_path / "cache").rglob("*.so"))


def test_jit_cache_too_large_to_bring_back_is_not_saved(tmp_path, monkeypatch, capsys):
    import sglang_jit_warmup as jit
    _jit_cache(tmp_path / "cache")
    monkeypatch.setattr(jit, "PART_BYTES", 2**20)
    monkeypatch.setattr(jit, "MAX_PARTS", 3)
    assert jit.save_cache(tmp_path / "cache", tmp_path / "out") == []
    assert not (tmp_path / "out").exists() and "not saved" in capsys.readouterr().out
    assert jit.save_cache(tmp_path / "empty", tmp_path / "out") == []


def test_sglang_benchmark_exposes_the_plugins_entry_point_where_the_plugin_is_not_installed(monkeypatch):
    """Without grace_qat's entry point, SGLang fails a grace_qat run late with "Unknown quantization
    method" (H100, 2026-12-07: a lease that skipped `run.sh install`). The benchmark's runner puts the
    serve checks' entry-point shim where this process and SGLang's schedulers look (sys.path,
    PYTHONPATH). The installed distribution's own entry point is hidden here to stand for a machine
    where only this checkout is on PYTHONPATH; the lookup itself is importlib.metadata's."""
    import importlib.metadata as md

    import sglang_run
    real = md.entry_points

    def without_installed(**kw):
        return [ep for ep in real(**kw) if not (ep.dist and ep.dist.name.replace("_", "-") == "grace-qat")]

    def grace_qat_entry_points():
        return [ep.value for ep in without_installed(group="sglang.srt.plugins") if ep.name == "grace_qat"]

    monkeypatch.setattr(md, "entry_points", without_installed)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    assert grace_qat_entry_points() == []
    sglang_run.expose_entry_point()
    assert grace_qat_entry_points() == ["grace_sglang:register"]
    shim = sys.path[0]
    assert os.environ["PYTHONPATH"] == shim + os.pathsep + "/elsewhere"     # for the scheduler processes


# -- both servers of a serve check at once --------------------------------------------------------

@pytest.mark.sglang
def test_sglang_servers_side_by_side_have_capped_kv_pools_this_sglang_accepts(tmp_path):
    """Side by side, each SGLang server gets a capped KV pool (--max-total-tokens) and 0.45 of the memory,
    so that each one's measurement of free memory stays positive whatever the other holds; alone, 0.6
    and no cap. Parsed by this SGLang's own argument parser (0.5.23 and the 0.5.17 overlay)."""
    require("sglang")
    import argparse

    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs
    load_plugins()                       # grace_qat among the --quantization choices, as in a server
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3VLForConditionalGeneration"]}))
    for side_by_side, fraction, cap in ((True, 0.45, serve_check.SGLANG_SIDE_BY_SIDE_TOKENS), (False, 0.6, None)):
        args = serve_check.parse_args(["--engine", "sglang", "--model", "m", "--out", "o"]
                                      + (["--side-by-side"] if side_by_side else []))
        for plugin in (True, False):
            _, srv, _ = serve_check.server_setup(args, str(tmp_path), plugin, str(tmp_path))
            ns = parser.parse_args(["--model-path", "m"] + srv)
            assert (ns.mem_fraction_static, ns.max_total_tokens) == (fraction, cap)


def test_serve_check_starts_a_side_again_alone_when_it_did_not_start_beside_the_other(tmp_path, monkeypatch):
    """A server that cannot start beside the other (memory, a port) is started again alone, so the check
    is not lost to sharing the GPU; the failed attempt stays in the JSON. The servers here are stand-ins
    for the engines (serve_once), the checkpoint a real tiny GRACE one."""
    from grace_qat import synthetic
    model, ref = tmp_path / "a", tmp_path / "ref"
    synthetic.write_qwen3vl(str(model), size="tiny")
    ref.mkdir()
    (ref / "config.json").write_text("{}")
    calls = []

    def stand_in(args, m, plugin, work, log_path, port=None):
        calls.append(("plugin" if plugin else "stock", args.side_by_side))
        if plugin and args.side_by_side:
            return {"exception": "RuntimeError: not enough memory", "log": log_path, "requests": {}}
        tokens = {"tokens": ["token_id:1", "token_id:2"]}
        return {"startup_s": 1.0, "requests": {"image_text": tokens, "text": tokens}, "kernels": ["K"]}

    monkeypatch.setattr(serve_check, "serve_once", stand_in)
    out = tmp_path / "r.json"
    rc = serve_check.main(["--engine", "vllm", "--model", str(model), "--reference", str(ref),
                           "--out", str(out), "--side-by-side"])
    result = json.loads(out.read_text())
    assert sorted(calls) == [("plugin", False), ("plugin", True), ("stock", True)]
    assert result["started_again_alone"] == ["plugin"]
    assert result["plugin_beside"]["exception"] == "RuntimeError: not enough memory"
    assert result["plugin"]["startup_s"] == 1.0 and result["passed"] and rc == 0


@pytest.mark.parametrize("engine", ["vllm", pytest.param("sglang", marks=pytest.mark.sglang)])
def test_serve_checks_start_the_plugin_with_the_model_cards_command(tmp_path, engine):
    """Issue 24: the serve checks serve each format as users do, with the plugin installed and no
    --quantization flag where the plugin detects the checkpoint (sidecar, AWQ-packed); a grid-only
    checkpoint, which nothing marks as GRACE, gets the flag; stock never gets it."""
    from grace_qat import synthetic
    if engine == "sglang":
        require("sglang")         # its vision-attention argument is read from SGLang itself
    args = serve_check.parse_args(["--engine", engine, "--model", "m", "--out", "o"])
    for fmt, flagged in (("qat-sidecar", False), ("awq", False), ("qat-grid", True)):
        model = str(tmp_path / fmt)
        synthetic.write_qwen3vl(model, size="tiny", fmt=fmt)
        _, plugin_args, _ = serve_check.server_setup(args, model, True, str(tmp_path))
        _, stock_args, _ = serve_check.server_setup(args, model, False, str(tmp_path))
        assert ("--quantization" in plugin_args) == flagged, (fmt, plugin_args)
        assert "--quantization" not in stock_args, fmt


@pytest.mark.sglang
def test_sglang_llava_serve_check_gives_stock_the_plugins_conversation(tmp_path):
    """Stock SGLang failed its own warm-up on the LLaVA export with the processor's template (vLLM's:
    string content), so the check starts it with the grace_llava_v1 conversation as a template file
    (tests/test_sglang_plugin.py: the same token ids as the plugin); the plugin keeps the model card's
    command."""
    require("sglang")
    from llava_fixtures import write_llava
    from sglang_serve_check import STOCK_LLAVA_TEMPLATE
    model = write_llava(str(tmp_path / "llava"), fmt="qat-sidecar", bits=4, seed=1)
    args = serve_check.parse_args(["--engine", "sglang", "--model", model, "--out", "o"])
    _, plugin_args, _ = serve_check.server_setup(args, model, True, str(tmp_path))
    _, stock_args, _ = serve_check.server_setup(args, model, False, str(tmp_path))
    assert "--chat-template" not in plugin_args, plugin_args
    assert stock_args[stock_args.index("--chat-template") + 1] == STOCK_LLAVA_TEMPLATE
    assert os.path.exists(STOCK_LLAVA_TEMPLATE)
