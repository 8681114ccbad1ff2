"""Where an :class:`~otter_gguf.OtterLlama`'s Otter signals come from and where they are kept.

* :class:`SignalSource` is the seam between OtterLlama and the runtime:
  :class:`RuntimeSignalSource` reads the signals from the patched libllama
  (:mod:`otter_gguf.runtime.capi`); tests may inject another source.
* :class:`SignalStore` keeps the signal of every context position, the Otter
  counterpart of ``Llama.scores``: ``eval`` fills it, a rewind of
  ``n_tokens`` truncates it, ``save_state`` / ``load_state`` snapshot and
  restore it.

Needs numpy only (the runtime source binds the C API on first use).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from otter_gguf.runtime import capi

__all__ = ["OtterHead", "SignalLayout", "SignalSource", "RuntimeSignalSource", "SignalStore", "check_heads",
           "head_signal_names", "heads_kind", "MIXED", "TOKEN_REWARD_SIGNAL"]

MIXED = "mixed"  # head_kind of a context running several heads, one of them (at least) a token_reward head
TOKEN_REWARD_SIGNAL = "token_reward"  # a token_reward head's one named value with several heads: ``head/token_reward``


def _s(b) -> Optional[str]:
    if b is None:
        return None
    return b.decode("utf-8", errors="replace") if isinstance(b, bytes) else str(b)


class SignalSource:
    """Where an :class:`OtterLlama` gets its Otter signals from.

    ``read_row(i, history)`` returns the signals of output row ``i`` of the
    last decode (``llama_get_logits_ith`` index semantics: the batch index of
    a token whose ``logits`` flag was set). ``history()`` returns the token
    sequence up to and including that row's token (only sources that
    recompute signals need it). ``read_position(j, history)`` returns the
    signals of batch position ``j`` of the last decode made in all-positions
    mode.
    """

    has_otter: bool = False
    n_out: int = 0
    head_kind: Optional[str] = None
    signal_names: List[str] = []
    supports_all_positions: bool = False
    heads: List["OtterHead"] = []
    layout: Optional["SignalLayout"] = None  # set for a MIXED context (several heads, a token_reward head among them)

    def set_enabled(self, enabled: bool) -> None:
        pass

    def set_all_positions(self, enabled: bool) -> None:
        pass

    def read_row(self, i: int, history: Callable[[], Sequence[int]]) -> np.ndarray:
        raise NotImplementedError

    def read_position(self, j: int, history: Callable[[], Sequence[int]]) -> np.ndarray:
        raise NotImplementedError


@dataclass
class OtterHead:
    """One Otter head a context runs: a one-file model's own head or an adapter GGUF loaded for the model.
    ``offset``: its first column in a signal row (rows are the heads' rows concatenated)."""

    name: str
    n_out: int
    head_kind: str
    signal_names: List[str]
    offset: int = 0


def _is_token_head(h: OtterHead) -> bool:
    return h.head_kind == TOKEN_REWARD_SIGNAL


def head_signal_names(heads: Sequence[OtterHead]) -> List[str]:
    """The signal names of a context's heads: the head's own names for one head, ``head/signal``
    for several (their rows are concatenated head by head); with several heads a token_reward
    head has the one name ``head/token_reward`` (its reward of the fed token)."""
    if len(heads) == 1:
        return list(heads[0].signal_names)
    return [f"{h.name}/{n}" for h in heads
            for n in ([TOKEN_REWARD_SIGNAL] if _is_token_head(h) else h.signal_names)]


def heads_kind(heads: Sequence[OtterHead]) -> Optional[str]:
    """``head_kind`` of a context: its head's kind for one head, ``"reward"`` for several reward
    heads, :data:`MIXED` when several heads include a token_reward head."""
    if not heads:
        return None
    if len(heads) == 1:
        return heads[0].head_kind
    return MIXED if any(_is_token_head(h) for h in heads) else heads[0].head_kind


def check_heads(heads: Sequence[OtterHead]) -> None:
    """Several heads must be uniquely named (ValueError otherwise)."""
    if len(heads) < 2:
        return
    names = [h.name for h in heads]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"several Otter heads are named {', '.join(map(repr, dup))}; give them distinct names "
                         f"(otter_heads={{'name': path, ...}})")


