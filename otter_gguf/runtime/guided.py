"""Reward-guided decoding inside an OtterLlama (docs/API.md, "Reward-guided decoding").

The selection rules are the numpy functions of :mod:`otter_gguf.runtime.guidance`;
this module runs them during generation:

* :func:`token_processor`: ``token_reward`` heads, one pass per step, as a
  llama-cpp-python logits processor reading the signal row of the last fed
  position;
* :func:`generate_batched`: scalar ``reward`` heads, ARGS with the ``top_k``
  candidates decoded as ``top_k`` parallel sequences (1..k, sharing the prefix
  of sequence 0) in ONE ``llama_batch`` per step;
* :func:`resolve_heads` / :class:`HeadsGuidance`: guidance of a ``"mixed"``
  context (several heads, a token_reward head among them): a candidate's reward
  is ``sum coef * signal`` over the named signals, a token_reward head's signal
  being its row at the last fed position read at the candidate's id;
* :func:`resolve`: the one resolution of a request's guidance against the heads
  an OtterLlama runs, and :func:`constrained_logits`, :func:`candidate_rewards`,
  :func:`pick_candidate`: the parts of one batched candidate step.
  :func:`generate_batched` and the server's engine (otter_gguf/server/engine.py,
  which interleaves the steps of many sequences in one batch) both use them.

llama_cpp is imported only when batched guidance runs.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence

import numpy as np

from otter_gguf.runtime.completion import CompletionRun
from otter_gguf.format.constants import HeadKind
from otter_gguf.runtime.guidance import (
    Guidance,
    ResolvedGuidance,
    args_pick,
    args_scores,
    dexperts_logits,
    token_args_logits,
    top_k_ids,
)
from otter_gguf.runtime.signals import SignalLayout, SignalStore

__all__ = ["GrammarMask", "token_processor", "prepare_prompt", "generate_batched", "HeadsGuidance", "resolve_heads", "resolve",
           "constrained_logits", "candidate_rewards", "pick_candidate"]


@dataclass
class HeadsGuidance(ResolvedGuidance):
    """A :class:`~otter_gguf.runtime.guidance.Guidance` checked against a ``"mixed"`` context's heads.

    ``coef`` (``[n_out]``, zero on token_reward columns) weighs the reward heads' signals of a
    candidate at its own position, None when ``signal`` names none (then one pass per step,
    ``head_kind == "token_reward"``); ``token_coef`` lists ``(offset, n_vocab, coefficient)`` of the
    token_reward heads it names: their rows at the last fed position, read at the candidate's id.
    """

    token_coef: List[tuple] = field(default_factory=list)

    def token_vector(self, row: np.ndarray) -> np.ndarray:
        """``[n_vocab]``: ``sum coefficient * row[offset: offset + n_vocab]`` over the named token_reward heads."""
        row = np.asarray(row, dtype=np.float32)
        if len(self.token_coef) == 1 and self.token_coef[0][2] == 1.0:
            off, n, _ = self.token_coef[0]
            return row[off: off + n]
        out = np.zeros(self.token_coef[0][1], dtype=np.float64)
        for off, n, c in self.token_coef:
            out += c * row[off: off + n].astype(np.float64)
        return out


def resolve_heads(g: Guidance, layout: SignalLayout, n_vocab: int) -> HeadsGuidance:
    """``g`` checked against a ``"mixed"`` context's heads (ValueError if it does not apply)."""
    names = layout.names
    if g.signal is None:
        raise ValueError(f"this context runs {len(layout.heads)} Otter heads (signals: {', '.join(names)}); "
                         f"choose one with signal='name' or combine them with signal={{'name': coefficient, ...}}")
    spec = {g.signal: 1.0} if isinstance(g.signal, str) else dict(g.signal)
    coef = np.zeros(layout.n_out, dtype=np.float64)
    token_coef, scalar = [], []
    for name, c in spec.items():
        if name not in names:
            raise ValueError(f"unknown signal name {name!r}; the signals of these heads are: {', '.join(names)}")
        k = names.index(name)
        if layout.cols[k] >= 0:
            coef[layout.cols[k]] += c
            scalar.append(name)
            continue
        _, off, n = next(t for t in layout.token_heads if t[0] == k)
        if n != n_vocab:
            raise ValueError(f"token_reward head {name!r} has n_out={n} but the vocabulary has {n_vocab} tokens")
        token_coef.append((off, n, c))
    if scalar and g.mode != "args":
        raise ValueError(f"guidance mode {g.mode!r} shifts every token's logit by a per-token reward; "
                         f"{', '.join(map(repr, scalar))} {'is a scalar signal' if len(scalar) == 1 else 'are scalar signals'} "
                         f"of a reward head (one value per fed token, known only for scored candidates): "
                         f"use mode='args', or name only token_reward signals")
    kind = HeadKind.REWARD.value if scalar else HeadKind.TOKEN_REWARD.value
    return HeadsGuidance(g, kind, coef if scalar else None, token_coef=token_coef)


