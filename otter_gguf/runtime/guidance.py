"""Reward-guided decoding with an Otter head (ARGS and DExperts).

:class:`Guidance` is what a caller passes as ``guidance=`` to
:meth:`otter_gguf.OtterLlama.create_completion`, ``__call__`` and
``create_chat_completion`` (a plain ``dict`` with the same keys works too).
The selection rules live here as small numpy functions so they can be tested
without a model; :mod:`otter_gguf.runtime.llama` wires them into decoding.

Two head kinds, two mechanisms (see docs/API.md):

* ``token_reward`` heads (``n_out == n_vocab``): the signal row of the last
  fed position holds one value per candidate next token, so one forward pass
  per step suffices. ``mode="args"`` keeps the ``top_k`` tokens by logit and
  re-ranks them by ``logit + weight * signal[token]``; ``mode="dexperts"``
  adds ``weight * signal`` to every logit. Both run as a llama-cpp-python
  logits processor, before the usual sampler chain (penalties, grammar,
  temperature, ...).
* ``reward`` heads (named scalar signals): ARGS only. The ``top_k``
  candidates by logit are appended to the prefix as ``top_k`` parallel
  sequences in ONE batched decode; each candidate's reward is the signal at
  its own position, reduced to a scalar with ``signal`` (a name, or
  ``{name: coefficient}``). The winner maximises ``logit + weight * reward``
  (or is drawn from ``softmax((logit + weight * reward) / temperature)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from otter_gguf.format.constants import HeadKind

MODES = ("args", "dexperts")

SignalSpec = Union[None, str, Mapping[str, float]]


@dataclass(frozen=True)
class Guidance:
    """Reward-guided decoding settings.

    Attributes:
        weight: ``w`` in ``logit + w * reward``; must be finite. ``0`` gives
            back plain decoding.
        top_k: number of candidates re-ranked per step (ARGS); ``>= 1``.
            For scalar ``reward`` heads the context needs
            ``n_seq_max >= top_k + 1`` (``OtterLlama(..., n_seq_max=...)`` or
            ``OtterLlama(..., guidance=...)`` sets it).
        mode: ``"args"`` or ``"dexperts"`` (``token_reward`` heads only).
        signal: which signal is the reward for a ``reward`` head: a name,
            or ``{name: coefficient}`` for a weighted sum. ``None`` means the
            single signal of a one-signal head (an error for several).
            Must be ``None`` for ``token_reward`` heads.
        trace: record every step's candidates, logits, rewards and scores
            in the result's ``otter["guidance"]`` list.
    """

    weight: float = 1.0
    top_k: int = 10
    mode: str = "args"
    signal: SignalSpec = None
    trace: bool = False

    def __post_init__(self) -> None:
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float, np.floating, np.integer)):
            raise ValueError(f"guidance weight must be a finite number, got {w!r}")
        if not math.isfinite(float(w)):
            raise ValueError(f"guidance weight must be finite, got {w!r}")
        object.__setattr__(self, "weight", float(w))
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise ValueError(f"guidance top_k must be an integer >= 1, got {k!r}")
        if int(k) < 1:
            raise ValueError(f"guidance top_k must be >= 1, got {k}")
        object.__setattr__(self, "top_k", int(k))
        if self.mode not in MODES:
            raise ValueError(f"guidance mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        s = self.signal
        if isinstance(s, Mapping):
            if not s:
                raise ValueError("guidance signal mapping is empty")
            clean = {}
            for name, coef in s.items():
                if not isinstance(name, str):
                    raise ValueError(f"guidance signal names must be strings, got {name!r}")
                if isinstance(coef, bool) or not isinstance(coef, (int, float, np.floating, np.integer)) \
                        or not math.isfinite(float(coef)):
                    raise ValueError(f"guidance signal coefficient for {name!r} must be a finite number, got {coef!r}")
                clean[name] = float(coef)
            object.__setattr__(self, "signal", clean)
        elif s is not None and not isinstance(s, str):
            raise ValueError(f"guidance signal must be a name, a {{name: coefficient}} mapping or None, got {s!r}")
        object.__setattr__(self, "trace", bool(self.trace))

    @classmethod
    def coerce(cls, obj: Any) -> Optional["Guidance"]:
        """``None`` / a :class:`Guidance` / a dict of its fields -> Guidance or None."""
        if obj is None or isinstance(obj, Guidance):
            return obj
        if isinstance(obj, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(obj) - known)
            if unknown:
                raise ValueError(f"unknown guidance option(s) {', '.join(map(repr, unknown))}; "
                                 f"expected: {', '.join(sorted(known))}")
            return cls(**dict(obj))
        raise ValueError(f"guidance must be a Guidance, a dict or None, got {type(obj).__name__}")

    def to_dict(self) -> dict:
        return {"weight": self.weight, "top_k": self.top_k, "mode": self.mode,
                "signal": dict(self.signal) if isinstance(self.signal, Mapping) else self.signal,
                "trace": self.trace}

    def resolve(self, *, head_kind: Optional[str], n_out: int, signal_names: Sequence[str],
                n_vocab: int) -> "ResolvedGuidance":
        """Check these settings against a model's head; ValueError if they do not apply."""
        if head_kind == HeadKind.TOKEN_REWARD:
            if self.signal is not None:
                raise ValueError("guidance signal selects a named signal of a 'reward' head; this model's head "
                                 "is 'token_reward' (one value per candidate token): leave signal unset")
            if n_out != n_vocab:
                raise ValueError(f"token_reward head has n_out={n_out} but the vocabulary has {n_vocab} tokens")
            return ResolvedGuidance(self, HeadKind.TOKEN_REWARD.value, None)
        if head_kind != HeadKind.REWARD:
            raise ValueError(f"guidance needs an Otter head of kind 'reward' or 'token_reward', got {head_kind!r}")
        if self.mode != "args":
            raise ValueError(f"guidance mode {self.mode!r} needs a 'token_reward' head (one value per candidate "
                             f"token); this model's head is 'reward' (scalar signals): use mode='args'")
        names = list(signal_names)
        coef = np.zeros(n_out, dtype=np.float64)
        if self.signal is None:
            if n_out != 1:
                raise ValueError(f"this head has {n_out} signals ({', '.join(names)}); choose one with "
                                 f"signal='name' or combine them with signal={{'name': coefficient, ...}}")
            coef[0] = 1.0
        else:
            spec = {self.signal: 1.0} if isinstance(self.signal, str) else dict(self.signal)
            for name, c in spec.items():
                if name not in names:
                    raise ValueError(f"unknown signal name {name!r}; this head's signals are: "
                                     f"{', '.join(names) if names else '(none)'}")
                coef[names.index(name)] += c
        return ResolvedGuidance(self, HeadKind.REWARD.value, coef)


