"""tests/gpu/bundle.py's pure logic, without network: splitting, the device-side reassembly with its
checksums (the real install.sh, run here under bash), the call text, and the per-call size limit."""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import lzma
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_bundle", ROOT / "tests" / "gpu" / "bundle.py")
bundle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bundle)
MIB = 1024 * 1024


def _archive(tmp_path: Path, files: dict[str, bytes], name="eng-1.0.tar.xz") -> Path:
    """A .tar.xz made with the standard library alone (the reference, independent of make_archive)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for n, data in files.items():
            info = tarfile.TarInfo(n)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / name
    path.write_bytes(lzma.compress(raw.getvalue()))
    return path


def test_split_cuts_in_order_and_the_pieces_concatenate_to_the_original(tmp_path):
    data = os.urandom(10_000)
    src = tmp_path / "a.tar.xz"
    src.write_bytes(data)
    parts = bundle.split_file(src, tmp_path / "out", part_bytes=4096)
    assert [p["dir"] for p in parts] == ["part00", "part01", "part02"]
    assert [p["size"] for p in parts] == [4096, 4096, 10_000 - 8192]
    joined = b"".join((tmp_path / "out" / p["dir"] / p["file"]).read_bytes() for p in parts)
    assert joined == data
    for p in parts:
        assert p["sha256"] == hashlib.sha256((tmp_path / "out" / p["dir"] / p["file"]).read_bytes()).hexdigest()


def test_split_of_an_exact_multiple_makes_no_empty_tail(tmp_path):
    src = tmp_path / "b.tar.xz"
    src.write_bytes(b"x" * 8192)
    parts = bundle.split_file(src, tmp_path / "out", part_bytes=4096)
    assert [p["size"] for p in parts] == [4096, 4096]


def test_a_part_that_would_not_fit_one_call_with_the_working_tree_is_refused(tmp_path):
    bundle.check_part_size(bundle.PART_MIB * MIB, 8 * MIB)  # the default beside today's tree: fits
    with pytest.raises(ValueError, match="call limit"):
        bundle.check_part_size(60 * MIB, 5 * MIB)          # 65 MiB with the tree
    with pytest.raises(ValueError, match="call limit"):
        bundle.check_part_size(64 * MIB, 0)
    src = tmp_path / "c.tar.xz"
    src.write_bytes(b"y" * 100)
    with pytest.raises(ValueError):
        bundle.split_file(src, tmp_path / "out", part_bytes=63 * MIB, tree_bytes=2 * MIB)
    assert not (tmp_path / "out").exists(), "nothing is written for a refused part size"


def test_the_working_tree_is_measured_as_an_archive_holds_it(tmp_path):
    """Many small files cost a header and padding each: the tree's size is what tar writes for them
    (less its two end blocks and record padding), not the sum of their sizes."""
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    files = {f"f{i:03d}.txt": os.urandom(i * 37) for i in range(200)}
    for n, data in files.items():
        (repo / n).write_bytes(data)
    (repo / ".gitignore").write_text("ignored.bin\n")
    (repo / "ignored.bin").write_bytes(b"z" * 100_000)             # not sent: not counted
    with tarfile.open(fileobj=io.BytesIO(), mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for n in [*files, ".gitignore"]:
            tar.add(repo / n, arcname=n)
        members_end = tar.offset                                   # before the end blocks and record padding
    assert bundle.tree_bytes(repo) == members_end
    assert bundle.tree_bytes(repo) > sum(len(d) for d in files.values()) + 200 * 512


def test_the_call_text_carries_each_part_once_and_only_the_last_installs():
    parts = [dict(dir="part%02d" % i, file="e-1.tar.xz.part%02d" % i, sha256="%064x" % i, size=1) for i in range(5)]
    calls = bundle.call_sequence("vllm", "vllm-0.33.0", ".devbundle-vllm-0.33.0", parts)
    assert [c["carry"] for c in calls] == [[".devbundle-vllm-0.33.0/part%02d" % i] for i in range(5)]
    for i, c in enumerate(calls[:-1]):
        assert "%064x" % i in c["command"] and "install.sh" not in c["command"]
        assert "/tmp/asm-vllm/" in c["command"]
    assert calls[-1]["command"].endswith("bash .devbundle-vllm-0.33.0/part04/install.sh")
    assert all(len(c["command"]) <= 2000 for c in calls)
    text = bundle.format_calls("vllm-0.33.0", calls, 5 * MIB)
    for i in range(5):
        assert text.count('".devbundle-vllm-0.33.0/part%02d"' % i) == 1
    assert text.count("\n") == 7 and "5 parts" in text and "source /tmp/site-vllm.env" in text


def _device(repo: Path, calls: list[dict], carried_from: Path) -> list[subprocess.CompletedProcess]:
    """Play the calls as the device does: a fresh tree per call holding only the carried part folder."""
    results = []
    for c in calls:
        shutil.rmtree(repo, ignore_errors=True)
        for rel in c["carry"]:
            shutil.copytree(carried_from / Path(rel).name, repo / rel)
        results.append(subprocess.run(["bash", "-c", c["command"]], cwd=repo, capture_output=True, text=True))
    return results


@pytest.fixture
def engine(tmp_path):
    """A unique engine name, so /tmp/asm-<engine> and /tmp/site-<engine> are this test's alone."""
    name = "bt%d%s" % (os.getpid(), tmp_path.name[-6:].replace("_", ""))
    yield name
    for p in ("/tmp/asm-" + name, "/tmp/site-" + name):
        shutil.rmtree(p, ignore_errors=True)
    for p in ("/tmp/site-%s.done" % name, "/tmp/site-%s.env" % name):
        Path(p).unlink(missing_ok=True)


