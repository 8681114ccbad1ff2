"""Errors raised by the converter."""

from __future__ import annotations


class ConvertError(ValueError):
    """A user error: bad input, bad option, mismatched base. The CLI exits 2."""
