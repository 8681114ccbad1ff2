"""A llama.cpp model and its contexts through the C API, Otter heads included.

The one C-API harness of the tests, the runtime benchmark and ``otter-gguf bench``: tokens in;
logits, hidden states and Otter signals out; no tokenizer, no sampling (that is
:class:`~otter_gguf.runtime.llama.OtterLlama`'s job). It is built on llama-cpp-python's own
intermediate wrappers (``llama_cpp._internals.LlamaModel`` / ``LlamaContext`` / ``LlamaBatch``:
the native objects' lifetimes, a context freed before its model) and on :mod:`.capi` for the
Otter functions::

    from otter_gguf.runtime.session import Model

    m = Model("base.gguf")
    head = m.load_adapter("head.gguf")          # loaded for the model, run by no context yet
    c = m.context(n_ctx=512, heads=[head])      # this context runs it
    c.decode([1, 20, 21])
    c.logits_ith(-1), c.signals_ith(-1)
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, Optional, Sequence, Union

import numpy as np

from otter_gguf.runtime import capi

__all__ = ["Model", "Context"]

GGML_TYPE_F32 = 0  # ggml.h
_FLASH_ATTN = {False: 0, True: 1}  # LLAMA_FLASH_ATTN_TYPE_DISABLED / _ENABLED


def _ll():
    from llama_cpp import llama_cpp

    return llama_cpp


class Model:
    """A ``llama_model`` loaded from ``path`` (default model parameters unless ``params``; the
    offload keywords of :func:`otter_gguf.runtime.backends.model_params` set them otherwise).

    ``has_otter`` / ``n_out``: the model's own Otter head (a one-file Otter GGUF), if any.
    A ValueError if llama.cpp refuses the file (its error log says why)."""

    def __init__(self, path: Union[str, "os.PathLike[str]"], *, params: Any = None, verbose: bool = False,
                 **offload: Any):
        from llama_cpp import _internals

        from otter_gguf.runtime.backends import model_params

        ll = _ll()
        self.path = os.fspath(path)
        if params is None:
            params = model_params(**offload)  # n_gpu_layers, split_mode, main_gpu, tensor_split, rpc_servers
        self._params = params
        self._model = _internals.LlamaModel(path_model=self.path, params=params, verbose=verbose)
        self.ptr = self._model.model
        self.vocab = self._model.vocab
        self.n_vocab = int(ll.llama_vocab_n_tokens(self.vocab))
        self.n_embd = int(ll.llama_model_n_embd(self.ptr))
        self.has_otter = capi.available("llama_model_has_otter") and bool(capi.llama_model_has_otter(self.ptr))
        self.n_out = int(capi.llama_model_otter_n_out(self.ptr)) if self.has_otter else 0

    @property
    def own_adapter(self) -> Optional[int]:
        """The model's own head as an adapter (``llama_model_get_adapter_otter``), None without one."""
        return capi.llama_model_get_adapter_otter(self.ptr) or None

    def load_adapter(self, path: Union[str, "os.PathLike[str]"]) -> int:
        """``llama_adapter_otter_init``: an Otter adapter GGUF loaded for this model (freed with it);
        a ValueError naming the file if llama.cpp refuses it (its error log says why)."""
        ad = capi.llama_adapter_otter_init(self.ptr, os.fsencode(path))
        if not ad:
            raise ValueError(f"llama.cpp refused the Otter adapter {os.fspath(path)} (see its error log)")
        return ad

    def context(self, **kw: Any) -> "Context":
        return Context(self, **kw)

    def close(self) -> None:
        """Free the model (and any context still open on it)."""
        self._model.close()
        self.ptr = None


