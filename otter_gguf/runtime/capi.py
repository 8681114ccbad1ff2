"""The Otter C API of the patched llama.cpp (docs/RUNTIME.md), typed ctypes bindings.

This module is the one declaration of the Otter functions (``include/llama.h``
hunks of patches/000*.patch), written in the style of llama-cpp-python's own
``llama_cpp/llama_cpp.py``: one typed Python function per C function. They are
bound to the shared library that llama-cpp-python already loaded
(``llama_cpp.llama_cpp._lib``), so that they operate on the same
``llama_model *`` / ``llama_context *`` pointers as llama-cpp-python's bindings.

Binding is lazy: importing this module neither imports llama_cpp nor needs a
patched library. Calling a function the loaded library lacks, or
:func:`load` / :func:`require` on an unpatched library, raises
:class:`OtterRuntimeError` naming the missing symbols and how to build the
runtime. :func:`available` / :func:`missing` ask without raising.

Example::

    from otter_gguf.runtime import capi

    if capi.llama_model_has_otter(model):
        n_out = capi.llama_model_otter_n_out(model)
        ptr = capi.llama_get_otter_signals_ith(ctx, -1)   # POINTER(c_float), NULL (falsy) on error

    lib = capi.load()            # this module, after checking every symbol is there
    lib.llama_otter_series()     # b"otter-gguf/<series>"
"""

from __future__ import annotations

import ctypes
import functools
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NewType, Optional, Tuple, TypeVar

if TYPE_CHECKING:  # pragma: no cover
    from llama_cpp._ctypes_extensions import CtypesPointer

__all__ = [
    "OtterRuntimeError", "NAMES", "MODEL_FUNCTIONS", "load", "require", "available", "missing",
    "otter_runtime_available", "series",
    "llama_otter_series",
    "llama_model_has_otter", "llama_model_otter_n_out", "llama_model_otter_head_kind",
    "llama_model_otter_n_signal_names", "llama_model_otter_signal_name",
    "llama_set_otter", "llama_set_otter_all_positions",
    "llama_get_otter_signals", "llama_get_otter_signals_ith", "llama_get_otter_signals_pos",
    "llama_adapter_otter_init", "llama_adapter_otter_free", "llama_adapter_otter_name", "llama_adapter_otter_n_out",
    "llama_adapter_otter_head_kind", "llama_adapter_otter_n_signal_names", "llama_adapter_otter_signal_name",
    "llama_model_get_adapter_otter", "llama_set_adapters_otter",
    "llama_otter_n_heads", "llama_otter_n_out",
]


class OtterRuntimeError(RuntimeError):
    """The loaded llama.cpp library is not the Otter-patched runtime."""


# the pointer types of llama-cpp-python's llama_cpp.py (same names, same ctypes)
llama_model_p = NewType("llama_model_p", int)
llama_model_p_ctypes = ctypes.c_void_p
llama_context_p = NewType("llama_context_p", int)
llama_context_p_ctypes = ctypes.c_void_p
llama_adapter_otter_p = NewType("llama_adapter_otter_p", int)
llama_adapter_otter_p_ctypes = ctypes.c_void_p

F = TypeVar("F", bound=Callable[..., Any])

# name -> (argtypes, restype), in declaration order; filled by @ctypes_function
_DECLARED: Dict[str, Tuple[List[Any], Any]] = {}
# name -> the library's function, argtypes/restype set (bound on first use)
_bound: Dict[str, Any] = {}
# the library the functions are bound to (None: llama-cpp-python's, loaded on first use)
_library: Any = None


def _llama_cpp_lib() -> Any:
    global _library
    if _library is None:
        try:
            from llama_cpp import llama_cpp as _ll
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise OtterRuntimeError(
                "llama-cpp-python is not installed; install the Otter runtime (otter-gguf build-runtime)"
            ) from e
        _library = _ll._lib
    return _library


def _use_library(lib: Any) -> Any:
    """Bind to ``lib`` from now on (None: llama-cpp-python's); returns the previous one. For tests."""
    global _library
    prev = _library
    _library = lib
    _bound.clear()
    return prev


def _missing_error(names: List[str]) -> OtterRuntimeError:
    path = getattr(_llama_cpp_lib(), "_name", "?")
    return OtterRuntimeError(
        f"the llama.cpp library {path} is not the Otter-patched runtime "
        f"(missing {', '.join(names)}); build it with `otter-gguf build-runtime` "
        f"or point LLAMA_CPP_LIB_PATH at a patched build"
    )


