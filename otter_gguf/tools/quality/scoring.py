"""Rewards of held-out examples and of guided decoding, in llama.cpp, for an Otter head and a reward model alike.

A :class:`Scorer` gives the reward of every position of a token sequence: an Otter head (an adapter GGUF on the
base: ``signals`` of an Otter context) or a reward-model GGUF (hidden states of an embeddings context through
its score head). :func:`heldout_metrics` ranks held-out data with it; :func:`args_generate` is ARGS (greedy:
``argmax logprob + w * reward`` over the base's top-k candidates, the selection functions of
:mod:`otter_gguf.runtime.guidance`) with the base's logits from a plain base context and the candidates' rewards
from the scorer: the same algorithm for both, so the label shift compares the rewards alone.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from otter_gguf.reference.training import regression_metrics
from otter_gguf.tools.eval.metrics import log_softmax
from otter_gguf.runtime.guidance import args_scores, top_k_ids

__all__ = ["Scorer", "args_generate", "base_likelihood_accuracy", "base_logprob_margins", "decode_cost",
           "heldout_metrics"]


class Scorer:
    """Rewards from an Otter adapter GGUF on ``base`` (``adapter=``) or a reward-model GGUF (``reward_model=``)."""

    def __init__(self, base: Path, *, adapter: Path | None = None, reward_model: Path | None = None,
                 n_ctx: int = 512, n_seq: int = 1, threads: int = 1):
        from otter_gguf.runtime.session import Model

        if (adapter is None) == (reward_model is None):
            raise ValueError("a Scorer takes adapter= or reward_model=")
        self.n_seq = n_seq
        if adapter is not None:
            self.model = Model(base)
            ad = self.model.load_adapter(adapter)
            self.ctx = self.model.context(n_ctx=n_ctx, n_batch=n_ctx, n_seq_max=n_seq, n_threads=threads, heads=[ad])
            self.head = None
        else:
            from otter_gguf.reference.reward_model_gguf import read_score_head

            self.head = read_score_head(reward_model)
            self.model = Model(reward_model)
            self.ctx = self.model.context(n_ctx=n_ctx, n_batch=n_ctx, n_seq_max=n_seq, n_threads=threads,
                                          embeddings=True)

    def _row(self, i: int) -> float:
        if self.head is None:
            row = self.ctx.signals_ith(i)
            if row is None:
                raise RuntimeError(f"no Otter signals for batch index {i}")
            return float(row[0])
        return float(self.head(self.ctx.hidden_ith(i))[0])

    def rewards(self, tokens: Sequence[int]) -> np.ndarray:
        """The reward of every position of ``tokens`` (a fresh sequence)."""
        self.ctx.clear()
        self.ctx.decode(list(tokens), 0, logits="all")
        return np.array([self._row(i) for i in range(len(tokens))])

    # -- ARGS: the prefix on sequence 0, one candidate per other sequence
    def set_prefix(self, tokens: Sequence[int]) -> None:
        self.ctx.clear()
        if len(tokens) > 1:
            self.ctx.decode(list(tokens[:-1]), 0, logits="none")
        self.n = len(tokens) - 1
        self.last = tokens[-1]

    def candidate_rewards(self, cands: Sequence[int]) -> np.ndarray:
        """Rewards of ``prefix + [c]`` for each candidate ``c`` (one batch: the prefix's last token and the
        candidates on their own sequences)."""
        from llama_cpp import llama_cpp as ll

        k = len(cands)
        if k + 1 > self.n_seq:
            raise ValueError(f"{k} candidates need n_seq >= {k + 1}")
        self.ctx.decode([self.last], self.n, logits="none")
        for j in range(1, k + 1):
            ll.llama_memory_seq_rm(self.ctx.mem, j, -1, -1)
            ll.llama_memory_seq_cp(self.ctx.mem, 0, j, -1, -1)
        self.ctx.decode(list(cands), 0, seqs=list(range(1, k + 1)), positions=[self.n + 1] * k)
        return np.array([self._row(i) for i in range(k)])

    def advance(self, token: int) -> None:
        """The chosen candidate joins the prefix."""
        self.n += 1
        self.last = token

    def close(self) -> None:
        self.model.close()


def heldout_metrics(scorer: Scorer, objective: str, examples: Sequence) -> dict:
    """``token_regression``: Pearson / Spearman / MSE of the reward of every labelled token against its label
    (the metrics of training's own held-out evaluation);
    ``pairwise``: the share of pairs whose chosen reply ends with the higher reward."""
    if objective == "pairwise":
        wins = [scorer.rewards(e.tokens)[-1] > scorer.rewards(e.rejected)[-1] for e in examples]
        return {"accuracy": float(np.mean(wins)), "pairs": len(wins)}
    if objective != "token_regression":
        raise ValueError(f"no held-out metric for the {objective} objective")
    pred, true = [], []
    for e in examples:
        r = scorer.rewards(e.tokens)
        for p, t in zip(r, e.targets):
            if t is not None and not (isinstance(t, float) and math.isnan(t)):
                pred.append(p)
                true.append(t)
    return {**regression_metrics(np.array(pred), np.array(true)), "tokens": len(pred)}


def base_logprob_margins(base: Path, examples: Sequence, threads: int = 1) -> np.ndarray:
    """For each pair: the base's log-probability of the chosen reply minus that of the rejected one (the sums
    of its log-probabilities of the tokens after the prefix both share)."""
    from otter_gguf.runtime.session import Model

    model = Model(base)
    n_ctx = max(max(len(e.tokens), len(e.rejected)) for e in examples) + 1
    ctx = model.context(n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads)

    def logprob(tokens: list[int], start: int) -> float:
        ctx.clear()
        ctx.decode(list(tokens), 0, logits="all")
        return float(sum(log_softmax(ctx.logits_ith(i - 1))[tokens[i]] for i in range(max(1, start), len(tokens))))

    out = []
    for e in examples:
        start = next((i for i, (a, b) in enumerate(zip(e.tokens, e.rejected)) if a != b),
                     min(len(e.tokens), len(e.rejected)))
        out.append(logprob(e.tokens, start) - logprob(e.rejected, start))
    ctx.close()
    model.close()
    return np.array(out)


def base_likelihood_accuracy(base: Path, examples: Sequence, threads: int = 1) -> dict:
    """The reference point of a pairwise task that needs no training: the share of pairs whose chosen reply the
    base itself finds likelier (:func:`base_logprob_margins` > 0)."""
    m = base_logprob_margins(base, examples, threads)
    return {"accuracy": float(np.mean(m > 0)), "pairs": len(m)}


def args_generate(base_ctx, scorer: Scorer | None, prompt: Sequence[int], *, weight: float, top_k: int,
                  max_tokens: int, stop: Callable[[list[int]], bool]) -> list[int]:
    """Greedy ARGS continuation of ``prompt`` (``scorer=None``: greedy unguided)."""
    base_ctx.clear()
    base_ctx.prefill(list(prompt))
    if scorer is not None:
        scorer.set_prefix(list(prompt))
    out: list[int] = []
    n = len(prompt)
    for _ in range(max_tokens):
        logits = base_ctx.logits_ith(-1)
        if scorer is None:
            tok = int(np.argmax(logits))
        else:
            ids = top_k_ids(logits, top_k)
            tok = int(ids[int(np.argmax(args_scores(logits[ids], scorer.candidate_rewards(ids), weight)))])
            scorer.advance(tok)
        out.append(tok)
        if stop(out):
            break
        base_ctx.decode([tok], n, logits="last")
        n += 1
    return out


def decode_cost(base: Path, *, adapter: Path, reward_model: Path, tokens: Sequence[int], n_decode: int = 32,
                repeats: int = 5, threads: int = 1) -> dict:
    """Decode time per token (median over ``repeats``, after a warm-up) of the base alone, of the base with the
    Otter head (one context, one pass), and of the base beside the reward model (two contexts, a pass each),
    measured side by side in one process: the prompt ``tokens`` prefilled, then ``n_decode`` tokens one at a
    time."""
    from otter_gguf.runtime.session import Model

    base_m, rm_m = Model(base), Model(reward_model)
    ad = base_m.load_adapter(adapter)
    n_ctx = len(tokens) + n_decode + 8
    kw = dict(n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads)
    plain = base_m.context(**kw)
    otter = base_m.context(heads=[ad], **kw)
    rm = rm_m.context(embeddings=True, **kw)
    feed = [int(t) for t in tokens[1:1 + n_decode]] * (n_decode // max(1, len(tokens) - 1) + 1)

    def run(ctxs) -> float:
        for c in ctxs:
            c.clear()
            c.prefill(list(tokens))
        t0 = time.perf_counter()
        for i in range(n_decode):
            for c in ctxs:
                c.decode([feed[i]], len(tokens) + i, logits="last")
        return (time.perf_counter() - t0) / n_decode

    confs = {"base": [plain], "otter": [otter], "base+rm": [plain, rm]}
    times: dict[str, list[float]] = {k: [] for k in confs}
    for k, c in confs.items():
        run(c)  # warm-up
    for _ in range(repeats):
        for k, c in confs.items():
            times[k].append(run(c))
    med = {k: float(np.median(v)) for k, v in times.items()}
    for c in (plain, otter, rm):
        c.close()
    base_m.close()
    rm_m.close()
    return {"ms_per_token": {k: round(v * 1e3, 3) for k, v in med.items()},
            "extra_ms_per_token": {"otter": round((med["otter"] - med["base"]) * 1e3, 3),
                                   "reward_model": round((med["base+rm"] - med["base"]) * 1e3, 3)},
            "n_decode": n_decode, "repeats": repeats, "threads": threads}
