"""The text of one completion as its tokens arrive: stop strings, streamed deltas.

:class:`CompletionText` follows llama-cpp-python's ``Llama._create_completion``
rules, so that a served completion has the text the Python API gives:

* the text is ``detokenize(completion_tokens, prev_tokens=prompt_tokens)``;
* a stop string ends the completion at the first stop (in the request's
  order) found in the text, which is cut before it; the token that completed
  the stop stays a completion token (as in ``logprobs`` / ``otter``);
* while the text ends inside a multi-byte UTF-8 character the stop strings
  are not looked for (llama-cpp-python's ``multibyte_fix``, llama-server's
  ``validate_utf8``); ``max_tokens`` is a hard cap all the same (the engine
  checks it, as llama-server checks ``n_predict``), and a character still
  incomplete at the end is dropped from the text;
* streamed deltas never show a byte that may still turn out to start a stop
  string, nor half a UTF-8 character (dropped if never completed, as
  ``errors="ignore"``).

Each streamed delta carries the tokens whose first byte it releases, so the
``otter`` blocks of the chunks concatenate to the block of the whole
completion. Pure Python: the detokenizer is a callable.
"""

from __future__ import annotations

import codecs
from typing import Callable, List, Optional, Sequence, Tuple

__all__ = ["CompletionText"]


class CompletionText:
    def __init__(self, detokenize: Callable[..., bytes], prompt_tokens: Sequence[int], stops: Sequence[bytes]):
        self._detok = detokenize
        self._prompt = list(prompt_tokens)
        self.stops = [s for s in stops if s]
        self.tokens: List[int] = []
        self.ends: List[int] = []  # byte end of each token's text in `raw`
        self.raw = b""
        self.cut: Optional[int] = None  # byte index of the stop string, once found
        self.sent = 0  # bytes released to the decoder
        self.assigned = 0  # tokens attached to released deltas
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self._multibyte = 0

    def add(self, token: int) -> bool:
        """Append a completion token. False while the text ends inside a
        multi-byte character (stop strings are not looked for yet); otherwise
        look for the stop strings (:attr:`stopped`) and return True."""
        self.tokens.append(int(token))
        self.raw = self._detok(self.tokens, prev_tokens=self._prompt)
        self.ends.append(len(self.raw))
        for k, char in enumerate(self.raw[-3:]):  # llama-cpp-python's test, verbatim
            k = 3 - k
            for num, pattern in ((2, 192), (3, 224), (4, 240)):
                if num > k and pattern & char == pattern:
                    self._multibyte = num - k
        if self._multibyte > 0:
            self._multibyte -= 1
            return False
        if self.cut is None:
            for s in self.stops:
                i = self.raw.find(s)
                if i >= 0:
                    self.cut = i
                    break
        return True

    @property
    def stopped(self) -> bool:
        """A stop string was found."""
        return self.cut is not None

    @property
    def text_bytes(self) -> bytes:
        return self.raw if self.cut is None else self.raw[: self.cut]

    @property
    def text(self) -> str:
        """The completion's text (cut at a stop string)."""
        return self.text_bytes.decode("utf-8", errors="ignore")

    def _partial_stop(self, upto: int) -> int:
        """Bytes at the end of ``raw[:upto]`` that start some stop string."""
        hold = 0
        for s in self.stops:
            for i in range(min(len(s) - 1, upto), hold, -1):
                if self.raw[upto - i: upto] == s[:i]:
                    hold = i
                    break
        return hold

    def release(self, n_ready: int, final: bool = False) -> Tuple[str, int, int]:
        """Release the text of the first ``n_ready`` tokens (all of it when
        ``final``): ``(delta, first token, token count)`` of the newly released part."""
        end = len(self.text_bytes)
        if not final:
            end = min(end, self.ends[n_ready - 1] if n_ready > 0 else 0)
            if self.cut is None:
                end -= self._partial_stop(end)
        end = max(end, self.sent)
        new = self.text_bytes[self.sent: end]
        self.sent = end
        delta = self._dec.decode(new, final=final)
        start = self.assigned
        if final:
            self.assigned = len(self.tokens)
        elif delta:
            while self.assigned < n_ready and (self.ends[self.assigned - 1] if self.assigned else 0) < self.sent:
                self.assigned += 1
        return delta, start, self.assigned - start
