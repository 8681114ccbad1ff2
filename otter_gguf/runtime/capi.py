"""ctypes bindings of the Otter C API of the patched llama.cpp (docs/RUNTIME.md).

The functions are bound to the shared library that llama-cpp-python already
loaded (``llama_cpp.llama_cpp._lib``), so that they operate on the same
``llama_model *`` / ``llama_context *`` pointers as llama-cpp-python's own
bindings. An unpatched runtime lacks the symbols: :func:`load` then raises
:class:`OtterRuntimeError` naming the missing function.

Example::

    from otter_gguf.runtime import capi as _lib
    lib = _lib.load()
    if lib.llama_model_has_otter(model):
        n_out = lib.llama_model_otter_n_out(model)
        ptr = lib.llama_get_otter_signals_ith(ctx, -1)   # POINTER(c_float) or None
"""

from __future__ import annotations

import ctypes
from typing import Any

__all__ = ["OtterRuntimeError", "load", "bind_available", "series", "signals", "FUNCTIONS"]


class OtterRuntimeError(RuntimeError):
    """The loaded llama.cpp library is not the Otter-patched runtime."""


_p = ctypes.c_void_p
_f32p = ctypes.POINTER(ctypes.c_float)

# name -> (restype, argtypes)
FUNCTIONS: dict[str, tuple[Any, list[Any]]] = {
    "llama_otter_series": (ctypes.c_char_p, []),
    # model
    "llama_model_has_otter": (ctypes.c_bool, [_p]),
    "llama_model_otter_n_out": (ctypes.c_int32, [_p]),
    "llama_model_otter_head_kind": (ctypes.c_char_p, [_p]),
    "llama_model_otter_n_signal_names": (ctypes.c_int32, [_p]),
    "llama_model_otter_signal_name": (ctypes.c_char_p, [_p, ctypes.c_int32]),
    # context
    "llama_set_otter": (None, [_p, ctypes.c_bool]),
    "llama_set_otter_all_positions": (None, [_p, ctypes.c_bool]),
    "llama_get_otter_signals": (_f32p, [_p]),
    "llama_get_otter_signals_ith": (_f32p, [_p, ctypes.c_int32]),
    "llama_get_otter_signals_pos": (_f32p, [_p, ctypes.c_int32]),
}

_bound: Any = None


def _llama_cpp_lib() -> ctypes.CDLL:
    try:
        from llama_cpp import llama_cpp as _ll
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise OtterRuntimeError(
            "llama-cpp-python is not installed; install the Otter runtime (otter-gguf build-runtime)"
        ) from e
    return _ll._lib


def load(lib: ctypes.CDLL | None = None) -> Any:
    """Declare the Otter functions on llama-cpp-python's library and return it.

    Raises :class:`OtterRuntimeError` if the library is not the patched runtime.
    """
    global _bound
    if lib is None and _bound is not None:
        return _bound
    target = lib if lib is not None else _llama_cpp_lib()
    missing = [name for name in FUNCTIONS if not hasattr(target, name)]
    if missing:
        path = getattr(target, "_name", "?")
        raise OtterRuntimeError(
            f"the llama.cpp library {path} is not the Otter-patched runtime "
            f"(missing {', '.join(missing)}); build it with `otter-gguf build-runtime` "
            f"or point LLAMA_CPP_LIB_PATH at a patched build"
        )
    for name, (restype, argtypes) in FUNCTIONS.items():
        fn = getattr(target, name)
        fn.restype = restype
        fn.argtypes = argtypes
    if lib is None:
        _bound = target
    return target


def bind_available(lib: ctypes.CDLL | None = None) -> dict[str, Any]:
    """name -> declared function, or None for each symbol the library lacks.

    Unlike :func:`load` this does not fail on a partial (or unpatched)
    runtime, so callers can say precisely what is missing.
    """
    target = lib if lib is not None else _llama_cpp_lib()
    out: dict[str, Any] = {}
    for name, (restype, argtypes) in FUNCTIONS.items():
        fn = getattr(target, name, None)
        if fn is not None:
            fn.restype = restype
            fn.argtypes = argtypes
        out[name] = fn
    return out


def series() -> str:
    """The patch series identifier of the loaded runtime ("otter-gguf/<series>")."""
    return load().llama_otter_series().decode()


def signals(ptr: Any, n_out: int) -> list[float] | None:
    """Copy ``n_out`` floats from a signal pointer (None stays None)."""
    if not ptr:
        return None
    return [float(ptr[i]) for i in range(n_out)]