def _bind(name: str) -> Any:
    fn = _bound.get(name)
    if fn is None:
        fn = getattr(_llama_cpp_lib(), name, None)
        if fn is None:
            raise _missing_error([name])
        fn.argtypes, fn.restype = _DECLARED[name]
        _bound[name] = fn
    return fn


def ctypes_function(name: str, argtypes: List[Any], restype: Any) -> Callable[[F], F]:
    """Declare the C function ``name`` with the signature of the decorated stub.

    As llama-cpp-python's decorator of the same name, except that the symbol is
    looked up on first call (an unpatched library fails then, not at import).
    """

    def decorator(stub: F) -> F:
        _DECLARED[name] = (argtypes, restype)

        @functools.wraps(stub)
        def call(*args: Any) -> Any:
            fn = _bound.get(name)
            if fn is None:
                fn = _bind(name)
            return fn(*args)

        return call  # type: ignore[return-value]

    return decorator


# ---------------------------------------------------------------------------
# the series marker (the last patch)
# ---------------------------------------------------------------------------
# LLAMA_API const char * llama_otter_series(void);
@ctypes_function("llama_otter_series", [], ctypes.c_char_p)
def llama_otter_series() -> bytes:
    """Identifier of the patch series the library was built from: b"otter-gguf/<series>"."""
    ...


# ---------------------------------------------------------------------------
# patch 0003: the model
# ---------------------------------------------------------------------------
# LLAMA_API bool llama_model_has_otter(const struct llama_model * model);
@ctypes_function("llama_model_has_otter", [llama_model_p_ctypes], ctypes.c_bool)
def llama_model_has_otter(model: llama_model_p, /) -> bool:
    """True when the model carries an Otter side stream."""
    ...


# LLAMA_API int32_t llama_model_otter_n_out(const struct llama_model * model);
@ctypes_function("llama_model_otter_n_out", [llama_model_p_ctypes], ctypes.c_int32)
def llama_model_otter_n_out(model: llama_model_p, /) -> int:
    """Signals per row (0 without an Otter side stream)."""
    ...


# LLAMA_API const char * llama_model_otter_head_kind(const struct llama_model * model);
@ctypes_function("llama_model_otter_head_kind", [llama_model_p_ctypes], ctypes.c_char_p)
def llama_model_otter_head_kind(model: llama_model_p, /) -> Optional[bytes]:
    """b"reward" or b"token_reward" (None without an Otter side stream)."""
    ...


# LLAMA_API int32_t llama_model_otter_n_signal_names(const struct llama_model * model);
@ctypes_function("llama_model_otter_n_signal_names", [llama_model_p_ctypes], ctypes.c_int32)
def llama_model_otter_n_signal_names(model: llama_model_p, /) -> int:
    """Number of signal names of a "reward" head (0 for "token_reward")."""
    ...


# LLAMA_API const char * llama_model_otter_signal_name(const struct llama_model * model, int32_t i);
@ctypes_function("llama_model_otter_signal_name", [llama_model_p_ctypes, ctypes.c_int32], ctypes.c_char_p)
def llama_model_otter_signal_name(model: llama_model_p, i: int, /) -> Optional[bytes]:
    """Name of signal ``i`` (None when ``i`` is out of range)."""
    ...


# ---------------------------------------------------------------------------
# patch 0004: the context
# ---------------------------------------------------------------------------
# LLAMA_API void llama_set_otter(struct llama_context * ctx, bool enabled);
@ctypes_function("llama_set_otter", [llama_context_p_ctypes, ctypes.c_bool], None)
def llama_set_otter(ctx: llama_context_p, enabled: bool, /) -> None:
    """Pause (False) or resume the context's heads (paused: base graph and speed, the getters return
    NULL; the heads stay set, and positions decoded while paused have no side K/V)."""
    ...


# LLAMA_API void llama_set_otter_all_positions(struct llama_context * ctx, bool enabled);
@ctypes_function("llama_set_otter_all_positions", [llama_context_p_ctypes, ctypes.c_bool], None)
def llama_set_otter_all_positions(ctx: llama_context_p, enabled: bool, /) -> None:
    """All-positions mode: signals for every token of a batch, logits only where batch.logits[i]."""
    ...


