"""Shared fixtures: where ../shared is, and the real models (fetched into the cache once).

Tests that need ``../shared`` (golden vectors, evaluation text) skip when it is absent, except
under ``QUANTREF_REQUIRE_SHARED=1`` (set by ``.ci/run``), where its absence is a failure: CI
must never pass by skipping the tests that matter.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_DATA = Path(__file__).resolve().parent / "data"


def _shared_dir() -> Path | None:
    env = os.environ.get("QUANTREF_SHARED")
    candidates = [Path(env)] if env else []
    candidates.append(ROOT.parent / "shared")
    for c in candidates:
        if (c / "data").is_dir() or (c / "golden").is_dir():
            return c
    return None


def _need(what: str) -> None:
    if os.environ.get("QUANTREF_REQUIRE_SHARED") == "1":
        pytest.fail(f"{what} is required (QUANTREF_REQUIRE_SHARED=1) but missing")
    pytest.skip(f"{what} not found (../shared is absent)")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    d = _shared_dir()
    if d is None:
        _need("../shared")
    return d


@pytest.fixture(scope="session")
def ppl_1k_text(shared_dir) -> str:
    p = shared_dir / "data" / "ppl_1k.txt"
    if not p.exists():
        _need(str(p))
    return p.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from quantref.fetch import model_path

    return model_path()


@pytest.fixture(scope="session")
def gemma_model_path() -> Path:
    from quantref.fetch import model_path

    return model_path("gemma3-270m")
