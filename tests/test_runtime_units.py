"""Unit tests of the runtime's parts that need no model and no patched library:
the typed Otter C API declaration (otter_gguf.runtime.capi) against a fake library.
"""

from __future__ import annotations

import ctypes
import inspect
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from otter_gguf.runtime import capi

pytestmark = pytest.mark.unit


class FakeLib(SimpleNamespace):
    """A stand-in for a ctypes.CDLL: attributes are the exported symbols."""

    _name = "/fake/libllama.so"


@pytest.fixture
def fake_lib():
    """Bind capi to a fake library for the test, then back to llama-cpp-python's."""
    libs = []

    def use(**symbols):
        lib = FakeLib(**symbols)
        libs.append(capi._use_library(lib))
        return lib

    yield use
    if libs:
        capi._use_library(libs[0])


def test_capi_declares_the_patch_series_functions_with_their_c_signatures():
    from pathlib import Path

    header = "".join(p.read_text() for p in sorted(Path(__file__).parents[1].glob("patches/000*.patch")))
    declared = {line.split("(")[0].split()[-1].lstrip("*")
                for line in header.splitlines() if line.startswith("+") and "LLAMA_API" in line and "otter" in line}
    assert set(capi.NAMES) == declared and len(capi.NAMES) == 11
    sig = inspect.signature(capi.llama_model_otter_n_out)
    assert list(sig.parameters) == ["model"] and sig.return_annotation == "int"
    assert inspect.signature(capi.llama_otter_series).return_annotation == "bytes"
    assert inspect.signature(capi.llama_model_has_otter).return_annotation == "bool"
    assert list(inspect.signature(capi.llama_get_otter_signals_pos).parameters) == ["ctx", "i"]
    assert capi._DECLARED["llama_model_otter_signal_name"] == ([ctypes.c_void_p, ctypes.c_int32], ctypes.c_char_p)
    assert capi._DECLARED["llama_set_otter"] == ([ctypes.c_void_p, ctypes.c_bool], None)
    assert capi._DECLARED["llama_get_otter_signals_ith"][1] is ctypes.POINTER(ctypes.c_float)
    assert capi.MODEL_FUNCTIONS == ("llama_model_has_otter", "llama_model_otter_n_out", "llama_model_otter_head_kind",
                                    "llama_model_otter_n_signal_names", "llama_model_otter_signal_name")


def test_capi_import_loads_no_library():
    code = "import sys; from otter_gguf.runtime import capi; print('llama_cpp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_capi_binds_lazily_and_sets_the_declared_types(fake_lib):
    calls = []

    def n_out(model):
        calls.append(model)
        return 3

    lib = fake_lib(llama_model_otter_n_out=n_out, llama_otter_series=lambda: b"otter-gguf/abc")
    assert not hasattr(n_out, "argtypes")  # nothing bound before the first call
    assert capi.llama_model_otter_n_out(7) == 3 and calls == [7]
    assert n_out.argtypes == [ctypes.c_void_p] and n_out.restype is ctypes.c_int32
    assert capi.series() == "otter-gguf/abc"
    assert lib.llama_otter_series.restype is ctypes.c_char_p


def test_capi_unpatched_library_names_what_is_missing(fake_lib):
    fake_lib(llama_otter_series=lambda: b"otter-gguf/abc", llama_model_has_otter=lambda m: True)
    assert capi.available("llama_otter_series", "llama_model_has_otter")
    assert not capi.available() and not capi.otter_runtime_available()
    assert capi.missing("llama_model_has_otter", "llama_set_otter") == ["llama_set_otter"]
    with pytest.raises(capi.OtterRuntimeError, match=r"/fake/libllama\.so.*missing llama_set_otter\)"
                                                     r".*otter-gguf build-runtime"):
        capi.llama_set_otter(1, True)
    with pytest.raises(capi.OtterRuntimeError) as e:
        capi.load()
    assert "llama_model_otter_n_out, llama_model_otter_head_kind" in str(e.value)
    assert "llama_otter_series," not in str(e.value)
    capi.require("llama_model_has_otter")  # present: no error
    with pytest.raises(ValueError, match="not an Otter C API function: llama_decode"):
        capi.require("llama_decode")


def test_capi_load_returns_the_typed_module(fake_lib):
    fake_lib(**{n: (lambda *a: 0) for n in capi.NAMES})
    lib = capi.load()
    assert lib is capi and capi.otter_runtime_available()
    assert inspect.signature(lib.llama_model_otter_n_out) == inspect.signature(capi.llama_model_otter_n_out)
