"""Optional test dependencies: a skip on a developer's machine, a failure in CI.

``pytest.importorskip`` at module level turns a dependency that setup forgot to install into a
silently skipped file; under ``CI=true`` (``scripts/test.sh`` sets it) the import must succeed."""
from __future__ import annotations

import importlib
import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(module: str, reason: str | None = None):
    """The imported module; outside CI a skip when it is missing, in CI the ImportError itself."""
    if in_ci():
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=reason)