def resolve(g: Guidance, llm: Any) -> ResolvedGuidance:
    """``g`` checked against the heads the OtterLlama ``llm`` runs (ValueError naming what does
    not apply): :func:`resolve_heads` on a ``"mixed"`` context, :meth:`Guidance.resolve` otherwise."""
    layout = llm._otter_src.layout
    if layout is not None:  # several heads, a token_reward head among them
        return resolve_heads(g, layout, llm._n_vocab)
    return g.resolve(head_kind=llm.head_kind, n_out=llm.n_out, signal_names=llm.signal_names, n_vocab=llm._n_vocab)


def constrained_logits(logits: np.ndarray, processors: Any, chain: Any, cand: Any, input_ids: Any = None) -> np.ndarray:
    """A batched step's logits before choosing candidates: the logits processors (a callable or
    None), then the penalties / grammar sampler ``chain`` (None: none), whose rejected tokens get
    ``-inf``. ``cand`` is a ``LlamaTokenDataArray`` of the vocabulary's size, reused across steps."""
    import llama_cpp

    cur = logits
    if processors is not None:
        cur = np.asarray(processors(input_ids, cur.copy()), dtype=np.float32)
    if chain is not None:
        cand.copy_logits(cur)
        llama_cpp.llama_sampler_apply(chain.sampler, ctypes.byref(cand.candidates))
        size = int(cand.candidates.size)
        cur = np.full(logits.shape[0], -np.inf, dtype=np.float32)
        cur[cand.candidates_data.id[:size]] = cand.candidates_data.logit[:size]
    return cur


def candidate_rewards(g: ResolvedGuidance, sig: np.ndarray, ids: np.ndarray, prev: Optional[np.ndarray],
                      position: int) -> np.ndarray:
    """The rewards of a batched step's candidates ``ids``: their own signal rows ``sig``
    (``[k, n_out]``) reduced by ``g``, plus, for a combination with token_reward heads, those heads'
    rows at the last fed position (``prev``, the row of ``position``) read at the candidates' ids."""
    rewards = g.reward(sig)
    if isinstance(g, HeadsGuidance) and g.token_coef:
        if prev is None:
            raise RuntimeError(f"no Otter signal row for position {position} while guiding")
        rewards = rewards + g.token_vector(prev)[ids].astype(np.float64)
    return rewards


def pick_candidate(g: ResolvedGuidance, ids: np.ndarray, logits: np.ndarray, rewards: np.ndarray, temp: float,
                   rng: np.random.Generator, trace: Optional[list]) -> int:
    """ARGS over the candidates (``logits``: their constrained logits): the index ``j`` of the
    chosen one; with ``trace`` (a list) the step is appended to it."""
    scores = args_scores(logits, rewards, g.weight)
    j = args_pick(scores, temp, rng)
    if trace is not None:
        trace.append({"candidates": ids.tolist(), "logits": logits.astype(float).tolist(),
                      "rewards": rewards.tolist(), "scores": scores.tolist(), "chosen": int(ids[j])})
    return j


def _candidate_row(g: ResolvedGuidance, row: np.ndarray) -> np.ndarray:
    """The per-candidate reward vector of a token_reward guidance from a signal row."""
    return g.token_vector(row) if isinstance(g, HeadsGuidance) else row


class GrammarMask:
    """The tokens a grammar allows next, for guidance that must choose among them: its own
    llama.cpp grammar sampler, advanced over ``generated`` (the completion's tokens so far)
    before each use. (llama-cpp-python's chain applies logits processors before the grammar,
    so guidance alone would rank candidates the grammar then rejects.)"""

    def __init__(self, model: Any, grammar: Any):
        import llama_cpp._internals as internals

        self._chain = internals.LlamaSampler()
        self._chain.add_grammar(model, grammar)
        self._cand: Any = None
        self._accepted = 0

    def __call__(self, generated: Sequence[int], scores: np.ndarray) -> np.ndarray:
        import llama_cpp
        import llama_cpp._internals as internals

        for t in generated[self._accepted:]:
            llama_cpp.llama_sampler_accept(self._chain.sampler, int(t))
        self._accepted = len(generated)
        if self._cand is None:
            self._cand = internals.LlamaTokenDataArray(n_vocab=int(scores.shape[0]))
        return constrained_logits(np.asarray(scores, dtype=np.float32), None, self._chain, self._cand)


