"""llama.cpp's (and ggml's) log, routed to Python ``logging`` and/or a list (:func:`llama_logs`).

Wraps libllama's ``llama_log_set`` on purpose: ``llama_cpp`` is imported inside
:func:`llama_logs` only, so importing this module loads nothing of llama.cpp.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from typing import Iterator

__all__ = ["LOGGER_NAME", "llama_logs"]

LOGGER_NAME = "otter_gguf.llama_cpp"

# ggml_log_level (ggml.h): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous line)
_GGML_LEVELS = {0: logging.INFO, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_GGML_CONT = 5

_active: list = []  # the callbacks of the open llama_logs() blocks: kept alive while llama.cpp holds them


def _get_log_callback(llama_cpp):
    """llama.cpp's current (callback, user_data), or None where llama_log_get is missing."""
    get = getattr(llama_cpp, "llama_log_get", None)
    if get is None:  # pragma: no cover - older bindings
        return None
    cb, ud = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    try:
        get(ctypes.byref(cb), ctypes.byref(ud))
    except Exception:  # pragma: no cover - a libllama without llama_log_get
        return None
    return cb, ud


@contextlib.contextmanager
def llama_logs(lines: list[str] | None = None, *, level: int = logging.DEBUG,
               log_level: int | None = logging.DEBUG) -> Iterator[list[str]]:
    """Route llama.cpp's (and ggml's) log while the block runs; yields ``lines``.

    Every complete, non-blank line (llama.cpp sends fragments; they are joined
    up to the newline, which is dropped) of ``level`` or above (Python ``logging``
    levels) is appended to ``lines`` (a new list when None), and every line
    of ``log_level`` or above goes to the logger ``otter_gguf.llama_cpp``
    (``log_level=None``: none, the block is quiet). On exit the callback that
    was set before is restored (llama-cpp-python's own, or the enclosing
    block's).
    """
    import llama_cpp

    out: list[str] = [] if lines is None else lines
    logger = logging.getLogger(LOGGER_NAME)
    state = {"buf": "", "level": logging.INFO}

    def emit(text: str, lvl: int) -> None:
        if not text.strip():
            return
        if lvl >= level:
            out.append(text)
        if log_level is not None and lvl >= log_level:
            logger.log(lvl, "%s", text)

    @llama_cpp.llama_log_callback
    def _callback(ggml_level, text, user_data):  # called from C
        s = text.decode("utf-8", "replace") if text else ""
        if ggml_level != _GGML_CONT:
            if state["buf"]:  # a new message: the unterminated previous one is complete
                emit(state["buf"], state["level"])
                state["buf"] = ""
            state["level"] = _GGML_LEVELS.get(ggml_level, logging.INFO)
        *done, state["buf"] = (state["buf"] + s).split("\n")
        for line in done:
            emit(line, state["level"])

    previous = _get_log_callback(llama_cpp)
    _active.append(_callback)
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
    try:
        yield out
    finally:
        if previous is not None and ctypes.cast(previous[0], ctypes.c_void_p).value:
            llama_cpp.llama_log_set(previous[0], previous[1])
        else:  # pragma: no cover - no llama_log_get: llama-cpp-python's own callback
            from llama_cpp import _logger

            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        _active.remove(_callback)
        if state["buf"]:
            emit(state["buf"], state["level"])
