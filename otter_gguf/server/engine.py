"""Continuous batching over one llama_context, as llama.cpp's llama-server does it.

One :class:`Engine` owns the model's context (``n_seq_max`` = ``--parallel``,
unified KV cache) and one scheduler thread. Requests are :class:`Job`\\ s; a
job admitted to the pool gets a sequence id (a scalar-head guidance job with
``top_k = k`` gets ``k + 1``) and from then on every scheduler step puts its
tokens into the ONE ``llama_batch`` of that step:

* a generating sequence feeds its last sampled token (one output row: the
  logits of the next sample and the Otter signal of that token);
* a scalar-head guidance sequence feeds its ``k`` candidates, each under its
  own helper sequence id (sharing the prefix through ``llama_memory_seq_cp``),
  keeps the chosen candidate's cell and drops the helpers, as
  :func:`otter_gguf.runtime.guided.generate_batched` does for one request;
* sequences still in their prompt (completions) or being scored fill the rest
  of the batch (chunked prefill); scoring rows are read in the runtime's
  all-positions mode.

Jobs join and leave between steps; a finished or cancelled job's sequences are
removed from the KV cache (``llama_memory_seq_rm``) at once. Each job has its
own sampler chain (llama-cpp-python's, built by ``Llama._init_sampler``),
stop strings, per-position :class:`~otter_gguf.runtime.signals.SignalStore`
and ``otter`` blocks (:class:`~otter_gguf.runtime.completion.CompletionAssembler`),
so a served completion carries the fields the Python API gives.

Jobs beyond the pool wait in a bounded FIFO queue (:class:`QueueFull` beyond
it). Results go to the job's ``sink`` (called from the scheduler thread) as
:class:`Delta` (streamed text), :class:`Done` and :class:`Failed` events.
"""

from __future__ import annotations

import collections
import threading
import time
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional

import numpy as np

import llama_cpp
import llama_cpp._internals as internals
from llama_cpp import Llama
from llama_cpp.llama import LogitsProcessorList
from llama_cpp.llama_grammar import LlamaGrammar

from otter_gguf.runtime import guided
from otter_gguf.runtime.completion import CompletionAssembler, CompletionRun
from otter_gguf.runtime.guidance import ResolvedGuidance, top_k_ids
from otter_gguf.runtime.signals import SignalStore
from otter_gguf.server.logprobs import TokenLogprobs, entry
from otter_gguf.server.text import CompletionText

__all__ = ["Engine", "Job", "Sampling", "Delta", "Done", "Failed", "QueueFull"]


class QueueFull(RuntimeError):
    """The wait queue is at its bound (HTTP 503 with Retry-After)."""


@dataclass
class Sampling:
    """The sampling parameters of llama-cpp-python's ``create_completion``."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    mirostat_mode: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    seed: Optional[int] = None
    grammar: Optional[str] = None
    logit_bias: Optional[Dict[int, float]] = None


@dataclass
class Job:
    """One request. ``kind``: ``"completion"`` (also chat: the app renders the
    template into ``prompt_tokens``) or ``"score"``."""

    kind: str
    prompt_tokens: List[int]
    sink: Callable[[Any], None]
    max_tokens: int = 16
    stop: List[bytes] = field(default_factory=list)
    stream: bool = False
    sampling: Sampling = field(default_factory=Sampling)
    guidance: Optional[ResolvedGuidance] = None
    full_signals: bool = False
    side_stream: bool = True  # compute (and return) the Otter signals
    echo_prefix: str = ""  # echo: the prompt text, prepended to the result text and offsets
    heads: Any = None  # a HeadSelection (server.heads): the heads the otter blocks show; None: all
    logprobs: Optional[int] = None  # log-probabilities of the tokens and the top N (server.logprobs); None: none
    cache_prompt: bool = True  # reuse a prompt prefix another sequence holds (llama-server's cache_prompt)
    draft_max: Optional[int] = None  # speculative decoding: drafts per step (None: the server's; 0: off)
    text_base: int = 0  # logprobs' text_offset of the first completion character (the prompt text's length)
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)

    @property
    def n_seqs(self) -> int:
        return 1 + (self.guidance.top_k if self.guidance is not None and self.guidance.batched else 0)

    def cancel(self) -> None:
        """Free the job's sequences at the next step (client gone)."""
        self.cancelled = True