def token_processor(g: ResolvedGuidance, run: CompletionRun, store: SignalStore,
                    position: Callable[[], int], grammar_mask: Optional[GrammarMask] = None):
    """The llama-cpp-python logits processor of token_reward guidance: re-ranks
    (``args``) or shifts (``dexperts``) the logits with the signal row of the
    last fed position (``position()``, i.e. ``n_tokens - 1``) in ``store``;
    with a ``grammar_mask``, among the tokens the grammar allows (``run.generated``
    must hold the completion's tokens so far)."""
    trace = run.trace if g.spec.trace else None

    def otter_guidance(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        p = position()
        row = store.get(p)
        if row is None:
            # exceptions do not cross the ctypes sampler callback: report after sampling
            run.error = RuntimeError(f"no Otter signal row for position {p} while guiding")
            return scores
        if grammar_mask is not None:
            scores = grammar_mask(run.generated, scores)
            if not np.isfinite(scores).any():
                run.error = RuntimeError("guidance: the grammar allows no token here")
                return scores
        row = _candidate_row(g, row)
        if g.mode == "dexperts":
            return dexperts_logits(scores, row, g.weight)
        return token_args_logits(scores, row, g.weight, g.top_k, trace=trace)

    return otter_guidance


def prepare_prompt(llm: Any, tokens: List[int], reset: bool) -> None:
    """Bring the context to ``tokens`` with live logits for the last one."""
    if reset:
        reuse = 0
        if llm.n_tokens > 0:
            reuse = min(llm.longest_token_prefix(llm._input_ids.tolist(), tokens), len(tokens) - 1)
        if reuse > 0 and llm._ctx.kv_cache_seq_rm(-1, reuse, -1):
            llm.n_tokens = reuse
        else:
            llm.reset()
    llm.eval(tokens[llm.n_tokens:])


def generate_batched(llm: Any, tokens: List[int], g: ResolvedGuidance, run: CompletionRun, *, temp, repeat_penalty,
                     frequency_penalty, presence_penalty, logits_processor, stopping_criteria, grammar, reset):
    """ARGS for scalar reward heads: every step scores the top-k candidates
    as k parallel sequences in ONE decode, then keeps the winner's cache.
    A generator of the chosen tokens, as ``Llama.generate``; ``llm`` is the
    :class:`~otter_gguf.runtime.llama.OtterLlama`."""
    import llama_cpp
    import llama_cpp._internals as internals

    mem = llm._ctx.memory
    n_vocab = llm._n_vocab
    st = llm._otter_store
    chain = None
    try:
        llama_cpp.llama_memory_seq_keep(mem, 0)
        prepare_prompt(llm, tokens, reset)
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,)).copy()
        if repeat_penalty != 1.0 or frequency_penalty != 0.0 or presence_penalty != 0.0 or grammar is not None:
            chain = internals.LlamaSampler()
            if repeat_penalty != 1.0 or frequency_penalty != 0.0 or presence_penalty != 0.0:
                chain.add_penalties(n_vocab=n_vocab, penalty_last_n=llm.last_n_tokens_size,
                                    penalty_repeat=repeat_penalty, penalty_freq=frequency_penalty,
                                    penalty_present=presence_penalty)
            if grammar is not None:
                chain.add_grammar(llm._model, grammar)
        cand = internals.LlamaTokenDataArray(n_vocab=n_vocab)
        rng = np.random.default_rng(int(llm._seed) & 0xFFFFFFFFFFFFFFFF)
        batch = llm._batch.batch
        while True:
            n = llm.n_tokens
            if n >= llm._n_ctx:
                return
            cur = constrained_logits(logits, logits_processor, chain, cand, llm._input_ids)
            k = min(g.top_k, llm._n_ctx - n, llm.n_batch)
            ids = top_k_ids(cur, k)
            if ids.size == 0:
                raise RuntimeError("guidance: no candidate token is left after the logits processors / grammar")
            for s in range(1, ids.size + 1):
                llama_cpp.llama_memory_seq_cp(mem, 0, s, -1, -1)
            batch.n_tokens = int(ids.size)
            for j, t in enumerate(ids.tolist()):
                batch.token[j] = t
                batch.pos[j] = n
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = j + 1
                batch.logits[j] = True
            llm._ctx.decode(llm._batch)
            prefix = llm.input_ids[:n].tolist()
            sig = np.stack([llm._otter_src.read_row(j, lambda t=t: prefix + [t])
                            for j, t in enumerate(ids.tolist())]).astype(np.float32)
            rewards = candidate_rewards(g, sig, ids, st.get(n - 1), n - 1)
            j = pick_candidate(g, ids, cur[ids], rewards, temp, rng, run.trace if g.spec.trace else None)
            tok = int(ids[j])
            new_logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(j), shape=(n_vocab,)).copy()
            llama_cpp.llama_memory_seq_cp(mem, j + 1, 0, n, n + 1)
            llama_cpp.llama_memory_seq_keep(mem, 0)
            llm.input_ids[n] = tok
            llm.n_tokens = n + 1
            llm._requires_eval = False
            if llm._logits_all:
                llm.scores[n, :] = new_logits
            st.truncate(n)
            st.note_token(n, tok)
            st.put(n, sig[j])
            if chain is not None:
                llama_cpp.llama_sampler_accept(chain.sampler, tok)
            used = cur
            logits = new_logits
            if stopping_criteria is not None and stopping_criteria(llm._input_ids[:n], used):
                return
            yield tok
    finally:
        if llm._ctx.ctx is not None and mem is not None:
            llama_cpp.llama_memory_seq_keep(mem, 0)
        if chain is not None:
            chain.close()
