"""`grace-qat inspect` reads the standard checkpoints `convert` writes, verifies them, says how to serve
them, and `--against SRC` checks an export against its source (issue 17, item 3).

The expected codes are computed here from the source's files with plain torch (round(W / exp(log_scale))).
"""
import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file, save_file

from grace_qat import synthetic

CLI = os.path.join(os.path.dirname(sys.executable), "grace-qat")
SIDECAR = "qat_quantized_weights.bin"
M = "model.language_model.layers.1.mlp.up_proj"
TARGETS = ("gptq", "compressed-tensors", "awq")


def run(*args):
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("exports")
    out = {"s4": tiny["qat-sidecar"], "awq-src": tiny["awq"]}
    for to in TARGETS + ("bf16",):
        out[to] = str(root / to)
        r = run("convert", out["s4"], out[to], "--to", to)
        assert r.returncode == 0, r.stderr
    out["awq-gptq"] = str(root / "awq-gptq")
    assert run("convert", out["awq-src"], out["awq-gptq"], "--to", "gptq").returncode == 0
    return out


def _source_histogram(src: str) -> Counter:
    side = torch.load(os.path.join(src, SIDECAR), weights_only=True)
    hist = Counter()
    for k, w in side.items():
        if k.endswith(".weight"):
            s = side[k[: -len(".weight")] + ".log_scale"].float().exp().reshape(w.shape[0], -1, 1)
            q = torch.round(w.float().reshape(w.shape[0], s.shape[1], -1) / s)
            hist.update(Counter(q.flatten().to(torch.int64).tolist()))
    return hist