# LLAMA_API float * llama_get_otter_signals(struct llama_context * ctx);
@ctypes_function("llama_get_otter_signals", [llama_context_p_ctypes], ctypes.POINTER(ctypes.c_float))
def llama_get_otter_signals(ctx: llama_context_p, /) -> CtypesPointer[ctypes.c_float]:
    """Signals of the output rows of the last decode, [n_outputs * n_out] (NULL when off)."""
    ...


# LLAMA_API float * llama_get_otter_signals_ith(struct llama_context * ctx, int32_t i);
@ctypes_function("llama_get_otter_signals_ith", [llama_context_p_ctypes, ctypes.c_int32],
                 ctypes.POINTER(ctypes.c_float))
def llama_get_otter_signals_ith(ctx: llama_context_p, i: int, /) -> CtypesPointer[ctypes.c_float]:
    """Signals of the ith token of the last batch, as llama_get_logits_ith (NULL for an invalid i)."""
    ...


# LLAMA_API float * llama_get_otter_signals_pos(struct llama_context * ctx, int32_t i);
@ctypes_function("llama_get_otter_signals_pos", [llama_context_p_ctypes, ctypes.c_int32],
                 ctypes.POINTER(ctypes.c_float))
def llama_get_otter_signals_pos(ctx: llama_context_p, i: int, /) -> CtypesPointer[ctypes.c_float]:
    """All-positions mode: signals of the token at batch index i, any token (NULL otherwise)."""
    ...


# ---------------------------------------------------------------------------
# patches 0003 and 0004: Otter adapters (loaded per model, activated per context)
# ---------------------------------------------------------------------------
# LLAMA_API struct llama_adapter_otter * llama_adapter_otter_init(struct llama_model * model, const char * path_otter);
@ctypes_function("llama_adapter_otter_init", [llama_model_p_ctypes, ctypes.c_char_p], llama_adapter_otter_p_ctypes)
def llama_adapter_otter_init(model: llama_model_p, path: bytes, /) -> Optional[llama_adapter_otter_p]:
    """Load an Otter adapter GGUF for ``model`` (no context runs it until
    :func:`llama_set_adapters_otter`); None with an error log when it is malformed or made for
    another base. Freed with the model."""
    ...


# LLAMA_API struct llama_adapter_otter * llama_model_get_adapter_otter(const struct llama_model * model);
@ctypes_function("llama_model_get_adapter_otter", [llama_model_p_ctypes], llama_adapter_otter_p_ctypes)
def llama_model_get_adapter_otter(model: llama_model_p, /) -> Optional[llama_adapter_otter_p]:
    """The head a one-file Otter GGUF carries, as an adapter of its model (None without one); a new
    context of the model runs it."""
    ...


# LLAMA_API void llama_adapter_otter_free(struct llama_adapter_otter * adapter);
@ctypes_function("llama_adapter_otter_free", [llama_adapter_otter_p_ctypes], None)
def llama_adapter_otter_free(adapter: llama_adapter_otter_p, /) -> None:
    """Free an adapter loaded with :func:`llama_adapter_otter_init` that no context runs (otherwise
    an error log, and it stays loaded until the model is freed)."""
    ...


# LLAMA_API int32_t llama_set_adapters_otter(struct llama_context * ctx, struct llama_adapter_otter ** adapters,
#                                            size_t n_adapters);
@ctypes_function("llama_set_adapters_otter",
                 [llama_context_p_ctypes, ctypes.POINTER(llama_adapter_otter_p_ctypes), ctypes.c_size_t],
                 ctypes.c_int32)
def llama_set_adapters_otter(ctx: llama_context_p, adapters: Any, n_adapters: int, /) -> int:
    """Set the heads ``ctx`` runs, in signal order (0 of them: the base graph). The context's memory is
    re-created and cleared (call llama_get_memory again). 0, or -1 with an error log (an adapter of
    another model or already freed, one listed twice) and the context keeps its heads."""
    ...


# LLAMA_API const char * llama_adapter_otter_name(const struct llama_adapter_otter * adapter);
@ctypes_function("llama_adapter_otter_name", [llama_adapter_otter_p_ctypes], ctypes.c_char_p)
def llama_adapter_otter_name(adapter: llama_adapter_otter_p, /) -> bytes:
    """The adapter's general.name (b"" if absent)."""
    ...


