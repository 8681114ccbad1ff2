"""otter-gguf's cache directory (the runtime's sdist and wheels, the PyPI models, the benchmark models)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """otter-gguf's cache: ``$OTTER_GGUF_CACHE``, else the platform's user cache
    directory (``~/.cache/otter-gguf`` on Linux). Holds the sdist, the extracted
    source, the runtime wheels and the benchmark models."""
    env = os.environ.get("OTTER_GGUF_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("otter-gguf"))
