"""The Otter adapter format (docs/OTTER.md §5): config, weights, GGUF names. numpy only, no torch.

Everything else imports this layer; it imports nothing of the project's.
"""

from otter_gguf.format.adapter import OtterAdapter, check_against_base, load_adapter, open_adapter, save_adapter
from otter_gguf.format.config import AdapterError, OtterConfig

__all__ = ["AdapterError", "OtterAdapter", "OtterConfig", "check_against_base", "load_adapter", "open_adapter",
           "save_adapter"]