@dataclass
class ResolvedGuidance:
    """A :class:`Guidance` checked against one model's head."""

    spec: Guidance
    head_kind: str
    coef: Optional[np.ndarray]  # [n_out] reduction of a reward head's signals to a scalar
    trace: list = field(default_factory=list)

    @property
    def weight(self) -> float:
        return self.spec.weight

    @property
    def top_k(self) -> int:
        return self.spec.top_k

    @property
    def mode(self) -> str:
        return self.spec.mode

    @property
    def batched(self) -> bool:
        """True when candidates are scored in a batched decode (scalar reward head)."""
        return self.head_kind == HeadKind.REWARD

    def reward(self, signals: np.ndarray) -> np.ndarray:
        """[..., n_out] signals -> [...] scalar rewards (reward heads)."""
        return np.asarray(signals, dtype=np.float64) @ self.coef


# ---------------------------------------------------------------------------
# selection rules (pure numpy)
# ---------------------------------------------------------------------------
def top_k_ids(logits: np.ndarray, k: int) -> np.ndarray:
    """Ids of the ``k`` largest finite logits, best first; ties go to the lower id."""
    logits = np.asarray(logits)
    finite = np.flatnonzero(np.isfinite(logits))
    if finite.size == 0 or k <= 0:
        return finite[:0]
    vals = logits[finite]
    if finite.size > k:  # only the values >= the k-th largest (ties at it included) need ordering
        keep = vals >= np.partition(vals, finite.size - k)[finite.size - k]
        finite, vals = finite[keep], vals[keep]
    order = np.lexsort((finite, -vals.astype(np.float64)))
    return finite[order[:k]]


def args_scores(logits: np.ndarray, rewards: np.ndarray, weight: float) -> np.ndarray:
    """ARGS score ``logit + weight * reward`` (float64)."""
    return np.asarray(logits, dtype=np.float64) + float(weight) * np.asarray(rewards, dtype=np.float64)


def args_pick(scores: np.ndarray, temperature: float, rng: Optional[np.random.Generator]) -> int:
    """Index of the chosen candidate: argmax (first on ties) when
    ``temperature <= 0``, else a draw from ``softmax(scores / temperature)``."""
    scores = np.asarray(scores, dtype=np.float64)
    if temperature is None or temperature <= 0.0 or scores.size == 1:
        return int(np.argmax(scores))
    z = scores / float(temperature)
    z = z - z.max()
    p = np.exp(z)
    p /= p.sum()
    if rng is None:
        rng = np.random.default_rng()
    return int(rng.choice(scores.size, p=p))


def token_args_logits(logits: np.ndarray, signal_row: np.ndarray, weight: float, k: int,
                      trace: Optional[list] = None) -> np.ndarray:
    """ARGS for a token_reward head: keep the top-k tokens by logit, score them
    ``logit + weight * signal[token]``, every other token gets ``-inf``."""
    logits = np.asarray(logits, dtype=np.float32)
    ids = top_k_ids(logits, k)
    out = np.full_like(logits, -np.inf)
    sc = args_scores(logits[ids], signal_row[ids], weight)
    out[ids] = sc.astype(np.float32)
    if trace is not None:
        trace.append({
            "candidates": ids.tolist(),
            "logits": logits[ids].astype(float).tolist(),
            "rewards": np.asarray(signal_row[ids], dtype=float).tolist(),
            "scores": sc.tolist(),
        })
    return out


def dexperts_logits(logits: np.ndarray, signal_row: np.ndarray, weight: float) -> np.ndarray:
    """DExperts for a token_reward head: ``logits + weight * signal``."""
    return (np.asarray(logits, dtype=np.float32)
            + np.float32(weight) * np.asarray(signal_row, dtype=np.float32))