# LLAMA_API int32_t llama_adapter_otter_n_out(const struct llama_adapter_otter * adapter);
@ctypes_function("llama_adapter_otter_n_out", [llama_adapter_otter_p_ctypes], ctypes.c_int32)
def llama_adapter_otter_n_out(adapter: llama_adapter_otter_p, /) -> int:
    """Signals per row of the adapter's head."""
    ...


# LLAMA_API const char * llama_adapter_otter_head_kind(const struct llama_adapter_otter * adapter);
@ctypes_function("llama_adapter_otter_head_kind", [llama_adapter_otter_p_ctypes], ctypes.c_char_p)
def llama_adapter_otter_head_kind(adapter: llama_adapter_otter_p, /) -> bytes:
    """b"reward" or b"token_reward"."""
    ...


# LLAMA_API int32_t llama_adapter_otter_n_signal_names(const struct llama_adapter_otter * adapter);
@ctypes_function("llama_adapter_otter_n_signal_names", [llama_adapter_otter_p_ctypes], ctypes.c_int32)
def llama_adapter_otter_n_signal_names(adapter: llama_adapter_otter_p, /) -> int:
    """Number of signal names of a "reward" head (0 for "token_reward")."""
    ...


# LLAMA_API const char * llama_adapter_otter_signal_name(const struct llama_adapter_otter * adapter, int32_t i);
@ctypes_function("llama_adapter_otter_signal_name", [llama_adapter_otter_p_ctypes, ctypes.c_int32], ctypes.c_char_p)
def llama_adapter_otter_signal_name(adapter: llama_adapter_otter_p, i: int, /) -> Optional[bytes]:
    """Name of signal ``i`` (None when ``i`` is out of range)."""
    ...


# LLAMA_API int32_t llama_otter_n_heads(const struct llama_context * ctx);
@ctypes_function("llama_otter_n_heads", [llama_context_p_ctypes], ctypes.c_int32)
def llama_otter_n_heads(ctx: llama_context_p, /) -> int:
    """Otter heads the context runs (those last set with :func:`llama_set_adapters_otter`)."""
    ...


# LLAMA_API int32_t llama_otter_n_out(const struct llama_context * ctx);
@ctypes_function("llama_otter_n_out", [llama_context_p_ctypes], ctypes.c_int32)
def llama_otter_n_out(ctx: llama_context_p, /) -> int:
    """Floats per signal row: the heads' n_out summed (rows are concatenated head by head)."""
    ...


NAMES: Tuple[str, ...] = tuple(_DECLARED)
"""Every function of the Otter C API, in declaration order."""

MODEL_FUNCTIONS: Tuple[str, ...] = tuple(n for n in NAMES if n.startswith("llama_model_"))
"""The functions that describe a model's Otter head (patch 0003)."""


# ---------------------------------------------------------------------------
# availability
# ---------------------------------------------------------------------------
def missing(*names: str) -> List[str]:
    """Those of ``names`` (default: all of :data:`NAMES`) the loaded library lacks."""
    lib = _llama_cpp_lib()
    return [n for n in (names or NAMES) if n not in _bound and not hasattr(lib, n)]


def available(*names: str) -> bool:
    """True when the loaded library has every one of ``names`` (default: the whole API)."""
    return not missing(*names)


def otter_runtime_available() -> bool:
    """True when the loaded libllama exposes the Otter signal API (the model functions and
    ``llama_get_otter_signals_ith``)."""
    return available(*MODEL_FUNCTIONS, "llama_get_otter_signals_ith")


def require(*names: str) -> None:
    """Bind ``names`` (default: the whole API); :class:`OtterRuntimeError` naming any missing."""
    names = names or NAMES
    unknown = [n for n in names if n not in _DECLARED]
    if unknown:
        raise ValueError(f"not an Otter C API function: {', '.join(unknown)}")
    gone = missing(*names)
    if gone:
        raise _missing_error(gone)
    for n in names:
        _bind(n)


def load() -> ModuleType:
    """:func:`require` the whole API and return this module (``lib.llama_model_otter_n_out(model)``)."""
    require()
    return sys.modules[__name__]


def series() -> str:
    """The patch series identifier of the loaded runtime ("otter-gguf/<series>")."""
    require("llama_otter_series")
    return llama_otter_series().decode()