class SignalLayout:
    """Where the named values of a :data:`MIXED` context's signal rows are.

    ``names[k]`` (= ``head_signal_names(heads)``) is either a reward head's signal, column
    ``cols[k]`` of a row, or a token_reward head's token reward (``cols[k] == -1``): for the
    token fed at position ``p``, ``row[p - 1][offset + token]``. ``token_heads`` lists
    ``(k, offset, n_out)`` of the token_reward heads.
    """

    def __init__(self, heads: Sequence[OtterHead]):
        self.heads = list(heads)
        self.names = head_signal_names(heads)
        self.n_out = sum(h.n_out for h in heads)
        self.cols: List[int] = []
        self.token_heads: List[tuple] = []
        for h in heads:
            if _is_token_head(h):
                self.token_heads.append((len(self.cols), h.offset, h.n_out))
                self.cols.append(-1)
            else:
                self.cols.extend(h.offset + i for i in range(h.n_out))
        self.scalar = np.array([k for k, c in enumerate(self.cols) if c >= 0], dtype=np.int64)
        self.scalar_cols = np.array([c for c in self.cols if c >= 0], dtype=np.int64)

    @classmethod
    def of(cls, heads: Sequence[OtterHead]) -> Optional["SignalLayout"]:
        """The layout of a :data:`MIXED` context's heads, None for any other (their rows are their named values)."""
        return cls(heads) if heads_kind(heads) == MIXED else None

    def values(self, rows: np.ndarray, tokens: Sequence[int]) -> np.ndarray:
        """``[n, len(names)]`` named values of the positions of ``rows`` (``[n, n_out]`` signal rows
        of positions ``0..n-1``) holding ``tokens`` (NaN token rewards at position 0)."""
        rows = np.asarray(rows, dtype=np.float32)
        out = np.full((rows.shape[0], len(self.names)), np.nan, dtype=np.float32)
        out[:, self.scalar] = rows[:, self.scalar_cols]
        for k, off, n in self.token_heads:
            for j in range(1, rows.shape[0]):
                if 0 <= tokens[j] < n:
                    out[j, k] = rows[j - 1, off + tokens[j]]
        return out


