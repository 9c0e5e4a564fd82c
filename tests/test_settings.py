"""grace_qat.settings: every variable grace_qat reads, parsed strictly in one place."""
import pytest

from grace_qat import settings
from grace_qat.errors import GraceFormatError


def test_whole_numbers_are_parsed_strictly(monkeypatch):
    monkeypatch.delenv(settings.MARLIN_MAX_M, raising=False)
    assert settings.marlin_max_m() is None
    monkeypatch.setenv(settings.MARLIN_MAX_M, " 16 ")
    assert settings.marlin_max_m() == 16
    for bad in ("4.5", "lots", "-1"):
        monkeypatch.setenv(settings.MARLIN_MAX_M, bad)
        with pytest.raises(GraceFormatError) as e:
            settings.marlin_max_m()
        assert str(e.value) == (f"environment variable GRACE_QAT_MARLIN_MAX_M={bad!r}: expected a whole "
                                f"number >= 0")


def test_choices_are_parsed_strictly(monkeypatch):
    monkeypatch.delenv(settings.SGLANG_KERNEL, raising=False)
    assert settings.sglang_kernel() is None
    monkeypatch.setenv(settings.SGLANG_KERNEL, " Humming ")
    assert settings.sglang_kernel() == "humming"
    monkeypatch.setenv(settings.SGLANG_KERNEL, "machete")
    with pytest.raises(GraceFormatError) as e:
        settings.sglang_kernel()
    assert str(e.value) == "environment variable GRACE_QAT_SGLANG_KERNEL='machete': expected one of marlin, humming"


def test_defaults_and_precedence(monkeypatch):
    for name in (settings.AUTODETECT, settings.SGLANG_AUTODETECT, settings.TRACEBACK, settings.DUAL_KERNEL,
                 settings.CLIP_PATH, settings.CROSSOVER_FILE):
        monkeypatch.delenv(name, raising=False)
    assert (settings.autodetect(), settings.sglang_autodetect(), settings.traceback(), settings.dual_kernel(),
            settings.clip_path(), settings.crossover_file()) == (True, True, False, True, None, None)
    monkeypatch.setenv(settings.AUTODETECT, "0")            # both engines
    assert (settings.autodetect(), settings.sglang_autodetect()) == (False, False)
    monkeypatch.setenv(settings.SGLANG_AUTODETECT, "yes")   # SGLang's own wins there
    assert (settings.autodetect(), settings.sglang_autodetect()) == (False, True)
    monkeypatch.setenv(settings.CLIP_PATH, "")
    assert settings.clip_path() is None
    monkeypatch.setenv(settings.CROSSOVER_FILE, "/tmp/table.json")
    assert settings.crossover_file() == "/tmp/table.json"


def test_no_other_module_reads_a_grace_variable():
    """One home: the GRACE_* names appear as strings in settings.py only."""
    import pathlib
    root = pathlib.Path(settings.__file__).resolve().parents[1]
    found = []
    for pkg in ("grace_qat", "grace_vllm", "grace_sglang"):
        for path in (root / pkg).rglob("*.py"):
            if path.name == "settings.py":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if ('"GRACE_' in line or "'GRACE_" in line) and not line.lstrip().startswith("#"):
                    found.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert found == [], found
