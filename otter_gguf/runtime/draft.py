"""Drafters for speculative decoding: a small GGUF with the base's vocabulary.

llama-cpp-python ships one drafter, prompt lookup (``LlamaPromptLookupDecoding``);
:class:`DraftLlama` is the other kind llama.cpp users run (llama-server's
``--model-draft``): a small model of the same family proposing its greedy
continuation. Both are ``LlamaDraftModel``\\ s, so they plug into
``OtterLlama(..., draft_model=...)`` and ``otter-gguf serve`` alike.

A draft must share the base's vocabulary (its ids are the base's ids):
:func:`vocab_signature` fingerprints a vocabulary and :func:`check_vocab`
refuses a mismatch naming both models.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional

import numpy as np
import numpy.typing as npt
from llama_cpp.llama_speculative import LlamaDraftModel

__all__ = ["DraftLlama", "vocab_signature", "check_vocab"]


def vocab_signature(model: Any) -> tuple:
    """``(n_vocab, sha256 of every token's text and type)`` of a ``llama_cpp._internals.LlamaModel``."""
    import llama_cpp

    vocab = model.vocab
    n = int(llama_cpp.llama_vocab_n_tokens(vocab))
    h = hashlib.sha256()
    for t in range(n):
        h.update(llama_cpp.llama_vocab_get_text(vocab, t) or b"")
        h.update(int(llama_cpp.llama_vocab_get_attr(vocab, t)).to_bytes(4, "little", signed=True))
        h.update(b"\0")
    return n, h.hexdigest()[:16]


def check_vocab(base: Any, base_name: str, draft: Any, draft_name: str) -> None:
    """ValueError unless the two models (``LlamaModel``\\ s) have the same vocabulary."""
    a, b = vocab_signature(base), vocab_signature(draft)
    if a != b:
        raise ValueError(f"draft model {draft_name} has a vocabulary of {b[0]} tokens (fingerprint {b[1]}) but the "
                         f"base {base_name} has {a[0]} tokens (fingerprint {a[1]}): a draft model must share the "
                         f"base's vocabulary")


class DraftLlama(LlamaDraftModel):
    """A small GGUF proposing ``num_pred_tokens`` greedy tokens after the ids it is given.

    It keeps its own context and reuses the longest prefix it already holds (``Llama.generate``'s
    prefix match), so one request's successive drafts cost only the new tokens. ``kwargs`` go to
    ``llama_cpp.Llama`` (``n_ctx``, ``n_threads``, ``n_gpu_layers``, ...).
    """

    def __init__(self, model_path: str, num_pred_tokens: int = 4, *, n_ctx: int = 4096,
                 n_threads: Optional[int] = None, verbose: bool = False, **kwargs: Any):
        from llama_cpp import Llama

        if not isinstance(num_pred_tokens, int) or isinstance(num_pred_tokens, bool) or not 1 <= num_pred_tokens <= 64:
            raise ValueError(f"num_pred_tokens must be an integer in 1..64, got {num_pred_tokens!r}")
        self.model_path = str(model_path)
        self.num_pred_tokens = num_pred_tokens
        self.llm = Llama(self.model_path, n_ctx=n_ctx, n_threads=n_threads, verbose=verbose, **kwargs)

    @property
    def model(self) -> Any:
        """The draft's ``LlamaModel`` (for :func:`check_vocab`)."""
        return self.llm._model

    def __call__(self, input_ids: npt.NDArray[np.intc], /, **kwargs: Any) -> npt.NDArray[np.intc]:
        ids = [int(t) for t in input_ids]
        room = self.llm.n_ctx() - len(ids)
        n = min(self.num_pred_tokens, room)
        if n <= 0 or not ids:
            return np.zeros(0, dtype=np.intc)
        out = []
        gen = self.llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0)
        try:
            for t in gen:
                out.append(int(t))
                if len(out) >= n:
                    break
        finally:
            gen.close()
        return np.asarray(out, dtype=np.intc)
