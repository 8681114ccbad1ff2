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


# ---------------------------------------------------------------------------
# the signal store (otter_gguf.runtime.signals)
# ---------------------------------------------------------------------------
def _row(*v):
    return np.array(v, dtype=np.float32)


@pytest.mark.parametrize("dense", [True, False])
def test_signal_store_put_get_array_truncate(dense):
    from otter_gguf.runtime.signals import SignalStore

    st = SignalStore(8, 2, token_head=False, dense=dense)
    st.keep_from = 0  # sparse: keep every row (as for full signals from position 0)
    assert st.dense is dense and st.get(0) is None and st.array(3).shape == (3, 2)
    assert np.isnan(st.array(3)).all()
    st.put(0, _row(1, 2))
    st.put(2, _row(5, 6))
    assert st.get(1) is None and st.get(-1) is None and st.get(8) is None
    np.testing.assert_array_equal(st.get(2), [5, 6])
    arr = st.array(3)
    np.testing.assert_array_equal(arr[[0, 2]], [[1, 2], [5, 6]])
    assert np.isnan(arr[1]).all() and st.hi == 3
    assert st.array(2).shape == (2, 2)  # positions >= n are not part of the array
    st.truncate(1)  # an n_tokens rewind to 1
    assert st.get(2) is None and st.hi == 1 and st.get(0) is not None
    st.truncate(5)  # beyond what was written: nothing happens
    np.testing.assert_array_equal(st.get(0), [1, 2])
    st.truncate(-3)
    assert st.get(0) is None and st.hi == 0


def test_signal_store_token_rewards_are_the_previous_row_at_the_token():
    from otter_gguf.runtime.signals import SignalStore

    st = SignalStore(6, 4, token_head=True)
    assert st.dense  # 6 x 4 floats
    st.note_token(0, 1)  # position 0 has no previous row
    st.put(0, _row(0.5, 1.5, 2.5, 3.5))
    st.note_token(1, 3)
    st.note_token(2, 0)  # no row at 1 yet
    st.note_token(1, 9)  # outside the row: ignored (the reward of 1 stays)
    assert st.token_reward(0) is None and st.token_reward(1) == 3.5 and st.token_reward(2) is None
    assert st.token_reward(6) is None and st.hi == 2
    st.truncate(1)
    assert st.token_reward(1) is None and st.get(0) is not None
    plain = SignalStore(6, 2, token_head=False)
    plain.put(0, _row(1, 2))
    plain.note_token(1, 1)
    assert plain.token_reward(1) is None and plain.tok_reward is None


def test_signal_store_sparse_keeps_only_the_latest_row_before_keep_from():
    from otter_gguf.runtime.signals import SignalStore

    st = SignalStore(16, 3, token_head=True, dense=False)
    for p in range(4):
        st.put(p, _row(p, p + 1, p + 2))
    assert sorted(st.rows) == [3]
    st.keep_from = 4
    for p in range(4, 7):
        st.note_token(p, 2)
        st.put(p, _row(10 * p, 10 * p + 1, 10 * p + 2))
    assert sorted(st.rows) == [4, 5, 6]  # 3 < keep_from went when 4 came (after giving 4 its reward)
    assert [st.token_reward(p) for p in (4, 5, 6)] == [5.0, 42.0, 52.0]


@pytest.mark.parametrize("dense", [True, False])
def test_signal_store_snapshot_restore(dense):
    from otter_gguf.runtime.signals import SignalStore

    st = SignalStore(10, 3, token_head=True, dense=dense)
    st.keep_from = 0
    for p, t in enumerate([2, 0, 1, 2]):
        st.note_token(p, t)
        st.put(p, _row(p, p + 0.25, p + 0.5))
    snap = st.snapshot(3)  # the state holds 3 tokens
    st.truncate(1)
    st.put(1, _row(-1, -1, -1))
    st.put(5, _row(7, 7, 7))
    st.restore(snap)
    assert st.hi == 3 and st.get(3) is None and st.get(5) is None
    np.testing.assert_array_equal(st.array(3), [[0, 0.25, 0.5], [1, 1.25, 1.5], [2, 2.25, 2.5]])
    assert [st.token_reward(p) for p in range(4)] == [None, 0.0, 1.25, None]
    st.put(4, _row(9, 9, 9))  # after restore, writing and truncating works as before
    st.truncate(3)
    assert st.get(4) is None and st.hi == 3