def _make_bundle(tmp_path, engine, files, installed_bytes=0):
    label = engine + "-1.0"
    src = _archive(tmp_path, files, label + ".tar.xz")
    whole = hashlib.sha256(src.read_bytes()).hexdigest()
    out = tmp_path / "bundle"
    parts = bundle.split_file(src, out, part_bytes=700)
    bundle.write_install(out / parts[-1]["dir"], label, engine, parts, whole,
                         "export BUNDLE_TEST_VAR=1\n", "import sys, pkg_in_bundle\nprint('smoke', pkg_in_bundle.X, sys.argv[1:])\n",
                         installed_bytes=installed_bytes)
    return label, out, parts, bundle.call_sequence(engine, label, ".devbundle-" + label, parts)


def test_the_printed_calls_reassemble_verify_and_install_the_bundle(tmp_path, engine):
    files = {"pkg_in_bundle/__init__.py": b"X = 42\n", "pkg_in_bundle/blob.bin": os.urandom(3000)}
    label, out, parts, calls = _make_bundle(tmp_path, engine, files)
    assert len(parts) > 3
    res = _device(tmp_path / "repo", calls, out)
    for r in res:
        assert r.returncode == 0, r.stdout + r.stderr
    assert "smoke 42 [%r]" % engine in res[-1].stdout   # the smoke test is told which engine
    site = Path("/tmp/site-" + engine)
    assert (site / "pkg_in_bundle" / "blob.bin").read_bytes() == files["pkg_in_bundle/blob.bin"]
    assert Path("/tmp/site-%s.done" % engine).exists()
    env = Path("/tmp/site-%s.env" % engine).read_text()
    assert "export PYTHONPATH=%s${PYTHONPATH:+:$PYTHONPATH}" % site in env and "BUNDLE_TEST_VAR=1" in env
    assert not list(Path("/tmp/asm-" + engine).glob(label + "*")), "parts and archive are removed after install"


def test_a_corrupted_part_stops_its_call_and_the_install(tmp_path, engine):
    label, out, parts, calls = _make_bundle(tmp_path, engine, {"pkg_in_bundle/__init__.py": os.urandom(3000)})
    bad = out / parts[1]["dir"] / parts[1]["file"]
    data = bytearray(bad.read_bytes())
    data[10] ^= 0xFF
    bad.write_bytes(bytes(data))
    res = _device(tmp_path / "repo", calls, out)
    assert res[0].returncode == 0
    assert res[1].returncode != 0 and "FAILED" in res[1].stdout + res[1].stderr
    assert res[-1].returncode != 0
    assert not Path("/tmp/site-%s.done" % engine).exists()
    assert not Path("/tmp/site-%s" % engine).exists(), "nothing is unpacked from a bundle that fails its checksum"


