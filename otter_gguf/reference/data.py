"""Training data for Otter heads: JSONL in the conventions people already use.

One JSON object per line. The objective follows from the fields (or is given):

| objective | fields | loss |
|---|---|---|
| ``pairwise`` | ``{"prompt"?, "chosen", "rejected"}`` (TRL's reward-trainer format: strings, or lists of chat messages) | Bradley-Terry on the final token's reward |
| ``token_regression`` | ``{"text" or "messages", "spans": [[start_char, end_char, target], ...]}`` or ``{"tokens", "targets"}`` | MSE per labelled token |
| ``sequence_regression`` | ``{"text" or "messages", "target"}`` | MSE on the final token's reward |
| ``next_token`` | ``{"text" or "messages"}`` (``token_reward`` heads) | cross-entropy of the head's row as next-token logits (a DExperts-style expert) |

``messages`` (``[{"role": ..., "content": ...}, ...]``) are rendered with the
base's chat template; ``spans`` of a ``messages`` record index the content of
its last message. A token is labelled by the span that holds its last
character; tokens outside every span (and ``null`` targets) are not in the
loss. Every problem is a :class:`TrainDataError` naming the file and line.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "OBJECTIVES",
    "Dataset",
    "Example",
    "HFTokenizer",
    "TextTokenizer",
    "TrainDataError",
    "detect_objective",
    "load_jsonl",
    "split_heldout",
]

OBJECTIVES = ("pairwise", "token_regression", "sequence_regression", "next_token")


class TrainDataError(ValueError):
    """Training data that cannot be used; the message names the file and line."""


class TextTokenizer(Protocol):
    """What the data reader needs from a base's tokenizer."""

    vocab_size: int

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids (with the base's BOS convention, special tokens parsed) and
        each token's ``(start, end)`` character offsets in ``text``."""

    def render_chat(self, messages: list[dict]) -> str:
        """``messages`` rendered with the base's chat template (no generation prompt);
        a ``ValueError`` if the base has none."""


class HFTokenizer:
    """The tokenizer of an HF checkpoint directory (transformers, fast or slow with offsets)."""

    def __init__(self, hf_dir: str | os.PathLike):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(os.fspath(hf_dir))
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tok(text, return_offsets_mapping=True)
        return list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]

    def render_chat(self, messages: list[dict]) -> str:
        if not getattr(self.tok, "chat_template", None):
            raise ValueError("the base has no chat template; use \"text\" records instead of \"messages\"")
        return self.tok.apply_chat_template(messages, tokenize=False)


@dataclass
class Example:
    """One tokenized record. ``targets``: per-token target (``nan`` = not in the
    loss) for token regression, per-token 1/0 loss mask for next-token; ``target``:
    sequence regression; ``rejected``: the rejected tokens of a pair."""

    line: int
    tokens: list[int]
    targets: list[float] | None = None
    target: float | None = None
    rejected: list[int] | None = None

    def n_tokens(self) -> int:
        return len(self.tokens) + len(self.rejected or ())


@dataclass
class Dataset:
    path: str
    objective: str
    examples: list[Example] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self):
        return iter(self.examples)

    def n_tokens(self) -> int:
        return sum(e.n_tokens() for e in self.examples)


def detect_objective(record: dict) -> str | None:
    """The objective a record's fields call for (``None``: no known field)."""
    if "chosen" in record or "rejected" in record:
        return "pairwise"
    if "spans" in record or "targets" in record:
        return "token_regression"
    if "target" in record:
        return "sequence_regression"
    if "text" in record or "messages" in record:
        return "next_token"
    return None


class _Line:
    """Error helper for one record."""

    def __init__(self, path: str, line: int):
        self.path, self.line = path, line

    def error(self, msg: str) -> TrainDataError:
        return TrainDataError(f"{self.path}:{self.line}: {msg}")


def _number(where: _Line, v: Any, what: str, *, allow_null: bool = False) -> float:
    if v is None and allow_null:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise where.error(f"{what} must be a finite number, found {json.dumps(v)[:40]}")
    return float(v)


def _messages(where: _Line, v: Any, what: str) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise where.error(f"{what} must be a non-empty list of chat messages")
    for i, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise where.error(f"{what}[{i}] must be an object with string \"role\" and \"content\"")
    if not v[-1]["content"]:
        raise where.error(f"{what}: the last message's content is empty")
    return v


