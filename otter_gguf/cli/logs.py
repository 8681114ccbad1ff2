"""llama.cpp's log in the CLI: routed to Python logging, on stderr only with ``otter-gguf --verbose``.

llama-cpp-python prints llama.cpp's warnings (its level table predates ggml's
current one), so lines like "padding V cache" or "n_ctx_seq > n_ctx_train"
reached every user of ``run``. The group option ``--verbose`` calls
:func:`configure`; a command that loads a model calls :func:`route_llama_logs`
first, which sends llama.cpp's log to the logger ``otter_gguf.llama_cpp``
until the command ends. Without ``--verbose`` that logger shows errors only.
"""

from __future__ import annotations

import logging
import sys

import click

LOGGER_NAME = "otter_gguf.llama_cpp"  # = otter_gguf.io.llama_log.LOGGER_NAME (imported lazily)
_META = "otter_gguf.verbose"


class _StderrHandler(logging.StreamHandler):
    """Writes to the sys.stderr of the moment (click's test runner swaps it per call)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure(verbose: bool) -> None:
    """Show llama.cpp's log lines on stderr: all with ``verbose``, else errors only."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta[_META] = verbose
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.ERROR)
    logger.propagate = False


def verbose() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(_META, False))


def route_llama_logs() -> None:
    """Until the running command ends, llama.cpp's log goes to the logger (once per command)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None or ctx.meta.get(_META + ".routed"):
        return
    from otter_gguf.io.llama_log import llama_logs

    # collect no lines (level above CRITICAL); every line to the logger, which filters
    ctx.with_resource(llama_logs(level=logging.CRITICAL + 1, log_level=logging.DEBUG))
    ctx.meta[_META + ".routed"] = True