@dataclass
class Delta:
    """Streamed text: ``otter`` is the block of the tokens it carries (None without signals)."""

    text: str
    otter: Optional[dict]
    finish_reason: Optional[str] = None
    logprobs: Optional[dict] = None  # completion-shaped logprobs of the tokens it carries


@dataclass
class Done:
    """The end of a job. Completions: ``text`` (whole text; for streams the
    last delta's), ``otter`` (whole block; streams: the last chunk's block),
    ``finish_reason``, token counts. Scoring: ``score``."""

    text: str = ""
    otter: Optional[dict] = None
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    score: Optional[dict] = None
    first_token_s: Optional[float] = None
    logprobs: Optional[dict] = None
    cached_tokens: int = 0  # prompt tokens reused from the prompt cache


@dataclass
class Failed:
    status: int
    message: str


class _Slot:
    """A job admitted to the pool: its sequences and decoding state."""

    def __init__(self, job: Job, seqs: List[int]):
        self.job = job
        self.seq = seqs[0]
        self.helpers = seqs[1:]
        self.n_past = 0  # tokens of this sequence in the KV cache
        self.cached = 0  # of them, prompt tokens reused from the prompt cache
        self.side_ok = True  # every cell of the sequence has its side-stream K/V (no step ran with it off)
        self.pending: Optional[int] = None  # sampled, to be fed (plain decoding)
        self.finishing: Optional[str] = None  # finish reason once decided, last token still to feed
        self.logits: Optional[np.ndarray] = None  # scalar guidance: distribution of the next step
        self.sampler: Any = None
        self.chain: Any = None  # scalar guidance: penalties / grammar
        self.rng: Optional[np.random.Generator] = None
        self.store: Optional[SignalStore] = None
        self.run: Optional[CompletionRun] = None
        self.blocks: Optional[CompletionAssembler] = None
        self.text: Optional[CompletionText] = None
        self.n_fed = 0  # completion tokens whose signal is known (fed)
        self.score_rows: Optional[np.ndarray] = None
        self.first_token_s: Optional[float] = None
        self.procs: List[Any] = []  # logits processors (logit_bias) of scalar guidance
        self.cand: Optional[np.ndarray] = None  # scalar guidance: this step's candidates
        self.cand_array: Any = None  # scalar guidance with a sampler chain: its token data array
        self.cur: Optional[np.ndarray] = None  # ... and the processed logits they came from
        self.drafts: List[int] = []  # speculative decoding: the drafts fed after `pending` this step
        self.lp: Optional[TokenLogprobs] = None  # logprobs: the entries of (echoed prompt and) completion tokens
        self.lp0 = 0  # entries of echoed prompt tokens before the completion's

    @property
    def prefill(self) -> bool:
        return self.n_past < len(self.job.prompt_tokens)


