"""``OtterLlama.score()``: per-token Otter signals of given text or tokens, without sampling
(docs/API.md, "score()").

:func:`score` decodes the tokens from position 0 in the runtime's
all-positions mode (signals for every token, vocab logits only for the last
one) in ``n_batch`` chunks; :class:`OtterScore` is its result. The input
checks (:func:`token_ids`, :func:`check_tokens`) and :class:`OtterScore` need
numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from otter_gguf.runtime.signals import MIXED, SignalLayout

__all__ = ["OtterScore", "score", "token_ids", "check_tokens"]


@dataclass
class OtterScore:
    """Per-token Otter signals of a given token sequence (no sampling).

    ``signals[j]`` is the signal at position ``j``: the head's output on the
    hidden state after consuming ``tokens[j]`` (docs/OTTER.md §3); with several heads
    their rows concatenated head by head. ``layout``: a ``"mixed"`` context's
    (several heads, a token_reward head among them), where ``signal_names`` name
    :attr:`values`' columns rather than ``signals``'.
    """

    tokens: List[int]
    signals: np.ndarray  # [len(tokens), n_out] float32
    signal_names: List[str]
    head_kind: str
    token_texts: List[str] = field(default_factory=list)
    layout: Optional[SignalLayout] = None

    def __post_init__(self) -> None:
        if self.head_kind == MIXED and self.layout is None:
            raise ValueError("OtterScore of several heads with a token_reward head among them needs their "
                             "SignalLayout (layout=SignalLayout.of(llm.otter_heads))")

    @property
    def values(self) -> np.ndarray:
        """``[len(tokens), len(signal_names)]``: the value of each named signal per token (a
        token_reward head's: its token reward, NaN at j == 0). ``signals`` itself for one head or
        several reward heads."""
        if self.layout is None:
            return self.signals
        return self.layout.values(self.signals, self.tokens)

    @property
    def rewards(self) -> Dict[str, np.ndarray]:
        """reward heads (and several heads): ``{name: [len(tokens)] values}``."""
        v = self.values if self.layout is not None else self.signals
        return {n: v[:, i] for i, n in enumerate(self.signal_names)}

    @property
    def token_rewards(self) -> np.ndarray:
        """token_reward heads: ``signals[j - 1][tokens[j]]`` (NaN for j == 0); with several heads,
        the one token_reward head's (ValueError when there are several)."""
        if self.layout is not None:
            th = self.layout.token_heads
            if len(th) != 1:
                raise ValueError(f"{len(th)} token_reward heads: use rewards['<head>/token_reward']")
            return self.values[:, th[0][0]]
        out = np.full(len(self.tokens), np.nan, dtype=np.float32)
        for j in range(1, len(self.tokens)):
            out[j] = self.signals[j - 1, self.tokens[j]]
        return out

    def to_dict(self) -> dict:
        """``{"tokens": [...], "signals": [[n_out] per token], "signal_names": [...]}``; for a
        ``"mixed"`` context ``signals`` holds :attr:`values` (one value per name, null where none)."""
        sig = self.signals if self.layout is None else self.values
        rows = sig.astype(float).tolist()
        if self.layout is not None:
            rows = [[None if v != v else v for v in r] for r in rows]
        return {"tokens": [int(t) for t in self.tokens],
                "signals": rows,
                "signal_names": list(self.signal_names)}


def token_ids(tokens: Sequence[Any]) -> List[int]:
    """``tokens`` as a list of ints; ValueError for anything that is not an integer id."""
    toks = []
    for t in tokens:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise ValueError(f"token ids must be integers, got {t!r}")
        toks.append(int(t))
    return toks


def check_tokens(toks: Sequence[int], n_vocab: int, n_ctx: int) -> None:
    """ValueError for an empty sequence, an id outside the vocabulary or more than ``n_ctx`` tokens."""
    if not toks:
        raise ValueError("score(): nothing to score (no tokens)")
    bad = [t for t in toks if not 0 <= t < n_vocab]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary (valid ids: 0..{n_vocab - 1})")
    if len(toks) > n_ctx:
        raise ValueError(f"{len(toks)} tokens exceed the context window n_ctx={n_ctx}")


def score(llm: Any, text: Optional[str] = None, *, tokens: Optional[Sequence[int]] = None,
          add_bos: bool = True, special: bool = True) -> OtterScore:
    """:meth:`OtterLlama.score <otter_gguf.runtime.llama.OtterLlama.score>` of ``llm``."""
    if (text is None) == (tokens is None):
        raise ValueError("score() takes exactly one of text= or tokens=")
    llm._require_otter("score()")
    if text is not None:
        if not isinstance(text, str):
            raise ValueError(f"score(text=...) expects a str, got {type(text).__name__}")
        toks = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)
    else:
        toks = token_ids(tokens)
    check_tokens(toks, llm._n_vocab, llm._n_ctx)
    out = _decode_all_positions(llm, toks)
    st = llm._otter_store
    for p, t in enumerate(toks):
        st.note_token(p, t)
        st.put(p, out[p])
    llm._requires_eval = True  # the last row's logits are live, but be conservative
    if llm._logits_all:
        # `scores` was not filled for these positions: do not let a completion reuse them
        llm.n_tokens = 0
    texts = [llm.detokenize([t], prev_tokens=toks[:i]).decode("utf-8", errors="ignore")
             for i, t in enumerate(toks)]
    return OtterScore(tokens=toks, signals=out, signal_names=llm.signal_names,
                      head_kind=llm.head_kind, token_texts=texts, layout=llm._otter_src.layout)


def _decode_all_positions(llm: Any, toks: List[int]) -> np.ndarray:
    """Decode ``toks`` from position 0 (sequence 0 only); their signals ``[len(toks), n_out]``."""
    import llama_cpp

    src, st = llm._otter_src, llm._otter_store
    out = np.empty((len(toks), src.n_out), dtype=np.float32)
    all_pos = src.supports_all_positions
    llama_cpp.llama_memory_seq_keep(llm._ctx.memory, 0)
    llm._ctx.kv_cache_seq_rm(-1, 0, -1)
    llm.n_tokens = 0
    st.truncate(0)
    if all_pos:
        src.set_all_positions(True)
    try:
        for i in range(0, len(toks), llm.n_batch):
            chunk = toks[i: i + llm.n_batch]
            n_past = llm.n_tokens
            # all-positions mode: vocab logits only for the last row, signals for all;
            # without it every row is an output row (logits for all, slower)
            llm._batch.set_batch(batch=chunk, n_past=n_past, logits_all=not all_pos)
            llm._ctx.decode(llm._batch)
            llm.input_ids[n_past: n_past + len(chunk)] = chunk
            for j in range(len(chunk)):
                p = n_past + j
                hist = (lambda p=p: toks[: p + 1])
                out[p] = src.read_position(j, hist) if all_pos else src.read_row(j, hist)
            llm.n_tokens += len(chunk)
    finally:
        if all_pos:
            src.set_all_positions(False)
    return out
