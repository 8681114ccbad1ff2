"""The patched llama.cpp runtime and OtterLlama.

* :mod:`.capi`: the typed Otter C API (bound lazily to llama-cpp-python's libllama);
* :mod:`.llama`: :class:`~.llama.OtterLlama`, delegating to its parts
  :mod:`.signals` (signal source and per-position store), :mod:`.completion`
  (the ``otter`` blocks of results), :mod:`.guided` (guidance during
  generation; the rules are in :mod:`.guidance`) and :mod:`.score`;
* :mod:`.build`: building and installing the patched runtime.

Importing :mod:`otter_gguf.runtime.llama` loads llama-cpp-python (and libllama);
:mod:`.build`, :mod:`.capi`, :mod:`.guidance`, :mod:`.signals`,
:mod:`.completion`, :mod:`.guided` and :mod:`.score` do not.
"""
