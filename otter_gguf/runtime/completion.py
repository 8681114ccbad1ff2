"""The ``otter`` field of completion and chat results (docs/API.md, "The ``otter`` field").

:class:`CompletionRun` is one completion call's bookkeeping (prompt length,
generated tokens, guidance trace, stream position); :func:`record` fills it
from the token generator. :class:`CompletionAssembler` turns a run plus the
:class:`~otter_gguf.runtime.signals.SignalStore` into the ``otter`` blocks:
the tokens of a result or streamed chunk, their texts and character offsets,
signals and rewards; it also holds streamed chunks back until their tokens'
signals exist, and converts chat streams.

Needs numpy only: the model is reached through the callables it is given
(``detokenize``, ``is_eog``, and per call ``step`` / ``finish`` /
``n_evaluated``), so it is tested with fake tokens, texts and signals.
"""

from __future__ import annotations

import codecs
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np

from otter_gguf.runtime.guidance import ResolvedGuidance
from otter_gguf.runtime.signals import MIXED, SignalStore

__all__ = ["CompletionRun", "CompletionAssembler", "kept_evaluated", "record"]


@dataclass
class CompletionRun:
    """One completion call's bookkeeping."""

    guidance: Optional[ResolvedGuidance]
    prompt: Any = None
    echo: bool = False
    full_signals: bool = False  # token_reward heads: include the full rows (otter_full_signals)
    prompt_len: int = -1  # set when generation starts
    generated: List[int] = field(default_factory=list)
    trace: List[dict] = field(default_factory=list)
    error: Optional[BaseException] = None
    # streaming: tokens already attached to chunks, their bytes, text decoder state
    assigned: int = 0
    emitted_bytes: int = 0
    chars: int = 0
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="ignore"))
    offsets: List[int] = field(default_factory=list)
    texts: List[str] = field(default_factory=list)


def record(inner: Iterator[int], run: CompletionRun):
    """Pass the tokens of ``inner`` (a ``Llama.generate`` generator) through,
    recording them in ``run`` (and as the ``chosen`` of their trace entry)."""
    try:
        tok = next(inner)
        while True:
            if run.error is not None:
                raise run.error
            run.generated.append(int(tok))
            if run.trace and len(run.trace) >= len(run.generated):
                run.trace[len(run.generated) - 1].setdefault("chosen", int(tok))
            sent = yield tok
            tok = inner.send(sent)
    except StopIteration:
        return
    finally:
        inner.close()


def kept_evaluated(run: CompletionRun, fed: Sequence[int]) -> int:
    """How many positions from 0 hold the signal rows of the prompt and the *kept* tokens.

    ``fed`` is what the context evaluated (its ids up to ``n_tokens``). Under speculative decoding
    (``draft_model``) it also holds drafts that were evaluated in the same batch but not (yet) kept:
    a row there is the signal of the draft token, not of the token the sampler chose. The count
    stops at the first position whose fed id is not the generated token of that position, and at the
    last generated token."""
    n = len(fed)
    if run.prompt_len < 0 or n <= run.prompt_len:
        return n
    m = min(len(run.generated), n - run.prompt_len)
    differs = np.flatnonzero(np.asarray(fed[run.prompt_len: run.prompt_len + m], dtype=np.int64)
                             != np.asarray(run.generated[:m], dtype=np.int64))
    return run.prompt_len + (int(differs[0]) if differs.size else m)


def _floats(row: Optional[np.ndarray]) -> Optional[List[Optional[float]]]:
    if row is None:
        return None
    return [None if not math.isfinite(v) else v for v in row.astype(float).tolist()]


