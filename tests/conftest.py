"""Shared tiny checkpoints: each (model, format, bits, seed) is written once per test session and
handed to every module that asks, instead of each module generating its own copy.

The directories are shared: a test that changes files must copy the checkpoint first
(``shutil.copytree``), as the tests that break checkpoints on purpose do.
"""
import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint(fmt, bits=4, seed=0, model="qwen3vl")`` -> path of a tiny GRACE checkpoint."""
    made: dict[tuple, str] = {}

    def make(fmt: str, bits: int = 4, seed: int = 0, model: str = "qwen3vl") -> str:
        key = (model, fmt, bits, seed)
        if key not in made:
            from grace_qat import synthetic
            write = synthetic.write_llava if model == "llava" else synthetic.write_qwen3vl
            out = tmp_path_factory.mktemp(f"tiny-{model}-{fmt}-w{bits}-s{seed}") / "ckpt"
            made[key] = write(str(out), size="tiny", fmt=fmt, bits=bits, seed=seed)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny(tiny_checkpoint):
    """Tiny Qwen3-VL W4 checkpoints (seed 0) by format name, written on first use."""
    class _ByFormat(dict):
        def __missing__(self, fmt):
            self[fmt] = tiny_checkpoint(fmt)
            return self[fmt]
    return _ByFormat()