class _Encoder:
    def __init__(self, tokenizer: TextTokenizer | None, max_length: int):
        self.tok = tokenizer
        self.max_length = max_length

    def _need(self, where: _Line) -> TextTokenizer:
        if self.tok is None:
            raise where.error("text records need the base's tokenizer (none was given)")
        return self.tok

    def _check_len(self, where: _Line, ids: list[int], what: str) -> None:
        if len(ids) < 1:
            raise where.error(f"{what} has no tokens")
        if len(ids) > self.max_length:
            raise where.error(f"{what} is {len(ids)} tokens, more than max_length {self.max_length} "
                              f"(shorten it or raise --max-length)")

    def chat(self, where: _Line, msgs: list[dict]) -> tuple[str, int]:
        """Rendered text and the offset of the last message's content in it."""
        try:
            text = self._need(where).render_chat(msgs)
        except TrainDataError:
            raise
        except Exception as e:  # template errors
            raise where.error(f"cannot render \"messages\" with the base's chat template: {e}") from None
        pos = text.rfind(msgs[-1]["content"])
        if pos < 0:
            raise where.error("the chat template does not reproduce the last message's content verbatim")
        return text, pos

    def text(self, where: _Line, rec: dict) -> tuple[str, int, str]:
        """(text, offset of the labelled part, field name) of a text/messages record."""
        has_t, has_m = "text" in rec, "messages" in rec
        if has_t and has_m:
            raise where.error("give either \"text\" or \"messages\", not both")
        if has_m:
            text, pos = self.chat(where, _messages(where, rec["messages"], "\"messages\""))
            return text, pos, "messages"
        if not has_t:
            raise where.error("missing field \"text\" (or \"messages\")")
        t = rec["text"]
        if not isinstance(t, str):
            raise where.error("\"text\" must be a string")
        if not t.strip():
            raise where.error("\"text\" is empty")
        return t, 0, "text"

    def encode(self, where: _Line, text: str, what: str):
        ids, offs = self._need(where).encode(text)
        self._check_len(where, ids, what)
        vocab = self._need(where).vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise where.error(f"token id {bad[0]} out of the base's vocabulary [0, {vocab})")
        return ids, offs


def _token_targets(where: _Line, enc: _Encoder, rec: dict) -> Example:
    if "tokens" in rec or "targets" in rec:
        if "spans" in rec or "text" in rec or "messages" in rec:
            raise where.error("\"tokens\"/\"targets\" records take no \"text\", \"messages\" or \"spans\"")
        for k in ("tokens", "targets"):
            if k not in rec:
                raise where.error(f"missing field \"{k}\"")
        toks, tg = rec["tokens"], rec["targets"]
        if not isinstance(toks, list) or not toks:
            raise where.error("\"tokens\" must be a non-empty list of token ids")
        if not isinstance(tg, list):
            raise where.error("\"targets\" must be a list of numbers")
        if len(tg) != len(toks):
            raise where.error(f"\"targets\" has {len(tg)} labels for {len(toks)} tokens")
        vocab = enc.tok.vocab_size if enc.tok is not None else None
        for i, t in enumerate(toks):
            if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (vocab is not None and t >= vocab):
                raise where.error(f"\"tokens\"[{i}] = {json.dumps(t)[:20]} is not a token id"
                                  + (f" in [0, {vocab})" if vocab is not None else ""))
        enc._check_len(where, toks, "\"tokens\"")
        targets = [_number(where, v, f"\"targets\"[{i}]", allow_null=True) for i, v in enumerate(tg)]
        if all(math.isnan(v) for v in targets):
            raise where.error("every target is null: nothing to learn")
        return Example(where.line, list(toks), targets=targets)
    text, base, field_name = enc.text(where, rec)
    if "spans" not in rec:
        raise where.error("missing field \"spans\"")
    spans = rec["spans"]
    if not isinstance(spans, list) or not spans:
        raise where.error("\"spans\" must be a non-empty list of [start_char, end_char, target]")
    n_chars = len(rec["messages"][-1]["content"]) if field_name == "messages" else len(text)
    parsed = []
    for i, sp in enumerate(spans):
        if not isinstance(sp, list) or len(sp) != 3:
            raise where.error(f"\"spans\"[{i}] must be [start_char, end_char, target]")
        s, e = sp[0], sp[1]
        if isinstance(s, bool) or isinstance(e, bool) or not isinstance(s, int) or not isinstance(e, int):
            raise where.error(f"\"spans\"[{i}]: start and end must be integers")
        if not 0 <= s < e <= n_chars:
            raise where.error(f"\"spans\"[{i}] [{s}, {e}] is out of range for a {field_name} of {n_chars} "
                              f"characters (need 0 <= start < end <= {n_chars})")
        parsed.append((s + base, e + base, _number(where, sp[2], f"\"spans\"[{i}] target")))
    parsed.sort()
    for (s0, e0, _), (s1, _e1, _) in zip(parsed, parsed[1:]):
        if s1 < e0:
            raise where.error(f"spans [{s0 - base}, {e0 - base}] and [{s1 - base}, ...] overlap")
    ids, offs = enc.encode(where, text, f"\"{field_name}\"")
    targets = []
    j = 0
    for a, b in offs:
        v = math.nan
        if b > a:
            last = b - 1
            while j < len(parsed) and parsed[j][1] <= last:
                j += 1
            if j < len(parsed) and parsed[j][0] <= last < parsed[j][1]:
                v = parsed[j][2]
        targets.append(v)
    if all(math.isnan(v) for v in targets):
        raise where.error("no token ends inside a span: nothing to learn")
    return Example(where.line, ids, targets=targets)