class CompletionAssembler:
    """Builds the ``otter`` blocks of one model's completions.

    ``detokenize(tokens, prev_tokens=None) -> bytes`` and ``is_eog(token)``
    are the model's. ``last_block`` / ``last_chunk_block`` are the blocks last
    attached to a result / a streamed chunk (the chat wrappers copy them into
    the chat results).
    """

    def __init__(self, store: SignalStore, *, head_kind: Optional[str], signal_names: Sequence[str],
                 detokenize: Callable[..., bytes], is_eog: Callable[[int], bool]):
        if head_kind == MIXED and store.layout is None:
            raise ValueError("several Otter heads with a token_reward head among them: the SignalStore needs "
                             "their SignalLayout (SignalStore(..., layout=SignalLayout.of(llm.otter_heads)))")
        self.store = store
        self.head_kind = head_kind
        self.signal_names = list(signal_names)
        self.detokenize = detokenize
        self.is_eog = is_eog
        self.last_block: Optional[dict] = None
        self.last_chunk_block: Optional[dict] = None

    # ------------------------------------------------------------------
    # blocks
    # ------------------------------------------------------------------
    def completion_tokens(self, run: CompletionRun) -> List[int]:
        """The completion's tokens: the generated ones less a final end-of-generation token."""
        gen = run.generated
        if gen and self.is_eog(gen[-1]):
            return gen[:-1]
        return gen

    def _texts(self, run: CompletionRun, upto: int) -> None:
        toks = run.generated
        base = len(run.prompt) if (run.echo and isinstance(run.prompt, str)) else 0
        while len(run.texts) < upto:
            i = len(run.texts)
            piece = self.detokenize([toks[i]], prev_tokens=toks[:i])
            run.texts.append(piece.decode("utf-8", errors="ignore"))
            run.offsets.append(base + run.chars)
            run.chars += len(run.decoder.decode(piece))

    def block(self, run: CompletionRun, start: int, count: int) -> dict:
        """The ``otter`` block of generated tokens ``start .. start + count - 1``."""
        self._texts(run, start + count)
        st = self.store
        toks = run.generated[start: start + count]
        pos = [run.prompt_len + start + i for i in range(count)]
        block: Dict[str, Any] = {
            "tokens": [int(t) for t in toks],
            "token_texts": run.texts[start: start + count],
            "text_offset": run.offsets[start: start + count],
            "head_kind": self.head_kind,
            "signal_names": list(self.signal_names),
        }
        if st.layout is not None:  # several heads, a token_reward head among them: the named values
            rows = [_floats(st.named(p)) for p in pos]
            block["signals"] = rows
            block["rewards"] = [None if r is None else dict(zip(self.signal_names, r)) for r in rows]
            if run.full_signals:
                block["signal_rows"] = [_floats(st.get(p)) for p in pos]
        elif st.token_head:
            block["token_rewards"] = [st.token_reward(p) for p in pos]
            block["signals"] = [_floats(st.get(p)) for p in pos] if run.full_signals else None
        else:
            rows = [_floats(st.get(p)) for p in pos]
            block["signals"] = rows
            block["rewards"] = [None if r is None else dict(zip(self.signal_names, r)) for r in rows]
        if run.guidance is not None and run.guidance.spec.trace:
            block["guidance"] = run.trace[start: start + count]
        return block

    def _assign(self, run: CompletionRun, choice: dict, limit: int) -> int:
        """How many not-yet-attached generated tokens a stream chunk holds."""
        lp = choice.get("logprobs")
        if lp is not None and lp.get("tokens") is not None:
            return min(len(lp["tokens"]), limit - run.assigned)
        target = run.emitted_bytes + len(choice.get("text", "").encode("utf-8"))
        take = 0
        while run.assigned + take < limit and run.emitted_bytes < target:
            t = run.generated[run.assigned + take]
            run.emitted_bytes += len(self.detokenize([t]))
            take += 1
        return take

    # ------------------------------------------------------------------
    # results
    # ------------------------------------------------------------------
    def single(self, run: CompletionRun, inner: Iterator[dict], step: Callable[[], dict],
               finish: Callable[[], None]):
        """A non-streamed completion: ``step()`` gives the result of ``inner``;
        ``finish()`` computes the last token's signal (the extra decode)."""
        result = step()
        inner.close()
        finish()
        block = self.block(run, 0, len(self.completion_tokens(run)))
        result["choices"][0]["otter"] = block
        self.last_block = block
        yield result

    def stream(self, run: CompletionRun, inner: Iterator[dict], step: Callable[[], dict],
               finish: Callable[[], None], n_evaluated: Callable[[], int]):
        """A streamed completion: each chunk of ``inner`` (``step()`` gives the
        next) with the block of the tokens it holds, held back until
        ``n_evaluated()`` (the model's ``n_tokens``) covers them."""
        held: List[tuple] = []  # (chunk, start, count) waiting for their tokens' signals

        def flush(all_: bool):
            while held:
                chunk, start, count = held[0]
                if not all_ and run.prompt_len + start + count > n_evaluated():
                    break
                held.pop(0)
                block = self.block(run, start, count)
                chunk["choices"][0]["otter"] = block
                self.last_chunk_block = block
                yield chunk

        try:
            while True:
                try:
                    chunk = step()
                except StopIteration:
                    return
                choice = chunk["choices"][0]
                if choice.get("finish_reason") is None:
                    limit = len(self.completion_tokens(run))
                    count = self._assign(run, choice, limit)
                    held.append((chunk, run.assigned, count))
                    run.assigned += count
                    yield from flush(False)
                    continue
                # final chunk: let the inner generator finish (cache save), then the extra decode
                try:
                    step()
                except StopIteration:
                    pass
                finish()
                yield from flush(True)
                toks = self.completion_tokens(run)
                block = self.block(run, run.assigned, len(toks) - run.assigned)
                run.assigned = len(toks)
                choice["otter"] = block
                self.last_chunk_block = block
                yield chunk
                return
        finally:
            inner.close()

    def chat_stream(self, chunks: Iterable[dict]):
        """A chat stream made from a completion stream of this assembler: each
        chunk gets the block of the completion chunk it came from."""
        for ch in chunks:
            choices = ch.get("choices") or []
            if choices:
                c0 = choices[0]
                delta = c0.get("delta") or {}
                if "role" in delta and not delta.get("content") and c0.get("finish_reason") is None:
                    c0["otter"] = None  # the role preamble holds no token
                else:
                    c0["otter"] = self.last_chunk_block
                    self.last_chunk_block = None
            yield ch