def test_a_missing_part_stops_the_install(tmp_path, engine):
    label, out, parts, calls = _make_bundle(tmp_path, engine, {"pkg_in_bundle/__init__.py": os.urandom(3000)})
    res = _device(tmp_path / "repo", calls[:1] + calls[2:], out)
    assert res[-1].returncode != 0
    assert not Path("/tmp/site-%s.done" % engine).exists()


def test_an_install_the_disk_cannot_hold_stops_in_one_line_before_unpacking(tmp_path, engine):
    """Lease 6 of 2026-12-07: with the 7B fixtures on the GPU machine's disk, pip died mid-install
    ("No space left on device") and left half a site. install.sh now compares the free space with
    the archive, its unpacked copy and the site (here a site bigger than any disk) and stops first."""
    label, out, parts, calls = _make_bundle(tmp_path, engine, {"pkg_in_bundle/__init__.py": b"X = 1\n"},
                                            installed_bytes=2 ** 60)
    res = _device(tmp_path / "repo", calls, out)
    assert all(r.returncode == 0 for r in res[:-1])
    last = res[-1]
    assert last.returncode != 0
    lines = last.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("install.sh: unpacking %s needs " % label), last.stderr
    assert "GiB free under /tmp/asm-%s" % engine in lines[0]
    assert not Path("/tmp/site-%s" % engine).exists() and not Path("/tmp/site-%s.done" % engine).exists()


def test_make_archive_round_trips_through_the_standard_library(tmp_path):
    site = tmp_path / "site"
    (site / "a" / "b").mkdir(parents=True)
    (site / "a" / "b" / "h.hpp").write_bytes(b"same header\n" * 100)
    (site / "a" / "h.hpp").write_bytes(b"same header\n" * 100)
    (site / "m.py").write_text("print(1)\n")
    dest = tmp_path / "s.tar.xz"
    bundle.make_archive(site, dest, "1")
    with tarfile.open(fileobj=lzma.open(dest)) as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert got == {"a/b/h.hpp": b"same header\n" * 100, "a/h.hpp": b"same header\n" * 100, "m.py": b"print(1)\n"}


def test_strip_tree_deletes_only_matching_files_and_honours_keep(tmp_path):
    site = tmp_path / "site"
    for rel in ["torch/include/x.h", "torch/lib/libc10.so", "torch/lib/libfoo.a", "vllm/vllm-rs", "vllm/x.py",
                "sgl/tests/test_a.py"]:
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(b"0" * 10)
    freed, hit = bundle.strip_tree(site, [r"torch/include/", r"torch/lib/.*\.a$", r"vllm/vllm-rs$",
                                          r".*/tests?/.*\.py$"], keep=[r"torch/include/"])
    left = sorted(p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file())
    assert left == ["torch/include/x.h", "torch/lib/libc10.so", "vllm/x.py"]
    assert freed == 30 and r"torch/include/" not in hit


def test_requirements_are_read_with_the_gpu_machines_markers():
    pkgs = [dict(name="eng", version="1", requested=True, url="", requires=[
        "a>=2", 'b==1; python_version < "3.11"', 'c<3; platform_machine == "x86_64"', "d; extra == 'test'",
        "e[fast]>=1"]),
        dict(name="e", version="1", requested=False, url="", requires=["f==9; extra == 'fast'", "g; extra == 'slow'"])]
    on = bundle.requirements_on(pkgs, {"eng", "e"})
    assert set(on) == {"a", "c", "e", "f"}
    assert str(on["a"][0][0]) == ">=2" and on["f"][0][1] == "e"