class RuntimeSignalSource(SignalSource):
    """Signals from the patched libllama's Otter C API.

    The context runs the model's own head (a one-file Otter GGUF; ``model_head_name`` names it
    when there are several heads), then ``adapters``: (name, ``llama_adapter_otter *``) loaded
    for the model with ``llama_adapter_otter_init``, in signal order. Given adapters, they are
    activated on ``ctx`` here (``llama_set_adapters_otter``, which re-creates the context's
    memory: the caller fetches ``llama_get_memory`` again); a ValueError if llama.cpp refuses.
    """

    def __init__(self, model: Any, ctx: Any, adapters: Sequence = (), model_head_name: str = "model"):
        self._model = model
        self._ctx = ctx
        active: List[tuple] = []
        if capi.available("llama_model_has_otter") and capi.llama_model_has_otter(model):
            capi.require("llama_model_get_adapter_otter")
            active.append((model_head_name, capi.llama_model_get_adapter_otter(model)))
        active.extend(adapters)
        heads: List[OtterHead] = []
        for name, ad in active:
            n = int(capi.llama_adapter_otter_n_signal_names(ad))
            heads.append(OtterHead(name, int(capi.llama_adapter_otter_n_out(ad)),
                                   _s(capi.llama_adapter_otter_head_kind(ad)),
                                   [_s(capi.llama_adapter_otter_signal_name(ad, i)) or f"signal_{i}"
                                    for i in range(n)]))
        check_heads(heads)
        if adapters:
            ptrs = (capi.llama_adapter_otter_p_ctypes * len(active))(*[ad for _, ad in active])
            if capi.llama_set_adapters_otter(ctx, ptrs, len(active)) != 0:
                raise ValueError(f"llama.cpp refused the Otter heads {', '.join(n for n, _ in active)} "
                                 f"for this context (see its error log)")
        check_heads(heads)
        off = 0
        for h in heads:
            h.offset, off = off, off + h.n_out
        self.heads = heads
        self.has_otter = bool(heads)
        if not self.has_otter:
            return
        capi.require("llama_set_otter", "llama_get_otter_signals_ith")
        self.n_out = sum(h.n_out for h in heads)
        if capi.available("llama_otter_n_out"):
            got = int(capi.llama_otter_n_out(ctx))
            if got != self.n_out:
                raise RuntimeError(f"the context runs {got} signals per row, the heads have {self.n_out}")
        self.head_kind = heads_kind(heads)
        self.signal_names = head_signal_names(heads)
        self.layout = SignalLayout.of(heads)
        self.supports_all_positions = capi.available("llama_set_otter_all_positions", "llama_get_otter_signals_pos")

    def set_enabled(self, enabled: bool) -> None:
        capi.llama_set_otter(self._ctx, bool(enabled))

    def set_all_positions(self, enabled: bool) -> None:
        if self.supports_all_positions:
            capi.llama_set_otter_all_positions(self._ctx, bool(enabled))

    def _copy(self, ptr, what: str) -> np.ndarray:
        if not ptr:
            raise RuntimeError(f"libllama returned no Otter signals for {what}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_out,)).copy()

    def read_row(self, i: int, history) -> np.ndarray:
        return self._copy(capi.llama_get_otter_signals_ith(self._ctx, int(i)), f"output row {i}")

    def read_position(self, j: int, history) -> np.ndarray:
        return self._copy(capi.llama_get_otter_signals_pos(self._ctx, int(j)), f"batch position {j}")


class SignalStore:
    """Signals per context position (NaN / absent where not computed).

    Dense ``[n_ctx, n_out]`` when that is small; otherwise (token_reward heads
    of big vocabularies) only the rows at positions ``>= keep_from``, and the
    latest row or, with ``hold_from`` set, the rows from ``hold_from`` on (the
    rows of the last decode, which speculative decoding samples one by one). For token_reward heads ``token_reward[p]`` is
    ``row[p - 1][token at p]``: what the head said, one step earlier, about
    the token that was then fed at ``p``.

    ``layout`` (a :data:`MIXED` context's :class:`SignalLayout`): the store also keeps the
    named values of every position (:meth:`named`): the reward heads' columns when a row is
    put, each token_reward head's token reward when a token is noted.
    """

    DENSE_LIMIT = 1 << 24  # floats

    def __init__(self, n_ctx: int, n_out: int, token_head: bool, dense: Optional[bool] = None,
                 layout: Optional[SignalLayout] = None):
        self.n_ctx = n_ctx
        self.n_out = n_out
        self.token_head = token_head and layout is None
        self.layout = layout
        self.dense = (n_ctx * n_out <= self.DENSE_LIMIT) if dense is None else dense
        self.keep_from: Optional[int] = None
        self.hold_from: Optional[int] = None
        self.hi = 0  # 1 + highest position ever written since the last truncate
        if self.dense:
            self.arr = np.full((n_ctx, n_out), np.nan, dtype=np.float32)
        else:
            self.rows: Dict[int, np.ndarray] = {}
        self.tok_reward = np.full(n_ctx, np.nan, dtype=np.float32) if self.token_head else None
        self.vals = np.full((n_ctx, len(layout.names)), np.nan, dtype=np.float32) if layout is not None else None

    @property
    def has_token_heads(self) -> bool:
        """A token_reward head contributes (alone or among several heads)."""
        return self.token_head or (self.layout is not None and bool(self.layout.token_heads))

    def truncate(self, n: int) -> None:
        """Forget everything at positions >= n."""
        n = max(0, n)
        if n >= self.hi:
            return
        if self.dense:
            self.arr[n:self.hi] = np.nan
        else:
            for p in [p for p in self.rows if p >= n]:
                del self.rows[p]
        if self.tok_reward is not None:
            self.tok_reward[n:self.hi] = np.nan
        if self.vals is not None:
            self.vals[n:self.hi] = np.nan
        self.hi = n

    def get(self, p: int) -> Optional[np.ndarray]:
        if p < 0 or p >= self.n_ctx:
            return None
        if self.dense:
            row = self.arr[p]
            return None if np.isnan(row[0]) else row
        return self.rows.get(p)

    def put(self, p: int, row: np.ndarray) -> None:
        if self.dense:
            self.arr[p] = row
        else:
            self.rows[p] = np.asarray(row, dtype=np.float32)
            lo = p if self.hold_from is None else min(p, self.hold_from)  # rows below lo go ...
            if self.keep_from is not None:
                lo = min(lo, self.keep_from)  # ... unless kept from keep_from on
            for q in [q for q in self.rows if q < lo]:
                del self.rows[q]
        if self.vals is not None:
            self.vals[p, self.layout.scalar] = np.asarray(row, dtype=np.float32)[self.layout.scalar_cols]
        self.hi = max(self.hi, p + 1)

    def note_token(self, p: int, token: int) -> None:
        """Token ``token`` is fed at position ``p``: record its token reward(s)."""
        if not self.has_token_heads or p <= 0:
            return
        prev = self.get(p - 1)
        if prev is None:
            return
        if self.tok_reward is not None:
            if 0 <= token < prev.shape[0]:
                self.tok_reward[p] = prev[token]
                self.hi = max(self.hi, p + 1)
            return
        for k, off, n in self.layout.token_heads:
            if 0 <= token < n:
                self.vals[p, k] = prev[off + token]
                self.hi = max(self.hi, p + 1)

    def token_reward(self, p: int) -> Optional[float]:
        if self.tok_reward is None or not (0 <= p < self.n_ctx):
            return None
        v = float(self.tok_reward[p])
        return None if math.isnan(v) else v

    def named(self, p: int) -> Optional[np.ndarray]:
        """A :data:`MIXED` context's named values at ``p`` (``layout.names`` order; NaN where not
        known), None when none is known."""
        if self.vals is None or not (0 <= p < self.n_ctx):
            return None
        v = self.vals[p]
        return None if np.isnan(v).all() else v

    def array(self, n: int) -> np.ndarray:
        """``[n, n_out]`` signals of positions ``0..n-1`` (NaN where none is kept)."""
        if self.dense:
            return self.arr[:n]
        out = np.full((n, self.n_out), np.nan, dtype=np.float32)
        for p, r in self.rows.items():
            if p < n:
                out[p] = r
        return out

    def snapshot(self, n: int) -> dict:
        snap: Dict[str, Any] = {"n": n}
        if self.dense:
            snap["arr"] = self.arr[:n].copy()
        else:
            snap["rows"] = {p: r.copy() for p, r in self.rows.items() if p < n}
        if self.tok_reward is not None:
            snap["tok_reward"] = self.tok_reward[:n].copy()
        if self.vals is not None:
            snap["vals"] = self.vals[:n].copy()
        return snap

    def restore(self, snap: dict) -> None:
        self.truncate(0)
        if self.dense:
            self.arr[:] = np.nan
        n = int(snap["n"])
        if self.dense and "arr" in snap:
            self.arr[:n] = snap["arr"]
        elif not self.dense and "rows" in snap:
            self.rows = {p: r.copy() for p, r in snap["rows"].items()}
        if self.tok_reward is not None and "tok_reward" in snap:
            self.tok_reward[:] = np.nan
            self.tok_reward[:n] = snap["tok_reward"]
        if self.vals is not None and "vals" in snap:
            self.vals[:] = np.nan
            self.vals[:n] = snap["vals"]
        self.hi = n