class Engine:
    """The scheduler over one :class:`~otter_gguf.runtime.llama.OtterLlama`'s context.

    ``llm`` must have been created with ``n_seq_max >= parallel`` (unified KV)
    and ``n_ctx >= parallel * ctx_per_seq``; :func:`otter_gguf.server.model.load_model`
    does that.
    """

    def __init__(self, llm: Any, *, parallel: int, ctx_per_seq: int, queue_size: int = 64,
                 on_step: Optional[Callable[[int, float], None]] = None, cache_prompt: bool = True,
                 drafter: Any = None, draft_max: int = 0):
        if llm.n_seq_max < parallel:
            raise ValueError(f"the context has n_seq_max={llm.n_seq_max} < parallel={parallel}")
        if llm.n_batch < parallel:
            raise ValueError(f"n_batch={llm.n_batch} must be >= parallel={parallel}")
        self.llm = llm
        self.parallel = parallel
        self.ctx_per_seq = ctx_per_seq
        self.queue_size = queue_size
        self.on_step = on_step
        self.n_batch = llm.n_batch
        self.n_vocab = llm._n_vocab
        self.has_otter = bool(llm.has_otter)
        self._src = llm._otter_src
        self._ctx = llm._ctx
        self._mem = llm._ctx.memory
        self._batch = internals.LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1, verbose=False)
        self._free: List[int] = list(range(parallel))
        # the prompt cache: what a free sequence still holds (its tokens, whether their side K/V was
        # computed) and when it was last used (LRU: the least recently used free sequence is taken
        # first by a job that reuses nothing)
        self._held: Dict[int, tuple] = {}
        self._used: Dict[int, int] = {q: 0 for q in range(parallel)}
        self._clock = 0
        self._swa = int(llama_cpp.llama_model_n_swa(llm._model.model)) > 0
        self.cache_prompt = cache_prompt
        self.drafter = drafter  # a llama-cpp-python LlamaDraftModel (prompt lookup, runtime.draft.DraftLlama)
        self.draft_max = draft_max if drafter is not None else 0
        self.drafted_tokens = 0
        self.accepted_tokens = 0
        self.cached_tokens = 0  # prompt tokens reused, since the start
        self._waiting: Deque[Job] = collections.deque()
        self._slots: List[_Slot] = []
        self._cv = threading.Condition()
        self._stop = False
        self._otter_on = self.has_otter and llm.otter_enabled
        self._thread: Optional[threading.Thread] = None
        self.steps = 0
        self.tokens_decoded = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.peak_sequences = 0  # most requests decoded in one step
        # end-of-generation tokens (llama_vocab_is_eog), as the Python API tests them
        self._vocab = llm._model.vocab
        for s in range(parallel):
            llama_cpp.llama_memory_seq_rm(self._mem, s, -1, -1)

    # ------------------------------------------------------------------
    # public
    # ------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="otter-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, *jobs: Job) -> None:
        """Queue ``jobs`` (the choices of one request: all or none); :class:`QueueFull` when the
        wait queue would pass its bound."""
        for job in jobs:
            if job.n_seqs > self.parallel:
                raise ValueError(f"this request needs {job.n_seqs} parallel sequences, the server has "
                                 f"{self.parallel}")
        with self._cv:
            if len(self._waiting) + len(jobs) > self.queue_size:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (queue bound {self.queue_size})")
            self._waiting.extend(jobs)
            self._cv.notify_all()

    def fail_all(self, status: int, message: str) -> None:
        """Answer every admitted and waiting job with ``Failed(status, message)`` now, from any
        thread, without touching the context: for a process about to end (ggml aborting on a lost
        RPC server, while the scheduler thread waits inside llama_decode)."""
        for s in list(self._slots):
            s.job.sink(Failed(status, message))
        for job in list(self._waiting):
            job.sink(Failed(status, message))

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._slots)

    @property
    def free_sequences(self) -> int:
        return len(self._free)

    # ------------------------------------------------------------------
    # scheduler
    # ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._slots and not self._waiting:
                    self._cv.wait()
                if self._stop:
                    break
                self._admit()
            self._drop_cancelled()
            if not self._slots:
                continue
            t0 = time.perf_counter()
            try:
                n = self._step()
            except Exception as e:  # noqa: BLE001 - a failed decode fails its jobs, not the server
                for s in list(self._slots):
                    self._finish(s, Failed(500, f"decode failed: {e}"))
                continue
            if self.on_step is not None:
                self.on_step(n, time.perf_counter() - t0)
        for s in list(self._slots):
            self._finish(s, Failed(503, "server shutting down"))
        with self._cv:
            while self._waiting:
                self._waiting.popleft().sink(Failed(503, "server shutting down"))

    def _admit(self) -> None:
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled:
                self._waiting.popleft()
                continue
            if job.n_seqs > len(self._free):
                return
            self._waiting.popleft()
            seqs, *reuse = self._take(job)
            try:
                slot = self._open(job, seqs)
            except Exception as e:  # noqa: BLE001 - a bad grammar etc.: that request fails
                for q in seqs:
                    llama_cpp.llama_memory_seq_rm(self._mem, q, -1, -1)
                with self._cv:
                    self._free.extend(seqs)
                    self._free.sort()
                job.sink(Failed(400, str(e)))
                continue
            self._reuse(slot, *reuse)
            self._slots.append(slot)

    # ------------------------------------------------------------------
    # the prompt cache
    # ------------------------------------------------------------------
    def _sources(self):
        """(seq, tokens held, side K/V computed, free) of every sequence holding tokens."""
        for q, (toks, side) in self._held.items():
            yield q, toks, side, True
        for s in self._slots:
            if s.job.kind == "completion" and s.text is not None:
                yield s.seq, (s.job.prompt_tokens + s.text.tokens)[: s.n_past], s.side_ok, False
            else:
                yield s.seq, s.job.prompt_tokens[: s.n_past], s.side_ok, False

    def _usable(self, q: int) -> bool:
        """A sequence's cells can be extended from any position: no sliding-window layer dropped any."""
        return not self._swa or int(llama_cpp.llama_memory_seq_pos_min(self._mem, q)) <= 0

    def _take(self, job: Job):
        """The sequences of a newly admitted job, with the prompt tokens it reuses and whether their
        side-stream K/V was computed: ``(seqs, n, side)``.
        The longest prefix of its prompt any sequence holds (free or active) is reused; the job takes
        over that sequence when it is free and the prefix is at least half of what it holds (the job
        continues it, as a chat's next turn does), else it takes the least recently used free sequence
        and the prefix's cells are shared into it (``llama_memory_seq_cp``: no copy of the data)."""
        toks = job.prompt_tokens
        best, src = 0, None  # src: (seq, free, side K/V computed, tokens held)
        if job.cache_prompt and self.cache_prompt and job.kind == "completion" and \
                not (job.echo_prefix and job.logprobs is not None):
            limit = len(toks) - 1  # the last prompt token is always decoded: its logits and signal row
            for q, held, side, free in self._sources():
                if job.side_stream and self.has_otter and not side:
                    continue
                n = 0
                for a, b in zip(held[:limit], toks):
                    if a != b:
                        break
                    n += 1
                if n > best and self._usable(q):
                    best, src = n, (q, free, side, len(held))
        with self._cv:
            if src is not None and src[1] and 2 * best >= src[3]:
                main = src[0]
            else:
                main = min(self._free, key=lambda q: self._used[q])
            self._free.remove(main)
            rest = sorted(self._free, key=lambda q: self._used[q])[: job.n_seqs - 1]
            for q in rest:
                self._free.remove(q)
        mem = self._mem
        if src is not None and src[0] == main:
            llama_cpp.llama_memory_seq_rm(mem, main, best, -1)  # take it over: keep the prefix
        else:
            llama_cpp.llama_memory_seq_rm(mem, main, -1, -1)
            if src is not None:
                llama_cpp.llama_memory_seq_cp(mem, src[0], main, 0, best)
        self._held.pop(main, None)
        for q in rest:  # (after the copy: the source may be one of them)
            self._held.pop(q, None)
            llama_cpp.llama_memory_seq_rm(mem, q, -1, -1)
        return [main, *rest], best, (src[2] if src else True)

    def _reuse(self, s: _Slot, n: int, side: bool) -> None:
        """``s`` starts after the ``n`` prompt tokens its sequence got from the prompt cache
        (``side``: their side-stream K/V was computed)."""
        s.side_ok = side
        s.n_past = s.cached = n
        self.cached_tokens += n

    def _open(self, job: Job, seqs: List[int]) -> _Slot:
        s = _Slot(job, seqs)
        llm = self.llm
        if self.has_otter and job.side_stream:
            token_head = llm.head_kind == "token_reward"
            s.store = SignalStore(self.ctx_per_seq, llm.n_out, token_head, layout=llm._otter_src.layout)
            if token_head and job.full_signals:
                s.store.keep_from = max(0, len(job.prompt_tokens) - 1)
        if job.kind == "score":
            s.score_rows = np.empty((len(job.prompt_tokens), llm.n_out), dtype=np.float32)
            return s
        s.text = CompletionText(llm.detokenize, job.prompt_tokens, job.stop)
        if job.logprobs is not None:
            echo = bool(job.echo_prefix)
            s.lp = TokenLogprobs(llm.detokenize, job.logprobs, 0 if echo else job.text_base,
                                 bos=llm.token_bos() if echo else None)
            if echo:  # the prompt's tokens first; the first has no value (nor a BOS after it, as in OpenAI's API)
                s.lp.add(job.prompt_tokens[0], None)
                s.lp0 = len(job.prompt_tokens)
        if s.store is not None:
            s.run = CompletionRun(guidance=job.guidance, prompt=job.echo_prefix or None,
                                  echo=bool(job.echo_prefix), full_signals=job.full_signals)
            s.run.prompt_len = len(job.prompt_tokens)
            s.blocks = CompletionAssembler(
                s.store, head_kind=llm.head_kind, signal_names=llm.signal_names,
                detokenize=llm.detokenize, is_eog=lambda t: llama_cpp.llama_vocab_is_eog(self._vocab, t))
        sp = job.sampling
        seed = sp.seed if sp.seed is not None else int.from_bytes(np.random.bytes(4), "little")
        grammar = LlamaGrammar.from_string(sp.grammar, verbose=False) if sp.grammar else None
        procs: List[Any] = []
        if sp.logit_bias:
            bias = dict(sp.logit_bias)

            def logit_bias_processor(input_ids, scores):
                out = np.copy(scores)
                for t, b in bias.items():
                    out[t] = b + scores[t]
                return out

            procs.append(logit_bias_processor)
        g = job.guidance
        if g is not None and g.batched:
            s.rng = np.random.default_rng(int(seed) & 0xFFFFFFFFFFFFFFFF)
            s.procs = procs
            if sp.repeat_penalty != 1.0 or sp.frequency_penalty != 0.0 or sp.presence_penalty != 0.0 \
                    or grammar is not None:
                s.chain = internals.LlamaSampler()
                if sp.repeat_penalty != 1.0 or sp.frequency_penalty != 0.0 or sp.presence_penalty != 0.0:
                    s.chain.add_penalties(n_vocab=self.n_vocab, penalty_last_n=llm.last_n_tokens_size,
                                          penalty_repeat=sp.repeat_penalty, penalty_freq=sp.frequency_penalty,
                                          penalty_present=sp.presence_penalty)
                if grammar is not None:
                    s.chain.add_grammar(llm._model, grammar)
            return s
        if g is not None:
            procs.append(guided.token_processor(g, s.run, s.store, lambda: s.n_past - 1,
                                                guided.GrammarMask(llm._model, grammar) if grammar else None))
        # llama-cpp-python's own sampler chain, exactly as Llama.generate builds it
        shim = types.SimpleNamespace(_input_ids=np.zeros(0, dtype=np.intc), _n_vocab=self.n_vocab,
                                     last_n_tokens_size=llm.last_n_tokens_size, _model=llm._model, _seed=seed)
        s.sampler = Llama._init_sampler(
            shim, top_k=sp.top_k, top_p=sp.top_p, min_p=sp.min_p, typical_p=sp.typical_p, temp=sp.temperature,
            repeat_penalty=sp.repeat_penalty, frequency_penalty=sp.frequency_penalty,
            presence_penalty=sp.presence_penalty, mirostat_mode=sp.mirostat_mode, mirostat_tau=sp.mirostat_tau,
            mirostat_eta=sp.mirostat_eta, logits_processor=LogitsProcessorList(procs) if procs else None,
            grammar=grammar)
        return s

    def _drop_cancelled(self) -> None:
        for s in [s for s in self._slots if s.job.cancelled]:
            self._release(s)

    def _release(self, s: _Slot) -> None:
        for q in s.helpers:
            llama_cpp.llama_memory_seq_rm(self._mem, q, -1, -1)
        llama_cpp.llama_memory_seq_rm(self._mem, s.seq, s.n_past, -1)  # drafts not kept (a stop inside them)
        # the job's own sequence keeps its cells for the prompt cache (taken over or cleared when reused)
        held = ((s.job.prompt_tokens + s.text.tokens) if s.text is not None else s.job.prompt_tokens)[: s.n_past]
        if held and self.cache_prompt:
            self._held[s.seq] = (held, s.side_ok)
        else:
            llama_cpp.llama_memory_seq_rm(self._mem, s.seq, -1, -1)
        self._clock += 1
        for q in [s.seq, *s.helpers]:
            self._used[q] = self._clock
        for obj in (s.sampler, s.chain):
            if obj is not None:
                obj.close()
        s.sampler = s.chain = None
        self._slots.remove(s)
        with self._cv:
            self._free.extend([s.seq, *s.helpers])
            self._free.sort()

    def _finish(self, s: _Slot, event: Any) -> None:
        self._release(s)
        s.job.sink(event)

    # ------------------------------------------------------------------
    # one step = one llama_decode
    # ------------------------------------------------------------------
    def _set_otter(self, on: bool) -> None:
        if self.has_otter and on != self._otter_on:
            self._src.set_enabled(on)
            self._otter_on = on

    def _step(self) -> int:
        b = self._batch.batch
        n = 0
        plan: List[tuple] = []  # (slot, what, first batch index, count)
        scoring = False
        need_signals = False

        def put(tok: int, pos: int, seq: int, out: bool) -> None:
            nonlocal n
            b.token[n], b.pos[n], b.n_seq_id[n], b.seq_id[n][0], b.logits[n] = tok, pos, 1, seq, out
            n += 1

        # 1. sequences that are generating: one token each (plus its drafts when speculating), k candidates
        # for scalar guidance; drafts take what the batch has left after one token per generating sequence
        spare = self.n_batch - sum((s.job.guidance.top_k if s.logits is not None else 1)
                                   for s in self._slots if not s.prefill)
        for s in self._slots:
            if s.prefill:
                continue
            if s.logits is not None:  # scalar-head guidance: the candidates of this step
                ids = self._candidates(s)
                if ids is None:
                    continue
                s.cand = ids
                plan.append((s, "cand", n, ids.size))
                for j, t in enumerate(ids.tolist()):
                    llama_cpp.llama_memory_seq_cp(self._mem, s.seq, s.helpers[j], -1, -1)
                    put(t, s.n_past, s.helpers[j], True)
            else:
                s.drafts = self._draft(s, max(0, spare))
                spare -= len(s.drafts)
                plan.append((s, "feed", n, 1 + len(s.drafts)))
                put(s.pending, s.n_past, s.seq, True)
                for j, t in enumerate(s.drafts):
                    put(t, s.n_past + 1 + j, s.seq, True)
            need_signals |= s.store is not None
        # 2. prompts and scoring: the rest of the batch, first come first served
        for s in self._slots:
            if not s.prefill or n >= self.n_batch:
                continue
            toks = s.job.prompt_tokens
            count = min(len(toks) - s.n_past, self.n_batch - n)
            last = s.n_past + count == len(toks)
            plan.append((s, "prompt", n, count))
            every = s.lp0 > 0  # echo with logprobs: the logits of every prompt position
            for j in range(count):
                put(toks[s.n_past + j], s.n_past + j, s.seq, last and j == count - 1 or every or
                    (s.job.kind == "score" and j == count - 1))
            scoring |= s.job.kind == "score"
            need_signals |= s.store is not None
        if n == 0:
            return 0
        b.n_tokens = n
        self._set_otter(need_signals)
        if not need_signals and self.has_otter:
            for s, _, _, _ in plan:  # their new cells have no side-stream K/V
                s.side_ok = False
        if scoring:
            self._src.set_all_positions(True)
        try:
            rc = llama_cpp.llama_decode(self._ctx.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            for s, what, i0, count in plan:
                if s not in self._slots:
                    continue
                try:
                    if what == "feed":
                        self._after_verify(s, i0) if s.drafts else self._after_feed(s, i0)
                    elif what == "cand":
                        self._after_candidates(s, i0)
                    else:
                        self._after_prompt(s, i0, count)
                except Exception as e:  # noqa: BLE001 - one request's failure
                    self._finish(s, Failed(500, f"{type(e).__name__}: {e}"))
        finally:
            if scoring:
                self._src.set_all_positions(False)
        self.steps += 1
        self.tokens_decoded += n
        self.peak_sequences = max(self.peak_sequences, len(plan))
        return n

    # ------------------------------------------------------------------
    # after the decode
    # ------------------------------------------------------------------
    def _history(self, s: _Slot, pos: int) -> Callable[[], List[int]]:
        toks = s.job.prompt_tokens + (s.text.tokens if s.text is not None else [])
        return lambda: toks[: pos + 1]

    def _read(self, s: _Slot, i: int, pos: int) -> None:
        if s.store is not None:
            s.store.put(pos, self._src.read_row(i, self._history(s, pos)))

    def _after_prompt(self, s: _Slot, i0: int, count: int) -> None:
        job = s.job
        p0 = s.n_past
        s.n_past += count
        self.prompt_tokens += count
        if job.kind == "score":
            for j in range(count):
                s.score_rows[p0 + j] = self._src.read_position(i0 + j, self._history(s, p0 + j))
            if not s.prefill:
                self._finish(s, Done(score={"tokens": list(job.prompt_tokens), "signals": s.score_rows},
                                     prompt_tokens=len(job.prompt_tokens)))
            return
        if s.lp0:
            self._prompt_logprobs(s, p0, i0, count)
        if s.prefill:
            return
        last = i0 + count - 1
        self._read(s, last, s.n_past - 1)
        if s.rng is not None:
            s.logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx.ctx, last),
                                             shape=(self.n_vocab,)).copy()
            if job.max_tokens <= 0:
                self._complete(s, "length")
            return
        self._sample(s, last)

    def _logits(self, i: int) -> np.ndarray:
        """The raw logits of output row ``i`` of the last decode (a view)."""
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx.ctx, i), shape=(self.n_vocab,))

    def _prompt_logprobs(self, s: _Slot, p0: int, i0: int, count: int) -> None:
        """Echo with logprobs: the entries of the prompt tokens after rows ``i0 ..`` (positions ``p0 ..``)."""
        toks = s.job.prompt_tokens
        for j in range(count):
            if p0 + j + 1 < len(toks):
                t = toks[p0 + j + 1]
                s.lp.add(t, None if p0 + j == 0 and toks[0] == s.lp.bos else entry(self._logits(i0 + j), t, s.lp.n))

    def _sample(self, s: _Slot, i: int) -> None:
        if s.job.max_tokens <= 0:
            return self._complete(s, "length")
        tok = int(s.sampler.sample(self._ctx, i))
        if s.run is not None and s.run.error is not None:
            raise s.run.error
        self._accept(s, tok, self._logits(i) if s.lp is not None else None)

    def _accept(self, s: _Slot, tok: int, logits: Optional[np.ndarray] = None) -> None:
        """A new token was chosen for position ``s.n_past`` (plain decoding: still to be fed) from
        the raw ``logits`` (for its logprobs)."""
        if s.first_token_s is None:
            s.first_token_s = time.monotonic() - s.job.submitted
        if llama_cpp.llama_vocab_is_eog(self._vocab, tok):
            return self._complete(s, "stop")
        if s.lp is not None:
            s.lp.add(tok, entry(logits, tok, s.lp.n))
        if s.store is not None:
            s.store.note_token(s.n_past, tok)
        if s.run is not None:
            s.run.generated.append(tok)
            if s.run.trace and len(s.run.trace) >= len(s.run.generated):
                s.run.trace[len(s.run.generated) - 1].setdefault("chosen", tok)
        self.generated_tokens += 1
        whole = s.text.add(tok)  # False inside a multi-byte character: no stop-string check yet
        if whole and s.text.stopped:
            s.finishing = "stop"
        elif len(s.text.tokens) >= s.job.max_tokens or s.n_past + 1 >= self.ctx_per_seq:
            s.finishing = "length"
        s.pending = tok

    def _after_feed(self, s: _Slot, i: int) -> None:
        pos = s.n_past
        s.n_past += 1
        s.n_fed = len(s.text.tokens)
        self._read(s, i, pos)
        if s.finishing is not None:
            return self._complete(s, s.finishing)
        self._stream(s)
        self._sample(s, i)

    # ------------------------------------------------------------------
    # speculative decoding
    # ------------------------------------------------------------------
    def _draft(self, s: _Slot, room: int) -> List[int]:
        """Draft tokens to verify after ``s``'s pending token (none: no drafter, the request opted out,
        its last token, no room in the batch, the context or ``max_tokens``)."""
        n = s.job.draft_max if s.job.draft_max is not None else self.draft_max
        if self.drafter is None or n <= 0 or s.finishing is not None or room <= 0:
            return []
        n = min(n, room, s.job.max_tokens - len(s.text.tokens), self.ctx_per_seq - s.n_past - 2)
        if n <= 0:
            return []
        hist = np.asarray(s.job.prompt_tokens + s.text.tokens, dtype=np.intc)
        drafts: List[int] = []
        for t in np.asarray(self.drafter(hist)).tolist()[:n]:
            if not 0 <= int(t) < self.n_vocab:  # a drafter's bad id ends its draft
                break
            drafts.append(int(t))
        return drafts

    def _after_verify(self, s: _Slot, i0: int) -> None:
        """Rows ``i0 ..`` hold ``s``'s pending token and its drafts: each row is sampled as one
        non-speculative step would sample it (signal read, token chosen from its logits, guidance
        from its own signal row); a draft is kept while it is the token chosen before it. The cells
        of the drafts not kept are removed; their rows are never read."""
        drafts, s.drafts = s.drafts, []
        kept = 0
        for j in range(len(drafts) + 1):
            self._after_feed(s, i0 + j)
            if s not in self._slots or j == len(drafts) or s.pending != drafts[j]:
                break
            kept += 1
        self.drafted_tokens += len(drafts)
        self.accepted_tokens += kept
        if s in self._slots:
            llama_cpp.llama_memory_seq_rm(self._mem, s.seq, s.n_past, -1)

    def _candidates(self, s: _Slot) -> Optional[np.ndarray]:
        """Scalar-head guidance: this step's candidates (top_k by processed logit)."""
        if s.chain is not None and s.cand_array is None:
            s.cand_array = internals.LlamaTokenDataArray(n_vocab=self.n_vocab)
        cur = guided.constrained_logits(s.logits, LogitsProcessorList(s.procs) if s.procs else None, s.chain,
                                        s.cand_array)
        k = min(s.job.guidance.top_k, self.ctx_per_seq - s.n_past)
        ids = top_k_ids(cur, k)
        if ids.size == 0:
            self._finish(s, Failed(400, "guidance: no candidate token is left after logit_bias / grammar"))
            return None
        s.cur = cur
        return ids

    def _after_candidates(self, s: _Slot, i0: int) -> None:
        g, ids, n = s.job.guidance, s.cand, s.n_past
        hist = s.job.prompt_tokens + s.text.tokens
        sig = np.stack([self._src.read_row(i0 + j, lambda t=t: hist + [t])
                        for j, t in enumerate(ids.tolist())]).astype(np.float32)
        rewards = guided.candidate_rewards(g, sig, ids, s.store.get(n - 1), n - 1)
        j = guided.pick_candidate(g, ids, s.cur[ids], rewards, s.job.sampling.temperature, s.rng,
                                  s.run.trace if g.spec.trace else None)
        tok = int(ids[j])
        step_logits = s.logits
        s.logits = self._logits(i0 + j).copy()
        llama_cpp.llama_memory_seq_cp(self._mem, s.helpers[j], s.seq, n, n + 1)
        for h in s.helpers:
            llama_cpp.llama_memory_seq_rm(self._mem, h, -1, -1)
        if s.chain is not None:
            llama_cpp.llama_sampler_accept(s.chain.sampler, tok)
        if llama_cpp.llama_vocab_is_eog(self._vocab, tok):
            return self._complete(s, "stop")
        s.store.put(n, sig[j])
        self._accept(s, tok, step_logits)
        s.pending = None
        s.n_past = n + 1
        s.n_fed = len(s.text.tokens)
        if s.finishing is not None:
            return self._complete(s, s.finishing)
        self._stream(s)

    # ------------------------------------------------------------------
    # results
    # ------------------------------------------------------------------
    def _block(self, s: _Slot, start: int, count: int) -> Optional[dict]:
        if s.blocks is None:
            return None
        block = s.blocks.block(s.run, start, count)
        return block if s.job.heads is None else s.job.heads.block(block)

    def _logprobs(self, s: _Slot, start: int, count: int) -> Optional[dict]:
        """Completion tokens ``start ..``: their logprobs (with echo, the prompt's come before token 0)."""
        if s.lp is None:
            return None
        if start == 0 and s.lp0:
            return s.lp.completion(0, s.lp0 + count)
        return s.lp.completion(s.lp0 + start, count)

    def _stream(self, s: _Slot) -> None:
        if not s.job.stream:
            return
        delta, start, count = s.text.release(s.n_fed)
        if delta:
            s.job.sink(Delta(delta, self._block(s, start, count), logprobs=self._logprobs(s, start, count)))

    def _complete(self, s: _Slot, reason: str) -> None:
        t = s.text
        n_tok = len(t.tokens)
        if s.job.stream:
            delta, start, count = t.release(n_tok, final=True)
            done = Done(text=delta, otter=self._block(s, start, count), finish_reason=reason,
                        logprobs=self._logprobs(s, start, count))
        else:
            done = Done(text=s.job.echo_prefix + t.text, otter=self._block(s, 0, n_tok), finish_reason=reason,
                        logprobs=self._logprobs(s, 0, n_tok))
        done.prompt_tokens = len(s.job.prompt_tokens)
        done.cached_tokens = s.cached
        done.completion_tokens = n_tok
        done.first_token_s = s.first_token_s
        self._finish(s, done)