def test_the_install_names_a_part_that_changed_after_its_call(tmp_path, engine):
    """A chunk damaged in /tmp/asm-<engine> after its own call passed is named by the last call."""
    label, out, parts, calls = _make_bundle(tmp_path, engine, {"pkg_in_bundle/__init__.py": os.urandom(3000)})
    res = _device(tmp_path / "repo", calls[:-1], out)
    assert all(r.returncode == 0 for r in res)
    chunk = Path("/tmp/asm-%s/%s" % (engine, parts[1]["file"]))
    data = chunk.read_bytes()
    chunk.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])   # always a change (a 0 byte could already be 0)
    last = _device(tmp_path / "repo", calls[-1:], out)[0]
    assert last.returncode != 0 and "%s: FAILED" % parts[1]["file"] in last.stdout + last.stderr
    assert not Path("/tmp/site-%s.done" % engine).exists()


def test_a_pin_the_index_lacks_takes_the_nearest_release_of_its_series():
    """vLLM 0.34 pins flashinfer-python==0.7.3, which the index lacks (0.7.2.post1 and 0.7.4 exist):
    the rule names the pin and the release it takes instead; a series with no release is refused."""
    avail = "0.6.8, 0.7.0, 0.7.1, 0.7.2.post1, 0.7.4, 0.7.5rc1, 0.8.0".split(",")
    version, rule = bundle.substitute_pin("flashinfer-python", "0.7.3", avail)
    assert version == "0.7.4" and "flashinfer-python==0.7.3 is not on the package index" in rule
    assert bundle.substitute_pin("x", "0.7.9", avail)[0] == "0.7.4"      # no newer one: the newest older
    version, rule = bundle.substitute_pin("cuda-tile", "1.6.0rc5", ["1.5.0", "1.6.0rc4", "1.7.0"])
    assert version is None and "skip list" in rule
    err = ("ERROR: Could not find a version that satisfies the requirement flashinfer-python==0.7.3 "
           "(from versions: 0.7.2.post1, 0.7.4)\nERROR: No matching distribution found")
    assert bundle.MISSING_PIN.search(err).groups() == ("flashinfer-python", "0.7.3", "0.7.2.post1, 0.7.4")


def test_a_reused_image_package_ships_when_its_own_requirements_exclude_what_ships_beside_it(monkeypatch):
    """The image's transformers 5.17 requires huggingface-hub<2.0; vLLM 0.34 ships hub 2.x: transformers
    must ship too (at the resolved version), and so must whatever that change excludes in turn."""
    monkeypatch.setitem(bundle.IMAGE, "transformers", "5.17.0")
    monkeypatch.setitem(bundle.IMAGE, "huggingface-hub", "1.33.0")
    monkeypatch.setitem(bundle.IMAGE, "tokenizers", "0.23.2")
    monkeypatch.setitem(bundle.IMAGE, "accelerate", "1.15.0")
    pkgs = [dict(name="huggingface-hub", version="2.4.0", requires=[]),
            dict(name="transformers", version="5.22.2", requires=["huggingface-hub>=2.0", "tokenizers>=0.23"]),
            dict(name="tokenizers", version="0.23.2", requires=["huggingface-hub>=1.0"]),
            dict(name="accelerate", version="1.16.0", requires=["transformers>=5.20"])]
    image_requires = {("transformers", "5.17.0"): ["huggingface-hub>=1.5.0,<2.0", "tokenizers>=0.22"],
                      ("accelerate", "1.15.0"): ["transformers<5.18", "numpy"]}
    dec = {"huggingface-hub": ("ship", "x"), "transformers": ("reuse", "x"), "tokenizers": ("reuse", "x"),
           "accelerate": ("reuse", "x")}
    bundle.reused_must_fit(pkgs, dec, None, requires_of=lambda n, v: image_requires[(n, v)])
    assert dec["transformers"][0] == "ship" and "requires huggingface-hub<2.0,>=1.5.0" in dec["transformers"][1]
    assert dec["accelerate"][0] == "ship"           # its transformers<5.18 no longer holds once 5.22.2 ships
    assert dec["tokenizers"] == ("reuse", "x")      # same version as resolved: its requirements hold