class Context:
    """A ``llama_context`` on ``model``.

    ``kv_f32``: an f32 KV cache (the tests' bit-exact comparisons) instead of llama.cpp's f16;
    ``kv_unified``: default on when ``n_seq_max > 1``; ``embeddings``: hidden states of every
    output row (pooling none); ``heads``: the Otter adapters the context runs
    (``llama_set_adapters_otter``; default: the model's own head, if any)."""

    def __init__(self, model: Model, *, n_ctx: int = 256, n_batch: int = 256, n_ubatch: Optional[int] = None,
                 n_seq_max: int = 1, kv_unified: Optional[bool] = None, n_threads: int = 2,
                 flash_attn: bool = False, kv_f32: bool = False, embeddings: bool = False,
                 cb_eval: Any = None, no_perf: bool = True, heads: Optional[Sequence[int]] = None):
        from llama_cpp import _internals

        ll = _ll()
        self.model = model
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = n_ubatch or n_batch
        cp.n_seq_max = n_seq_max
        cp.kv_unified = n_seq_max > 1 if kv_unified is None else bool(kv_unified)
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.flash_attn_type = _FLASH_ATTN[bool(flash_attn)]
        cp.no_perf = no_perf
        if kv_f32:
            cp.type_k = cp.type_v = GGML_TYPE_F32
        if cb_eval is not None:
            cp.cb_eval = cb_eval
        if embeddings:
            cp.embeddings = True
            cp.pooling_type = ll.LLAMA_POOLING_TYPE_NONE
        self._ctx = _internals.LlamaContext(model=model._model, params=cp, verbose=False)
        self.ptr = self._ctx.ctx
        self.n_batch = n_batch
        self.embeddings = embeddings
        self._batch = None
        if heads is not None and self.set_heads(heads) != 0:
            raise ValueError("llama.cpp refused the Otter heads for this context (see its error log)")

    # -- Otter heads
    @property
    def mem(self):
        """The context's ``llama_memory_t`` (re-created when its heads change)."""
        return self._ctx.memory

    @property
    def n_out(self) -> int:
        """Floats per signal row of the heads the context runs (0: none)."""
        return int(capi.llama_otter_n_out(self.ptr)) if capi.available("llama_otter_n_out") else 0

    def set_heads(self, adapters: Sequence[int]) -> int:
        """``llama_set_adapters_otter``: the heads the context runs, in signal order; its return code
        (0, or -1 with an error log and the heads unchanged). The memory is re-created (cleared)."""
        arr = (capi.llama_adapter_otter_p_ctypes * max(1, len(adapters)))(*adapters)
        rc = int(capi.llama_set_adapters_otter(self.ptr, arr, len(adapters)))
        self._ctx.memory = _ll().llama_get_memory(self.ptr)
        return rc

    def set_otter(self, enabled: bool) -> None:
        """``llama_set_otter``: pause (False) or resume the context's heads."""
        capi.llama_set_otter(self.ptr, bool(enabled))

    # -- decoding
    def _batch_for(self, n: int):
        from llama_cpp import _internals

        if self._batch is None or self._batch._n_tokens < n:
            if self._batch is not None:
                self._batch.close()
            self._batch = _internals.LlamaBatch(n_tokens=max(n, self.n_batch), embd=0, n_seq_max=1, verbose=False)
        return self._batch.batch

    def decode(self, tokens: Sequence[int], pos0: int = 0, seq: int = 0, logits: Any = "all",
               seqs: Optional[Sequence[int]] = None, positions: Optional[Sequence[int]] = None) -> None:
        """Decode one batch. ``logits``: "all", "last", "none" or one bool per token; ``seqs`` /
        ``positions`` override the sequence and the position (``pos0 + i``) per token."""
        n = len(tokens)
        b = self._batch_for(n)
        for i, t in enumerate(tokens):
            b.token[i] = int(t)
            b.pos[i] = positions[i] if positions is not None else pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seqs[i] if seqs is not None else seq
            if isinstance(logits, str):
                b.logits[i] = logits == "all" or (logits == "last" and i == n - 1)
            else:
                b.logits[i] = bool(logits[i])
        b.n_tokens = n
        rc = _ll().llama_decode(self.ptr, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def prefill(self, tokens: Sequence[int], pos0: int = 0) -> None:
        """Prompt processing in ``n_batch`` chunks; only the last token is an output row. An
        embeddings context decodes all but the last token with embeddings off (no output rows)."""
        ll = _ll()
        tokens = list(tokens)
        if self.embeddings and len(tokens) > 1:
            ll.llama_set_embeddings(self.ptr, False)
            try:
                for i in range(0, len(tokens) - 1, self.n_batch):
                    self.decode(tokens[i:min(i + self.n_batch, len(tokens) - 1)], pos0 + i, logits="none")
            finally:
                ll.llama_set_embeddings(self.ptr, True)
            self.decode(tokens[-1:], pos0 + len(tokens) - 1)
            return
        for i in range(0, len(tokens), self.n_batch):
            chunk = tokens[i:i + self.n_batch]
            self.decode(chunk, pos0 + i, logits="last" if i + len(chunk) == len(tokens) else "none")

    def batched_logits(self, tokens: Sequence[int], batch: int) -> np.ndarray:
        """Decode ``tokens`` (positions 0..) in batches of ``batch``: the logits of every token [n, V]."""
        rows = []
        for s in range(0, len(tokens), batch):
            chunk = tokens[s:s + batch]
            self.decode(chunk, pos0=s)
            rows += [self.logits_ith(i) for i in range(len(chunk))]
        return np.stack(rows)

    # -- outputs of the last decode (copies)
    def logits_ith(self, i: int) -> np.ndarray:
        p = _ll().llama_get_logits_ith(self.ptr, i)
        if not p:
            raise RuntimeError(f"no logits for batch index {i}")
        return np.ctypeslib.as_array(p, shape=(self.model.n_vocab,)).copy()

    def hidden_ith(self, i: int) -> np.ndarray:
        p = _ll().llama_get_embeddings_ith(self.ptr, i)
        if not p:
            raise RuntimeError(f"no hidden state for batch index {i}")
        return np.ctypeslib.as_array(p, shape=(self.model.n_embd,)).copy()

    def signals_ith(self, i: int) -> Optional[np.ndarray]:
        """Otter signals of batch index ``i`` (``llama_get_otter_signals_ith``), None where there are none."""
        p = capi.llama_get_otter_signals_ith(self.ptr, i)
        return np.ctypeslib.as_array(p, shape=(self.n_out,)).copy() if p else None

    def signals_pos(self, i: int) -> Optional[np.ndarray]:
        """All-positions mode: the signals of batch position ``i``, None where there are none."""
        p = capi.llama_get_otter_signals_pos(self.ptr, i)
        return np.ctypeslib.as_array(p, shape=(self.n_out,)).copy() if p else None

    # -- memory and state
    def seq_rm(self, seq: int, p0: int, p1: int = -1) -> bool:
        return bool(_ll().llama_memory_seq_rm(self.mem, seq, p0, p1))

    def clear(self) -> None:
        _ll().llama_memory_clear(self.mem, True)

    def state_save(self) -> bytes:
        ll = _ll()
        n = ll.llama_state_get_size(self.ptr)
        buf = (ctypes.c_uint8 * n)()
        w = ll.llama_state_get_data(self.ptr, buf, n)
        return bytes(buf[:w])

    def state_load(self, data: bytes) -> None:
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        r = _ll().llama_state_set_data(self.ptr, buf, len(data))
        if r != len(data):
            raise RuntimeError(f"llama_state_set_data read {r} of {len(data)} bytes")

    def close(self) -> None:
        if self._batch is not None:
            self._batch.close()
            self._batch = None
        self._ctx.close()
        self.ptr = None
