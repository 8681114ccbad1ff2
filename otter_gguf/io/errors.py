"""The error of bad input (a file or an option that is not what was expected)."""

from __future__ import annotations


class InputError(ValueError):
    """A user error: bad input, bad option, mismatched base. The CLI exits 2.

    ``otter_gguf_converter.ConvertError`` is this class (the converter's public name for it)."""
