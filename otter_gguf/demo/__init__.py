"""The embedded demo: a tiny trained base with an Otter sentiment head.

``python -m otter_gguf.demo`` (``make demo``) converts it and shows per-token
rewards and reward-guided generation; :mod:`otter_gguf.demo.train` reproduces
the weights from :mod:`otter_gguf.demo.corpus`.
"""

from pathlib import Path

#: the demo's HF base (``base/``), its Otter adapter (``adapter/``) and ``metrics.json``
DEMO_DIR = Path(__file__).resolve().parent

__all__ = ["DEMO_DIR"]
