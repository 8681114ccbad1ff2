"""Errors raised by the converter: bad input is :class:`otter_gguf.io.errors.InputError`, the same class
under the converter's public name (the GGUF reader of the bottom layer raises it too)."""

from __future__ import annotations

from otter_gguf.io.errors import InputError as ConvertError

__all__ = ["ConvertError"]