def _pair(where: _Line, enc: _Encoder, rec: dict) -> Example:
    for k in ("chosen", "rejected"):
        if k not in rec:
            raise where.error(f"missing field \"{k}\"")
    prompt = rec.get("prompt")
    out = {}
    for k in ("chosen", "rejected"):
        v = rec[k]
        if isinstance(v, str):
            if prompt is not None and not isinstance(prompt, str):
                raise where.error(f"\"prompt\" is a message list but \"{k}\" is a string")
            text = (prompt or "") + v
            if not v.strip():
                raise where.error(f"\"{k}\" is empty")
        elif isinstance(v, list):
            msgs = _messages(where, v, f"\"{k}\"")
            if prompt is not None:
                if not isinstance(prompt, list):
                    raise where.error(f"\"{k}\" is a message list but \"prompt\" is not")
                msgs = _messages(where, prompt, "\"prompt\"") + msgs
            text, _ = enc.chat(where, msgs)
        else:
            raise where.error(f"\"{k}\" must be a string or a list of chat messages")
        out[k], _ = enc.encode(where, text, f"\"{k}\"")
    return Example(where.line, out["chosen"], rejected=out["rejected"])


def _sequence(where: _Line, enc: _Encoder, rec: dict) -> Example:
    if "target" not in rec:
        raise where.error("missing field \"target\"")
    y = _number(where, rec["target"], "\"target\"")
    text, _, name = enc.text(where, rec)
    ids, _ = enc.encode(where, text, f"\"{name}\"")
    return Example(where.line, ids, target=y)


def _next_token(where: _Line, enc: _Encoder, rec: dict) -> Example:
    text, base, name = enc.text(where, rec)
    ids, offs = enc.encode(where, text, f"\"{name}\"")
    if len(ids) < 2:
        raise where.error(f"\"{name}\" is a single token: no next token to predict")
    # position p predicts ids[p + 1]; with messages only the last message's tokens are targets
    mask = [1.0 if offs[p + 1][1] > base or base == 0 else 0.0 for p in range(len(ids) - 1)] + [0.0]
    if not any(mask):
        raise where.error("no token to predict")
    return Example(where.line, ids, targets=mask)


_PARSERS = {"pairwise": _pair, "token_regression": _token_targets,
            "sequence_regression": _sequence, "next_token": _next_token}


def load_jsonl(path: str | os.PathLike, tokenizer: TextTokenizer | None, *,
               objective: str | None = None, max_length: int = 2048) -> Dataset:
    """Read and tokenize a JSONL file. ``objective=None``: from the first record's fields."""
    p = os.fspath(path)
    if objective is not None and objective not in OBJECTIVES:
        raise TrainDataError(f"unknown objective {objective!r} (known: {', '.join(OBJECTIVES)})")
    try:
        fh = open(p, encoding="utf-8")
    except OSError as e:
        raise TrainDataError(f"{p}: cannot read: {e.strerror or e}") from None
    enc = _Encoder(tokenizer, max_length)
    ds = Dataset(p, objective or "")
    with fh:
        for n, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            where = _Line(p, n)
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as e:
                raise where.error(f"not valid JSON ({e.msg} at column {e.colno})") from None
            except UnicodeDecodeError:
                raise where.error("not UTF-8") from None
            if not isinstance(rec, dict):
                raise where.error("each line must be a JSON object")
            kind = detect_objective(rec)
            if kind is None:
                raise where.error("no known field: expected \"chosen\"/\"rejected\", \"text\"/\"messages\" "
                                  "with \"spans\" or \"target\", or \"tokens\"/\"targets\"")
            if not ds.objective:
                ds.objective = kind
            elif kind != ds.objective:
                raise where.error(f"this record is {kind} data but the file's objective is {ds.objective}")
            ds.examples.append(_PARSERS[ds.objective](where, enc, rec))
    if not ds.examples:
        raise TrainDataError(f"{p}: no records")
    return ds


def split_heldout(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """A seeded split into (train, held-out); held-out gets ``round(fraction * n)`` records
    (at least 1 when ``fraction > 0`` and there are 2 or more)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"held-out fraction must be in [0, 1), found {fraction}")
    n = len(ds)
    k = min(n - 1, max(1 if fraction > 0 and n > 1 else 0, round(fraction * n)))
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    held = sorted(idx[:k])
    train = sorted(idx[k:])
    return (Dataset(ds.path, ds.objective, [ds.examples[i] for i in train]),
            Dataset(ds.path, ds.objective, [ds.examples[i] for i in held]))
