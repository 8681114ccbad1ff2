"""The patched llama.cpp runtime: its C API (:mod:`.capi`), :class:`OtterLlama`, guidance and the build.

Importing :mod:`otter_gguf.runtime.llama` loads llama-cpp-python (and libllama);
:mod:`otter_gguf.runtime.build` does not.
"""