@pytest.mark.parametrize("to", TARGETS)
def test_inspect_recognises_verifies_and_says_how_to_serve(dirs, to):
    r = run("inspect", dirs[to], "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    cfg = json.load(open(os.path.join(dirs[to], "config.json")))["quantization_config"]
    assert rep["format"] == cfg["quant_method"] == to
    assert (rep["bits"], rep["group_size"], rep["verified"]) == (4, 128, True)
    hist = {int(k): v for k, v in rep["code_histogram"].items() if v}
    assert hist == dict(_source_histogram(dirs["s4"]))
    assert rep["serve"][0] == f"vllm serve {dirs[to]}"
    human = run("inspect", dirs[to])
    assert human.returncode == 0 and f"format      {to}:" in human.stdout
    assert "no plugin needed" in human.stdout and "--quantization" not in human.stdout


@pytest.mark.parametrize("to", TARGETS + ("bf16",))
def test_against_source_passes_for_every_export(dirs, to):
    r = run("inspect", dirs[to], "--against", dirs["s4"])
    assert r.returncode == 0, r.stderr
    line = [ln for ln in r.stdout.splitlines() if ln.strip().startswith("against")][0]
    if to == "bf16":
        assert "weights equal to the source's codes x scales rounded to bf16" in line, line
    else:
        assert "codes equal bit for bit" in line and "scales equal to the source's fp32 scales rounded to " \
            f"{'fp16' if to == 'awq' else 'bf16'}" in line, line
    r = run("inspect", dirs["awq-gptq"], "--against", dirs["awq-src"])
    assert r.returncode == 0 and "scales exact (fp16, as in the source)" in r.stdout, r.stdout + r.stderr


def _edit(src_dir, tmp_path, name, fn):
    d = tmp_path / os.path.basename(src_dir)
    shutil.copytree(src_dir, d)
    (st,) = [f for f in os.listdir(d) if f.endswith(".safetensors")]
    t = load_file(str(d / st))
    t[name] = fn(t[name].clone())
    save_file(t, str(d / st), metadata={"format": "pt"})
    return str(d), str(d / st)


def _flip_code(q):
    q[0, 0] ^= 1                       # the lowest code of the first pack: another valid code
    return q


def _next_up(s):
    flat = s.view(-1)
    flat[0] = torch.nextafter(flat[0:1].float(), torch.tensor([1e9])).to(s.dtype) \
        if s.dtype == torch.float32 else torch.tensor(flat[0].item() * (1 + 2 ** -7), dtype=s.dtype)
    return s


@pytest.mark.parametrize("to,leaf", [("gptq", "qweight"), ("compressed-tensors", "weight_packed"), ("awq", "qweight")])
def test_against_refuses_a_changed_code(dirs, tmp_path, to, leaf):
    d, st = _edit(dirs[to], tmp_path, f"{M}.{leaf}", _flip_code)
    assert run("inspect", d).returncode == 0          # still a valid checkpoint on its own
    r = run("inspect", d, "--against", dirs["s4"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert M in r.stderr and "1 codes differ" in r.stderr, r.stderr


def test_against_checks_every_module(dirs, tmp_path, capsys):
    """One code changed in one module at a time, for every quantized module of the export (listed
    from its files, first to last): each change fails `inspect --against` naming that module, so a
    comparison that skips a module cannot print "codes equal bit for bit"."""
    from grace_qat import cli
    d = tmp_path / "gptq"
    shutil.copytree(dirs["gptq"], d)
    (st,) = [f for f in os.listdir(d) if f.endswith(".safetensors")]
    original = load_file(str(d / st))
    modules = sorted((k[: -len(".qweight")] for k in original if k.endswith(".qweight")),
                     key=lambda m: (int(m.split(".layers.")[1].split(".")[0]), m))
    assert len(modules) == 7 * 4
    assert cli.main(["inspect", str(d), "--against", dirs["s4"]]) == 0
    assert f"{len(modules)} modules: codes equal bit for bit" in capsys.readouterr().out
    try:
        for m in modules:
            t = dict(original)
            t[m + ".qweight"] = _flip_code(original[m + ".qweight"].clone())
            save_file(t, str(d / st), metadata={"format": "pt"})
            assert cli.main(["inspect", str(d), "--against", dirs["s4"]]) == 2, m
            err = capsys.readouterr().err
            assert f"{m}: 1 codes differ" in err, (m, err)
    finally:
        save_file(original, str(d / st), metadata={"format": "pt"})


@pytest.mark.parametrize("to,leaf", [("gptq", "scales"), ("compressed-tensors", "weight_scale")])
def test_against_refuses_a_changed_scale(dirs, tmp_path, to, leaf):
    d, st = _edit(dirs[to], tmp_path, f"{M}.{leaf}", _next_up)
    r = run("inspect", d, "--against", dirs["s4"])
    assert r.returncode == 2 and f"{st}: {M}.{leaf} differs" in r.stderr, r.stderr


def test_inspect_refuses_asymmetric_zero_points_and_bad_scales(dirs, tmp_path):
    def zero(q):
        q[0, 0] = q[0, 0] ^ 1
        return q
    d, st = _edit(dirs["gptq"], tmp_path / "z", f"{M}.qzeros", zero)
    r = run("inspect", d)
    assert r.returncode == 2 and f"{st}: {M}.qzeros" in r.stderr and "symmetric" in r.stderr, r.stderr
    d, st = _edit(dirs["compressed-tensors"], tmp_path / "s", f"{M}.weight_scale", lambda s: -s)
    r = run("inspect", d)
    assert r.returncode == 2 and f"{st}: {M}.weight_scale" in r.stderr and "> 0" in r.stderr, r.stderr
    cfg_path = os.path.join(dirs["gptq"], "config.json")
    d = tmp_path / "b"
    shutil.copytree(dirs["gptq"], d)
    cfg = json.load(open(cfg_path))
    cfg["quantization_config"]["bits"] = 8
    json.dump(cfg, open(d / "config.json", "w"))
    r = run("inspect", str(d))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "for 8-bit group 128" in r.stderr, r.stderr


def test_bf16_export_against_refuses_a_changed_weight(dirs, tmp_path):
    d, st = _edit(dirs["bf16"], tmp_path, f"{M}.weight", lambda w: w * 2)
    r = run("inspect", d, "--against", dirs["s4"])
    assert r.returncode == 2 and f"{M}.weight differs" in r.stderr, r.stderr


def test_plain_checkpoint_is_named_plain(tmp_path):
    d = synthetic.write_qwen3vl(str(tmp_path / "plain"), size="tiny", fmt="plain", bits=4)
    r = run("inspect", d)
    assert r.returncode == 0, r.stderr
    assert "plain: an unquantized checkpoint" in r.stdout and "no plugin needed" in r.stdout, r.stdout
    assert f"vllm serve {d}" in r.stdout


def test_inspect_suggests_the_command_that_serves_it(dirs, tmp_path):
    """No flag where the plugin detects the checkpoint itself (a sidecar, AWQ, or a `--to grace_qat`
    export, whose point is "no flag needed"); a `--to bf16` export (a bare grid) is served by the
    stock command as it is, the flag only for packed serving (issue 27: inspect printed the flag for
    the grace_qat export, and only the plugin's commands for the BF16 one)."""
    declared = str(tmp_path / "declared")
    assert run("convert", dirs["s4"], declared, "--to", "grace_qat").returncode == 0
    for d in (declared, dirs["s4"], dirs["awq-src"]):
        rep = json.loads(run("inspect", d, "--json").stdout)
        assert rep["serve"] == [f"vllm serve {d}", f"python -m sglang.launch_server --model-path {d}"], rep["serve"]
    rep = json.loads(run("inspect", dirs["bf16"], "--json").stdout)
    assert rep["serve"][:2] == [f"vllm serve {dirs['bf16']}",
                                f"python -m sglang.launch_server --model-path {dirs['bf16']}"], rep["serve"]
    assert rep["serve"][2] == f"vllm serve {dirs['bf16']} --quantization grace_qat", rep["serve"]
    human = run("inspect", dirs["bf16"]).stdout
    assert "stock engine, no plugin needed: BF16" in human and "packed 4-bit" in human, human
