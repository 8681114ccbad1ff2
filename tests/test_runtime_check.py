"""The suite's one runtime check (helpers.require_otter_runtime) fails, never
skips: on a library without the Otter API, on another patch series, and
without llama_cpp. Fake libraries and a fake llama_cpp module: no runtime."""

from __future__ import annotations

import sys
from types import ModuleType

import pytest

from helpers import otter_runtime_problem, require_otter_runtime
from otter_gguf.runtime import capi
from otter_gguf.runtime.build import SERIES_PREFIX, series_id

pytestmark = pytest.mark.unit

WANT = SERIES_PREFIX + series_id()


class FakeLib:
    """Stands in for the loaded libllama: attributes are its exported symbols."""

    _name = "/fake/libllama.so"

    def __init__(self, series: bytes | None = None, drop=()):
        if series is not None:
            for name in capi.NAMES:
                if name not in drop:
                    setattr(self, name, lambda *a: None)
            self.llama_otter_series = lambda: series


def fake_llama_cpp(monkeypatch, lib) -> None:
    pkg, mod = ModuleType("llama_cpp"), ModuleType("llama_cpp.llama_cpp")
    mod._lib = lib
    pkg.llama_cpp = mod
    monkeypatch.setitem(sys.modules, "llama_cpp", pkg)
    monkeypatch.setitem(sys.modules, "llama_cpp.llama_cpp", mod)


def test_current_series_passes():
    assert otter_runtime_problem(FakeLib(WANT.encode()), WANT) is None


def test_plain_library_lacks_the_otter_api():
    msg = otter_runtime_problem(FakeLib(), WANT)
    assert "/fake/libllama.so lacks the Otter API" in msg
    assert "llama_otter_series" in msg and "llama_get_otter_signals_ith" in msg


def test_partly_patched_library_names_what_is_missing():
    msg = otter_runtime_problem(FakeLib(WANT.encode(), drop=("llama_get_otter_signals_pos",)), WANT)
    assert msg.endswith("(missing llama_get_otter_signals_pos)")


def test_other_series_is_a_problem():
    msg = otter_runtime_problem(FakeLib(b"otter-gguf/0123456789abcdef"), WANT)
    assert "'otter-gguf/0123456789abcdef'" in msg and repr(WANT) in msg


def test_dev_build_only_with_dev_ok():
    dev = FakeLib((SERIES_PREFIX + "dev").encode())
    assert otter_runtime_problem(dev, WANT, dev_ok=True) is None
    assert "'otter-gguf/dev'" in otter_runtime_problem(dev, WANT)


@pytest.mark.parametrize("lib", [FakeLib(), FakeLib(b"otter-gguf/stale")], ids=["unpatched", "stale"])
def test_require_fails_on_a_wrong_library(monkeypatch, lib):
    monkeypatch.delenv("LLAMA_CPP_LIB_PATH", raising=False)
    fake_llama_cpp(monkeypatch, lib)
    with pytest.raises(pytest.fail.Exception, match=r"/fake/libllama.so .*: run `make runtime`"):
        require_otter_runtime()


def test_require_fails_without_llama_cpp(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    with pytest.raises(pytest.fail.Exception, match=r"llama-cpp-python is not importable .*make runtime"):
        require_otter_runtime()


def test_require_returns_the_bindings_of_a_current_library(monkeypatch):
    lib = FakeLib(WANT.encode())
    fake_llama_cpp(monkeypatch, lib)
    assert require_otter_runtime()._lib is lib
