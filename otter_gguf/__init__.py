"""otter-gguf: Otter reward heads on llama.cpp."""

__version__ = "0.1.0"
