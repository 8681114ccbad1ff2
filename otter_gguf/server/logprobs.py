"""Log-probabilities of the served tokens, as llama-cpp-python's server returns them.

The values are llama-cpp-python's: ``Llama.logits_to_logprobs`` (log-softmax
in float32) of the base model's raw logits at the position before the token
(before sampling, penalties, grammar and reward guidance), the top ``n``
sorted as ``sorted(zip(logprobs, ids), reverse=True)[:n]`` plus the chosen
token. The shapes are the OpenAI API's:

* completions (``logprobs=N``): ``{"tokens", "text_offset", "token_logprobs",
  "top_logprobs"}`` (``text_offset`` counts from the start of the prompt text,
  as llama-cpp-python and OpenAI count it; with ``echo`` the prompt's tokens
  come first, the first of them without a value);
* chat (``logprobs: true``, ``top_logprobs: N``): ``{"content": [{"token",
  "logprob", "bytes", "top_logprobs": [...]}], "refusal": None}``, converted
  by llama-cpp-python's own ``_convert_text_completion_logprobs_to_chat``.

A :class:`TokenLogprobs` keeps the entries of one sequence's tokens; streamed
chunks take the entries of the tokens they carry, so they concatenate to the
non-streamed answer, and they stay aligned with the ``otter`` block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from llama_cpp import Llama
from llama_cpp.llama_chat_format import _convert_text_completion_logprobs_to_chat

__all__ = ["Entry", "entry", "TokenLogprobs", "to_chat"]


@dataclass
class Entry:
    """One token's log-probability and the ``n`` most likely tokens of its position."""

    logprob: float
    top: List[Tuple[int, float]]


def entry(logits: np.ndarray, token: int, n: int) -> Entry:
    """The :class:`Entry` of ``token`` sampled from raw ``logits`` (``[n_vocab]``)."""
    lp = Llama.logits_to_logprobs(np.asarray(logits, dtype=np.float32))
    top: List[Tuple[int, float]] = []
    if n > 0:
        k = min(lp.size, n + 16)  # the top n and any ties at its edge, sorted as llama-cpp-python sorts them
        part = np.argpartition(-lp, k - 1)[:k]
        order = part[np.lexsort((-part, -lp[part]))][:n]
        top = [(int(i), float(lp[i])) for i in order]
    return Entry(float(lp[int(token)]), top)


class TokenLogprobs:
    """The entries of one sequence's tokens (``None`` where a token has none: the first echoed
    prompt token), and their text: ``detokenize(tokens) -> bytes`` is the model's."""

    def __init__(self, detokenize: Callable[..., bytes], n: int, text_base: int, bos: Optional[int] = None):
        self.detokenize = detokenize
        self.n = n
        self.base = text_base
        self.bos = bos
        self.tokens: List[int] = []
        self.entries: List[Optional[Entry]] = []
        self._raw = b""  # the text bytes of tokens[:len(_ends)]
        self._ends: List[int] = []

    def add(self, token: int, e: Optional[Entry]) -> None:
        self.tokens.append(int(token))
        self.entries.append(e)
        self._raw += self.detokenize([int(token)])
        self._ends.append(len(self._raw))

    def __len__(self) -> int:
        return len(self.tokens)

    def _piece(self, t: int) -> str:
        return self.detokenize([t]).decode("utf-8", errors="ignore")

    def completion(self, start: int, count: int) -> dict:
        """The completion-shaped logprobs of tokens ``start .. start + count - 1`` (BOS left out)."""
        out: Dict[str, list] = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
        for idx in range(start, start + count):
            t = self.tokens[idx]
            if t == self.bos:
                continue
            s = self._piece(t)
            before = self._raw[: self._ends[idx - 1]] if idx else b""
            out["tokens"].append(s)
            out["text_offset"].append(self.base + len(before.decode("utf-8", errors="ignore")))
            e = self.entries[idx]
            if e is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            top = {self._piece(i): lp for i, lp in e.top}
            top[s] = e.logprob
            out["token_logprobs"].append(e.logprob)
            out["top_logprobs"].append(top)
        return out


def to_chat(lp: Optional[dict]) -> Optional[dict]:
    """Chat-shaped logprobs of completion-shaped ones (llama-cpp-python's conversion)."""
    return _convert_text_completion_logprobs_to_chat(lp) if lp is not None else None
