"""otter-gguf: Otter reward heads on llama.cpp."""

__version__ = "0.1.0"

__all__ = ["OtterLlama", "Guidance", "OtterScore", "DraftLlama"]


def __getattr__(name):
    # lazy: `import otter_gguf` must not import llama_cpp (and load libllama)
    if name in ("OtterLlama", "OtterScore"):
        from otter_gguf.runtime import llama as _llama

        return getattr(_llama, name)
    if name == "DraftLlama":
        from otter_gguf.runtime.draft import DraftLlama

        return DraftLlama
    if name == "Guidance":
        from otter_gguf.runtime.guidance import Guidance

        return Guidance
    raise AttributeError(f"module 'otter_gguf' has no attribute {name!r}")
