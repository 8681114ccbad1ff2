"""The bottom layer: files and the outside world, one module per job.

``gguf_read`` (reading a GGUF), ``gguf_write`` (the one GGUF writer), ``outputs`` (atomic output
files), ``otter_read`` (reading and validating Otter GGUFs), ``errors`` (``InputError``),
``cache`` (the cache directory), ``llama_source`` (the pinned llama.cpp source, pip),
``llama_log`` (llama.cpp's log), ``llama_quantize`` (llama.cpp's quantizer), ``ggml_quant``
(ggml's quantizer), ``pypi_models`` (base models from PyPI), ``random_base`` (random base GGUFs).

It imports ``otter_gguf.format`` and nothing else of the project; ``llama_cpp`` only in
``llama_log`` and ``llama_quantize``, which wrap libllama on purpose (``ggml_quant`` loads
libggml-base by path). Importing it loads nothing of llama.cpp.
"""
