"""Helpers for the runtime tests: drive the patched llama.cpp through
llama-cpp-python's low-level bindings plus the Otter C API (otter_gguf.runtime.capi).

No tests here; imported by tests/test_runtime*.py.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

GGML_TYPE_F32 = 0
FA_DISABLED = 0
FA_ENABLED = 1


class Model:
    def __init__(self, ll, lib, path: Path):
        self.ll, self.lib = ll, lib
        p = ll.llama_model_default_params()
        self.ptr = ll.llama_model_load_from_file(str(path).encode(), p)
        if not self.ptr:
            raise ValueError(f"failed to load {path}")
        self.vocab = ll.llama_model_get_vocab(self.ptr)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self.has_otter = bool(lib.llama_model_has_otter(self.ptr))
        self.n_out = lib.llama_model_otter_n_out(self.ptr)

    def close(self):
        if self.ptr:
            self.ll.llama_model_free(self.ptr)
            self.ptr = None

    def context(self, **kw) -> "Context":
        return Context(self, **kw)


class Context:
    def __init__(self, model: Model, *, n_ctx=256, n_batch=256, n_ubatch=None, n_seq_max=1,
                 n_threads=2, flash_attn=False, kv_f32=True):
        ll = model.ll
        self.ll, self.lib, self.model = ll, model.lib, model
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = n_ubatch or n_batch
        cp.n_seq_max = n_seq_max
        cp.n_threads = n_threads
        cp.n_threads_batch = n_threads
        cp.flash_attn_type = FA_ENABLED if flash_attn else FA_DISABLED
        if kv_f32:
            cp.type_k = GGML_TYPE_F32
            cp.type_v = GGML_TYPE_F32
        self.ptr = ll.llama_init_from_model(model.ptr, cp)
        if not self.ptr:
            raise ValueError("failed to create context")
        self.mem = ll.llama_get_memory(self.ptr)

    def close(self):
        if self.ptr:
            self.ll.llama_free(self.ptr)
            self.ptr = None

    def decode(self, tokens, pos0=0, seq=0, logits="all", seqs=None, positions=None):
        """Decode one batch. tokens: list[int]; seqs/positions override per token.
        logits: "all", "last" or a list of bools."""
        ll = self.ll
        n = len(tokens)
        b = ll.llama_batch_init(n, 0, 1)
        try:
            for i, t in enumerate(tokens):
                b.token[i] = int(t)
                b.pos[i] = positions[i] if positions is not None else pos0 + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seqs[i] if seqs is not None else seq
                if logits == "all":
                    b.logits[i] = 1
                elif logits == "last":
                    b.logits[i] = 1 if i == n - 1 else 0
                else:
                    b.logits[i] = 1 if logits[i] else 0
            b.n_tokens = n
            rc = ll.llama_decode(self.ptr, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
        finally:
            ll.llama_batch_free(b)

    def logits_ith(self, i) -> np.ndarray:
        p = self.ll.llama_get_logits_ith(self.ptr, i)
        assert p
        return np.ctypeslib.as_array(p, shape=(self.model.n_vocab,)).copy()

    def signals_ith(self, i):
        p = self.lib.llama_get_otter_signals_ith(self.ptr, i)
        if not p:
            return None
        return np.ctypeslib.as_array(p, shape=(self.model.n_out,)).copy()

    def signals_pos(self, i):
        p = self.lib.llama_get_otter_signals_pos(self.ptr, i)
        if not p:
            return None
        return np.ctypeslib.as_array(p, shape=(self.model.n_out,)).copy()

    def seq_rm(self, seq, p0, p1=-1):
        return self.ll.llama_memory_seq_rm(self.mem, seq, p0, p1)

    def clear(self):
        self.ll.llama_memory_clear(self.mem, True)

    def state_save(self) -> bytes:
        ll = self.ll
        n = ll.llama_state_get_size(self.ptr)
        buf = (ctypes.c_uint8 * n)()
        w = ll.llama_state_get_data(self.ptr, buf, n)
        return bytes(buf[:w])

    def state_load(self, data: bytes):
        ll = self.ll
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        r = ll.llama_state_set_data(self.ptr, buf, len(data))
        assert r == len(data), (r, len(data))


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
